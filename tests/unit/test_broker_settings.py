"""Which broker the settings select, and what Payguard asks of RabbitMQ (no server needed:
tests/integration/test_rabbitmq_broker.py runs them against a real one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bus import broker
from core.settings import Settings


def test_the_broker_is_rabbitmq_only_when_broker_url_says_so():
    redis_only = Settings(_env_file=None, REDIS_URL="redis://127.0.0.1:6379/0")
    assert redis_only.broker_url == "redis://127.0.0.1:6379/0"
    assert not redis_only.broker_is_rabbitmq

    both = Settings(
        _env_file=None, REDIS_URL="redis://127.0.0.1:6379/0", BROKER_URL="amqp://u:p@mq:5672/pg"
    )
    assert both.broker_url == "amqp://u:p@mq:5672/pg" and both.broker_is_rabbitmq
    assert both.REDIS_URL == "redis://127.0.0.1:6379/0"  # still the shared store

    empty = Settings(_env_file=None, REDIS_URL="redis://127.0.0.1:6379/0", BROKER_URL="")
    assert empty.broker_url == "redis://127.0.0.1:6379/0"  # empty is unset

    with pytest.raises(ValueError, match="must be an amqp://"):
        Settings(_env_file=None, BROKER_URL="http://mq:15672/")


def test_on_rabbitmq_every_queue_is_a_durable_quorum_queue_with_confirmed_publishes():
    options = broker.celery_options(
        "amqp://u:p@mq:5672/pg", delivery_limit=7, visibility_timeout=3600
    )
    queues = {q.name: q for q in options["task_queues"]}
    assert set(queues) == set(broker.QUEUES)
    for q in queues.values():
        assert q.durable
        assert q.queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": 7}
        # Native delayed delivery (retry countdowns) forwards through topic exchanges only.
        assert q.exchange.type == "topic"
    assert options["broker_transport_options"]["confirm_publish"] is True
    assert options["worker_detect_quorum_queues"] is True
    assert options["task_create_missing_queue_type"] == "quorum"


def test_prepared_statements_can_be_turned_off_for_pgbouncer():
    assert Settings(_env_file=None).DATABASE_PREPARE_THRESHOLD == 5  # psycopg's default
    assert (
        Settings(_env_file=None, DATABASE_PREPARE_THRESHOLD="none").DATABASE_PREPARE_THRESHOLD
        is None
    )
    assert Settings(_env_file=None, DATABASE_PREPARE_THRESHOLD="0").DATABASE_PREPARE_THRESHOLD == 0


def test_every_task_the_worker_runs_has_its_queue_in_the_one_table_of_routes():
    # In a process of its own: the worker's Celery app reads its settings when imported.
    listing = """
import json
import worker.beat_jobs, worker.outbound_tasks, worker.send_tasks, worker.tasks
from worker.celery_app import app
print(json.dumps(sorted(n for n in app.tasks if n.startswith("payguard."))))
"""
    env = {
        **os.environ,
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    env.pop("BROKER_URL", None)
    out = subprocess.run(
        [sys.executable, "-c", listing], env=env, capture_output=True, text=True, check=True
    )
    tasks = json.loads(out.stdout.strip().splitlines()[-1])
    assert "payguard.capture_top_up" in tasks
    # beat's jobs go to payguard.beat by their name; every other task is in broker.ROUTES,
    # which the publishers (bus/publisher.py) route by too.
    assert [t for t in tasks if not t.startswith("payguard.beat.") and t not in broker.ROUTES] == []
