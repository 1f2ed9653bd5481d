"""Threat model of POST /webhooks/paypal: what a sender who is not PayPal can try, and the test
that proves it fails.

PayPal signs ``transmission_id|transmission_time|webhook_id|crc32(body)`` and sends the
signature, the certificate URL and the signed fields as headers. CRC32 is not a hash: anyone
can build another body with the same CRC (tests.support.fakes.crc_forge does it in milliseconds). So
one genuine transmission that leaks (a log line, a proxy, a misdirected delivery) is a
signature for every body of its CRC. The attacker we defend against holds such a leaked
transmission, can send any bytes to ``web``, and can run a server nowhere PayPal's
certificate URLs point to. What each of their moves meets:

* **Re-encode or pad a signed header** (``<id>\\xa0``, ``<id>\\x85``, tabs, spaces, a second
  copy of the header): the signed fields are verified exactly as they are stored, and any
  PayPal header that is not printable ASCII without surrounding whitespace, or that comes
  twice, is refused with 400 before anything is fetched or stored. WSGI hands headers over as
  latin-1-decoded text, so a raw 0xA0 byte on the wire reaches us as ``\\xa0``:
  ``test_padded_transmission_id_never_carries_a_forged_body`` (through gunicorn),
  ``test_whitespace_around_a_paypal_header_is_refused``,
  ``test_non_ascii_in_any_paypal_header_is_a_bad_signature_not_a_5xx``.
* **Replay a transmission with a forged body**: every verified transmission id is recorded
  with the SHA-256 of the body it vouched for, in the transaction that stores the event,
  whatever the answer (accepted or duplicate). The same id with another body is 400 replay:
  ``test_headers_of_a_duplicate_delivery_never_carry_a_forged_body`` (PayPal's retries come
  with fresh transmission ids; before, only the first was remembered) and
  ``test_racing_bodies_for_one_transmission_store_one_of_them``.
* **Replay a transmission that was never recorded** (leaked before a database restore, or
  older than anything we keep): transmission times outside PayPal's retry schedule (3 days)
  plus margin, or ahead of our clock by more than the allowed skew, are refused:
  ``test_transmission_time_outside_the_window_is_refused``.
* **Make ``web`` fetch certificates for them** (each unauthenticated request names a URL;
  anything under the allowed prefix is a candidate): a URL whose fetch failed is not fetched
  again for a while, one fetch per URL is in flight at a time, each fetch has a total
  deadline, and few distinct URLs are fetched per time window:
  ``test_failing_certificate_url_is_fetched_once_however_often_it_is_named``,
  ``test_new_certificate_urls_are_fetched_only_up_to_a_budget``,
  ``test_a_certificate_fetch_has_a_total_deadline``.

Nothing here needs a worker: a request that is refused stores nothing, and what is not stored
never moves money.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests
from sqlalchemy import text

from core import orgs
from core.db import run_in_transaction
from core.providers.paypal.verify import CertificateFetcher, VerificationUnavailable
from core.settings import Settings
from tests.stack import start_web
from tests.support.fakes.crc_forge import forge_same_crc
from tests.support.fakes.paypal_api import CERTS_PATH
from tests.support.payloads import paypal as pp
from webhook_receiver.app import create_app

WEBHOOK_ID = "WH-TEST"
PATH = "/webhooks/paypal"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def client(database_url, redis_clean, fake_paypal) -> Iterator:
    app = create_app(
        Settings(
            _env_file=None,
            DATABASE_URL=database_url,
            REDIS_URL=redis_clean,
            PAYPAL_WEBHOOK_ID=WEBHOOK_ID,
            PAYPAL_CERT_URL_PREFIXES=fake_paypal.cert_prefix,
        )
    )
    yield app.test_client()
    app.extensions["payguard"].close()


def victim_and_attacker(engine) -> None:
    run_in_transaction(engine, lambda c: orgs.create(c, "victim"))
    run_in_transaction(engine, lambda c: orgs.create(c, "attacker"))


def genuine_capture() -> bytes:
    return json.dumps(pp.capture_completed("victim", pp.new_id(), value="10.00")).encode()


def forged_like(genuine: bytes) -> bytes:
    """Another event crediting `attacker` 999.00, with the CRC32 of `genuine`."""
    event = json.loads(genuine)
    event["id"] = pp.new_event_id()
    event["resource"]["id"] = pp.new_id()
    event["resource"]["custom_id"] = "attacker"
    event["resource"]["amount"]["value"] = "999.00"
    return forge_same_crc(genuine, event)


def stored_bodies(engine) -> list[bytes]:
    with engine.connect() as conn:
        return [bytes(r[0]) for r in conn.execute(text("SELECT body FROM webhook_events"))]


# --------------------------------------------------------------------------- padded headers


def test_padded_transmission_id_never_carries_a_forged_body(
    engine, stack_env, tmp_path, fake_paypal, paypal_signer
):
    victim_and_attacker(engine)
    genuine = genuine_capture()
    headers = paypal_signer.sign(WEBHOOK_ID, genuine, fake_paypal.signing_cert_url)
    forged = forged_like(genuine)
    with start_web(stack_env, tmp_path) as web:
        first = requests.post(f"{web.url}{PATH}", data=genuine, headers=headers, timeout=10)
        assert (first.status_code, first.json()["status"]) == (200, "accepted")
        for pad in ("\xa0", "\x85", "\xa0\xa0", "\t\xa0"):
            padded = {**headers, "PAYPAL-TRANSMISSION-ID": headers["PAYPAL-TRANSMISSION-ID"] + pad}
            answer = requests.post(f"{web.url}{PATH}", data=forged, headers=padded, timeout=10)
            assert answer.status_code == 400, (repr(pad), answer.text)
    assert stored_bodies(engine) == [genuine]


@pytest.mark.parametrize("header", ["PAYPAL-TRANSMISSION-ID", "PAYPAL-TRANSMISSION-TIME"])
@pytest.mark.parametrize("pad", [" {}", "{} ", "\t{}", "{}\t", "{}\xa0", "\x85{}"])
def test_whitespace_around_a_paypal_header_is_refused(
    engine, client, fake_paypal, paypal_signer, header, pad
):
    victim_and_attacker(engine)
    genuine = genuine_capture()
    headers = paypal_signer.sign(WEBHOOK_ID, genuine, fake_paypal.signing_cert_url)
    assert client.post(PATH, data=genuine, headers=headers).status_code == 200
    padded = {**headers, header: pad.format(headers[header])}
    answer = client.post(PATH, data=forged_like(genuine), headers=padded)
    assert answer.status_code == 400, answer.get_json()
    assert stored_bodies(engine) == [genuine]


@pytest.mark.parametrize(
    "header",
    [
        "PAYPAL-TRANSMISSION-ID",
        "PAYPAL-TRANSMISSION-TIME",
        "PAYPAL-TRANSMISSION-SIG",
        "PAYPAL-CERT-URL",
        "PAYPAL-AUTH-ALGO",
    ],
)
@pytest.mark.parametrize("junk", ["\xe9", "\xa0", "\x00", "\x7f", " "])
def test_non_ascii_in_any_paypal_header_is_a_bad_signature_not_a_5xx(
    engine, client, fake_paypal, paypal_signer, header, junk
):
    body = genuine_capture()
    headers = paypal_signer.sign(WEBHOOK_ID, body, fake_paypal.signing_cert_url)
    headers[header] = headers[header][:4] + junk + headers[header][4:]
    answer = client.post(PATH, data=body, headers=headers)
    assert answer.status_code == 400, answer.get_json()
    assert stored_bodies(engine) == []
    assert sum(fake_paypal.cert_hits.values()) == 0


def test_a_second_copy_of_a_signed_header_is_refused(engine, client, fake_paypal, paypal_signer):
    victim_and_attacker(engine)
    genuine = genuine_capture()
    headers = paypal_signer.sign(WEBHOOK_ID, genuine, fake_paypal.signing_cert_url)
    assert client.post(PATH, data=genuine, headers=headers).status_code == 200
    doubled = [*headers.items(), ("PAYPAL-TRANSMISSION-ID", "another-" + pp.new_id())]
    answer = client.post(PATH, data=forged_like(genuine), headers=doubled)
    assert answer.status_code == 400, answer.get_json()
    assert stored_bodies(engine) == [genuine]


# --------------------------------------------------------------------------- replays


def test_headers_of_a_duplicate_delivery_never_carry_a_forged_body(
    engine, stack_env, tmp_path, fake_paypal, paypal_signer
):
    victim_and_attacker(engine)
    genuine = genuine_capture()
    first = paypal_signer.sign(WEBHOOK_ID, genuine, fake_paypal.signing_cert_url)
    retry = paypal_signer.sign(WEBHOOK_ID, genuine, fake_paypal.signing_cert_url)
    assert first["PAYPAL-TRANSMISSION-ID"] != retry["PAYPAL-TRANSMISSION-ID"]
    forged = forged_like(genuine)
    with start_web(stack_env, tmp_path) as web:
        answers = [
            requests.post(f"{web.url}{PATH}", data=body, headers=headers, timeout=10)
            for body, headers in (
                (genuine, first),
                (genuine, retry),
                (genuine, retry),
                (forged, retry),
                (forged, first),
            )
        ]
    assert [(a.status_code, a.json().get("status")) for a in answers[:3]] == [
        (200, "accepted"),
        (200, "duplicate"),
        (200, "duplicate"),
    ]
    assert [(a.status_code, a.json().get("cause")) for a in answers[3:]] == [
        (400, "replay"),
        (400, "replay"),
    ]
    assert stored_bodies(engine) == [genuine]
    with engine.connect() as conn:
        recorded = conn.execute(
            text("SELECT transmission_id FROM paypal_transmissions ORDER BY first_seen_at")
        ).scalars()
        assert list(recorded) == [first["PAYPAL-TRANSMISSION-ID"], retry["PAYPAL-TRANSMISSION-ID"]]


def test_racing_bodies_for_one_transmission_store_one_of_them(
    engine, stack_env, tmp_path, fake_paypal, paypal_signer
):
    # Whoever holds the transmission first wins it (PayPal's own delivery, normally); the point
    # is that concurrent posts never let both bodies through.
    victim_and_attacker(engine)
    genuine = genuine_capture()
    forged = forged_like(genuine)
    headers = paypal_signer.sign(WEBHOOK_ID, genuine, fake_paypal.signing_cert_url)
    start = threading.Barrier(8)
    answers: list[tuple[bytes, int]] = []

    def post(body: bytes, url: str) -> None:
        start.wait()
        response = requests.post(url, data=body, headers=headers, timeout=20)
        answers.append((body, response.status_code))

    with start_web(stack_env, tmp_path, workers=2) as web:
        threads = [
            threading.Thread(target=post, args=(genuine if i % 2 else forged, web.url + PATH))
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    [winner] = stored_bodies(engine)
    assert sorted(status for body, status in answers if body == winner) == [200] * 4
    assert sorted(status for body, status in answers if body != winner) == [400] * 4


@pytest.mark.parametrize(
    ("age", "status"),
    [
        (timedelta(days=3, hours=1), 200),  # PayPal's last retry of a 3-day schedule
        (timedelta(days=5), 400),
        (timedelta(minutes=-2), 200),  # a sender clock slightly ahead of ours
        (timedelta(minutes=-30), 400),
    ],
)
def test_transmission_time_outside_the_window_is_refused(
    engine, client, fake_paypal, paypal_signer, age, status
):
    body = genuine_capture()
    sent = datetime.now(UTC) - age
    headers = paypal_signer.sign(WEBHOOK_ID, body, fake_paypal.signing_cert_url, time=sent)
    answer = client.post(PATH, data=body, headers=headers)
    assert answer.status_code == status, answer.get_json()
    assert len(stored_bodies(engine)) == (1 if status == 200 else 0)


# --------------------------------------------------------------------------- certificate fetches


def test_failing_certificate_url_is_fetched_once_however_often_it_is_named(
    engine, stack_env, tmp_path, fake_paypal, paypal_signer
):
    body = genuine_capture()
    missing = fake_paypal.cert_prefix + "CERT-missing"
    fake_paypal.serve(CERTS_PATH + "CERT-missing", b"gone", status=404)
    with start_web(stack_env, tmp_path) as web:
        statuses = [
            requests.post(
                f"{web.url}{PATH}",
                data=body,
                headers=paypal_signer.sign(WEBHOOK_ID, body, missing),
                timeout=10,
            ).status_code
            for _ in range(6)
        ]
    assert all(s in (400, 503) for s in statuses), statuses
    assert fake_paypal.cert_hits[CERTS_PATH + "CERT-missing"] == 1
    assert stored_bodies(engine) == []


def test_new_certificate_urls_are_fetched_only_up_to_a_budget(
    engine, stack_env, tmp_path, fake_paypal, paypal_signer
):
    body = genuine_capture()
    with start_web(stack_env, tmp_path) as web:
        for i in range(30):
            url = f"{fake_paypal.cert_prefix}CERT-new-{i}"
            headers = paypal_signer.sign(WEBHOOK_ID, body, url)
            answer = requests.post(f"{web.url}{PATH}", data=body, headers=headers, timeout=10)
            assert answer.status_code in (400, 503), answer.text
        # The certificate PayPal really uses was cached before the flood or is fetched once
        # the window has passed; either way the flood itself fetched little.
        fetched = sum(n for path, n in fake_paypal.cert_hits.items() if "CERT-new-" in path)
    assert fetched <= CertificateFetcher.DEFAULT_MAX_NEW_URLS
    assert stored_bodies(engine) == []


def test_failed_fetch_is_remembered_for_a_while_then_tried_again(fake_paypal, paypal_signer):
    now = [1000.0]
    url = fake_paypal.serve(CERTS_PATH + "CERT-later", b"busy", status=503)
    fetcher = CertificateFetcher(
        [fake_paypal.cert_prefix], failure_ttl=30.0, monotonic=lambda: now[0]
    )
    for _ in range(3):
        with pytest.raises(VerificationUnavailable):
            fetcher.get(url)
    assert fake_paypal.cert_hits[CERTS_PATH + "CERT-later"] == 1
    fake_paypal.serve_cert(CERTS_PATH + "CERT-later", paypal_signer.cert_pem)
    now[0] += 31
    assert fetcher.get(url) == paypal_signer.cert_pem
    assert fake_paypal.cert_hits[CERTS_PATH + "CERT-later"] == 2


@pytest.fixture
def dripping_server() -> Iterator[str]:
    """A certificate host that answers its headers at once, then one byte every 0.1 s: no
    single read ever waits long, so only a deadline on the whole fetch stops it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n")
                    while not stop.is_set():
                        conn.sendall(b"-")
                        time.sleep(0.1)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}{CERTS_PATH}"
    stop.set()
    thread.join(5)
    listener.close()


def test_a_certificate_fetch_has_a_total_deadline(dripping_server):
    fetcher = CertificateFetcher([dripping_server], timeout=2.0, total_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(VerificationUnavailable):
        fetcher.get(dripping_server + "CERT-drip")
    assert time.monotonic() - started < 2.0


def test_waiters_for_a_slow_fetch_give_up_at_its_deadline(fake_paypal, paypal_signer):
    url = fake_paypal.serve(CERTS_PATH + "CERT-slow", paypal_signer.cert_pem, delay=3)
    fetcher = CertificateFetcher([fake_paypal.cert_prefix], total_timeout=0.5)
    errors: list[BaseException] = []

    def get() -> None:
        try:
            fetcher.get(url)
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=get) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started < 2.0
    assert len(errors) == 6 and all(isinstance(e, VerificationUnavailable) for e in errors)
    assert fake_paypal.cert_hits[CERTS_PATH + "CERT-slow"] == 1
