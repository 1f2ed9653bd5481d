"""Idempotency of the host API (contract: Host API, Idempotency): a retry answers the first
answer, even when many copies arrive at once; keys live at least a day, then beat prunes
them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import requests
from sqlalchemy import text

from core import idempotency
from core.db import run_in_transaction
from tests.stack import start_web
from tests.support.api import api_org, count, make_key
from tests.support.db import tx

TO = "+15005550010"


def test_a_retry_answers_the_first_answer_with_idempotent_replayed(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    body = {"org_id": org, "to": TO, "body": "hello"}
    reordered = {"body": "hello", "to": TO, "org_id": org}

    first = api.post("/messages", key, body, headers={"Idempotency-Key": "retry-1"})
    again = api.post("/messages", key, reordered, headers={"Idempotency-Key": "retry-1"})

    assert first.status == again.status == 202
    assert first.body == again.body
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert count(engine, "messages") == 1


def test_a_refused_request_keeps_no_key_so_its_retry_is_judged_afresh(api, engine):
    key = make_key(engine, "admin")
    body = {"org_id": "later", "to": TO, "body": "hello"}

    assert api.post("/messages", key, body, headers={"Idempotency-Key": "k"}).status == 404
    api.post("/organizations", key, {"org_id": "later", "billing": "prepaid"})
    retried = api.post("/messages", key, body, headers={"Idempotency-Key": "k"})

    assert retried.status == 202 and "Idempotent-Replayed" not in retried.headers


def test_a_batch_retried_whole_or_in_part_replays_each_message(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    items = [{"to": TO, "body": f"m{i}", "idempotency_key": f"k{i}"} for i in range(4)]

    first = api.post("/messages/batch", key, {"org_id": org, "messages": items[:3]})
    whole = api.post("/messages/batch", key, {"org_id": org, "messages": items[:3]})
    grown = api.post("/messages/batch", key, {"org_id": org, "messages": items})

    assert whole.body == first.body and whole.headers["Idempotent-Replayed"] == "true"
    assert grown.body["messages"][:3] == first.body["messages"]
    assert "Idempotent-Replayed" not in grown.headers
    assert count(engine, "messages") == 4


def test_thirty_copies_at_once_queue_one_message_and_all_answer_alike(app_env, engine, tmp_path):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "burst"}
    body = {"org_id": org, "to": TO, "body": "once"}
    start = threading.Barrier(30)

    with start_web(app_env, tmp_path, workers=4) as web:

        def post(_):
            start.wait(timeout=60)
            r = requests.post(f"{web.url}/v1/messages", json=body, headers=headers, timeout=60)
            return r.status_code, r.json(), r.headers.get("Idempotent-Replayed")

        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(post, range(30)))

    assert {status for status, _, _ in answers} == {202}
    assert len({b["message_id"] for _, b, _ in answers}) == 1
    assert sorted(r is None for _, _, r in answers).count(True) == 1  # one first answer
    assert count(engine, "messages") == 1
    assert count(engine, "outbox", "task = 'payguard.send_message'") == 1


def test_keys_are_kept_a_day_and_then_pruned(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    for n in range(3):
        api.post("/messages", key, {"org_id": org, "to": TO, "body": "x"},
                 headers={"Idempotency-Key": f"k{n}"})  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
                 "WHERE key IN ('k0', 'k1')")
        )  # fmt: skip
        conn.execute(
            text("UPDATE idempotency_keys SET created_at = now() - interval '23 hours' "
                 "WHERE key = 'k2'")
        )  # fmt: skip

    pruned = run_in_transaction(
        engine,
        lambda c: idempotency.prune(c, older_than_seconds=idempotency.RETENTION_SECONDS, limit=100),
    )

    assert pruned == 2
    with engine.connect() as conn:
        assert conn.execute(text("SELECT key FROM idempotency_keys")).scalars().all() == ["k2"]


def test_beat_schedules_the_pruning():
    from core.settings import Settings
    from worker.schedule import beat_schedule

    jobs = {job["task"] for job in beat_schedule(Settings()).values()}
    assert "payguard.beat.prune_idempotency_keys" in jobs
