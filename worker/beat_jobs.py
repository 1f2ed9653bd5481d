"""Periodic repair jobs run by beat. Each is bounded per run, logs what it changed, and is
harmless when two schedulers fire it at once (SKIP LOCKED rows or a transaction-scoped
advisory lock that the second run fails to take and so does nothing)."""

from __future__ import annotations

import logging
from functools import partial

from sqlalchemy import Connection

from bus.publisher import Publisher
from core import db, idempotency, messages, orgs, outbox, sending, topups, wallet
from core.db import run_in_transaction
from core.providers.twilio import accounts as twilio_accounts
from worker import runtime
from worker.celery_app import app

log = logging.getLogger(__name__)

BATCH = 500
# Organizations re-decided per transaction by reconcile_campaigns; each page commits on its own.
RECONCILE_PAGE = 500


def _try_lock(conn: Connection, job: str) -> bool:
    """The job's advisory lock, released at the end of the transaction (core.db.try_lock)."""
    return db.try_lock(conn, f"payguard.beat.{job}")


_publisher: dict[str, Publisher] = {}


def publisher() -> Publisher:
    if "p" not in _publisher:
        s = runtime.settings()
        _publisher["p"] = Publisher.from_settings(s)
    return _publisher["p"]


@app.task(name="payguard.beat.relay_outbox", acks_late=True)
def relay_outbox() -> int:
    """Publish outbox rows the receiver could not, and re-publish stuck events."""
    s = runtime.settings()

    def relay(conn: Connection) -> int:
        return outbox.relay(
            conn,
            publisher(),
            limit=BATCH,
            grace_seconds=s.OUTBOX_GRACE_SECONDS,
            redeliver_seconds=s.EVENT_REDELIVER_SECONDS,
        )

    count = run_in_transaction(runtime.engine(), relay)
    if count:
        log.info("outbox relayed", extra={"published": count})
    return count


@app.task(name="payguard.beat.converge_twilio", acks_late=True)
def converge_twilio() -> int:
    """Enqueue a sync for every subaccount whose status is not what it should be."""

    def enqueue(conn: Connection) -> int:
        if not _try_lock(conn, "converge_twilio"):
            return 0
        orgs = twilio_accounts.out_of_sync(conn, BATCH)
        for org_id in orgs:
            outbox.enqueue(conn, sending.SYNC_TWILIO_TASK, [org_id])
        return len(orgs)

    count = run_in_transaction(runtime.engine(), enqueue)
    if count:
        log.info("twilio syncs queued", extra={"count": count})
    return count


@app.task(name="payguard.beat.reconcile_campaigns", acks_late=True)
def reconcile_campaigns(page_size: int = RECONCILE_PAGE) -> int:
    """Re-decide every organization, campaigns or not: a grace period may have run out, and
    then campaigns pause and the Twilio subaccount is marked to be suspended.

    Keyset pages of `page_size` organizations, one transaction each, so no transaction holds
    every organization's rows; the job's advisory lock, taken in a transaction of its own left
    open on a connection of its own for the whole walk, keeps a second beat out until the walk
    is over. That transaction only holds the lock: it writes nothing (no transaction id) and,
    at READ COMMITTED, keeps no snapshot between statements, so it holds back no vacuum."""
    engine = runtime.engine()
    policy = runtime.policy()

    def page(conn: Connection, after: str) -> tuple[list[str], int]:
        org_ids = orgs.ids_after(conn, after, page_size)
        changed = 0
        for org_id in org_ids:
            r = sending.reconcile(conn, org_id, policy)
            changed += len(r.paused) + len(r.resumed) + int(r.twilio_desired_changed)
        return org_ids, changed

    changed = 0
    with engine.connect() as lock_conn:
        try:
            if not _try_lock(lock_conn, "reconcile_campaigns"):
                return 0
            after = ""
            while True:
                org_ids, n = run_in_transaction(engine, partial(page, after=after))
                changed += n
                if len(org_ids) < page_size:
                    break
                after = org_ids[-1]
        finally:
            lock_conn.rollback()  # ends the lock's transaction: the lock goes with it
    if changed:
        log.info("campaigns reconciled", extra={"changed": changed})
    return changed


@app.task(name="payguard.beat.verify_ledger", acks_late=True)
def verify_ledger() -> int:
    """Every wallet against its journal; the count is recorded for /metrics to serve."""

    def run(conn: Connection):
        if not _try_lock(conn, "verify_ledger"):
            return []
        mismatches = wallet.verify(conn)
        twilio_count, twilio_found = messages.segment_mismatches(conn, limit=100)
        wallet.record_check(conn, len(mismatches), twilio_count)
        for t in twilio_found:
            log.warning("twilio billed other segments than charged", extra=t.as_dict())
        return mismatches

    mismatches = run_in_transaction(runtime.engine(), run)
    for m in mismatches:
        log.error("ledger mismatch", extra=m.as_dict())
    return len(mismatches)


@app.task(name="payguard.beat.expire_holds", acks_late=True)
def expire_holds() -> int:
    s = runtime.settings()
    count = messages.expire_stale_holds(
        runtime.engine(), s.HOLD_MAX_AGE_SECONDS, BATCH, runtime.policy()
    )
    if count:
        log.info("stale holds settled", extra={"count": count})
    return count


@app.task(name="payguard.beat.refresh_subscriptions", acks_late=True)
def refresh_subscriptions() -> int:
    """Ask the providers about subscriptions whose last event is old (missed webhooks)."""
    from worker import reconcile_providers

    return reconcile_providers.refresh_stale(runtime.settings(), runtime.engine(), runtime.policy())


@app.task(name="payguard.beat.prune_idempotency_keys", acks_late=True)
def prune_idempotency_keys() -> int:
    """Forget idempotency keys of the host API older than a day (the contract keeps them at
    least 24 hours), a bounded batch per transaction, until none is left."""
    pruned = 0
    for _ in range(100):
        count = run_in_transaction(
            runtime.engine(),
            lambda conn: idempotency.prune(
                conn, older_than_seconds=idempotency.RETENTION_SECONDS, limit=5000
            ),
        )
        pruned += count
        if count < 5000:
            break
    if pruned:
        log.info("idempotency keys pruned", extra={"count": pruned})
    return pruned


@app.task(name="payguard.beat.expire_top_ups", acks_late=True)
def expire_top_ups() -> int:
    """Top-ups nobody approved within the provider's window (PayPal: 3 hours, Stripe: 24)
    become `expired`; SKIP LOCKED, so two beats share the work."""
    s = runtime.settings()
    windows = {
        "paypal": s.TOP_UP_PAYPAL_EXPIRE_SECONDS,
        "stripe": s.TOP_UP_STRIPE_EXPIRE_SECONDS,
    }
    expired = 0
    for provider, seconds in windows.items():
        expired += run_in_transaction(
            runtime.engine(),
            partial(
                topups.expire_stale, provider=provider, older_than_seconds=seconds, limit=BATCH
            ),
        )
    if expired:
        log.info("top-ups expired", extra={"count": expired})
    return expired
