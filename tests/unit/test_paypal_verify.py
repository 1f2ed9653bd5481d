"""PayPal webhook verification without I/O: real simulator transmissions and generated keys."""

from __future__ import annotations

import base64
import json
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from werkzeug.datastructures import Headers

from core.providers.paypal.verify import (
    CertificateFetcher,
    InvalidWebhook,
    OfflineVerifier,
    PostbackVerifier,
    Transmission,
    TransmissionWindow,
    build_verifier,
    check_cert_url,
    check_transmission_time,
    expected_message,
    verify_signature,
)
from core.settings import ConfigError, Settings
from tests.support.fakes.paypal_api import make_signing_cert, sign_transmission

PAYPAL_PREFIXES = (
    "https://api.paypal.com/v1/notifications/certs/",
    "https://api.sandbox.paypal.com/v1/notifications/certs/",
)
FIXTURE_NAME = "simulator-transmissions.json"
# Kept in the repository (tests/fixtures/paypal/README.md says where it comes from): a fresh
# clone has everything its tests read.
FIXTURE_PATH = Path(__file__).resolve().parents[1] / "fixtures" / "paypal" / FIXTURE_NAME

SIMULATOR = json.loads(FIXTURE_PATH.read_text())
WEBHOOK_ID = SIMULATOR["webhook_id"]
TRANSMISSIONS = {t["name"]: t for t in SIMULATOR["transmissions"]}
NAMES = sorted(TRANSMISSIONS)


def transmission(name: str) -> tuple[dict[str, str], bytes]:
    t = TRANSMISSIONS[name]
    return dict(t["headers"]), base64.b64decode(t["body_b64"])


def sent_at(headers: dict[str, str]) -> datetime:
    return datetime.fromisoformat(headers["paypal-transmission-time"].replace("Z", "+00:00"))


class CountingFetcher:
    """A certificate source that never touches the network and counts requests."""

    def __init__(self, certs: dict[str, bytes]) -> None:
        self.certs = certs
        self.requested: list[str] = []

    def get(self, url: str) -> bytes:
        self.requested.append(url)
        return self.certs[url]


@pytest.fixture
def seeded_fetcher() -> CertificateFetcher:
    fetcher = CertificateFetcher(PAYPAL_PREFIXES)
    for url, pem in SIMULATOR["certificates"].items():
        fetcher.preload(url, pem.encode())
    return fetcher


def verifier_at(fetcher, when: datetime, webhook_id: str = WEBHOOK_ID) -> OfflineVerifier:
    return OfflineVerifier(webhook_id, fetcher, clock=lambda: when)


# --------------------------------------------------------------------------- simulator


@pytest.mark.parametrize("name", NAMES)
def test_every_simulator_transmission_verifies(name, seeded_fetcher):
    headers, body = transmission(name)
    verifier_at(seeded_fetcher, sent_at(headers)).verify(headers, body)


@pytest.mark.parametrize("name", NAMES)
def test_one_byte_change_to_any_body_fails(name, seeded_fetcher):
    headers, body = transmission(name)
    tampered = bytearray(body)
    tampered[len(body) // 2] ^= 0x01
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(seeded_fetcher, sent_at(headers)).verify(headers, bytes(tampered))
    assert exc.value.cause == "signature"


def _change_one_char(value: str) -> str:
    # Change the first alphanumeric character; stays base64 / stays a plausible id or time.
    for i, ch in enumerate(value):
        if ch.isalnum():
            replacement = (
                "B" if ch == "A" else ("1" if ch == "0" else ("A" if ch.isalpha() else "0"))
            )
            return value[:i] + replacement + value[i + 1 :]
    raise AssertionError(value)


@pytest.mark.parametrize(
    "header", ["paypal-transmission-id", "paypal-transmission-time", "paypal-transmission-sig"]
)
@pytest.mark.parametrize("name", NAMES)
def test_one_change_to_any_signed_header_fails(name, header, seeded_fetcher):
    headers, body = transmission(name)
    clock = sent_at(headers)
    headers[header] = _change_one_char(headers[header])
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(seeded_fetcher, clock).verify(headers, body)
    assert exc.value.cause == "signature"


@pytest.mark.parametrize("name", NAMES)
def test_verify_returns_the_transmission_exactly_as_received(name, seeded_fetcher):
    headers, body = transmission(name)
    verified = verifier_at(seeded_fetcher, sent_at(headers)).verify(headers, body)
    assert verified == Transmission(headers["paypal-transmission-id"], sent_at(headers))


@pytest.mark.parametrize(
    "header",
    [
        "paypal-transmission-id",
        "paypal-transmission-time",
        "paypal-transmission-sig",
        "paypal-cert-url",
        "paypal-auth-algo",
    ],
)
@pytest.mark.parametrize("pad", [" {}", "{} ", "\t{}", "{}\t", "{}\xa0", "\x85{}", "{}\u3000"])
def test_padding_around_any_paypal_header_is_refused_before_any_fetch(header, pad):
    # Before, values were verified after .strip() (which also removes \xa0 and \x85, as WSGI
    # delivers raw 0xA0 / 0x85 bytes) but stored as received.
    headers, body = transmission(NAMES[0])
    clock = sent_at(headers)
    headers[header] = pad.format(headers[header])
    fetcher = CountingFetcher({})
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(fetcher, clock).verify(headers, body)
    assert exc.value.cause == "headers"
    assert fetcher.requested == []


@pytest.mark.parametrize("junk", ["\xe9", "\x00", "\x7f", "\u0130", " ", "\n"])
def test_non_ascii_or_control_characters_inside_a_header_are_refused(junk):
    headers, body = transmission(NAMES[0])
    clock = sent_at(headers)
    headers["paypal-transmission-id"] = headers["paypal-transmission-id"][:5] + junk
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(CountingFetcher({}), clock).verify(headers, body)
    assert exc.value.cause == "headers"


def test_a_header_sent_twice_is_refused(seeded_fetcher):
    headers, body = transmission(NAMES[0])
    doubled = Headers(list(headers.items()))
    doubled.add("PAYPAL-TRANSMISSION-ID", "some-other-id")
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(seeded_fetcher, sent_at(headers)).verify(doubled, body)
    assert exc.value.cause == "headers"


@pytest.mark.parametrize(
    "value", ["yesterday", "2024-08-02 19:34:57Z", "2024-08-02T19:34:57", "2024-13-02T19:34:57Z"]
)
def test_transmission_time_that_is_not_an_rfc3339_utc_time_is_refused(value):
    headers, body = transmission(NAMES[0])
    clock = sent_at(headers)
    headers["paypal-transmission-time"] = value
    fetcher = CountingFetcher({})
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(fetcher, clock).verify(headers, body)
    assert exc.value.cause == "headers"
    assert fetcher.requested == []


@pytest.mark.parametrize(
    ("delay", "accepted"),
    [
        (timedelta(0), True),
        (timedelta(days=3, hours=12), True),  # PayPal's last retry: 25 tries over 3 days
        (timedelta(days=4), True),
        (timedelta(days=4, seconds=1), False),
        (timedelta(minutes=-5), True),
        (timedelta(minutes=-5, seconds=-1), False),
    ],
)
def test_a_genuine_transmission_verifies_only_inside_the_window(seeded_fetcher, delay, accepted):
    headers, body = transmission(NAMES[0])
    verifier = verifier_at(seeded_fetcher, sent_at(headers) + delay)
    if accepted:
        verifier.verify(headers, body)
    else:
        with pytest.raises(InvalidWebhook) as exc:
            verifier.verify(headers, body)
        assert exc.value.cause == "time"


def test_window_is_configurable():
    sent = datetime(2026, 1, 1, tzinfo=UTC)
    narrow = TransmissionWindow(max_age=timedelta(hours=1), max_skew=timedelta(0))
    check_transmission_time(sent, sent + timedelta(hours=1), narrow)
    for now in (sent + timedelta(hours=1, seconds=1), sent - timedelta(seconds=1)):
        with pytest.raises(InvalidWebhook):
            check_transmission_time(sent, now, narrow)


def test_transmission_after_certificate_expiry_fails(seeded_fetcher):
    headers, body = transmission(NAMES[0])
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(seeded_fetcher, datetime(2025, 3, 8, tzinfo=UTC)).verify(headers, body)
    assert exc.value.cause == "certificate"


def test_wrong_webhook_id_fails(seeded_fetcher):
    headers, body = transmission(NAMES[0])
    verifier = verifier_at(seeded_fetcher, sent_at(headers), webhook_id="WH-SOMEONE-ELSE")
    with pytest.raises(InvalidWebhook) as exc:
        verifier.verify(headers, body)
    assert exc.value.cause == "signature"


def test_headers_are_matched_case_insensitively_from_a_request_headers_object(seeded_fetcher):
    headers, body = transmission(NAMES[0])
    shouted = Headers([(k.upper(), v) for k, v in headers.items()])
    verifier_at(seeded_fetcher, sent_at(headers)).verify(shouted, body)


@pytest.mark.parametrize(
    "missing",
    [
        "paypal-transmission-id",
        "paypal-transmission-time",
        "paypal-transmission-sig",
        "paypal-cert-url",
        "paypal-auth-algo",
    ],
)
def test_missing_header_is_refused_before_any_fetch(missing):
    headers, body = transmission(NAMES[0])
    clock = sent_at(headers)
    del headers[missing]
    fetcher = CountingFetcher({})
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(fetcher, clock).verify(headers, body)
    assert exc.value.cause == "headers"
    assert fetcher.requested == []


def test_unsupported_auth_algo_is_refused(seeded_fetcher):
    headers, body = transmission(NAMES[0])
    headers["paypal-auth-algo"] = "SHA1withRSA"
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(seeded_fetcher, sent_at(headers)).verify(headers, body)
    assert exc.value.cause == "headers"


def test_signature_that_is_not_base64_is_refused(seeded_fetcher):
    headers, body = transmission(NAMES[0])
    headers["paypal-transmission-sig"] = "not-base64!"
    with pytest.raises(InvalidWebhook) as exc:
        verifier_at(seeded_fetcher, sent_at(headers)).verify(headers, body)
    assert exc.value.cause == "signature"


def test_expected_message_uses_unsigned_decimal_crc32():
    assert zlib.crc32(b"a") > 2**31  # the signed form would be negative
    assert expected_message("id-1", "2024-08-02T19:34:57Z", "WH", b"a") == (
        b"id-1|2024-08-02T19:34:57Z|WH|3904355907"
    )


# --------------------------------------------------------------------------- generated keys

CERT_URL = "https://api.paypal.com/v1/notifications/certs/CERT-generated"
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def signer():
    return make_signing_cert()


def test_generated_signature_verifies(signer):
    body = b'{"id":"WH-1"}'
    headers = sign_transmission(signer.key, "WH-ID", body, CERT_URL)
    verify_signature(signer.cert_pem, headers, body, "WH-ID", NOW)


def test_certificate_for_another_name_is_refused(signer):
    impostor = make_signing_cert("messageverificationcerts.paypal.com.evil.test", key=signer.key)
    body = b"{}"
    headers = impostor.sign("WH-ID", body, CERT_URL)
    with pytest.raises(InvalidWebhook) as exc:
        verify_signature(impostor.cert_pem, headers, body, "WH-ID", NOW)
    assert exc.value.cause == "certificate"


def test_certificate_naming_paypal_only_in_san_is_accepted(signer):
    san_only = make_signing_cert(
        "PayPal message verification",
        key=signer.key,
        san_dns=("messageverificationcerts.paypal.com",),
    )
    body = b"{}"
    verify_signature(san_only.cert_pem, san_only.sign("WH-ID", body, CERT_URL), body, "WH-ID", NOW)


def test_certificate_not_yet_valid_is_refused(signer):
    future = make_signing_cert(key=signer.key, not_before=NOW + timedelta(days=1))
    body = b"{}"
    with pytest.raises(InvalidWebhook) as exc:
        verify_signature(future.cert_pem, future.sign("WH-ID", body, CERT_URL), body, "WH-ID", NOW)
    assert exc.value.cause == "certificate"


def test_signature_by_another_key_is_refused(signer):
    other = make_signing_cert()
    body = b"{}"
    headers = other.sign("WH-ID", body, CERT_URL)
    with pytest.raises(InvalidWebhook) as exc:
        verify_signature(signer.cert_pem, headers, body, "WH-ID", NOW)
    assert exc.value.cause == "signature"


def test_non_rsa_certificate_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "messageverificationcerts.paypal.com")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    headers = {
        "PAYPAL-TRANSMISSION-ID": "x",
        "PAYPAL-TRANSMISSION-TIME": "t",
        "PAYPAL-TRANSMISSION-SIG": "AAAA",
        "PAYPAL-AUTH-ALGO": "SHA256withRSA",
    }
    with pytest.raises(InvalidWebhook) as exc:
        verify_signature(cert.public_bytes(Encoding.PEM), headers, b"{}", "WH", NOW)
    assert exc.value.cause == "certificate"


def test_garbage_certificate_is_refused(signer):
    body = b"{}"
    with pytest.raises(InvalidWebhook) as exc:
        verify_signature(b"<html>hi</html>", signer.sign("WH", body, CERT_URL), body, "WH", NOW)
    assert exc.value.cause == "certificate"


def test_naive_clock_is_a_programming_error(signer):
    body = b"{}"
    with pytest.raises(ValueError, match="aware"):
        verify_signature(
            signer.cert_pem,
            signer.sign("WH", body, CERT_URL),
            body,
            "WH",
            datetime.now(UTC).replace(tzinfo=None),
        )


# --------------------------------------------------------------------------- cert URL allowlist


@pytest.mark.parametrize(
    "url",
    [
        "https://api.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-1a5f47cb",
        "https://api.sandbox.paypal.com/v1/notifications/certs/CERT-1",
        "https://API.PayPal.com/v1/notifications/certs/CERT-1",
        "https://api.paypal.com:443/v1/notifications/certs/CERT-1",
    ],
)
def test_paypal_certificate_urls_are_allowed(url):
    check_cert_url(url, PAYPAL_PREFIXES)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.paypal.com.evil.test/v1/notifications/certs/CERT-1",
        "https://evil.test/v1/notifications/certs/CERT-1",
        "https://evilapi.paypal.com/v1/notifications/certs/CERT-1",
        "https://api.paypal.com./v1/notifications/certs/CERT-1",
        "https://user@api.paypal.com/v1/notifications/certs/CERT-1",
        "https://api.paypal.com:pw@evil.test/v1/notifications/certs/CERT-1",
        "https://api.paypal.com@evil.test/v1/notifications/certs/CERT-1",
        "http://api.paypal.com/v1/notifications/certs/CERT-1",
        "ftp://api.paypal.com/v1/notifications/certs/CERT-1",
        "//api.paypal.com/v1/notifications/certs/CERT-1",
        "https://api.paypal.com:8443/v1/notifications/certs/CERT-1",
        "https://api.paypal.com:80/v1/notifications/certs/CERT-1",
        "https://api.paypal.com:99999/v1/notifications/certs/CERT-1",
        "https://api.paypal.com/v1/notifications/certs/../x",
        "https://api.paypal.com/v1/notifications/certs/./CERT-1",
        "https://api.paypal.com/v1/notifications/certs/CERT-1/..",
        "https://api.paypal.com/v1/notifications/certs//CERT-1",
        "https://api.paypal.com/v1/notifications/certs/%2e%2e/x",
        "https://api.paypal.com/v1/notifications/certs/..%2fx",
        "https://api.paypal.com/v1/notifications/certs/%2E%2E%2Fx",
        "https://api.paypal.com/v1/notifications/certs/..\\x",
        "https://api.paypal.com/v1/notifications/certs\\..\\x",
        "https://api.paypal.com/v1/notifications/certs/CERT-1?x=1",
        "https://api.paypal.com/v1/notifications/certs/CERT-1?",
        "https://api.paypal.com/v1/notifications/certs/CERT-1#frag",
        "https://api.paypal.com/v1/notifications/certs/CERT-1;type=a",
        "https://api.paypal.com/v1/notifications/certs/",
        "https://api.paypal.com/v1/notifications/certsevil/CERT-1",
        "https://api.paypal.com/v1/notifications/CERT-1",
        "https://api.paypal.com/v1/notifications/certs/CERT 1",
        "https://api.paypal.com/v1/notifications/certs/CERT-\u00e9",
        " https://api.paypal.com/v1/notifications/certs/CERT-1",
        "https://api.paypal.com/v1/notifications/certs/CERT-1\n",
        "",
        "https://api.paypal.com/v1/notifications/certs/" + "a" * 3000,
    ],
)
def test_certificate_urls_outside_the_prefixes_are_refused(url):
    with pytest.raises(InvalidWebhook) as exc:
        check_cert_url(url, PAYPAL_PREFIXES)
    assert exc.value.cause == "cert_url"


def test_plain_http_is_allowed_only_where_a_prefix_says_http():
    prefix = ("http://127.0.0.1:8123/v1/notifications/certs/",)
    check_cert_url("http://127.0.0.1:8123/v1/notifications/certs/CERT-1", prefix)
    for url in (
        "https://127.0.0.1:8123/v1/notifications/certs/CERT-1",
        "http://127.0.0.1:8124/v1/notifications/certs/CERT-1",
        "http://127.0.0.1/v1/notifications/certs/CERT-1",
        "http://localhost:8123/v1/notifications/certs/CERT-1",
    ):
        with pytest.raises(InvalidWebhook):
            check_cert_url(url, prefix)


def test_a_prefix_without_trailing_slash_is_still_a_directory():
    check_cert_url("https://h.test/certs/CERT-1", ["https://h.test/certs"])
    with pytest.raises(InvalidWebhook):
        check_cert_url("https://h.test/certsevil/CERT-1", ["https://h.test/certs"])


@pytest.mark.parametrize(
    "prefix",
    ["ftp://h.test/certs/", "https:///certs/", "https://u@h.test/certs/", "https://h.test/c?x"],
)
def test_malformed_prefix_is_a_configuration_error(prefix):
    with pytest.raises(ValueError, match="certificate URL prefix must be"):
        CertificateFetcher([prefix])


def test_preload_refuses_a_url_outside_the_prefixes_and_a_non_certificate(signer):
    fetcher = CertificateFetcher(PAYPAL_PREFIXES)
    with pytest.raises(InvalidWebhook):
        fetcher.preload("https://evil.test/v1/notifications/certs/CERT-1", signer.cert_pem)
    with pytest.raises(InvalidWebhook):
        fetcher.preload(CERT_URL, b"not a certificate")


def test_url_outside_prefixes_is_refused_even_if_the_certificate_is_known(signer):
    # The fetcher's allowlist runs before its cache: a seeded URL is no way around it.
    fetcher = CertificateFetcher(PAYPAL_PREFIXES)
    fetcher.preload(CERT_URL, signer.cert_pem)
    body = b"{}"
    headers = signer.sign(
        "WH", body, CERT_URL.replace("api.paypal.com", "api.paypal.com.evil.test")
    )
    with pytest.raises(InvalidWebhook) as exc:
        OfflineVerifier("WH", fetcher).verify(headers, body)
    assert exc.value.cause == "cert_url"


# --------------------------------------------------------------------------- build_verifier


def _settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


def test_build_verifier_defaults_to_offline_with_the_configured_prefixes(signer):
    verifier = build_verifier(_settings(PAYPAL_WEBHOOK_ID="WH"), clock=lambda: NOW)
    assert isinstance(verifier, OfflineVerifier)
    assert verifier.clock() == NOW
    verifier.fetcher.preload(CERT_URL, signer.cert_pem)
    body = b'{"ok":true}'
    # Signed at the verifier's clock: NOW is fixed at import, and a full run reaches this test
    # minutes later, beyond the allowed skew of a transmission signed "now".
    verifier.verify(signer.sign("WH", body, CERT_URL, time=NOW), body)


def test_build_verifier_reads_the_transmission_window():
    verifier = build_verifier(
        _settings(
            PAYPAL_WEBHOOK_ID="WH",
            PAYPAL_TRANSMISSION_MAX_AGE_SECONDS=60,
            PAYPAL_TRANSMISSION_MAX_SKEW_SECONDS=7,
        )
    )
    assert verifier.window == TransmissionWindow(timedelta(seconds=60), timedelta(seconds=7))
    default = build_verifier(_settings(PAYPAL_WEBHOOK_ID="WH")).window
    assert default.max_age >= timedelta(days=3, hours=12)


def test_build_verifier_postback():
    verifier = build_verifier(
        _settings(
            PAYPAL_WEBHOOK_ID="WH",
            PAYPAL_VERIFY="postback",
            PAYPAL_API_BASE="https://api-m.sandbox.paypal.com/",
            PAYPAL_CLIENT_ID="id",
            PAYPAL_CLIENT_SECRET="secret",
        )
    )
    assert isinstance(verifier, PostbackVerifier)
    assert verifier.api_base == "https://api-m.sandbox.paypal.com"


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        ({}, "PAYPAL_WEBHOOK_ID"),
        ({"PAYPAL_WEBHOOK_ID": "WH", "PAYPAL_VERIFY": "postback"}, "PAYPAL_CLIENT_ID"),
        (
            {"PAYPAL_WEBHOOK_ID": "WH", "PAYPAL_VERIFY": "postback", "PAYPAL_CLIENT_ID": "id"},
            "PAYPAL_CLIENT_SECRET",
        ),
    ],
)
def test_build_verifier_names_the_missing_variable(values, missing, monkeypatch):
    for name in ("PAYPAL_WEBHOOK_ID", "PAYPAL_CLIENT_ID", "PAYPAL_CLIENT_SECRET", "PAYPAL_VERIFY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=missing):
        build_verifier(_settings(**values))


def test_build_verifier_reads_the_certificate_fetch_budget():
    verifier = build_verifier(_settings(PAYPAL_WEBHOOK_ID="WH", PAYPAL_CERT_FETCH_BUDGET=3))
    assert verifier.fetcher._max_new_urls == 3
