"""Segment counting and address checks (core.sms): what a message costs and who may send it."""

import pytest

from core.sms import count_segments, is_messaging_service_sid, validate_e164

EMOJI = "\U0001f600"  # outside the BMP: two UTF-16 code units


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("a", (1, "GSM-7")),
        ("a" * 160, (1, "GSM-7")),
        ("a" * 161, (2, "GSM-7")),
        ("a" * 306, (2, "GSM-7")),
        ("a" * 307, (3, "GSM-7")),
        ("a" * 459, (3, "GSM-7")),
        ("a" * 460, (4, "GSM-7")),
        ("ΔΦΓΛΩΠΨΣΘΞ@£$¥èéùìòÇØøÅåÆæßÉ¤¡ÄÖÑÜ§¿äöñüà\n\r", (1, "GSM-7")),
    ],
)
def test_plain_gsm_bodies_fit_160_then_153_per_part(body, expected):
    assert count_segments(body) == expected


@pytest.mark.parametrize("char", list("^{}\\[~]|€\f"))
def test_extension_characters_take_two_septets(char):
    assert count_segments("a" * 158 + char) == (1, "GSM-7")  # 160 septets
    assert count_segments("a" * 159 + char) == (2, "GSM-7")  # 161 septets


def test_an_escape_pair_is_never_split_across_parts():
    # 306 septets would fit two 153-septet parts, but the € cannot straddle the first
    # boundary, so it starts the second part, which then overflows into a third.
    body = "a" * 152 + "€" + "a" * 152
    assert count_segments(body) == (3, "GSM-7")
    assert count_segments("a" * 151 + "€" + "a" * 153) == (2, "GSM-7")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("ж" * 70, (1, "UCS-2")),
        ("ж" * 71, (2, "UCS-2")),
        ("ж" * 134, (2, "UCS-2")),
        ("ж" * 135, (3, "UCS-2")),
        (EMOJI * 35, (1, "UCS-2")),  # 70 code units
        (EMOJI * 36, (2, "UCS-2")),
        (EMOJI * 67, (3, "UCS-2")),  # 134 units, but 33 whole emoji fit a part
    ],
    ids=[
        "70-cyrillic",
        "71-cyrillic",
        "134-cyrillic",
        "135-cyrillic",
        "35-emoji",
        "36-emoji",
        "67-emoji",
    ],
)
def test_ucs2_counts_utf16_code_units_70_then_67_per_part(body, expected):
    assert count_segments(body) == expected


def test_a_surrogate_pair_is_never_split_across_parts():
    body = "a" * 66 + EMOJI + "a" * 66  # 134 code units, yet three parts
    assert count_segments(body) == (3, "UCS-2")


@pytest.mark.parametrize("char", ["ж", "`", "\x1b", "á", "\u00a0"])
def test_one_character_outside_gsm7_makes_the_whole_body_ucs2(char):
    assert count_segments("a" * 69 + char) == (1, "UCS-2")
    assert count_segments("a" * 70 + char)[0] == 2


def test_empty_body_is_refused():
    with pytest.raises(ValueError, match="empty message body"):
        count_segments("")


@pytest.mark.parametrize("number", ["+14155550100", "+447911123456", "+12", "+123456789012345"])
def test_e164_numbers_are_returned_unchanged(number):
    assert validate_e164(number) == number


@pytest.mark.parametrize(
    "number",
    [
        "",
        "14155550100",
        "+04155550100",
        "+1 415 555 0100",
        "+1-415-555-0100",
        "+1234567890123456",  # 16 digits
        "+1",
        "+14155550100\n",
        "+١٤١٥٥٥٥٠١٠٠",  # non-ASCII digits
        None,
    ],
)
def test_malformed_numbers_are_refused(number):
    with pytest.raises(ValueError, match=r"not an E\.164 phone number"):
        validate_e164(number)


def test_messaging_service_sids():
    assert is_messaging_service_sid("MG" + "0123456789abcdef" * 2)
    assert is_messaging_service_sid("MG" + "0123456789ABCDEF" * 2)
    assert not is_messaging_service_sid("MG" + "a" * 31)
    assert not is_messaging_service_sid("MG" + "a" * 33)
    assert not is_messaging_service_sid("MG" + "g" * 32)
    assert not is_messaging_service_sid("PN" + "a" * 32)
    assert not is_messaging_service_sid("MG" + "a" * 32 + "\n")
    assert not is_messaging_service_sid("+14155550100")
    assert not is_messaging_service_sid(None)
