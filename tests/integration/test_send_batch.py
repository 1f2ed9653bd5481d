"""The batch send path end to end (core/send_batch.py, worker/send_tasks.py): real Celery
workers, PostgreSQL and Redis, and the fake Twilio over real HTTP.

Each rule of the single send path (tests/integration/test_send_path.py) holds here per
message: only what the money covers is held, in order, the rest blocked as a single send
blocks it; a message that may have gone out is `unknown`, charged once and never created
again, whether Twilio's answer was lost or the worker died mid-batch; a refusal gives the
hold back; nothing that reached nothing at Twilio is lost. And Twilio's limits: at most
TWILIO_MAX_CONCURRENCY calls in flight per account across workers, and a 429 backs off that
account alone.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from core import messages, send_batch, sending, wallet
from core.campaigns import create_campaign, pause_campaign
from core.messages import CAMPAIGN_PAUSED
from core.send_batch import SEND_BATCH_TASK
from core.sending import INSUFFICIENT_BALANCE
from tests.integration.test_send_path import (
    GATEWAY_READ_TIMEOUT,
    POLICY,
    SENDER,
    TO,
    captures,
    holds,
    message,
    publish,
    queue,
    sending_org,
    settled,
    tx,
    wallet_of,
)
from tests.integration.test_send_path import (
    campaigns as campaign_states,
)
from tests.stack import start_worker, wait_for
from tests.support.factories import subaccount_of
from tests.support.fakes.fake_twilio import Reply

pytestmark = pytest.mark.slow


def new_org(engine, balance: int, *, price: int = 1, campaigns=()) -> tuple[str, str]:
    """A prepaid organization with a Twilio subaccount: (org id, subaccount SID)."""
    org = tx(engine, sending_org, balance=balance, price=price, campaigns=campaigns)
    return org, subaccount_of(org)


def drain(env, *org_ids: str) -> None:
    publish(env, SEND_BATCH_TASK, [[o] for o in org_ids])


def by_status(found) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in found:
        counts[m.status] = counts.get(m.status, 0) + 1
    return counts


def queue_bodies(engine, org: str, bodies: list[str]) -> list[str]:
    return tx(
        engine,
        lambda c: [messages.queue(c, org, TO, b, POLICY).message_id for b in bodies],
    )


# --- spending only what was paid ----------------------------------------------------------


def test_a_batch_holds_what_the_money_covers_in_order_and_blocks_the_rest_as_single_sends_do(
    engine, twilio_env, fake_twilio, tmp_path
):
    twilio_env["SEND_BATCH_SIZE"] = "40"  # five claims for 200 messages
    org, sub = new_org(engine, 150, price=3, campaigns=["spring", "summer", "autumn"])
    tx(engine, lambda c: pause_campaign(c, org, "autumn"))
    ids = queue(engine, org, 200, lambda i: ("spring", "summer", None)[i % 3])

    with start_worker(twilio_env, tmp_path, concurrency=2):
        drain(twilio_env, org)
        found = settled(engine, ids, timeout=90)

    assert by_status(found) == {"accepted": 50, "blocked": 150}
    # In order: the first fifty the money covers, exactly the ones sent one by one would be.
    assert [m.status for m in found[:50]] == ["accepted"] * 50
    assert fake_twilio.message_count(sub) == 50
    assert all(INSUFFICIENT_BALANCE in m.block_reasons for m in found if m.status == "blocked")
    assert sum(m.charged_cents for m in found) == 150
    state = wallet_of(engine, org)
    assert (state.balance_cents, state.held_cents) == (0, 0)
    assert captures(engine, org) == 50
    assert tx(engine, lambda c: wallet.verify(c, org)) == []
    assert campaign_states(engine, org) == {
        "spring": ("paused", "system"),
        "summer": ("paused", "system"),
        "autumn": ("paused", "user"),
    }


def test_a_cheaper_message_after_an_unaffordable_one_is_still_sent_as_a_single_send_would(
    engine, twilio_env, fake_twilio, tmp_path
):
    org, sub = new_org(engine, 5, price=1)
    # 3 segments, 3 segments, 1 segment: 3 is held, the second 3 is short, the 1 still fits.
    long_body = "x" * 400
    ids = queue_bodies(engine, org, [long_body, long_body, "short"])
    tx(engine, lambda c: create_campaign(c, org, "spring", POLICY))
    [paused] = tx(
        engine,
        lambda c: [messages.queue(c, org, TO, "in spring", POLICY, "spring").message_id],
    )
    # Paused after queueing: refused when held, as a single send refuses it.
    tx(engine, lambda c: pause_campaign(c, org, "spring"))

    with start_worker(twilio_env, tmp_path):
        drain(twilio_env, org)
        found = settled(engine, [*ids, paused])

    assert [m.status for m in found] == ["accepted", "blocked", "accepted", "blocked"]
    assert found[1].block_reasons == [INSUFFICIENT_BALANCE]
    assert CAMPAIGN_PAUSED in found[3].block_reasons
    assert [m.charged_cents for m in found] == [3, 0, 1, 0]
    assert fake_twilio.message_count(sub) == 2
    assert wallet_of(engine, org).balance_cents == 1


def test_a_frozen_wallet_blocks_the_whole_batch_and_sends_nothing(
    engine, twilio_env, fake_twilio, tmp_path
):
    org, sub = new_org(engine, 100, price=1)
    ids = queue(engine, org, 5)
    tx(engine, lambda c: wallet.freeze(c, org, "fraud-check", actor="test"))

    with start_worker(twilio_env, tmp_path):
        drain(twilio_env, org)
        found = settled(engine, ids)

    assert {m.status for m in found} == {"blocked"}
    assert all(sending.WALLET_FROZEN in m.block_reasons for m in found)
    assert fake_twilio.message_count(sub) == 0
    assert wallet_of(engine, org).held_cents == 0


# --- what Twilio answers, per message of one batch ----------------------------------------


def test_each_answer_of_a_batch_settles_its_own_message(engine, twilio_env, fake_twilio, tmp_path):
    # One batch: a refusal, a lost connection, a 5xx, and successes, in whatever order the
    # threads reach the fake. Each message settles as a single send would.
    fake_twilio.script("messages", [Reply(400, code=21211, message="bad To"), "drop", 500])
    org, sub = new_org(engine, 100, price=2)
    ids = queue(engine, org, 10)

    with start_worker(twilio_env, tmp_path) as worker:
        drain(twilio_env, org)
        found = settled(engine, ids)
        time.sleep(1.0)  # room for a (wrong) second attempt to show
        log = worker.log()

    assert by_status(found) == {"accepted": 7, "rejected": 1, "unknown": 2}, log
    assert fake_twilio.message_count(sub) == 10  # one create each, never repeated
    charged = {m.status: m.charged_cents for m in found}
    assert charged == {"accepted": 2, "rejected": 0, "unknown": 2}
    assert sorted(h[1] for h in holds(engine, org)) == ["captured"] * 9 + ["released"]
    assert captures(engine, org) == 9
    sids = {c["sid"] for c in fake_twilio.messages(sub)}
    assert {m.twilio_sid for m in found if m.status == "accepted"} <= sids
    state = wallet_of(engine, org)
    assert (state.balance_cents, state.held_cents) == (100 - 18, 0)
    assert tx(engine, lambda c: wallet.verify(c, org)) == []


def test_a_batch_whose_answers_time_out_is_unknown_charged_once_and_never_repeated(
    engine, twilio_env, fake_twilio, tmp_path
):
    fake_twilio.hang_seconds = GATEWAY_READ_TIMEOUT + 10  # longer than the worker waits
    fake_twilio.script("messages", ["timeout", "timeout"])
    org, sub = new_org(engine, 10, price=2)
    ids = queue(engine, org, 3)

    with start_worker(twilio_env, tmp_path) as worker:
        drain(twilio_env, org)
        found = settled(engine, ids, timeout=GATEWAY_READ_TIMEOUT + 20)
        time.sleep(1.0)
        log = worker.log()

    assert by_status(found) == {"unknown": 2, "accepted": 1}, log
    assert fake_twilio.message_count(sub) == 3
    assert captures(engine, org) == 3
    assert wallet_of(engine, org).balance_cents == 4


def test_a_rate_limited_message_is_sent_again_by_a_later_batch_and_charged_once(
    engine, twilio_env, fake_twilio, tmp_path
):
    fake_twilio.script("messages", [429, 429])
    org, sub = new_org(engine, 10, price=2)
    ids = queue(engine, org, 3)

    with start_worker(twilio_env, tmp_path):
        drain(twilio_env, org)
        found = settled(engine, ids, timeout=60)

    assert [m.status for m in found] == ["accepted"] * 3
    assert fake_twilio.message_count(sub) == 5  # two 429s, then each message once
    assert len(fake_twilio.messages(sub)) == 3
    assert captures(engine, org) == 3
    assert wallet_of(engine, org).balance_cents == 4


def test_twilio_unreachable_gives_the_batch_up_with_every_hold_released(
    engine, twilio_env, fake_twilio, tmp_path
):
    from tests.support.fakes.fake_twilio import unused_port

    twilio_env["TWILIO_API_BASE"] = f"http://127.0.0.1:{unused_port()}"  # connection refused
    org, _ = new_org(engine, 10, price=2)
    ids = queue(engine, org, 3)

    with start_worker(twilio_env, tmp_path) as worker:
        drain(twilio_env, org)
        found = settled(engine, ids, timeout=60)
        log = worker.log()

    assert [m.status for m in found] == ["not_sent"] * 3, log
    assert all(m.charged_cents == 0 for m in found)
    assert [h[1] for h in holds(engine, org)] == ["released"] * 3
    assert wallet_of(engine, org).available_cents == 10
    with engine.connect() as c:
        tries = c.execute(
            text("SELECT send_tries FROM messages WHERE org_id = :o"), {"o": org}
        ).scalars()
        assert set(tries) == {int(twilio_env["TASK_MAX_RETRIES"]) + 1}


# --- a worker dying mid-batch -------------------------------------------------------------


def test_a_worker_killed_mid_batch_leaves_every_message_unknown_and_charged_once(
    engine, twilio_env, fake_twilio, tmp_path
):
    twilio_env["BROKER_VISIBILITY_TIMEOUT"] = "2"  # the killed delivery is handed out again soon
    twilio_env["SEND_LEASE_SECONDS"] = "20"
    fake_twilio.hang_seconds = 60
    # Two answered at once, three that hang: the batch records nothing before all are back.
    fake_twilio.script("messages", [201, 201, "timeout", "timeout", "timeout"])
    org, sub = new_org(engine, 20, price=2)
    ids = queue(engine, org, 5)

    worker = start_worker(twilio_env, tmp_path)
    try:
        drain(twilio_env, org)
        wait_for(lambda: fake_twilio.message_count(sub) == 5, 20, what="every create sent")
        assert {message(engine, m).status for m in ids} == {"sending"}
        worker.kill()
    finally:
        worker.stop()
    time.sleep(2.5)  # past the visibility timeout: the fresh worker restores the delivery

    with start_worker(twilio_env, tmp_path) as fresh:

        def all_unknown():
            found = [message(engine, m) for m in ids]
            return found if all(m.status == "unknown" for m in found) else None

        found = wait_for(
            all_unknown,
            90,
            what="the batch settled as unknown",
        )
        time.sleep(1.0)
        log = fresh.log()

    assert fake_twilio.message_count(sub) == 5, log  # never sent again
    assert [m.charged_cents for m in found] == [2] * 5
    assert holds(engine, org) == [(f"msg:{m}", "captured", 2) for m in ids]
    assert captures(engine, org) == 5
    assert wallet_of(engine, org).balance_cents == 10
    assert tx(engine, lambda c: wallet.verify(c, org)) == []


def test_a_duplicate_drain_during_the_calls_sends_each_message_once(
    engine, twilio_env, fake_twilio, tmp_path
):
    fake_twilio.script("messages", [Reply(201, delay=2.0)] * 4)
    org, sub = new_org(engine, 10, price=2)
    ids = queue(engine, org, 4)

    with start_worker(twilio_env, tmp_path, concurrency=2):
        drain(twilio_env, org)
        wait_for(lambda: fake_twilio.message_count(sub) == 4, 20, what="the creates in flight")
        drain(twilio_env, org)  # published twice (a second request for the same organization)
        found = settled(engine, ids)
        time.sleep(1.0)

    assert [m.status for m in found] == ["accepted"] * 4
    assert fake_twilio.message_count(sub) == 4
    assert captures(engine, org) == 4
    assert wallet_of(engine, org).balance_cents == 2


def test_a_single_send_task_for_a_message_a_batch_settled_does_nothing(
    engine, twilio_env, fake_twilio, tmp_path
):
    org, sub = new_org(engine, 10, price=2)
    [mid] = queue(engine, org)

    with start_worker(twilio_env, tmp_path):
        drain(twilio_env, org)
        settled(engine, [mid])
        publish(twilio_env, messages.SEND_TASK, [[mid]])  # the outbox relay's copy
        time.sleep(1.5)

    assert message(engine, mid).status == "accepted"
    assert fake_twilio.message_count(sub) == 1
    assert wallet_of(engine, org).balance_cents == 8


def test_a_claim_reads_a_big_backlog_through_its_index_not_a_sort(engine):
    # An organization's first big batch, before ANALYZE has seen it: PostgreSQL estimated a
    # handful of rows and sorted the whole backlog (on disk) for every claim of a hundred.
    org, _ = new_org(engine, 10**6)
    for start in range(0, 20_000, 1_000):
        items = [(TO, f"message {i}") for i in range(start, start + 1_000)]
        tx(engine, lambda c, it=items: messages.queue_batch(c, org, it, POLICY))
    explain = text("EXPLAIN " + send_batch._TO_SEND.text)

    with engine.begin() as conn:
        # Costs that favour reading every row and sorting, as stale statistics can: PostgreSQL
        # chose that plan for a table ANALYZE had never seen (106 ms a claim for 200,000).
        conn.execute(text("SET LOCAL random_page_cost = 1000"))
        with send_batch.index_order(conn):
            plan = "\n".join(conn.execute(explain, {"org_id": org, "limit": 100}).scalars())
        claim = send_batch.claim(conn, org, 100, POLICY, "owner-1")
        # ...and the transaction's later statements are planned as configured again.
        assert conn.execute(text("SHOW enable_sort")).scalar_one() == "on"

    assert "Sort" not in plan and "messages_to_send" in plan, plan
    assert len(claim.plans) == 100


# --- Twilio's limits ----------------------------------------------------------------------


def test_no_account_has_more_calls_in_flight_than_its_cap_across_workers(
    engine, twilio_env, fake_twilio, tmp_path
):
    twilio_env.update(TWILIO_MAX_CONCURRENCY="3", SEND_BATCH_THREADS="10", SEND_BATCH_SIZE="10")
    fake_twilio.set_default("messages", Reply(201, delay=0.2))
    org_a, sub_a = new_org(engine, 100)
    org_b, sub_b = new_org(engine, 100)
    ids = queue(engine, org_a, 20) + queue(engine, org_b, 20)

    # Two worker processes, each running one batch of org A and one of org B at a time.
    with (
        start_worker(twilio_env, tmp_path, concurrency=2),
        start_worker(twilio_env, tmp_path, concurrency=2),
    ):
        drain(twilio_env, org_a, org_a, org_b, org_b)
        found = settled(engine, ids, timeout=90)

    assert {m.status for m in found} == {"accepted"}
    assert fake_twilio.message_count(sub_a) == fake_twilio.message_count(sub_b) == 20
    assert 1 <= fake_twilio.peak_concurrency(sub_a) <= 3
    assert 1 <= fake_twilio.peak_concurrency(sub_b) <= 3


def test_a_429_backs_off_that_account_only(engine, twilio_env, fake_twilio, tmp_path):
    # A backoff long enough that org B's sends are seen inside it on a busy machine too.
    twilio_env.update(
        SEND_BATCH_THREADS="4", SEND_BATCH_SIZE="4", TWILIO_RATE_LIMIT_BACKOFF_SECONDS="4"
    )
    org_a, sub_a = new_org(engine, 100)
    org_b, sub_b = new_org(engine, 100)
    fake_twilio.script("messages", [429], account_sid=sub_a)
    fake_twilio.set_default("messages", Reply(201, delay=0.1))
    [id_a], ids_b = queue(engine, org_a, 1), queue(engine, org_b, 12)

    with start_worker(twilio_env, tmp_path, concurrency=2):
        drain(twilio_env, org_a)
        # Org B's work is published only once A has met its 429, not by timing luck.
        wait_for(lambda: fake_twilio.requests("messages", sub_a), what="org A's first send")
        drain(twilio_env, org_b)
        found = settled(engine, [id_a, *ids_b], timeout=60)

    assert {m.status for m in found} == {"accepted"}
    a = fake_twilio.requests("messages", sub_a)
    b = fake_twilio.requests("messages", sub_b)
    assert [r.behaviour == "429" for r in a] == [True, False] and len(b) == 12
    limited, sent = a[0].received_at, a[1].received_at
    # Org A's message waited out the backoff (four seconds, from Redis)...
    assert sent - limited >= 3.9
    # ...while all of org B's sends went on within it (twelve 0.1 s calls, four at a time).
    assert max(r.received_at for r in b) < limited + 3.0
    assert wallet_of(engine, org_a).balance_cents == 99
    assert wallet_of(engine, org_b).balance_cents == 88


def test_a_batch_send_names_the_sender_and_the_status_callback(
    engine, twilio_env, fake_twilio, tmp_path
):
    org, sub = new_org(engine, 10)
    [mid] = queue(engine, org)

    with start_worker(twilio_env, tmp_path):
        drain(twilio_env, org)
        [m] = settled(engine, [mid])

    [created] = fake_twilio.messages(sub)
    assert (created["sid"], created["from"], created["to"]) == (m.twilio_sid, SENDER, TO)
    assert (
        created["status_callback"]
        == f"{twilio_env['PUBLIC_BASE_URL']}/webhooks/twilio/status?m={mid}"
    )
