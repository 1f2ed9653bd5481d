"""Converging each Twilio subaccount to its desired status (suspended while the organization's
subscription is inactive). Sending is blocked from the moment the desired status changes;
Twilio's answer only confirms it. Payguard never closes a subaccount: that is irreversible.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, Row, text

from core.db import run_in_transaction
from core.sending import Policy, reconcile

if TYPE_CHECKING:
    from core.providers.twilio.gateway import SmsGateway

log = logging.getLogger(__name__)


def converge_one(engine: Engine, gateway: SmsGateway, org_id: str, policy: Policy) -> str:
    """'in_sync', 'changed', 'retry' or 'failed'. No transaction is held during the call."""
    row = run_in_transaction(
        engine,
        lambda c: c.execute(
            text(
                "SELECT twilio_subaccount_sid, twilio_desired_status, twilio_status "
                "FROM organizations WHERE org_id = :o"
            ),
            {"o": org_id},
        ).first(),
    )
    if row is None:
        return "failed"
    if row.twilio_desired_status == row.twilio_status:
        return "in_sync"
    desired = row.twilio_desired_status
    if row.twilio_subaccount_sid:
        from core.providers.twilio.gateway import AccountOutcome

        result = gateway.set_account_status(row.twilio_subaccount_sid, desired)
        if result.outcome == AccountOutcome.RETRY:
            log.warning(
                "twilio account update will be retried",
                extra={"org_id": org_id, "desired": desired},
            )
            return "retry"
        if result.outcome != AccountOutcome.OK:
            log.error("twilio refused account update", extra={"org_id": org_id, "desired": desired})
            return "failed"

    # Only record what Twilio confirmed, and only if nobody changed the desire meanwhile.
    def record(conn: Connection) -> Row[Any] | None:
        done = conn.execute(
            text(
                "UPDATE organizations SET twilio_status = :d, twilio_synced_at = now() "
                "WHERE org_id = :o AND twilio_desired_status = :d RETURNING org_id"
            ),
            {"o": org_id, "d": desired},
        ).first()
        if done is not None:
            reconcile(conn, org_id, policy)  # a reactivated account may resume campaigns
        return done

    updated = run_in_transaction(engine, record)
    if updated is not None:
        log.info("twilio subaccount converged", extra={"org_id": org_id, "status": desired})
        return "changed"
    return "retry"


def out_of_sync(conn: Connection, limit: int) -> list[str]:
    """Organizations whose subaccount status is not yet the desired one."""
    return list(
        conn.execute(
            text(
                "SELECT org_id FROM organizations WHERE twilio_desired_status <> twilio_status "
                "ORDER BY org_id LIMIT :l"
            ),
            {"l": limit},
        ).scalars()
    )
