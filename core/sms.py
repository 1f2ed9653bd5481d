"""SMS arithmetic and address checks: segments per body, E.164 numbers, Messaging Service SIDs.

Pure standard library. Segment counts decide what a message costs, so they follow what
Twilio and the carriers bill: GSM-7 when every character is in the GSM 03.38 basic set or
its extension table (extension characters take two septets, an escape and the character),
UCS-2 otherwise (UTF-16 code units, so an emoji outside the BMP takes two). A concatenated
message loses room to its User Data Header, and a part never ends in the middle of an
escape pair or a surrogate pair: the whole character moves to the next part.
"""

from __future__ import annotations

import re

GSM7 = "GSM-7"
UCS2 = "UCS-2"

# GSM 03.38 basic character set, without the escape (0x1B) itself: a literal ESC in a body
# cannot be sent as text, so a body containing one is not GSM-7.
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The extension table: each is sent as ESC + character, two septets.
_GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

GSM7_SINGLE = 160
GSM7_PART = 153
UCS2_SINGLE = 70
UCS2_PART = 67

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_MESSAGING_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")


def count_segments(body: str) -> tuple[int, str]:
    """Return (segments, encoding) for a body; encoding is "GSM-7" or "UCS-2".

    Raises ValueError for an empty body: it cannot be sent and must not be priced.
    """
    if not body:
        raise ValueError("empty message body")
    if all(c in _GSM7_BASIC or c in _GSM7_EXTENSION for c in body):
        units = [2 if c in _GSM7_EXTENSION else 1 for c in body]
        return _segments(units, GSM7_SINGLE, GSM7_PART), GSM7
    units = [2 if ord(c) > 0xFFFF else 1 for c in body]
    return _segments(units, UCS2_SINGLE, UCS2_PART), UCS2


def _segments(units: list[int], single: int, part: int) -> int:
    """Greedy split: a character that does not fit whole starts the next part."""
    if sum(units) <= single:
        return 1
    parts, used = 1, 0
    for cost in units:
        if used + cost > part:
            parts, used = parts + 1, 0
        used += cost
    return parts


def validate_e164(s: str) -> str:
    """Return s if it is an E.164 number (+, country code, at most 15 digits), else ValueError."""
    if not isinstance(s, str) or not _E164.fullmatch(s):
        raise ValueError(f"not an E.164 phone number: {s!r}")
    return s


def is_messaging_service_sid(s: str) -> bool:
    """True for a Twilio Messaging Service SID: "MG" and 32 hexadecimal digits."""
    return isinstance(s, str) and _MESSAGING_SERVICE_SID.fullmatch(s) is not None
