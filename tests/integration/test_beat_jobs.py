"""Beat jobs run twice at once (two schedulers firing the same tick) change nothing twice.

Each job's task function is called on two threads released together, in this process, on a
real database and Redis: the relay publishes each outbox row once, converge_twilio queues one
sync per subaccount, expire_holds settles each stale hold once, reconcile_campaigns pauses
each campaign once. Each run is bounded and logs what it changed.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial
from unittest import mock

import pytest
import redis
from sqlalchemy import text

from core import campaigns, inbox, messages, orgs, outbox, sending, subscriptions, wallet
from core.sending import Policy
from tests.support.db import tx
from tests.support.factories import new_org
from worker import beat_jobs, runtime

POLICY = Policy()
QUEUES = ("payguard.events", "payguard.send", "payguard.twilio", "payguard.beat")

# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def beat(monkeypatch, database_url, redis_clean):
    """The worker runtime of this process pointed at this test's database and Redis."""
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "PUBLIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", redis_clean)
    monkeypatch.setenv("OUTBOX_GRACE_SECONDS", "0")
    monkeypatch.setenv("HOLD_MAX_AGE_SECONDS", "60")
    monkeypatch.setattr(runtime, "_state", {})
    monkeypatch.setattr(beat_jobs, "_publisher", {})
    yield redis_clean
    engine = runtime._state.get("engine")
    if engine is not None:
        engine.dispose()
    if "p" in beat_jobs._publisher:
        beat_jobs._publisher["p"].close()


def twice_at_once(task, *, meet_at_lock: bool = False) -> list:
    """Run a task's body on two threads released together; both results (or exceptions).

    `task.run` is the function itself: Celery's own call wrapper is not thread-safe on first
    use, and two beat schedulers run their jobs in two worker processes anyway. With
    `meet_at_lock`, each run also waits for the other right after trying the job's advisory
    lock, so the two transactions overlap for certain (fast jobs would otherwise often run
    one after the other, which is not what this checks)."""
    job = task.run
    tried = threading.Barrier(2)
    try_lock = beat_jobs._try_lock

    def try_lock_together(conn, name, **kwargs):
        taken = try_lock(conn, name, **kwargs)
        tried.wait(timeout=30)
        return taken

    barrier = threading.Barrier(2)
    results: list = [None, None]

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            results[i] = job()
        except Exception as exc:  # reported by the assertion on the results
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    with mock.patch.object(beat_jobs, "_try_lock", try_lock_together if meet_at_lock else try_lock):
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    return results


beat_org = partial(new_org, twilio=True, price=1, billing="prepaid")


def published(redis_url: str) -> Counter:
    """Task ids of the messages waiting in the broker's queues, with how often each is there."""
    client = redis.Redis.from_url(redis_url)
    try:
        ids: Counter = Counter()
        for queue in QUEUES:
            for raw in client.lrange(queue, 0, -1):
                ids[json.loads(raw)["headers"]["id"]] += 1
        return ids
    finally:
        client.close()


def outbox_of(engine, task: str) -> list:
    with engine.connect() as c:
        return list(
            c.execute(
                text("SELECT args FROM outbox WHERE task = :t ORDER BY id"), {"t": task}
            ).scalars()
        )


# --- relay_outbox -------------------------------------------------------------------------


def test_two_relays_at_once_publish_each_outbox_row_once_and_each_run_is_bounded(
    beat, engine, caplog
):
    n = 3 * 200  # more than one run's batch

    def fill(conn):
        org = beat_org(conn, balance=1000)
        for i in range(200):
            _stored, _ = inbox.store(
                conn, "paypal", f"WH-{i}", "PAYMENT.CAPTURE.COMPLETED", {}, b"{}"
            )
            messages.queue(conn, org, "+15005550010", f"m{i}", POLICY)  # a send_message row
            outbox.enqueue(conn, sending.SYNC_TWILIO_TASK, [org])
        return [r for r in conn.execute(text("SELECT id FROM outbox ORDER BY id")).scalars()]

    outbox_ids = tx(engine, fill)
    assert len(outbox_ids) == n

    with caplog.at_level(logging.INFO, logger="worker.beat_jobs"):
        counts = twice_at_once(beat_jobs.relay_outbox)

    assert all(isinstance(c, int) for c in counts), counts
    assert all(c <= beat_jobs.BATCH for c in counts)
    assert sum(counts) == n
    with engine.connect() as c:
        sends = set(
            c.execute(
                text("SELECT id FROM outbox WHERE task = :t"), {"t": messages.SEND_TASK}
            ).scalars()
        )
    tasks = published(beat)
    drains = {t: k for t, k in tasks.items() if t.startswith("relay-drain-")}
    # Every event and sync row once; the queued messages as one drain of their organization
    # per run that claimed any of them, never a send task each.
    assert {t: k for t, k in tasks.items() if t not in drains} == Counter(
        {f"outbox-{i}": 1 for i in outbox_ids if i not in sends}
    )
    assert 1 <= sum(drains.values()) <= len(counts)
    with engine.connect() as c:
        assert (
            c.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar() == 0
        )
    assert beat_jobs.relay_outbox() == 0  # nothing is published again
    assert sum(r.published for r in caplog.records if r.getMessage() == "outbox relayed") == n


# --- converge_twilio ----------------------------------------------------------------------


def test_two_convergence_runs_at_once_queue_one_sync_per_subaccount(beat, engine, caplog):
    def lapse(conn):
        org_ids = []
        for _ in range(40):
            # Subscription-billed: a prepaid organization's subaccount stays active regardless.
            org = beat_org(conn, billing="subscription")
            subscriptions.apply_status(
                conn, "paypal", f"I-{org}", org, "cancelled", datetime.now(UTC)
            )
            sending.reconcile(conn, org, POLICY)
            org_ids.append(org)
        beat_org(conn)  # in sync: nothing to do for it
        conn.execute(text("DELETE FROM outbox"))  # as if those syncs were long gone
        return org_ids

    org_ids = tx(engine, lapse)

    with caplog.at_level(logging.INFO, logger="worker.beat_jobs"):
        counts = twice_at_once(beat_jobs.converge_twilio, meet_at_lock=True)

    assert sorted(counts) == [0, 40], counts
    queued = outbox_of(engine, sending.SYNC_TWILIO_TASK)
    assert sorted(args[0] for args in queued) == sorted(org_ids)
    assert [r.count for r in caplog.records if r.getMessage() == "twilio syncs queued"] == [40]


# --- expire_holds -------------------------------------------------------------------------


def test_two_expiry_runs_at_once_settle_each_stale_hold_once(beat, engine, caplog):
    def stale_sends(conn):
        created = []
        for _ in range(3):
            org = beat_org(conn, balance=100, price=2)
            for i in range(10):
                m = messages.queue(conn, org, "+15005550010", f"m{i}", POLICY)
                created.append((org, m.message_id))
        return created

    created = tx(engine, stale_sends)
    for i, (_, mid) in enumerate(created):
        assert tx(engine, lambda c, mid=mid: messages.prepare(c, mid, POLICY)) is not None
        if i % 3 == 0:  # Twilio was unreachable: it waits to be retried, holding its price
            tx(
                engine,
                lambda c, mid=mid: c.execute(
                    text("UPDATE messages SET status = 'retrying' WHERE message_id = :m"),
                    {"m": mid},
                ),
            )
    fresh_org = tx(engine, lambda c: beat_org(c, balance=10, price=2))
    fresh = tx(engine, lambda c: messages.queue(c, fresh_org, "+15005550010", "new", POLICY))
    tx(engine, lambda c: c.execute(text("UPDATE holds SET created_at = now() - interval '1 hour'")))
    assert tx(engine, lambda c: messages.prepare(c, fresh.message_id, POLICY)) is not None

    with caplog.at_level(logging.INFO, logger="worker.beat_jobs"):
        counts = twice_at_once(beat_jobs.expire_holds)

    assert all(isinstance(c, int) for c in counts), counts
    assert sum(counts) == len(created)
    with engine.connect() as c:
        settled = dict(
            c.execute(
                text("SELECT message_id, status FROM messages WHERE message_id <> :m"),
                {"m": fresh.message_id},
            ).all()
        )
        journal = Counter(
            c.execute(text("SELECT reference FROM journal WHERE kind = 'capture'")).scalars()
        )
        open_holds = c.execute(text("SELECT reference FROM holds WHERE status = 'open'")).scalars()
        assert list(open_holds) == [f"msg:{fresh.message_id}"]
    expected = {mid: "not_sent" if i % 3 == 0 else "unknown" for i, (_, mid) in enumerate(created)}
    assert settled == expected
    assert set(journal.values()) == {1}
    assert len(journal) == sum(1 for s in expected.values() if s == "unknown")
    for org in {org for org, _ in created}:
        state = tx(engine, lambda c, org=org: wallet.show(c, org))
        charged = 2 * sum(1 for (o, mid) in created if o == org and expected[mid] == "unknown")
        assert (state.balance_cents, state.held_cents) == (100 - charged, 0)
    assert tx(engine, lambda c: wallet.verify(c)) == []
    assert beat_jobs.expire_holds() == 0
    assert sum(r.count for r in caplog.records if r.getMessage() == "stale holds settled") == len(
        created
    )


# --- reconcile_campaigns ------------------------------------------------------------------


def test_two_campaign_reconciliations_at_once_pause_each_campaign_once(beat, engine):
    def past_due(conn):
        org_ids = []
        for _ in range(5):
            org = beat_org(conn, balance=100, billing="subscription")
            subscriptions.apply_status(
                conn, "paypal", f"I-{org}", org, "past_due", datetime.now(UTC) - timedelta(hours=1)
            )
            for c in ("spring", "summer"):
                campaigns.create_campaign(conn, org, c, POLICY)  # running: still in grace
            org_ids.append(org)
        conn.execute(text("DELETE FROM outbox"))
        return org_ids

    org_ids = tx(engine, past_due)
    # past_due for longer than the grace period: nothing told Payguard it ran out
    lapsed_at = datetime.now(UTC) - POLICY.past_due_grace - timedelta(hours=1)
    tx(
        engine,
        lambda c: c.execute(text("UPDATE subscriptions SET status_since = :t"), {"t": lapsed_at}),
    )

    counts = twice_at_once(beat_jobs.reconcile_campaigns, meet_at_lock=True)

    # per organization: two campaigns paused and the subaccount marked to be suspended
    assert sorted(counts) == [0, 3 * len(org_ids)], counts
    with engine.connect() as c:
        rows = c.execute(text("SELECT status, paused_by, pause_reason FROM campaigns")).all()
        syncs = c.execute(
            text("SELECT count(*) FROM outbox WHERE task = :t"), {"t": sending.SYNC_TWILIO_TASK}
        ).scalar_one()
    assert {tuple(r) for r in rows} == {
        ("paused", "system", f"{sending.SUBSCRIPTION_INACTIVE},{sending.TWILIO_SUSPENDED}"),
    }
    assert syncs == len(org_ids)
    assert beat_jobs.reconcile_campaigns() == 0


def test_reconciliation_pages_through_every_organization_even_those_without_campaigns(beat, engine):
    recently = datetime.now(UTC) - timedelta(hours=1)

    def past_due(conn):
        with_campaigns = []
        for _ in range(7):  # more than two pages of 3
            org = f"org-{uuid.uuid4().hex[:10]}"
            orgs.create(conn, org, twilio_subaccount_sid="AC" + uuid.uuid4().hex)
            wallet.credit(conn, org, 100, f"seed:{org}")
            subscriptions.apply_status(conn, "paypal", f"I-{org}", org, "past_due", recently)
            campaigns.create_campaign(conn, org, "spring", POLICY)  # running: still in grace
            with_campaigns.append(org)
        # Subscription-billed, no campaign at all: only its Twilio subaccount is at stake.
        bare = "zz-" + uuid.uuid4().hex[:8]  # sorts after every other: on the last page
        orgs.create(conn, bare, twilio_subaccount_sid="AC" + uuid.uuid4().hex)
        subscriptions.apply_status(conn, "paypal", f"I-{bare}", bare, "past_due", recently)
        sending.reconcile(conn, bare, POLICY)
        return with_campaigns, bare

    with_campaigns, bare = tx(engine, past_due)
    with engine.begin() as c:
        assert set(c.execute(text("SELECT status FROM campaigns")).scalars()) == {"running"}
        c.execute(text("DELETE FROM outbox"))
        # The grace runs out with no event at all: only the clock moved.
        c.execute(
            text("UPDATE subscriptions SET status_since = :t"),
            {"t": datetime.now(UTC) - POLICY.past_due_grace - timedelta(hours=1)},
        )

    changed = beat_jobs.reconcile_campaigns.run(page_size=3)

    # each organization with a campaign: one paused, the subaccount marked; the bare one: marked
    assert changed == 2 * len(with_campaigns) + 1
    with engine.connect() as c:
        desired = dict(
            c.execute(text("SELECT org_id, twilio_desired_status FROM organizations")).all()
        )
        statuses = set(c.execute(text("SELECT status FROM campaigns")).scalars())
        synced = {
            args[0]
            for args in c.execute(
                text("SELECT args FROM outbox WHERE task = :t"), {"t": sending.SYNC_TWILIO_TASK}
            ).scalars()
        }
    assert desired[bare] == "suspended"
    assert set(desired.values()) == {"suspended"}
    assert statuses == {"paused"}
    assert synced == {*with_campaigns, bare}
    assert beat_jobs.reconcile_campaigns.run(page_size=3) == 0


# --- verify_ledger ------------------------------------------------------------------------


def test_two_ledger_verifications_at_once_report_the_mismatch_once(beat, engine, caplog):
    org = tx(engine, lambda c: beat_org(c, balance=100))
    tx(
        engine,
        lambda c: c.execute(
            text("UPDATE wallets SET balance_cents = 90 WHERE org_id = :o"), {"o": org}
        ),
    )

    with caplog.at_level(logging.ERROR, logger="worker.beat_jobs"):
        counts = twice_at_once(beat_jobs.verify_ledger, meet_at_lock=True)

    assert sorted(counts) == [0, 1], counts
    [record] = [r for r in caplog.records if r.getMessage() == "ledger mismatch"]
    assert (record.org_id, record.field, record.stored, record.expected) == (
        org,
        "balance_cents",
        90,
        100,
    )
    assert tx(engine, lambda c: wallet.show(c, org)).balance_cents == 90
