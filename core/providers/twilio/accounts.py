"""Converging each Twilio subaccount to its desired status (suspended while the organization's
subscription is inactive). Sending is blocked from the moment the desired status changes;
Twilio's answer only confirms it. Payguard never closes a subaccount: that is irreversible.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, Row

from core import sql
from core.db import run_in_transaction
from core.sending import Policy, reconcile

if TYPE_CHECKING:
    from core.providers.twilio.gateway import SmsGateway

log = logging.getLogger(__name__)


_LOCK_ORG = sql.statement(
    "twilio.accounts.lock_org",
    """
    SELECT twilio_subaccount_sid, twilio_desired_status, twilio_status
    FROM organizations WHERE org_id = :org_id
    """,
)

_RECORD_SYNCED = sql.statement(
    "twilio.accounts.record_synced",
    """
    UPDATE organizations SET twilio_status = :desired_status, twilio_synced_at = now()
    WHERE org_id = :org_id AND twilio_desired_status = :desired_status RETURNING org_id
    """,
)


def converge_one(engine: Engine, gateway: SmsGateway, org_id: str, policy: Policy) -> str:
    """'in_sync', 'changed', 'retry' or 'failed'. No transaction is held during the call."""
    row = run_in_transaction(
        engine,
        lambda c: c.execute(
            _LOCK_ORG,
            {"org_id": org_id},
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
                extra={"org_id": org_id, "desired_status": desired},
            )
            return "retry"
        if result.outcome != AccountOutcome.OK:
            log.error(
                "twilio refused account update", extra={"org_id": org_id, "desired_status": desired}
            )
            return "failed"

    # Only record what Twilio confirmed, and only if nobody changed the desire meanwhile.
    def record(conn: Connection) -> Row[Any] | None:
        done = conn.execute(
            _RECORD_SYNCED,
            {"org_id": org_id, "desired_status": desired},
        ).first()
        if done is not None:
            reconcile(conn, org_id, policy)  # a reactivated account may resume campaigns
        return done

    updated = run_in_transaction(engine, record)
    if updated is not None:
        log.info("twilio subaccount converged", extra={"org_id": org_id, "status": desired})
        return "changed"
    return "retry"


_OUT_OF_SYNC = sql.statement(
    "twilio.accounts.out_of_sync",
    """
    SELECT org_id FROM organizations WHERE twilio_desired_status <> twilio_status
    ORDER BY org_id LIMIT :limit
    """,
)


def out_of_sync(conn: Connection, limit: int) -> list[str]:
    """Organizations whose subaccount status is not yet the desired one."""
    return list(
        conn.execute(
            _OUT_OF_SYNC,
            {"limit": limit},
        ).scalars()
    )
