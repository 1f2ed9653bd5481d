"""POST /webhooks/paypal: verify, store durably, answer, then publish; nothing else.

Most tests run the Flask app in-process (create_app + test_client) against this test's
database, the session Redis and a local fake PayPal serving the signing certificate. The
body-size limit for a chunked request is checked through gunicorn, and recovery from a
broker outage with a real worker and beat.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import redis
import requests
import sqlalchemy
from sqlalchemy import text

from core import orgs, wallet
from core.db import run_in_transaction
from core.publish_marks import PublishMarks
from core.settings import Settings
from tests.stack import free_port, start_beat, start_web, start_worker, wait_for
from tests.support.fakes.paypal_api import CERTS_PATH, FakePayPal, LocalCA, make_signing_cert
from tests.support.payloads import paypal as pp
from webhook_receiver.app import create_app
from webhook_receiver.receiver import MAX_BODY

WEBHOOK_ID = "WH-TEST"
EVENTS_QUEUE = "payguard.events"


# --------------------------------------------------------------------------- helpers


def settings(database_url: str, redis_url: str, cert_prefix: str, **extra) -> Settings:
    return Settings(
        _env_file=None,
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PAYPAL_WEBHOOK_ID=WEBHOOK_ID,
        PAYPAL_VERIFY="offline",
        PAYPAL_CERT_URL_PREFIXES=cert_prefix,
        **extra,
    )


def build_app(*args, **extra):
    app = create_app(settings(*args, **extra))
    app.config["TESTING"] = True
    return app


def close_app(app) -> None:
    app.extensions["payguard"].close()


@pytest.fixture
def app(database_url, redis_clean, fake_paypal):
    app = build_app(database_url, redis_clean, fake_paypal.cert_prefix)
    yield app
    close_app(app)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def queue(redis_clean) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_clean)
    yield client
    client.close()


@pytest.fixture
def org(engine) -> str:
    run_in_transaction(engine, lambda c: orgs.create(c, "acme", billing="prepaid"))
    return "acme"


def body_of(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def signed(signer, body: bytes, cert_url: str, webhook_id: str = WEBHOOK_ID) -> dict[str, str]:
    return signer.sign(webhook_id, body, cert_url)


def post(client, body: bytes, headers: dict[str, str]):
    return client.post("/webhooks/paypal", data=body, headers=headers)


def stored(engine) -> tuple[int, int]:
    """(webhook_events rows, outbox rows)."""
    with engine.connect() as conn:
        events = conn.execute(text("SELECT count(*) FROM webhook_events")).scalar_one()
        outbox = conn.execute(text("SELECT count(*) FROM outbox")).scalar_one()
    return events, outbox


def event_row(engine, event_id: str):
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT e.id, e.status, e.body, o.id AS outbox_id, o.published_at, o.created_at "
                "FROM webhook_events e JOIN outbox o ON o.args->>0 = e.id::text "
                "WHERE e.provider = 'paypal' AND e.event_id = :e"
            ),
            {"e": event_id},
        ).one()


def wait_for_publish_mark(engine, event_id: str) -> None:
    """The receiver marks what it published in a batch, a moment after its answer."""
    wait_for(
        lambda: event_row(engine, event_id).published_at is not None,
        10,
        what=f"the outbox row of {event_id} marked published",
    )


def balance(engine, org_id: str) -> int:
    return run_in_transaction(engine, lambda c: wallet.show(c, org_id)).balance_cents


def journal_rows(engine, org_id: str) -> int:
    return len(run_in_transaction(engine, lambda c: wallet.history(c, org_id)))


# --------------------------------------------------------------------------- accepted


def test_a_signed_capture_is_stored_with_its_outbox_row_and_queued(
    client, engine, queue, paypal_signer, fake_paypal, org
):
    payload = pp.capture_completed(org, pp.new_id(), value="25.00")
    body = body_of(payload)

    response = post(client, body, signed(paypal_signer, body, fake_paypal.signing_cert_url))

    assert response.status_code == 200
    assert response.get_json()["status"] == "accepted"
    assert response.get_json()["event_id"] == payload["id"]
    row = event_row(engine, payload["id"])
    assert row.status == "received" and bytes(row.body) == body
    assert queue.llen(EVENTS_QUEUE) == 1
    message = json.loads(queue.lindex(EVENTS_QUEUE, 0))
    assert message["headers"]["task"] == "payguard.process_event"
    assert message["headers"]["id"] == f"outbox-{row.outbox_id}"
    wait_for_publish_mark(engine, payload["id"])


def test_a_webhook_commits_once_in_its_request_and_its_publish_is_marked_after(
    app, client, engine, paypal_signer, fake_paypal, org
):
    """The request's only commit stores the event and its outbox row; the mark that tells the
    relay "published" is written later, in a batch, off the request path."""
    receiver = app.extensions["payguard"]
    receiver.publish_marks = PublishMarks(receiver.engine, interval=3600)  # only flush() marks
    request_thread, commits = threading.current_thread(), []

    def count_commit(conn) -> None:
        if threading.current_thread() is request_thread:
            commits.append(conn)

    sqlalchemy.event.listen(receiver.engine, "commit", count_commit)
    try:
        bodies = [body_of(pp.capture_completed(org, pp.new_id())) for _ in range(3)]
        for body in bodies:
            response = post(client, body, signed(paypal_signer, body, fake_paypal.signing_cert_url))
            assert response.status_code == 200
        assert len(commits) == 3
        ids = [json.loads(b)["id"] for b in bodies]
        assert all(event_row(engine, i).published_at is None for i in ids)

        assert receiver.publish_marks.flush() == 3  # one statement for the three
    finally:
        sqlalchemy.event.remove(receiver.engine, "commit", count_commit)
    assert all(event_row(engine, i).published_at is not None for i in ids)


def test_the_same_event_again_is_a_duplicate_and_is_neither_stored_nor_queued_twice(
    client, engine, queue, paypal_signer, fake_paypal, org
):
    payload = pp.capture_completed(org, pp.new_id())
    body = body_of(payload)

    first = post(client, body, signed(paypal_signer, body, fake_paypal.signing_cert_url))
    # PayPal retries with a new transmission (new id, time and signature), same event.
    again = post(client, body, signed(paypal_signer, body, fake_paypal.signing_cert_url))

    assert first.status_code == again.status_code == 200
    assert first.get_json()["status"] == "accepted"
    assert again.get_json() | {"id": None} == {
        "status": "duplicate",
        "event_id": payload["id"],
        "id": None,
    }
    assert stored(engine) == (1, 1)
    assert queue.llen(EVENTS_QUEUE) == 1


def test_the_raw_body_is_what_is_verified_and_stored_byte_for_byte(
    client, engine, paypal_signer, fake_paypal, org
):
    payload = pp.capture_completed(org, pp.new_id())
    payload["summary"] = "Paiement reçu — 10,00 $ ✓"
    # Odd spacing, unescaped UTF-8 and a trailing newline: re-serializing would change the CRC.
    body = (json.dumps(payload, indent=3, ensure_ascii=False, sort_keys=True) + "\n").encode()

    response = post(client, body, signed(paypal_signer, body, fake_paypal.signing_cert_url))

    assert response.status_code == 200, response.get_json()
    assert bytes(event_row(engine, payload["id"]).body) == body


def test_publishing_happens_only_after_the_event_and_outbox_row_commit(
    app, client, database_url, paypal_signer, fake_paypal, org
):
    seen = []

    class CommitWitness:
        """Looks, from another session, for the rows it is asked to publish."""

        def publish(self, task, args, *, task_id=None):
            with psycopg.connect(database_url, autocommit=True) as conn:
                visible = conn.execute(
                    "SELECT count(*) FROM webhook_events e JOIN outbox o "
                    "ON o.args->>0 = e.id::text WHERE e.id = %s",
                    (args[0],),
                ).fetchone()[0]
            seen.append((task, args, task_id, visible))

        def close(self):
            pass

    app.extensions["payguard"].publisher = CommitWitness()
    payload = pp.capture_completed(org, pp.new_id())
    body = body_of(payload)

    response = post(client, body, signed(paypal_signer, body, fake_paypal.signing_cert_url))

    assert response.status_code == 200
    inbox_id = response.get_json()["id"]
    assert len(seen) == 1
    task, args, task_id, visible = seen[0]
    assert (task, args, visible) == ("payguard.process_event", [inbox_id], 1)
    assert task_id and task_id.startswith("outbox-")


# --------------------------------------------------------------------------- refused


def _tampered(signer, cert_url, body):
    return body.replace(b'"10.00"', b'"99.00"'), signed(signer, body, cert_url)


def _other_webhook(signer, cert_url, body):
    return body, signed(signer, body, cert_url, webhook_id="WH-SOMEONE-ELSE")


def _other_key(signer, cert_url, body):
    return body, signed(make_signing_cert(), body, cert_url)


def _missing_signature(signer, cert_url, body):
    headers = signed(signer, body, cert_url)
    del headers["PAYPAL-TRANSMISSION-SIG"]
    return body, headers


def _garbage_signature(signer, cert_url, body):
    return body, signed(signer, body, cert_url) | {"PAYPAL-TRANSMISSION-SIG": "bm9wZQ=="}


def _other_algorithm(signer, cert_url, body):
    return body, signed(signer, body, cert_url) | {"PAYPAL-AUTH-ALGO": "SHA1withRSA"}


def _no_headers(signer, cert_url, body):
    return body, {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "forge",
    [
        _tampered,
        _other_webhook,
        _other_key,
        _missing_signature,
        _garbage_signature,
        _other_algorithm,
        _no_headers,
    ],
)
def test_a_bad_signature_is_400_and_changes_nothing(
    client, engine, queue, paypal_signer, fake_paypal, org, forge
):
    body = body_of(pp.capture_completed(org, pp.new_id(), value="10.00"))
    sent, headers = forge(paypal_signer, fake_paypal.signing_cert_url, body)

    response = post(client, sent, headers)

    assert response.status_code == 400
    assert stored(engine) == (0, 0)
    assert queue.llen(EVENTS_QUEUE) == 0
    assert balance(engine, org) == 0


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"event_type": "PAYMENT.CAPTURE.COMPLETED"}',
        b'{"id": "WH-1"}',
        b'{"id": "", "event_type": "PAYMENT.CAPTURE.COMPLETED"}',
        b'{"id": 7, "event_type": "PAYMENT.CAPTURE.COMPLETED"}',
        b"\xff\xfe{}",
    ],
)
def test_a_signed_but_malformed_body_is_400_and_changes_nothing(
    client, engine, paypal_signer, fake_paypal, body
):
    response = post(client, body, signed(paypal_signer, body, fake_paypal.signing_cert_url))

    assert response.status_code == 400
    assert stored(engine) == (0, 0)


def test_a_body_over_1_mib_is_413_and_changes_nothing(
    client, engine, paypal_signer, fake_paypal, org
):
    payload = pp.capture_completed(org, pp.new_id())
    core = body_of(payload)
    exactly = core + b" " * (MAX_BODY - len(core))
    over = exactly + b" "

    refused = post(client, over, signed(paypal_signer, over, fake_paypal.signing_cert_url))
    assert refused.status_code == 413
    assert stored(engine) == (0, 0)

    # The limit is "over 1 MiB": exactly 1 MiB is an ordinary (signed, valid) webhook.
    taken = post(client, exactly, signed(paypal_signer, exactly, fake_paypal.signing_cert_url))
    assert taken.status_code == 200
    assert stored(engine) == (1, 1)


@pytest.mark.slow
def test_a_chunked_body_over_1_mib_is_413_even_if_its_first_mib_is_signed(
    stack_env, tmp_path, engine, paypal_signer, fake_paypal, org
):
    """Without Content-Length the size is only known by reading; a body cut at the limit
    would verify and be accepted although the request was oversized."""
    core = body_of(pp.capture_completed(org, pp.new_id()))
    first_mib = core + b" " * (MAX_BODY - len(core))
    headers = signed(paypal_signer, first_mib, fake_paypal.signing_cert_url)
    oversized = first_mib + b" " * 4096

    def chunks():
        for start in range(0, len(oversized), 64 * 1024):
            yield oversized[start : start + 64 * 1024]

    with start_web(stack_env, tmp_path) as web:
        try:
            response = requests.post(
                f"{web.url}/webhooks/paypal", data=chunks(), headers=headers, timeout=10
            )
            status = response.status_code
        except requests.ConnectionError:
            status = None  # the server may hang up on the rest of an oversized body
        assert status in (413, None)
        assert stored(engine) == (0, 0)


# --------------------------------------------------------------------------- certificates


def _outside(fake: FakePayPal, signer) -> list[tuple[str, str]]:
    """(cert URL the sender names, path on the fake that would serve it) pairs, each outside
    the allowed prefix; the fake really serves the signing certificate at every one, so only
    the allowlist stands between these and a 200."""
    base = fake.base_url
    other_host = base.replace("127.0.0.1", "localhost")
    cases = [
        (f"{base}/evil/certs/CERT", "/evil/certs/CERT"),
        (f"{base}/v1/notifications/certsevil/CERT", "/v1/notifications/certsevil/CERT"),
        (f"{base}{CERTS_PATH}../../../evil/certs/CERT", "/evil/certs/CERT"),
        (f"{other_host}{CERTS_PATH}CERT-other-host", f"{CERTS_PATH}CERT-other-host"),
        (f"{base}/{CERTS_PATH}CERT-double-slash", f"/{CERTS_PATH}CERT-double-slash"),
    ]
    for _, path in cases:
        fake.serve_cert(path, signer.cert_pem)
    return cases


def test_a_certificate_url_outside_the_allowed_prefixes_is_400_and_never_fetched(
    client, engine, paypal_signer, fake_paypal, org
):
    for cert_url, path in _outside(fake_paypal, paypal_signer):
        body = body_of(pp.capture_completed(org, pp.new_id()))

        response = post(client, body, signed(paypal_signer, body, cert_url))

        assert response.status_code == 400, cert_url
        assert response.get_json()["cause"] == "cert_url"
        assert fake_paypal.cert_hits[path] == 0, cert_url
    assert sum(fake_paypal.cert_hits.values()) == 0
    assert stored(engine) == (0, 0)


def test_the_certificate_is_fetched_once_and_then_served_from_the_cache(
    client, paypal_signer, fake_paypal, org
):
    for _ in range(3):
        body = body_of(pp.capture_completed(org, pp.new_id()))
        assert (
            post(
                client, body, signed(paypal_signer, body, fake_paypal.signing_cert_url)
            ).status_code
            == 200
        )

    assert (
        fake_paypal.cert_hits[fake_paypal.signing_cert_url.removeprefix(fake_paypal.base_url)] == 1
    )


def test_a_certificate_that_cannot_be_fetched_is_503_and_changes_nothing(
    client, engine, paypal_signer, fake_paypal, org
):
    down = fake_paypal.serve(CERTS_PATH + "CERT-down", b"upstream error", status=500)
    body = body_of(pp.capture_completed(org, pp.new_id()))

    response = post(client, body, signed(paypal_signer, body, down))

    assert response.status_code == 503
    assert stored(engine) == (0, 0)


def test_a_certificate_host_that_is_unreachable_is_503(
    database_url, redis_clean, engine, paypal_signer, org
):
    closed = f"http://127.0.0.1:{free_port()}{CERTS_PATH}"
    app = build_app(database_url, redis_clean, closed)
    try:
        body = body_of(pp.capture_completed(org, pp.new_id()))
        response = post(app.test_client(), body, signed(paypal_signer, body, closed + "CERT"))
    finally:
        close_app(app)

    assert response.status_code == 503
    assert stored(engine) == (0, 0)


def test_the_certificate_is_fetched_over_verified_tls(
    database_url, redis_clean, engine, tmp_path, paypal_signer, org
):
    trusted, impostor = LocalCA("trusted"), LocalCA("impostor")
    (tmp_path / "trusted").mkdir()
    (tmp_path / "impostor").mkdir()
    with FakePayPal(webhook_id=WEBHOOK_ID, ssl_context=trusted.server_context()) as paypal:
        cert_url = paypal.install_signing_cert(paypal_signer)
        results = {}
        for name, ca in (("impostor", impostor), ("trusted", trusted)):
            bundle = ca.write_bundle(tmp_path / name)
            app = build_app(database_url, redis_clean, paypal.cert_prefix, PAYPAL_CA_BUNDLE=bundle)
            try:
                body = body_of(pp.capture_completed(org, pp.new_id()))
                results[name] = post(
                    app.test_client(), body, signed(paypal_signer, body, cert_url)
                ).status_code
            finally:
                close_app(app)

    assert results == {"impostor": 503, "trusted": 200}
    assert stored(engine) == (1, 1)


# --------------------------------------------------------------------------- storage and broker


def test_an_unreachable_database_is_503_and_nothing_is_acknowledged(
    redis_clean, queue, paypal_signer, fake_paypal
):
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/payguard"
    app = build_app(nowhere, redis_clean, fake_paypal.cert_prefix)
    try:
        body = body_of(pp.capture_completed("acme", pp.new_id()))
        response = post(
            app.test_client(), body, signed(paypal_signer, body, fake_paypal.signing_cert_url)
        )
    finally:
        close_app(app)

    assert response.status_code == 503
    assert queue.llen(EVENTS_QUEUE) == 0


def _timed_post(client, signer, fake, org) -> tuple[float, object, str]:
    payload = pp.capture_completed(org, pp.new_id(), value="25.00")
    body = body_of(payload)
    headers = signed(signer, body, fake.signing_cert_url)
    started = time.monotonic()
    response = post(client, body, headers)
    return time.monotonic() - started, response, payload["id"]


@pytest.mark.parametrize("outage", ["stopped", "hung"])
def test_with_the_broker_down_or_hung_the_answer_is_200_within_a_second(
    database_url, own_redis, engine, paypal_signer, fake_paypal, org, outage
):
    app = build_app(database_url, own_redis.url, fake_paypal.cert_prefix)
    client = app.test_client()
    try:
        # Warm the certificate cache and both pools, so the broker is the only thing timed.
        _, warm, warm_id = _timed_post(client, paypal_signer, fake_paypal, org)
        assert warm.status_code == 200
        wait_for_publish_mark(engine, warm_id)

        if outage == "stopped":
            own_redis.stop()
        else:  # the process is there and its port accepts, but nothing answers
            os.kill(own_redis.pid, signal.SIGSTOP)
        try:
            elapsed, response, event_id = _timed_post(client, paypal_signer, fake_paypal, org)
        finally:
            if outage == "stopped":
                own_redis.start()
            else:
                os.kill(own_redis.pid, signal.SIGCONT)

        assert response.status_code == 200 and response.get_json()["status"] == "accepted"
        assert elapsed < 1.0, f"answered in {elapsed:.2f}s"
        row = event_row(engine, event_id)
        assert row.status == "received" and row.published_at is None  # left to the relay

        # The broker is back: the next webhook is published by the receiver itself again.
        _, after, after_id = _timed_post(client, paypal_signer, fake_paypal, org)
        assert after.status_code == 200
        wait_for_publish_mark(engine, after_id)
    finally:
        close_app(app)


@pytest.mark.slow
def test_an_event_accepted_while_the_broker_was_down_is_credited_once_by_the_relay(
    database_url, own_redis, stack_env, tmp_path, engine, paypal_signer, fake_paypal, org
):
    app = build_app(database_url, own_redis.url, fake_paypal.cert_prefix)
    try:
        own_redis.stop()
        elapsed, response, event_id = _timed_post(
            app.test_client(), paypal_signer, fake_paypal, org
        )
    finally:
        close_app(app)
    assert response.status_code == 200 and elapsed < 1.0
    assert event_row(engine, event_id).published_at is None

    own_redis.start()  # empty: nothing was ever queued, only the outbox knows
    env = stack_env | {"REDIS_URL": own_redis.url}
    with start_worker(env, tmp_path), start_beat(env, tmp_path):
        wait_for(lambda: balance(engine, org) == 2500, 30, what="credit via the relay")
        time.sleep(1.5)  # a few more relay rounds: nothing may be applied twice

    assert balance(engine, org) == 2500 and journal_rows(engine, org) == 1
    assert event_row(engine, event_id).status == "processed"
