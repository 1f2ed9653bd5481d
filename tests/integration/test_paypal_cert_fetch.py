"""PayPal verification over real sockets on 127.0.0.1: certificate fetching and postback.

No PostgreSQL or Redis needed; every server here is a local fake from tests.support.fakes.
"""

from __future__ import annotations

import socket
import threading

import pytest

from core.providers.paypal.verify import (
    CertificateFetcher,
    InvalidWebhook,
    OfflineVerifier,
    PostbackVerifier,
    VerificationUnavailable,
)
from tests.support.fakes.paypal_api import CERTS_PATH, FakePayPal, LocalCA, make_signing_cert

WEBHOOK_ID = "WH-TEST-1"
BODY = b'{"id":"WH-1","event_type":"PAYMENT.CAPTURE.COMPLETED"}'


@pytest.fixture(scope="module")
def signer():
    return make_signing_cert()


@pytest.fixture(scope="module")
def ca():
    return LocalCA()


@pytest.fixture
def paypal():
    with FakePayPal(webhook_id=WEBHOOK_ID) as server:
        yield server


@pytest.fixture
def https_paypal(ca):
    with FakePayPal(webhook_id=WEBHOOK_ID, ssl_context=ca.server_context()) as server:
        yield server


def offline(prefixes, **fetcher_options) -> OfflineVerifier:
    return OfflineVerifier(WEBHOOK_ID, CertificateFetcher(prefixes, **fetcher_options))


class Clock:
    """A monotonic clock the test moves: failures are remembered for ``FAILURE_TTL``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def pass_failure_ttl(self) -> None:
        self.now += FAILURE_TTL + 1


FAILURE_TTL = 30.0


# --------------------------------------------------------------------------- allowlist


def test_url_outside_the_prefixes_is_never_fetched(paypal, signer):
    cert_url = paypal.install_signing_cert(signer)
    verifier = offline(["https://api.paypal.com/v1/notifications/certs/"])
    with pytest.raises(InvalidWebhook) as exc:
        verifier.verify(signer.sign(WEBHOOK_ID, BODY, cert_url), BODY)
    assert exc.value.cause == "cert_url"
    assert sum(paypal.cert_hits.values()) == 0
    assert paypal.connections == 0


@pytest.mark.parametrize(
    "trick",
    [
        "{base}/v1/notifications/certs/../secret",
        "{base}/v1/notifications/certs/%2e%2e/secret",
        "{base}/v1/notifications/certs/..%2Fsecret",
        "{base}/v1/notifications/certs/CERT-fake-paypal?x=1",
        "{base}/v1/notifications/certsX/CERT-fake-paypal",
        "http://user@127.0.0.1:{port}/v1/notifications/certs/CERT-fake-paypal",
        "https://127.0.0.1:{port}/v1/notifications/certs/CERT-fake-paypal",
        "http://127.0.0.1:{other_port}/v1/notifications/certs/CERT-fake-paypal",
        "http://localhost:{port}/v1/notifications/certs/CERT-fake-paypal",
        "http://127.0.0.1.evil.test:{port}/v1/notifications/certs/CERT-fake-paypal",
    ],
)
def test_url_tricks_are_refused_without_a_single_connection(paypal, signer, trick):
    paypal.install_signing_cert(signer)
    paypal.serve("/secret", signer.cert_pem)
    url = trick.format(base=paypal.base_url, port=paypal.port, other_port=paypal.port + 1)
    verifier = offline([paypal.cert_prefix])
    with pytest.raises(InvalidWebhook) as exc:
        verifier.verify(signer.sign(WEBHOOK_ID, BODY, url), BODY)
    assert exc.value.cause == "cert_url"
    assert paypal.connections == 0


# --------------------------------------------------------------------------- fetching


def test_fetch_over_https_with_the_configured_ca_bundle_verifies(
    https_paypal, ca, signer, tmp_path
):
    cert_url = https_paypal.install_signing_cert(signer)
    verifier = offline([https_paypal.cert_prefix], ca_bundle=ca.write_bundle(tmp_path))
    verifier.verify(signer.sign(WEBHOOK_ID, BODY, cert_url), BODY)
    assert https_paypal.cert_hits[CERTS_PATH + "CERT-fake-paypal"] == 1


def test_untrusted_ca_is_verification_unavailable_and_remembered_only_briefly(
    https_paypal, signer, tmp_path
):
    # Decision: the URL is already one of the allowed PayPal prefixes, so a TLS failure is our
    # network or CA bundle, not a forged request. 503 lets PayPal retry once it is fixed.
    cert_url = https_paypal.install_signing_cert(signer)
    stranger = LocalCA("Some Other CA")
    clock = Clock()
    verifier = offline(
        [https_paypal.cert_prefix],
        ca_bundle=stranger.write_bundle(tmp_path),
        failure_ttl=FAILURE_TTL,
        monotonic=clock,
    )
    headers = signer.sign(WEBHOOK_ID, BODY, cert_url)
    for pause in (None, None, clock.pass_failure_ttl):
        if pause:
            pause()
        with pytest.raises(VerificationUnavailable):
            verifier.verify(headers, BODY)
    assert sum(https_paypal.cert_hits.values()) == 0  # no HTTP request got past the handshake
    assert https_paypal.connections == 2  # remembered for a while, then tried again


def test_system_trust_store_does_not_trust_a_local_ca(https_paypal, signer):
    cert_url = https_paypal.install_signing_cert(signer)
    with pytest.raises(VerificationUnavailable):
        offline([https_paypal.cert_prefix]).verify(signer.sign(WEBHOOK_ID, BODY, cert_url), BODY)


def test_second_verify_makes_no_second_fetch(paypal, signer):
    cert_url = paypal.install_signing_cert(signer)
    verifier = offline([paypal.cert_prefix])
    verifier.verify(signer.sign(WEBHOOK_ID, BODY, cert_url), BODY)
    other = b'{"id":"WH-2"}'
    verifier.verify(signer.sign(WEBHOOK_ID, other, cert_url), other)
    assert paypal.cert_hits[CERTS_PATH + "CERT-fake-paypal"] == 1


def _verify_concurrently(verifier, headers, body, threads: int = 8) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def run() -> None:
        start.wait()
        try:
            verifier.verify(headers, body)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return errors


def test_concurrent_first_verifies_fetch_once(paypal, signer):
    cert_url = paypal.serve(CERTS_PATH + "CERT-slow", signer.cert_pem, delay=0.2)
    verifier = offline([paypal.cert_prefix])
    errors = _verify_concurrently(verifier, signer.sign(WEBHOOK_ID, BODY, cert_url), BODY)
    assert errors == []
    assert paypal.cert_hits[CERTS_PATH + "CERT-slow"] == 1


def test_concurrent_first_verifies_share_one_failure_and_the_next_one_retries(paypal, signer):
    cert_url = paypal.serve(CERTS_PATH + "CERT-down", b"busy", status=503, delay=0.2)
    clock = Clock()
    verifier = offline([paypal.cert_prefix], failure_ttl=FAILURE_TTL, monotonic=clock)
    headers = signer.sign(WEBHOOK_ID, BODY, cert_url)
    errors = _verify_concurrently(verifier, headers, BODY)
    assert len(errors) == 8
    assert all(isinstance(e, VerificationUnavailable) for e in errors)
    assert paypal.cert_hits[CERTS_PATH + "CERT-down"] == 1

    paypal.serve_cert(CERTS_PATH + "CERT-down", signer.cert_pem)
    with pytest.raises(VerificationUnavailable):
        verifier.verify(headers, BODY)  # the failure is remembered for a while
    clock.pass_failure_ttl()
    verifier.verify(headers, BODY)
    assert paypal.cert_hits[CERTS_PATH + "CERT-down"] == 2


def test_redirect_is_not_followed(paypal, signer):
    target = paypal.serve_cert("/elsewhere/cert.pem", signer.cert_pem)
    cert_url = paypal.serve(CERTS_PATH + "CERT-moved", status=302, headers={"Location": target})
    with pytest.raises(InvalidWebhook) as exc:
        offline([paypal.cert_prefix]).verify(signer.sign(WEBHOOK_ID, BODY, cert_url), BODY)
    assert exc.value.cause == "cert_url"
    assert paypal.cert_hits["/elsewhere/cert.pem"] == 0


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "streamed"])
def test_oversized_certificate_is_refused_and_not_cached(paypal, signer, send_length):
    huge = signer.cert_pem + b"\n" * (64 * 1024)
    cert_url = paypal.serve(CERTS_PATH + "CERT-huge", huge, send_length=send_length)
    clock = Clock()
    verifier = offline([paypal.cert_prefix], failure_ttl=FAILURE_TTL, monotonic=clock)
    headers = signer.sign(WEBHOOK_ID, BODY, cert_url)
    for pause in (None, None, clock.pass_failure_ttl):
        if pause:
            pause()
        with pytest.raises(InvalidWebhook) as exc:
            verifier.verify(headers, BODY)
        assert exc.value.cause == "certificate"
    assert paypal.cert_hits[CERTS_PATH + "CERT-huge"] == 2


def test_certificate_just_under_the_limit_is_accepted(paypal, signer):
    padded = signer.cert_pem + b"\n" * (1024 - len(signer.cert_pem) % 1024)
    cert_url = paypal.serve(CERTS_PATH + "CERT-padded", padded)
    verifier = OfflineVerifier(
        WEBHOOK_ID, CertificateFetcher([paypal.cert_prefix], max_bytes=len(padded))
    )
    verifier.verify(signer.sign(WEBHOOK_ID, BODY, cert_url), BODY)


def test_answer_that_is_not_a_certificate_is_refused_and_not_cached(paypal, signer):
    cert_url = paypal.serve(CERTS_PATH + "CERT-html", b"<html>maintenance</html>")
    clock = Clock()
    verifier = offline([paypal.cert_prefix], failure_ttl=FAILURE_TTL, monotonic=clock)
    headers = signer.sign(WEBHOOK_ID, BODY, cert_url)
    for pause in (None, None, clock.pass_failure_ttl):
        if pause:
            pause()
        with pytest.raises(InvalidWebhook) as exc:
            verifier.verify(headers, BODY)
        assert exc.value.cause == "certificate"
    assert paypal.cert_hits[CERTS_PATH + "CERT-html"] == 2


@pytest.mark.parametrize("status", [404, 500, 503])
def test_certificate_host_error_is_verification_unavailable(paypal, signer, status):
    cert_url = paypal.serve(CERTS_PATH + "CERT-x", b"nope", status=status)
    with pytest.raises(VerificationUnavailable):
        offline([paypal.cert_prefix]).verify(signer.sign(WEBHOOK_ID, BODY, cert_url), BODY)


def test_certificate_host_down_is_verification_unavailable(signer):
    with FakePayPal() as gone:
        prefix = gone.cert_prefix
    cert_url = prefix + "CERT-1"
    with pytest.raises(VerificationUnavailable):
        offline([prefix]).verify(signer.sign(WEBHOOK_ID, BODY, cert_url), BODY)


def test_certificate_host_that_never_answers_times_out_as_unavailable(signer):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # accepts the TCP connection, never says a word
        prefix = f"http://127.0.0.1:{silent.getsockname()[1]}{CERTS_PATH}"
        verifier = offline([prefix], timeout=0.3)
        with pytest.raises(VerificationUnavailable):
            verifier.verify(signer.sign(WEBHOOK_ID, BODY, prefix + "CERT-1"), BODY)


# --------------------------------------------------------------------------- postback

# Unusual spacing, key order, escapes and raw UTF-8: any re-serialization changes these bytes.
ODD_BODY = (
    '{ "summary" :"Caf\u00e9 \\u00e9 \u2603 \\ud83d\\ude00",\n\t"id":"WH-ODD",'
    '  "resource":{"amount":{"value":"10.10" ,"currency_code":"EUR"}, "n": 1.0e2 },'
    '"event_type":"PAYMENT.CAPTURE.COMPLETED"   }\n'
).encode()


def postback(paypal: FakePayPal, **options) -> PostbackVerifier:
    return PostbackVerifier(
        paypal.base_url, paypal.client_id, paypal.client_secret, WEBHOOK_ID, timeout=2, **options
    )


def test_postback_splices_the_raw_body_byte_identical(paypal, signer):
    paypal.register_event(ODD_BODY)
    headers = signer.sign(WEBHOOK_ID, ODD_BODY, "https://api.paypal.com/v1/notifications/certs/C")
    postback(paypal).verify(headers, ODD_BODY)
    assert paypal.verify_hits == 1
    assert ODD_BODY in paypal.verify_requests[0]


def test_postback_failure_is_invalid_webhook(paypal, signer):
    paypal.register_event(ODD_BODY)
    equivalent_but_reformatted = b'{"summary": "Caf\\u00e9", "id": "WH-ODD"}'
    headers = signer.sign(WEBHOOK_ID, equivalent_but_reformatted, "https://x.test/c")
    with pytest.raises(InvalidWebhook) as exc:
        postback(paypal).verify(headers, equivalent_but_reformatted)
    assert exc.value.cause == "signature"


def test_postback_reuses_its_oauth_token(paypal, signer):
    paypal.register_event(BODY)
    verifier = postback(paypal)
    for _ in range(3):
        verifier.verify(signer.sign(WEBHOOK_ID, BODY, "https://x.test/c"), BODY)
    assert paypal.oauth_hits == 1
    assert paypal.verify_hits == 3


def test_postback_refreshes_a_revoked_token_once(paypal, signer):
    paypal.register_event(BODY)
    verifier = postback(paypal)
    headers = signer.sign(WEBHOOK_ID, BODY, "https://x.test/c")
    verifier.verify(headers, BODY)
    paypal.revoke_tokens()
    verifier.verify(headers, BODY)
    assert paypal.oauth_hits == 2
    assert paypal.verify_hits == 3


def test_postback_401_after_refresh_is_unavailable(paypal, signer):
    paypal.register_event(BODY)
    paypal.verify_status = 401
    with pytest.raises(VerificationUnavailable):
        postback(paypal).verify(signer.sign(WEBHOOK_ID, BODY, "https://x.test/c"), BODY)
    assert paypal.oauth_hits == 2
    assert paypal.verify_hits == 2


def test_postback_oauth_401_is_unavailable(paypal, signer):
    verifier = PostbackVerifier(paypal.base_url, "client-id", "wrong-secret", WEBHOOK_ID, timeout=2)
    with pytest.raises(VerificationUnavailable):
        verifier.verify(signer.sign(WEBHOOK_ID, BODY, "https://x.test/c"), BODY)
    assert paypal.verify_hits == 0


@pytest.mark.parametrize("status", [500, 503, 429])
def test_postback_server_error_is_unavailable(paypal, signer, status):
    paypal.verify_status = status
    with pytest.raises(VerificationUnavailable):
        postback(paypal).verify(signer.sign(WEBHOOK_ID, BODY, "https://x.test/c"), BODY)


@pytest.mark.parametrize("status", [400, 403, 422])
def test_postback_client_error_is_invalid_webhook(paypal, signer, status):
    paypal.verify_status = status
    with pytest.raises(InvalidWebhook) as exc:
        postback(paypal).verify(signer.sign(WEBHOOK_ID, BODY, "https://x.test/c"), BODY)
    assert exc.value.cause == "signature"


def test_postback_server_down_is_unavailable(signer):
    with FakePayPal() as gone:
        base = gone.base_url
    verifier = PostbackVerifier(base, "client-id", "client-secret", WEBHOOK_ID, timeout=2)
    with pytest.raises(VerificationUnavailable):
        verifier.verify(signer.sign(WEBHOOK_ID, BODY, "https://x.test/c"), BODY)


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"WH-1"}, "webhook_id": "WH-ATTACKER"',
        b'{"id":"WH-1"}}',
        b'["not", "an", "object"]',
        b"\xff\xfe not utf-8",
        b"",
    ],
)
def test_postback_body_that_is_not_one_json_object_is_refused_before_any_call(paypal, signer, body):
    with pytest.raises(InvalidWebhook) as exc:
        postback(paypal).verify(signer.sign(WEBHOOK_ID, body, "https://x.test/c"), body)
    assert exc.value.cause == "body"
    assert paypal.oauth_hits == paypal.verify_hits == 0


def test_postback_refuses_a_cert_url_outside_the_prefixes_before_any_call(paypal, signer):
    paypal.register_event(BODY)
    verifier = postback(
        paypal, cert_url_prefixes=["https://api.paypal.com/v1/notifications/certs/"]
    )
    headers = signer.sign(WEBHOOK_ID, BODY, "https://evil.test/v1/notifications/certs/C")
    with pytest.raises(InvalidWebhook) as exc:
        verifier.verify(headers, BODY)
    assert exc.value.cause == "cert_url"
    assert paypal.oauth_hits == paypal.verify_hits == 0


def test_postback_missing_header_is_refused_before_any_call(paypal, signer):
    headers = signer.sign(WEBHOOK_ID, BODY, "https://x.test/c")
    del headers["PAYPAL-TRANSMISSION-SIG"]
    with pytest.raises(InvalidWebhook) as exc:
        postback(paypal).verify(headers, BODY)
    assert exc.value.cause == "headers"
    assert paypal.oauth_hits == paypal.verify_hits == 0
