"""RabbitMQ as the broker (BROKER_URL=amqp://…): every Payguard queue a durable quorum queue,
publisher confirms, the same acks-late delivery as on Redis, and every publisher (receiver,
relay, CLI) going to it while Redis stays the shared store.

The delivery and fault tests of test_delivery_faults.py run on both brokers; these are the
RabbitMQ-only ones. They skip, saying why, where no RabbitMQ answers."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests

from bus.publisher import Publisher
from tests.stack import start_web, start_worker, wait_for
from tests.support.fakes.tcp_proxy import TcpProxy


def _queues(vhost: str) -> dict[str, dict]:
    out = subprocess.run(
        [
            "rabbitmqctl",
            "--quiet",
            "list_queues",
            "-p",
            vhost,
            "name",
            "type",
            "durable",
            "arguments",
            "--formatter",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {q["name"]: q for q in json.loads(out)}


def _ready_messages(url: str, queue: str) -> int:
    """Asked of the queue itself (rabbitmqctl's counts of a quorum queue lag by seconds)."""
    from kombu import Connection

    with Connection(url, connect_timeout=10) as conn:
        return conn.default_channel.queue_declare(queue, passive=True).message_count


def _arguments(queue: dict) -> dict:
    """rabbitmqctl's JSON gives arguments as a list of [name, type, value] or as a map."""
    args = queue["arguments"]
    if isinstance(args, dict):
        return args
    return {a[0]: a[-1] for a in args}


def test_the_worker_keeps_acks_late_on_rabbitmq(monkeypatch, database_url, redis_url, rabbitmq):
    from worker import runtime
    from worker.celery_app import _config

    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("BROKER_URL", rabbitmq.url)
    monkeypatch.setattr(runtime, "_state", {})
    config = _config()
    assert config["broker_url"] == rabbitmq.url
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert "visibility_timeout" not in config["broker_transport_options"]  # Redis's alone


def test_a_publish_declares_quorum_queues_and_is_confirmed(rabbitmq_clean):
    publisher = Publisher(rabbitmq_clean.url, timeout=5.0)
    try:
        publisher.publish("payguard.process_event", [1], task_id="outbox-1")
        publisher.publish("payguard.send_message", ["msg_1"], task_id="outbox-2")
    finally:
        publisher.close()

    queues = _queues(rabbitmq_clean.vhost)
    for name in ("payguard.events", "payguard.send"):
        assert queues[name]["type"] == "quorum" and queues[name]["durable"] is True
        assert _arguments(queues[name])["x-delivery-limit"] == 20
    # Confirmed means the queue has it, not that it is on its way.
    assert _ready_messages(rabbitmq_clean.url, "payguard.events") == 1
    assert _ready_messages(rabbitmq_clean.url, "payguard.send") == 1


def test_a_publish_to_a_rabbitmq_that_is_gone_fails_fast(rabbitmq_clean):
    with TcpProxy(rabbitmq_clean.host, rabbitmq_clean.port) as proxy:
        publisher = Publisher(rabbitmq_clean.url_via("127.0.0.1", proxy.port), timeout=0.5)
        try:
            publisher.publish("payguard.process_event", [1])  # a pooled connection exists
            proxy.cut()
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(Exception):  # noqa: B017, PT011 (any broker error: the relay retries)
                    publisher.publish("payguard.process_event", [2])
                assert time.monotonic() - started < 2.0  # 0.5 s timeout, slack for a busy box
            proxy.restore()
            # Back: the same publisher reconnects by itself.
            wait_for(
                lambda: publisher.publish("payguard.process_event", [3]) is None,
                30,
                interval=0.2,
                what="a publish after the broker came back",
            )
        finally:
            publisher.close()


def test_a_publish_to_a_rabbitmq_that_does_not_answer_gives_up_in_time(rabbitmq_clean):
    """A broker that accepts bytes and never answers (a partition, a stopped VM) must not hold
    a webhook request: the confirm wait, and a new connection's handshake, end at the
    publish timeout."""
    with TcpProxy(rabbitmq_clean.host, rabbitmq_clean.port) as proxy:
        publisher = Publisher(rabbitmq_clean.url_via("127.0.0.1", proxy.port), timeout=0.5)
        try:
            publisher.publish("payguard.process_event", [1])  # a pooled connection exists
            proxy.stall()
            for _ in range(3):  # the pooled connection first, then fresh ones
                started = time.monotonic()
                with pytest.raises(Exception):  # noqa: B017, PT011 (any broker error: the relay retries)
                    publisher.publish("payguard.process_event", [2])
                assert time.monotonic() - started < 3.0  # 0.5 s timeouts, slack for a busy box
            proxy.unstall()
            wait_for(
                lambda: publisher.publish("payguard.process_event", [3]) is None,
                30,
                interval=0.2,
                what="a publish after the broker answered again",
            )
        finally:
            publisher.close()


@pytest.mark.slow
def test_readyz_names_the_broker_when_rabbitmq_is_down_and_redis_is_up(
    stack_env, tmp_path, rabbitmq_clean
):
    with TcpProxy(rabbitmq_clean.host, rabbitmq_clean.port) as proxy:
        env = dict(stack_env, BROKER_URL=rabbitmq_clean.url_via("127.0.0.1", proxy.port))
        with start_web(env, tmp_path) as web:
            ready = requests.get(f"{web.url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}

            proxy.cut()
            down = requests.get(f"{web.url}/readyz", timeout=10)
            assert down.status_code == 503
            checks = down.json()["checks"]
            assert checks["redis"] == "ok" and checks["broker"].startswith("unavailable")


@pytest.mark.slow
def test_a_worker_on_rabbitmq_declares_its_queues_as_quorum_queues(
    stack_env, tmp_path, rabbitmq_clean
):
    env = dict(stack_env, BROKER_URL=rabbitmq_clean.url)
    with start_worker(env, tmp_path) as worker:
        queues = wait_for(
            lambda: (q := _queues(rabbitmq_clean.vhost)) and "payguard.beat" in q and q,
            30,
            what="the worker's queues",
        )
        assert worker.alive(), worker.log()[-3000:]
    for name in ("payguard.events", "payguard.send", "payguard.twilio", "payguard.beat"):
        assert queues[name]["type"] == "quorum", queues[name]
    # Celery's native delayed delivery, for retry countdowns, is set up on quorum queues too.
    assert queues["celery_delayed_0"]["type"] == "quorum"


def test_the_cli_publishes_to_rabbitmq_when_broker_url_is_set(database_url, engine, rabbitmq_clean):
    """`payguard events replay` queues the event again: its task goes to RabbitMQ, confirmed,
    and its outbox row is marked published (Redis is not even configured for the console)."""
    import os
    import sys
    from pathlib import Path

    from sqlalchemy import text

    from core import inbox
    from core.db import run_in_transaction

    def failed_event(conn) -> int:
        stored, _ = inbox.store(conn, "paypal", "WH-CLI-1", "PAYMENT.CAPTURE.COMPLETED", {}, b"{}")
        inbox.finish(conn, stored.id, "failed", error="test")
        conn.execute(text("UPDATE outbox SET published_at = now()"))  # its first task went out
        return stored.id

    inbox_id = run_in_transaction(engine, failed_event)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "LANG": "C.UTF-8",
        "DATABASE_URL": database_url,
        "BROKER_URL": rabbitmq_clean.url,
    }
    payguard = [str(Path(sys.executable).parent / "payguard")]
    run = subprocess.run(
        [*payguard, "events", "replay", str(inbox_id), "--actor", "test", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr

    assert _ready_messages(rabbitmq_clean.url, "payguard.events") == 1
    with engine.connect() as conn:
        unpublished = conn.execute(
            text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        ).scalar_one()
    assert unpublished == 0
