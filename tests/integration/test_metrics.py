"""Prometheus metrics: the receiver's counters and database gauges, several gunicorn workers
adding up through the Procfile's own web line, and the worker's and beat's endpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from bus.publisher import Publisher
from core import inbox, messages, sending, wallet
from core.settings import Settings
from tests.stack import free_port, start_beat, start_procfile_web, start_worker, wait_for
from tests.support.db import tx
from tests.support.factories import new_org
from tests.support.payloads import paypal as pp
from tests.support.payloads import stripe as sp
from webhook_receiver.app import create_app

POLICY = sending.Policy()
TOKEN = "metrics-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --------------------------------------------------------------------------- helpers


class Scrape:
    """One /metrics answer, parsed: value(metric, **labels) of a sample, None if absent."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }

    def value(self, metric: str, /, **labels: str) -> float | None:
        return self.samples.get((metric, frozenset(labels.items())))

    def total(self, metric: str, /, **labels: str) -> float:
        """Sum of every sample of `metric` whose labels include `labels`."""
        return sum(
            v
            for (n, ls), v in self.samples.items()
            if n == metric and set(labels.items()) <= set(ls)
        )


def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape:
    response = requests.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return Scrape(response.text)


@pytest.fixture
def clean_env(monkeypatch):
    """No Payguard variable from the developer's shell, and one process' counters in memory."""
    for name in [*Settings.model_fields, "PROMETHEUS_MULTIPROC_DIR"]:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_client(clean_env, database_url, redis_url):
    apps = []

    def make(db_url: str = database_url, token: str | None = TOKEN):
        settings = Settings(
            DATABASE_URL=db_url,
            REDIS_URL=redis_url,
            STRIPE_WEBHOOK_SECRET=sp.TEST_SECRET,
            LOG_FORMAT="text",
            METRICS_TOKEN=token,
        )
        app = create_app(settings)
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        app.extensions["payguard"].close()


def client_scrape(client) -> Scrape:
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    return Scrape(response.get_data(as_text=True))


def post_stripe(client, event: dict, secret: str = sp.TEST_SECRET):
    body, signature = sp.signed(event, secret)
    return client.post(
        "/webhooks/stripe",
        data=body,
        headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
    )


# --------------------------------------------------------------------------- web, in-process


@pytest.fixture
def beat_runtime(monkeypatch, database_url, redis_url):
    """worker.runtime of this process pointed at this test's database: beat jobs in-process."""
    from worker import runtime

    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setattr(runtime, "_state", {})
    yield runtime
    engine = runtime._state.get("engine")
    if engine is not None:
        engine.dispose()


def verify_ledger_as_beat_does() -> int:
    from worker import beat_jobs

    return beat_jobs.verify_ledger.run()


def test_metrics_count_answers_and_show_the_state_of_the_database(
    make_client, engine, beat_runtime
):
    client = make_client()
    before = client_scrape(client)
    assert before.value("payguard_metrics_scrape_error") == 0
    for status in ("received", "processed", "ignored", "parked", "failed"):
        assert before.value("payguard_events", status=status) == 0
    for gauge in ("open_holds", "open_holds_cents", "frozen_wallets"):
        assert before.value(f"payguard_{gauge}") == 0
    # No verification has run yet: no figure, and a check time of 0 that staleness alerts see.
    assert before.value("payguard_ledger_mismatches") is None
    assert before.value("payguard_ledger_checked_timestamp_seconds") == 0
    assert before.value("payguard_blocked_messages") == 0

    event = sp.payment_intent_succeeded(org_id="org-unknown", payment_intent_id=sp.new_id("pi"))
    assert post_stripe(client, event, secret="whsec_not_ours_0000000000000000").status_code == 400
    assert post_stripe(client, event).status_code == 200

    frozen, held, tampered = (tx(engine, new_org, balance=1000, twilio=True) for _ in range(3))
    tx(engine, lambda c: wallet.freeze(c, frozen, "chargeback", actor="test"))
    tx(engine, lambda c: wallet.hold(c, held, 300, "msg:test-hold"))
    with engine.begin() as conn:  # what `ledger verify` exists to catch: SQL beside the journal
        conn.execute(
            text("UPDATE wallets SET balance_cents = balance_cents + 7 WHERE org_id = :o"),
            {"o": tampered},
        )
    blocked = tx(engine, lambda c: messages.queue(c, frozen, "+15005550010", "hi", POLICY))
    assert tx(engine, lambda c: messages.prepare(c, blocked.message_id, POLICY)) is None
    assert verify_ledger_as_beat_does() == 1

    after = client_scrape(client)

    def grew(metric: str, **labels: str) -> float:
        return after.total(metric, **labels) - before.total(metric, **labels)

    assert grew("payguard_webhooks_received_total", provider="stripe", answer="400") == 1
    assert grew("payguard_webhooks_received_total", provider="stripe", answer="200") == 1
    assert grew("payguard_webhook_verification_failures_total", provider="stripe") == 1
    assert after.value("payguard_metrics_scrape_error") == 0
    assert after.value("payguard_events", status="received") == 1
    assert after.value("payguard_events", status="processed") == 0
    assert after.value("payguard_frozen_wallets") == 1
    assert after.value("payguard_open_holds") == 1
    assert after.value("payguard_open_holds_cents") == 300
    assert after.value("payguard_ledger_mismatches") == 1
    assert after.value("payguard_ledger_checked_timestamp_seconds") > time.time() - 60
    assert after.value("payguard_blocked_messages") == 1
    assert after.value("payguard_messages", status="blocked") == 1


def test_metrics_answer_404_when_no_token_is_configured(make_client):
    client = make_client(token=None)

    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
    ids=["none", "empty", "wrong", "longer", "basic", "no-scheme"],
)
def test_metrics_refuse_a_missing_or_wrong_token(make_client, headers):
    client = make_client()

    response = client.get("/metrics", headers=headers)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert b"payguard_" not in response.get_data()


def test_a_scrape_reads_the_last_verification_and_never_scans_the_journal(
    make_client, engine, beat_runtime
):
    from sqlalchemy import event

    client = make_client()
    tampered = tx(engine, new_org, balance=1000, twilio=True)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE wallets SET balance_cents = balance_cents + 7 WHERE org_id = :o"),
            {"o": tampered},
        )
    statements: list[str] = []
    scrape_engine = client.application.extensions["payguard"].engine
    event.listen(scrape_engine, "before_cursor_execute", lambda *a: statements.append(a[2].lower()))

    stale = client_scrape(client)  # the mismatch exists, but no verification has seen it yet
    assert verify_ledger_as_beat_does() == 1
    fresh = client_scrape(client)

    assert stale.value("payguard_ledger_mismatches") is None
    assert fresh.value("payguard_ledger_mismatches") == 1
    assert statements, "the scrapes read the database"
    assert not [s for s in statements if "journal" in s], statements


def test_a_query_past_its_statement_timeout_drops_its_gauges_not_the_scrape(
    make_client, database_url
):
    client = make_client()
    locker = psycopg.connect(database_url)
    # Let go after 8 s in any case: a scrape that waits for the lock then answers cleanly.
    release = threading.Timer(8.0, locker.rollback)
    try:
        locker.execute("LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE")
        release.start()
        started = time.monotonic()
        result = client_scrape(client)
        elapsed = time.monotonic() - started
    finally:
        release.cancel()
        release.join()
        locker.rollback()
        locker.close()

    assert elapsed < 6, f"the scrape waited {elapsed:.1f}s on a locked table"
    assert result.value("payguard_metrics_scrape_error") == 1
    assert result.value("payguard_events", status="received") is None
    assert result.value("payguard_frozen_wallets") == 0  # the other queries still answered
    assert "payguard_webhooks_received_total" in result.body
    assert client_scrape(client).value("payguard_metrics_scrape_error") == 0


def test_a_database_that_cannot_be_reached_is_a_scrape_error_not_a_failed_scrape(make_client):
    client = make_client(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")

    result = client_scrape(client)

    assert result.value("payguard_metrics_scrape_error") == 1
    assert result.value("payguard_frozen_wallets") is None
    assert "# TYPE payguard_webhooks_received_total counter" in result.body


# --------------------------------------------------------------------------- web, gunicorn


def post_unsigned(url: str) -> int:
    """A PayPal delivery without its signature headers: 400, verified and stored nothing."""
    return requests.post(f"{url}/webhooks/paypal", data=b"{}", timeout=10).status_code


def one_delivery_per_worker(port: int, workers: int) -> list[bytes]:
    """As many unsigned deliveries as there are workers, each made to wait for its body, so
    that each is held by a different (sync) worker; then the bodies. Their answers."""
    held = []
    for _ in range(workers):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(
            b"POST /webhooks/paypal HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n"
        )
        held.append(conn)
    time.sleep(0.5)  # every worker accepts its connection and waits in reading the body
    answers = []
    for conn in held:
        with conn:
            conn.sendall(b"{}")
            answers.append(conn.makefile("rb").readline().strip())
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("operator_dir", [False, True], ids=["own-dir", "operator-dir"])
def test_three_gunicorn_workers_count_every_request_once_in_any_scrape(
    stack_env, tmp_path, operator_dir
):
    env = {**stack_env, "METRICS_TOKEN": TOKEN}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # The worker's pid on every access-log line: which workers served the requests.
    env["GUNICORN_CMD_ARGS"] = '--access-logformat "served-by=%(p)s %(r)s %(s)s"'
    if operator_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus")

    def servers() -> set[str]:
        return set(re.findall(r"served-by=<(\d+)> POST /webhooks/paypal", web.log()))

    with start_procfile_web(env, tmp_path, workers=3) as web:
        n = 0
        for _ in range(10):  # a worker still loading the app takes no connection yet
            assert one_delivery_per_worker(web.port, 3) == [b"HTTP/1.1 400 BAD REQUEST"] * 3
            n += 3
            if len(servers()) == 3:
                break
        assert len(servers()) == 3, "each worker served some: their counts must add up"
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: post_unsigned(web.url), range(60)))
        assert answers == [400] * 60
        n += 60

        for _ in range(6):  # each scrape may be answered by any of the three
            result = scrape(web.url, AUTH)
            assert (
                result.value("payguard_webhooks_received_total", provider="paypal", answer="400")
                == n
            )
            assert result.value("payguard_metrics_scrape_error") == 0

        killed = web.children()[0]
        os.kill(killed, signal.SIGKILL)  # its counts happened: they stay
        wait_for(
            lambda: killed not in web.children() and len(web.children()) == 3,
            20,
            what="gunicorn replacing its worker",
        )
        after_death = scrape(web.url, AUTH)
        assert (
            after_death.value("payguard_webhooks_received_total", provider="paypal", answer="400")
            == n
        )

    if operator_dir:
        assert list((tmp_path / "prometheus").glob("counter_*.db")), "the operator's dir unused"


# --------------------------------------------------------------------------- worker and beat


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses something listens on at `port`, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.fixture
def worker_env(stack_env, fake_twilio):
    env = dict(stack_env)
    env.update(
        WORKER_METRICS_PORT=str(free_port()),
        TWILIO_ACCOUNT_SID="AC" + "1" * 32,
        TWILIO_AUTH_TOKEN="parent-auth-token",
        TWILIO_API_BASE=fake_twilio.base_url,
        PUBLIC_BASE_URL=f"http://127.0.0.1:{free_port()}",
    )
    return env


def publish(env, task: str, args: list) -> None:
    publisher = Publisher(env["REDIS_URL"], timeout=2.0)
    try:
        publisher.publish(task, args)
    finally:
        publisher.close()


@pytest.mark.slow
def test_the_worker_serves_celery_exporter_metrics_summed_over_its_pool(
    worker_env, tmp_path, engine
):
    org = tx(engine, new_org, balance=100, active=True, twilio=True)
    payload = pp.capture_completed(org, pp.new_id(), value="25.00")
    stored, _ = tx(
        engine,
        lambda c: inbox.store(
            c, "paypal", payload["id"], payload["event_type"], {}, json.dumps(payload).encode()
        ),
    )
    sms = tx(engine, lambda c: messages.queue(c, org, "+15005550010", "hello", POLICY))
    url = f"http://127.0.0.1:{worker_env['WORKER_METRICS_PORT']}"
    event = {"name": "payguard.process_event", "hostname": "payguard-test"}

    with start_worker(worker_env, tmp_path, concurrency=2) as worker:
        publish(worker_env, "payguard.process_event", [stored.id])
        publish(worker_env, messages.SEND_TASK, [sms.message_id])
        wait_for(lambda: tx(engine, lambda c: inbox.get(c, stored.id)).status == "processed", 30)
        wait_for(
            lambda: scrape(url).total("celery_task_succeeded_total", hostname="payguard-test") == 2,
            30,
            what="both tasks counted as succeeded",
        )

        result = scrape(url)
        assert listening_addresses(int(worker_env["WORKER_METRICS_PORT"])) == {"127.0.0.1"}
        assert result.value("celery_worker_up", hostname="payguard-test") == 1
        assert result.value("celery_task_received_total", **event) == 1
        assert result.value("celery_task_started_total", **event) == 1
        assert result.value("celery_task_failed_total", exception="", **event) == 0
        assert result.value("celery_task_runtime_count", **event) == 1
        assert result.value("payguard_event_outcomes_total", outcome="processed") == 1
        sent = {"operation": "send", "outcome": "accepted"}
        assert result.value("payguard_twilio_calls_total", **sent) == 1
        assert (
            result.value(
                "celery_task_succeeded_total", name=messages.SEND_TASK, hostname="payguard-test"
            )
            == 1
        )

        killed = worker.kill_child()  # a pool child's counts outlive it
        wait_for(lambda: killed not in worker.children() and len(worker.children()) == 2, 20)
        assert scrape(url).value("celery_task_succeeded_total", **event) == 1


@pytest.mark.slow
def test_beat_serves_the_jobs_it_sent(stack_env, tmp_path):
    env = {**stack_env, "BEAT_METRICS_PORT": str(free_port())}
    url = f"http://127.0.0.1:{env['BEAT_METRICS_PORT']}"
    relay = {"name": "payguard.beat.relay_outbox"}

    with start_beat(env, tmp_path):
        result = wait_for(
            lambda: (s := scrape(url)).total("celery_task_sent_total", **relay) >= 2 and s,
            30,
            what="beat sending relay_outbox twice",
        )
        assert listening_addresses(int(env["BEAT_METRICS_PORT"])) == {"127.0.0.1"}

    assert result.total("payguard_beat_up") == 1
