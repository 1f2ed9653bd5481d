"""Subscription state per provider subscription, applied out of order safely.

A change older than the one already applied (by the provider's own timestamp) is recorded as
seen but never overwrites the newer status. Whether a status allows sending is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row

from core import sql

ALLOWING = {"active", "trialing"}
GRACE = {"past_due"}


def allows_sending(
    status: str, status_since: datetime | None, now: datetime, past_due_grace: timedelta
) -> bool:
    """active and trialing allow; past_due allows for a grace period; everything else blocks."""
    status = status.lower()
    if status in ALLOWING:
        return True
    if status in GRACE:
        return status_since is not None and now - status_since <= past_due_grace
    return False


@dataclass(frozen=True)
class Applied:
    org_id: str | None
    status: str
    changed: bool  # False when the event was older than what is stored


_UPSERT = sql.statement(
    "subscriptions.upsert",
    """
    INSERT INTO subscriptions AS s (provider, subscription_id, org_id, status, status_at,
                                    status_since, last_event_at)
    VALUES (:provider, :subscription_id, :org_id, :status, :status_at, coalesce(:status_at, now()),
            now())
    ON CONFLICT (provider, subscription_id) DO UPDATE SET
        org_id = coalesce(s.org_id, EXCLUDED.org_id),
        status = CASE WHEN s.status_at IS NULL OR EXCLUDED.status_at >= s.status_at
                      THEN EXCLUDED.status ELSE s.status END,
        status_since = CASE WHEN (s.status_at IS NULL OR EXCLUDED.status_at >= s.status_at)
                                 AND EXCLUDED.status <> s.status
                            THEN coalesce(EXCLUDED.status_at, now()) ELSE s.status_since END,
        status_at = greatest(s.status_at, EXCLUDED.status_at),
        last_event_at = now(),
        updated_at = now()
    RETURNING org_id, status, (xmax = 0) AS inserted, status_at
    """,
)


_LOCK = sql.statement(
    "subscriptions.lock",
    """
    SELECT status, status_at FROM subscriptions WHERE provider = :provider AND
        subscription_id = :subscription_id FOR UPDATE
    """,
)


def apply_status(
    conn: Connection,
    provider: str,
    subscription_id: str,
    org_id: str | None,
    status: str,
    at: datetime,
) -> Applied:
    """Record a status seen at `at`; it wins only if it is not older than the stored one."""
    before = conn.execute(
        _LOCK,
        {"provider": provider, "subscription_id": subscription_id},
    ).first()
    row = conn.execute(
        _UPSERT,
        {
            "provider": provider,
            "subscription_id": subscription_id,
            "org_id": org_id,
            "status": status.lower(),
            "status_at": at,
        },
    ).one()
    changed = before is None or (row.status != before.status)
    return Applied(org_id=row.org_id, status=row.status, changed=changed)


_RECORD_PAYMENT = sql.statement(
    "subscriptions.record_payment",
    """
    INSERT INTO subscriptions AS s (provider, subscription_id, org_id, status,
                                    last_payment_outcome, last_payment_at)
    VALUES (:provider, :subscription_id, :org_id, 'unknown', :outcome, :paid_at)
    ON CONFLICT (provider, subscription_id) DO UPDATE SET
        org_id = coalesce(s.org_id, EXCLUDED.org_id),
        last_payment_outcome = CASE WHEN s.last_payment_at IS NULL OR EXCLUDED.last_payment_at
                                         >= s.last_payment_at
                                    THEN EXCLUDED.last_payment_outcome
                                    ELSE s.last_payment_outcome END,
        last_payment_at = greatest(s.last_payment_at, EXCLUDED.last_payment_at),
        last_event_at = now(), updated_at = now()
    RETURNING org_id
    """,
)


def record_payment(
    conn: Connection,
    provider: str,
    subscription_id: str,
    org_id: str | None,
    outcome: str,
    at: datetime,
) -> str | None:
    """Note a subscription charge; returns the subscription's organization if known."""
    row = conn.execute(
        _RECORD_PAYMENT,
        {
            "provider": provider,
            "subscription_id": subscription_id,
            "org_id": org_id,
            "outcome": outcome,
            "paid_at": at,
        },
    ).one()
    org: str | None = row.org_id
    return org


_ORG_OF = sql.statement(
    "subscriptions.org_of",
    """
    SELECT org_id FROM subscriptions
    WHERE provider = :provider AND subscription_id = :subscription_id
    """,
)


def org_of(conn: Connection, provider: str, subscription_id: str) -> str | None:
    return conn.execute(
        _ORG_OF,
        {"provider": provider, "subscription_id": subscription_id},
    ).scalar()


_STALE = sql.statement(
    "subscriptions.stale",
    """
    SELECT provider, subscription_id, org_id, status FROM subscriptions
    WHERE greatest(last_event_at, coalesce(checked_at, last_event_at)) < :cutoff
    AND (CAST(:providers AS text[]) IS NULL OR provider = ANY(:providers))
    ORDER BY greatest(last_event_at, coalesce(checked_at, last_event_at))
    LIMIT :limit FOR UPDATE SKIP LOCKED
    """,
)


def stale(
    conn: Connection, older_than: timedelta, limit: int, providers: list[str] | None = None
) -> list[Row[Any]]:
    """Subscriptions whose last event or check is older than `older_than` (missed webhooks),
    of the given providers only, so a provider nobody can ask never crowds out the rest."""
    return list(
        conn.execute(
            _STALE,
            {"cutoff": datetime.now(UTC) - older_than, "limit": limit, "providers": providers},
        )
    )


_MARK_CHECKED = sql.statement(
    "subscriptions.mark_checked",
    """
    UPDATE subscriptions SET checked_at = now() WHERE provider = :provider AND
        subscription_id = :subscription_id
    """,
)


def mark_checked(conn: Connection, provider: str, subscription_id: str) -> None:
    conn.execute(
        _MARK_CHECKED,
        {"provider": provider, "subscription_id": subscription_id},
    )
