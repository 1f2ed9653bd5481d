"""Periodic repair jobs run by beat. Each is bounded per run, logs what it changed, and is
harmless when two schedulers fire it at once (SKIP LOCKED rows or a transaction-scoped
advisory lock that the second run fails to take and so does nothing)."""

from __future__ import annotations

import logging
import zlib

from sqlalchemy import Connection, text

from core import inbox, sending, twilio_accounts, wallet
from core.db import run_in_transaction
from worker import runtime
from worker.celery_app import app
from worker.publisher import Publisher

log = logging.getLogger(__name__)

BATCH = 500


def _try_lock(conn: Connection, job: str) -> bool:
    key = zlib.crc32(f"payguard.beat.{job}".encode())
    return bool(conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar())


_publisher: dict[str, Publisher] = {}


def publisher() -> Publisher:
    if "p" not in _publisher:
        s = runtime.settings()
        _publisher["p"] = Publisher(s.REDIS_URL or "", timeout=s.BROKER_PUBLISH_TIMEOUT)
    return _publisher["p"]


@app.task(name="payguard.beat.relay_outbox", acks_late=True)
def relay_outbox() -> int:
    """Publish outbox rows the receiver could not, and re-publish stuck events."""
    s = runtime.settings()

    def relay(conn: Connection) -> int:
        rows = inbox.claim_for_relay(
            conn,
            limit=BATCH,
            grace_seconds=s.OUTBOX_GRACE_SECONDS,
            redeliver_seconds=s.EVENT_REDELIVER_SECONDS,
        )
        published = []
        for row in rows:
            try:
                publisher().publish(row.task, list(row.args), task_id=f"outbox-{row.id}")
            except Exception as exc:
                inbox.record_publish_failure(conn, row.id, repr(exc))
                log.warning("outbox publish failed", extra={"outbox_id": row.id, "error": str(exc)})
                break
            published.append(row.id)
        inbox.mark_published(conn, published)
        inbox.prune_published(conn, older_than_seconds=86400, limit=BATCH)
        return len(published)

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
            inbox.enqueue(conn, sending.SYNC_TWILIO_TASK, [org_id])
        return len(orgs)

    count = run_in_transaction(runtime.engine(), enqueue)
    if count:
        log.info("twilio syncs queued", extra={"count": count})
    return count


@app.task(name="payguard.beat.reconcile_campaigns", acks_late=True)
def reconcile_campaigns() -> int:
    """Re-decide every organization with campaigns (a grace period may have run out)."""

    def run(conn: Connection) -> int:
        if not _try_lock(conn, "reconcile_campaigns"):
            return 0
        changed = 0
        org_ids = (
            conn.execute(
                text("SELECT DISTINCT org_id FROM campaigns ORDER BY org_id LIMIT :l"),
                {"l": BATCH * 4},
            )
            .scalars()
            .all()
        )
        for org_id in org_ids:
            r = sending.reconcile(conn, org_id, runtime.policy())
            changed += len(r.paused) + len(r.resumed) + int(r.twilio_desired_changed)
        return changed

    changed = run_in_transaction(runtime.engine(), run)
    if changed:
        log.info("campaigns reconciled", extra={"changed": changed})
    return changed


@app.task(name="payguard.beat.verify_ledger", acks_late=True)
def verify_ledger() -> int:
    def run(conn: Connection):
        if not _try_lock(conn, "verify_ledger"):
            return []
        return wallet.verify(conn)

    mismatches = run_in_transaction(runtime.engine(), run)
    for m in mismatches:
        log.error("ledger mismatch", extra=m.as_dict())
    return len(mismatches)


@app.task(name="payguard.beat.expire_holds", acks_late=True)
def expire_holds() -> int:
    from core import messages

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
