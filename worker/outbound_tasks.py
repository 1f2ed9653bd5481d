"""Events to the host: beat claims due deliveries from PostgreSQL and publishes them to
`payguard.outbound`, where the `events` worker POSTs each one. Retry times live in
PostgreSQL (core.outbound.record_answer), never in broker countdowns."""

from __future__ import annotations

import logging
import time
from functools import partial

from sqlalchemy import Connection

from core import outbound
from core.db import run_in_transaction
from core.outbound_net import post
from worker import runtime
from worker.beat_jobs import _try_lock, publisher
from worker.celery_app import app

log = logging.getLogger(__name__)

DISPATCH_BATCH = 200
# Up to 200,000 events pruned per run (every 10 minutes), in batches of 2,000.
PRUNE_BATCH, PRUNE_BATCHES = 2000, 100


@app.task(name="payguard.deliver_event", acks_late=True, reject_on_worker_lost=True)
def deliver_event(delivery_id: int, token: str) -> str:
    """One try of one delivery; what happens next is kept in PostgreSQL."""
    engine, policy = runtime.engine(), runtime.outbound_policy()
    delivery = run_in_transaction(
        engine, lambda c: outbound.start_delivery(c, delivery_id, token, policy)
    )
    if delivery is None:
        return "not ours"
    timestamp = int(time.time())
    answer = post(
        delivery.url,
        delivery.body,
        delivery.headers(timestamp),
        resolver=policy.resolver,
        allow_private=policy.allow_private,
        timeout=policy.timeout_seconds,
    )
    result = run_in_transaction(
        engine,
        lambda c: outbound.record_answer(c, delivery_id, token, timestamp, answer, policy),
    )
    log.info(
        "event delivery tried",
        extra={"delivery_id": delivery_id, "result": result, "status_code": answer.status_code,
               "error": answer.error},
    )  # fmt: skip
    return result


@app.task(name="payguard.beat.dispatch_outbound", acks_late=True)
def dispatch_outbound() -> int:
    """Publish the deliveries that are due (one in flight per endpoint)."""
    policy = runtime.outbound_policy()

    def claim(conn: Connection) -> list[outbound.Claimed]:
        if not _try_lock(conn, "dispatch_outbound"):
            return []
        return outbound.claim_due(conn, DISPATCH_BATCH, policy)

    claimed = run_in_transaction(runtime.engine(), claim)
    published = 0
    for c in claimed:
        try:
            publisher().publish("payguard.deliver_event", [c.delivery_id, c.token])
            published += 1
        except Exception as exc:
            log.warning("outbound publish failed", extra={"error": str(exc)})
            run_in_transaction(
                runtime.engine(),
                partial(outbound.release_claim, delivery_id=c.delivery_id, token=c.token),
            )
    return published


@app.task(name="payguard.beat.prune_outbound", acks_late=True)
def prune_outbound() -> int:
    """Delivered events older than EVENT_RETENTION_DAYS go, with their attempts."""
    days = runtime.settings().EVENT_RETENTION_DAYS
    count = 0
    for _ in range(PRUNE_BATCHES):  # a transaction per batch, none holding many rows long
        n = run_in_transaction(runtime.engine(), lambda c: outbound.prune(c, days, PRUNE_BATCH))
        count += n
        if n < PRUNE_BATCH:
            break
    if count:
        log.info("outbound events pruned", extra={"count": count})
    return count
