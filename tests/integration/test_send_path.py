"""The safe send path end to end: real Celery workers (subprocesses), real PostgreSQL and
Redis, and the fake Twilio over real HTTP.

What must hold however Twilio answers and whenever a worker dies: no message reaches Twilio
unless its price is held first; a message that may have been sent is charged once and never
created again; a refusal gives the hold back; an inactive subscription blocks sending from
the moment it is recorded, before Twilio has suspended the subaccount.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from functools import partial

import pytest
from sqlalchemy import text

from bus.publisher import Publisher
from core import inbox, messages, orgs, outbox, sending, subscriptions, wallet
from core.campaigns import list_campaigns, pause_campaign
from core.sending import INSUFFICIENT_BALANCE, SUBSCRIPTION_INACTIVE, TWILIO_SUSPENDED, Policy
from tests.stack import start_worker, wait_for
from tests.support.db import tx
from tests.support.factories import (
    TWILIO_PARENT_SID,
    TWILIO_PARENT_TOKEN,
    new_org,
    subaccount_of,
)
from tests.support.fakes.fake_twilio import Reply, unused_port
from tests.support.payloads import paypal as paypal_payloads

pytestmark = pytest.mark.slow

SENDER = "+15005550006"
TO = "+15005550010"
POLICY = Policy()
SETTLED = ("accepted", "rejected", "unknown", "blocked", "not_sent")
GATEWAY_READ_TIMEOUT = (
    15.0  # core.providers.twilio.gateway.DEFAULT_TIMEOUT: the worker's read timeout
)

# --- helpers ------------------------------------------------------------------------------


sending_org = partial(new_org, price=1, twilio=True, active=True)


def queue(engine, org: str, n: int = 1, campaign_of=lambda i: None) -> list[str]:
    def unit(conn):
        return [
            messages.queue(conn, org, TO, f"message {i}", POLICY, campaign_of(i)).message_id
            for i in range(n)
        ]

    return tx(engine, unit)


def publish(env, task: str, args_list: list[list]) -> None:
    publisher = Publisher(env["REDIS_URL"], timeout=2.0)
    try:
        for args in args_list:
            publisher.publish(task, args)
    finally:
        publisher.close()


def send(env, message_ids: list[str]) -> None:
    publish(env, messages.SEND_TASK, [[m] for m in message_ids])


def message(engine, message_id: str) -> messages.Message:
    return tx(engine, lambda c: messages.get(c, message_id))


def settled(engine, message_ids: list[str], timeout: float = 60.0) -> list[messages.Message]:
    def all_settled():
        found = [message(engine, m) for m in message_ids]
        return found if all(m.status in SETTLED for m in found) else None

    return wait_for(all_settled, timeout, 0.1, what="messages settled")


def wallet_of(engine, org: str) -> wallet.WalletState:
    return tx(engine, lambda c: wallet.show(c, org))


def holds(engine, org: str) -> list[tuple[str, str, int | None]]:
    with engine.connect() as c:
        return [
            tuple(r)
            for r in c.execute(
                text(
                    "SELECT reference, status, captured_cents FROM holds WHERE org_id = :o "
                    "ORDER BY id"
                ),
                {"o": org},
            )
        ]


def captures(engine, org: str) -> int:
    with engine.connect() as c:
        return c.execute(
            text("SELECT count(*) FROM journal WHERE org_id = :o AND kind = 'capture'"),
            {"o": org},
        ).scalar_one()


def campaigns(engine, org: str) -> dict[str, tuple]:
    return {
        c.campaign_id: (c.status, c.paused_by)
        for c in tx(engine, lambda conn: list_campaigns(conn, org))
    }


def deliver_paypal_event(engine, env, payload: dict) -> int:
    """Store a (verified) PayPal event in the inbox, as the receiver does, and publish it."""
    stored, _ = tx(
        engine,
        lambda c: inbox.store(
            c, "paypal", payload["id"], payload["event_type"], {}, json.dumps(payload).encode()
        ),
    )
    publish(env, outbox.PROCESS_EVENT_TASK, [[stored.id]])
    return stored.id


def outbox_args(engine, task: str) -> list:
    with engine.connect() as c:
        return list(
            c.execute(
                text("SELECT args FROM outbox WHERE task = :t ORDER BY id"), {"t": task}
            ).scalars()
        )


def twilio_status(engine, org: str) -> tuple[str, str]:
    row = tx(engine, lambda c: orgs.get(c, org))
    return row.twilio_desired_status, row.twilio_status


# --- spending only what was paid ----------------------------------------------------------


def test_two_hundred_sends_for_a_wallet_that_pays_for_fifty(
    engine, twilio_env, fake_twilio, tmp_path
):
    org = tx(engine, sending_org, balance=150, price=3, campaigns=["spring", "summer", "autumn"])
    sub = subaccount_of(org)
    tx(engine, lambda c: pause_campaign(c, org, "autumn"))
    ids = queue(engine, org, 200, lambda i: ("spring", "summer", None)[i % 3])

    with start_worker(twilio_env, tmp_path, concurrency=8):
        send(twilio_env, ids)
        found = settled(engine, ids, timeout=90)

        by_status: dict[str, int] = {}
        for m in found:
            by_status[m.status] = by_status.get(m.status, 0) + 1
        assert by_status == {"accepted": 50, "blocked": 150}
        assert fake_twilio.message_count(sub) == 50
        assert fake_twilio.message_count() == 50
        assert all(INSUFFICIENT_BALANCE in m.block_reasons for m in found if m.status == "blocked")
        assert sum(m.charged_cents for m in found) == 150
        state = wallet_of(engine, org)
        assert (state.balance_cents, state.held_cents) == (0, 0)
        assert captures(engine, org) == 50
        assert tx(engine, lambda c: wallet.verify(c, org)) == []
        assert campaigns(engine, org) == {
            "spring": ("paused", "system"),
            "summer": ("paused", "system"),
            "autumn": ("paused", "user"),
        }

        # A payment arrives through the PayPal handler: what the system paused resumes.
        deliver_paypal_event(
            engine,
            twilio_env,
            paypal_payloads.capture_completed(org, paypal_payloads.new_id(), "5.00"),
        )
        wait_for(
            lambda: campaigns(engine, org)["spring"] == ("running", None),
            30,
            what="campaigns resumed after the payment",
        )
    assert wallet_of(engine, org).balance_cents == 500
    assert campaigns(engine, org) == {
        "spring": ("running", None),
        "summer": ("running", None),
        "autumn": ("paused", "user"),
    }


# --- what Twilio answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviours",
    [["timeout"], ["drop", 500, 503]],
    ids=["read-timeout", "connection-lost-or-5xx"],
)
def test_a_send_that_may_have_gone_out_is_unknown_charged_once_and_never_repeated(
    engine, twilio_env, fake_twilio, tmp_path, behaviours
):
    fake_twilio.hang_seconds = GATEWAY_READ_TIMEOUT + 10  # longer than the worker waits
    fake_twilio.script("messages", behaviours)  # one per message, in order (one worker)
    org = tx(engine, sending_org, balance=10, price=2)
    sub = subaccount_of(org)
    ids = queue(engine, org, len(behaviours))

    with start_worker(twilio_env, tmp_path) as worker:
        send(twilio_env, ids)
        found = settled(engine, ids, timeout=GATEWAY_READ_TIMEOUT + 15)
        time.sleep(1.0)  # room for a (wrong) second attempt to show
        log = worker.log()

    assert [m.status for m in found] == ["unknown"] * len(ids), log
    assert [m.charged_cents for m in found] == [2] * len(ids)
    assert fake_twilio.message_count(sub) == len(ids)  # one create each, never repeated
    assert holds(engine, org) == [(f"msg:{mid}", "captured", 2) for mid in ids]
    assert captures(engine, org) == len(ids)
    assert wallet_of(engine, org).balance_cents == 10 - 2 * len(ids)


def test_a_refused_send_gives_the_hold_back(engine, twilio_env, fake_twilio, tmp_path):
    fake_twilio.script("messages", [Reply(400, code=21211, message="bad To")])
    org = tx(engine, sending_org, balance=10, price=2)
    sub = subaccount_of(org)
    [mid] = queue(engine, org)

    with start_worker(twilio_env, tmp_path):
        send(twilio_env, [mid])
        [m] = settled(engine, [mid])

    assert (m.status, m.charged_cents) == ("rejected", 0)
    assert "21211" in (m.error or "")
    assert fake_twilio.message_count(sub) == 1
    assert holds(engine, org) == [(f"msg:{mid}", "released", 0)]
    state = wallet_of(engine, org)
    assert (state.balance_cents, state.held_cents) == (10, 0)


def test_a_rate_limited_send_is_retried_and_charged_once(engine, twilio_env, fake_twilio, tmp_path):
    fake_twilio.script("messages", [429, 429, 201])
    org = tx(engine, sending_org, balance=10, price=2)
    sub = subaccount_of(org)
    [mid] = queue(engine, org)

    with start_worker(twilio_env, tmp_path):
        send(twilio_env, [mid])
        [m] = settled(engine, [mid])

    assert m.status == "accepted"
    assert m.twilio_sid and m.twilio_sid.startswith("SM")
    assert fake_twilio.message_count(sub) == 3
    [created] = fake_twilio.messages(sub)
    assert (created["sid"], created["from"], created["to"]) == (m.twilio_sid, SENDER, TO)
    assert (
        created["status_callback"]
        == f"{twilio_env['PUBLIC_BASE_URL']}/webhooks/twilio/status?m={mid}"
    )
    assert {r.auth for r in fake_twilio.requests("messages")} == {
        (TWILIO_PARENT_SID, TWILIO_PARENT_TOKEN)
    }
    assert holds(engine, org) == [(f"msg:{mid}", "captured", 2)]
    assert wallet_of(engine, org).balance_cents == 8


def test_twilio_unreachable_is_retried_then_given_up_with_the_hold_released(
    engine, twilio_env, fake_twilio, tmp_path
):
    twilio_env["TWILIO_API_BASE"] = f"http://127.0.0.1:{unused_port()}"  # connection refused
    org = tx(engine, sending_org, balance=10, price=2)
    [mid] = queue(engine, org)

    with start_worker(twilio_env, tmp_path) as worker:
        send(twilio_env, [mid])
        [m] = settled(engine, [mid], timeout=30)
        log = worker.log()

    assert m.status == "not_sent", log
    assert m.charged_cents == 0
    assert log.count("retry") >= int(twilio_env["TASK_MAX_RETRIES"]), log  # it was retried
    assert holds(engine, org) == [(f"msg:{mid}", "released", 0)]
    assert wallet_of(engine, org).available_cents == 10


def test_a_retry_after_the_subscription_lapsed_does_not_send(
    engine, twilio_env, fake_twilio, tmp_path
):
    # Twilio takes a while to answer 429; meanwhile the subscription is cancelled.
    fake_twilio.script("messages", [Reply(429, delay=2.0)])
    org = tx(engine, sending_org, balance=10, price=2)
    sub = subaccount_of(org)
    [mid] = queue(engine, org)

    with start_worker(twilio_env, tmp_path):
        send(twilio_env, [mid])
        wait_for(lambda: fake_twilio.message_count(sub) == 1, 20, what="first attempt")
        tx(
            engine,
            lambda c: (
                subscriptions.apply_status(
                    c, "paypal", f"I-{org}", org, "cancelled", datetime.now(UTC)
                ),
                sending.reconcile(c, org, POLICY),
            ),
        )
        [m] = settled(engine, [mid], timeout=30)
        time.sleep(0.5)

    assert fake_twilio.message_count(sub) == 1  # the retry was not sent
    assert m.status == "blocked"
    assert SUBSCRIPTION_INACTIVE in m.block_reasons
    assert holds(engine, org) == [(f"msg:{mid}", "released", 0)]
    assert wallet_of(engine, org).available_cents == 10


# --- a worker dying during the call -------------------------------------------------------


def test_a_worker_killed_during_the_twilio_call_leaves_the_message_unknown_and_charged(
    engine, twilio_env, fake_twilio, tmp_path
):
    twilio_env["BROKER_VISIBILITY_TIMEOUT"] = "2"  # the killed delivery is handed out again soon
    # The redelivery leaves the message to the dead run until its lease is over (the shortest
    # lease allowed), then calls it unknown.
    twilio_env["SEND_LEASE_SECONDS"] = "20"
    fake_twilio.hang_seconds = 60
    fake_twilio.script("messages", ["timeout"])
    org = tx(engine, sending_org, balance=10, price=2)
    sub = subaccount_of(org)
    [mid] = queue(engine, org)

    worker = start_worker(twilio_env, tmp_path)
    try:
        send(twilio_env, [mid])
        wait_for(lambda: fake_twilio.message_count(sub) == 1, 20, what="the create to hang")
        assert message(engine, mid).status == "sending"
        worker.kill()
    finally:
        worker.stop()
    time.sleep(2.5)  # past the visibility timeout: the fresh worker restores the delivery

    with start_worker(twilio_env, tmp_path) as fresh:
        m = wait_for(
            lambda: (found := message(engine, mid)).status == "unknown" and found,
            90,
            what="the message settled as unknown",
        )
        time.sleep(1.0)
        log = fresh.log()

    assert fake_twilio.message_count(sub) == 1, log
    assert m.charged_cents == 2
    assert holds(engine, org) == [(f"msg:{mid}", "captured", 2)]
    assert wallet_of(engine, org).balance_cents == 8
    assert tx(engine, lambda c: wallet.verify(c, org)) == []


def test_a_duplicate_delivery_during_the_call_leaves_the_send_to_its_owner(
    engine, twilio_env, fake_twilio, tmp_path
):
    fake_twilio.script("messages", [Reply(201, delay=2.0)])
    org = tx(engine, sending_org, balance=10, price=2)
    sub = subaccount_of(org)
    [mid] = queue(engine, org)

    with start_worker(twilio_env, tmp_path, concurrency=2):
        send(twilio_env, [mid])
        wait_for(lambda: fake_twilio.message_count(sub) == 1, 20, what="the create in flight")
        send(twilio_env, [mid])  # published twice (say by the CLI and by the outbox relay)
        [m] = settled(engine, [mid])
        time.sleep(1.0)

    [created] = fake_twilio.messages(sub)
    assert (m.status, m.twilio_sid) == ("accepted", created["sid"])
    assert fake_twilio.message_count(sub) == 1
    assert holds(engine, org) == [(f"msg:{mid}", "captured", 2)]
    assert wallet_of(engine, org).balance_cents == 8


# --- the Twilio subaccount ----------------------------------------------------------------


def test_a_cancelled_subscription_blocks_sending_before_twilio_suspends_the_subaccount(
    engine, twilio_env, fake_twilio, tmp_path
):
    # Twilio is slow to answer, and then rate limits the first suspension.
    fake_twilio.script("account", [Reply(429, delay=4.0), 200])
    org = tx(engine, sending_org, balance=10, price=2, campaigns=["spring"])
    sub = subaccount_of(org)

    with start_worker(twilio_env, tmp_path, concurrency=2):
        deliver_paypal_event(
            engine,
            twilio_env,
            paypal_payloads.subscription_event("BILLING.SUBSCRIPTION.CANCELLED", f"I-{org}", org),
        )
        wait_for(
            lambda: twilio_status(engine, org) == ("suspended", "active"),
            20,
            what="the suspension recorded as desired",
        )
        # The handler queued the sync in the outbox; publish it as the relay would.
        assert outbox_args(engine, sending.SYNC_TWILIO_TASK) == [[org]]
        publish(twilio_env, sending.SYNC_TWILIO_TASK, [[org]])
        wait_for(lambda: fake_twilio.requests("account", sub), 10, what="the suspension call")

        [mid] = queue(engine, org, campaign_of=lambda i: "spring")
        send(twilio_env, [mid])
        [m] = settled(engine, [mid])
        assert fake_twilio.account_status(sub) == "active"  # Twilio has not suspended it yet
        assert m.status == "blocked"
        assert {SUBSCRIPTION_INACTIVE, TWILIO_SUSPENDED} <= set(m.block_reasons)
        assert campaigns(engine, org) == {"spring": ("paused", "system")}

        wait_for(
            lambda: twilio_status(engine, org) == ("suspended", "suspended"),
            30,
            what="Twilio's confirmation recorded",
        )
    assert fake_twilio.account_status(sub) == "suspended"
    updates = [r.params.get("Status") for r in fake_twilio.requests("account", sub)]
    assert updates == ["suspended", "suspended"]  # the 429, then the retry
    assert fake_twilio.message_count() == 0
    assert wallet_of(engine, org).held_cents == 0


def test_the_subaccount_is_suspended_through_errors_and_reactivated_but_never_closed(
    engine, twilio_env, fake_twilio, tmp_path
):
    fake_twilio.script("account", [429, 503, "drop", 200])
    org = tx(engine, sending_org, balance=10, price=2, campaigns=["spring"])
    sub = subaccount_of(org)

    def change(status: str) -> None:
        def unit(conn):
            subscriptions.apply_status(conn, "paypal", f"I-{org}", org, status, datetime.now(UTC))
            sending.reconcile(conn, org, POLICY)

        tx(engine, unit)
        publish(twilio_env, sending.SYNC_TWILIO_TASK, [[org]])

    with start_worker(twilio_env, tmp_path):
        change("cancelled")
        wait_for(lambda: twilio_status(engine, org) == ("suspended", "suspended"), 30)
        assert fake_twilio.account_status(sub) == "suspended"
        assert campaigns(engine, org) == {"spring": ("paused", "system")}

        change("active")
        wait_for(lambda: twilio_status(engine, org) == ("active", "active"), 30)
        wait_for(lambda: campaigns(engine, org) == {"spring": ("running", None)}, 10)

    assert fake_twilio.account_status(sub) == "active"
    updates = [r.params.get("Status") for r in fake_twilio.requests("account", sub)]
    assert updates == ["suspended"] * 4 + ["active"]
    assert all(
        r.auth == (TWILIO_PARENT_SID, TWILIO_PARENT_TOKEN) for r in fake_twilio.requests("account")
    )
