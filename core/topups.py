"""Top-ups: the host asks for money, a buyer pays it at PayPal or Stripe, the wallet is
credited once.

    create  (POST /v1/.../top-ups)  → `created`: a PayPal order or a Stripe Checkout Session
    approve (CHECKOUT.ORDER.APPROVED, PayPal only) → `approved`, and a capture task queued
    capture (worker, core/top_up_capture.py) → PayPal's answer credits the capture, or
    credit  (PAYMENT.CAPTURE.COMPLETED, checkout.session.completed) → `completed`
    expire  (beat)                   → `expired`, when nobody approved or paid in time

Money moves only through core.handlers.credit_payment, with the reference every payment of
the provider uses (`paypal:payment:<capture id>`, `stripe:payment:<payment intent>`), so the
capture's answer and the provider's webhook converge on one credit whichever comes first.
What is credited is what the provider captured, not what was asked.

`finish` is the one place a top-up becomes completed, failed or expired.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from core import orgs, outbound, outbox, sql
from core.errors import InvalidInput, NotFound, ParkEvent
from core.providers.ports import TopUpApi
from core.statuses import TopUpStatus

log = logging.getLogger(__name__)

PROVIDERS = ("paypal", "stripe")
CAPTURE_TASK = outbox.CAPTURE_TOP_UP_TASK
OPEN = (TopUpStatus.CREATED, TopUpStatus.APPROVED)
FINAL = (TopUpStatus.COMPLETED, TopUpStatus.FAILED, TopUpStatus.EXPIRED)
_COLUMNS = (
    "top_up_id, org_id, provider, provider_reference, amount_cents, currency, approval_url, "
    "status, failure_reason, payment_id, credited_cents, created_at, updated_at"
)


@dataclass(frozen=True)
class TopUp:
    top_up_id: str
    org_id: str
    provider: str
    provider_reference: str
    amount_cents: int
    currency: str
    approval_url: str
    status: str
    failure_reason: str | None
    payment_id: str | None
    credited_cents: int | None
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "top_up_id": self.top_up_id,
            "org_id": self.org_id,
            "provider": self.provider,
            "provider_reference": self.provider_reference,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "approval_url": self.approval_url,
            "status": self.status,
            "failure_reason": self.failure_reason,
            "credited_cents": self.credited_cents,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def _row(row: Any) -> TopUp:
    return TopUp(**row._mapping)


def check_amount(amount_cents: object, minimum: int, maximum: int) -> int:
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int):
        raise InvalidInput("amount_cents must be an integer of cents")
    if not minimum <= amount_cents <= maximum:
        raise InvalidInput(f"amount_cents must be between {minimum} and {maximum}")
    return amount_cents


def provider_key(org_id: str, idempotency_key: str, request_digest: bytes) -> str:
    """The idempotency key sent to the provider: the same request of the same organization
    under the same key asks for the same order, so a retry after an answer lost in a crash
    gets the first order back instead of making a second one."""
    digest = hashlib.sha256(
        b"\0".join([org_id.encode(), idempotency_key.encode(), request_digest])
    ).hexdigest()
    return f"payguard-topup-{digest[:48]}"


_CREATE = sql.statement(
    "topups.create",
    f"""
    INSERT INTO top_ups (top_up_id, org_id, provider, provider_reference, amount_cents,
                         currency, approval_url)
    VALUES (:top_up_id, :org_id, :provider, :provider_reference, :amount_cents, :currency,
            :approval_url)
    RETURNING {_COLUMNS}
    """,
)


def create(
    conn: Connection,
    api: TopUpApi,
    *,
    org_id: str,
    provider: str,
    amount_cents: int,
    return_url: str,
    cancel_url: str,
    provider_idempotency_key: str,
) -> TopUp:
    """Ask the provider for an order (or session) and record the top-up as `created`.

    The provider is called inside the caller's transaction, which holds the request's
    idempotency key: a concurrent copy waits for this one, and when the provider refuses or
    is down the caller rolls back and nothing is left. ProviderRefused / ProviderUnavailable
    propagate."""
    currency = orgs.get(conn, org_id).currency
    checkout = api.create_checkout(
        org_id=org_id, amount_cents=amount_cents, currency=currency, return_url=return_url,
        cancel_url=cancel_url, idempotency_key=provider_idempotency_key,
    )  # fmt: skip
    row = conn.execute(
        _CREATE,
        {
            "top_up_id": "tu_" + secrets.token_hex(16),
            "org_id": org_id,
            "provider": provider,
            "provider_reference": checkout.reference,
            "amount_cents": amount_cents,
            "currency": currency,
            "approval_url": checkout.approval_url,
        },
    ).one()
    log.info(
        "top-up created",
        extra={"org_id": org_id, "provider": provider, "provider_reference": checkout.reference},
    )
    return _row(row)


_GET = sql.statement(
    "topups.get",
    f"SELECT {_COLUMNS} FROM top_ups WHERE top_up_id = :top_up_id AND org_id = :org_id",
)


def get(conn: Connection, org_id: str, top_up_id: str) -> TopUp:
    row = conn.execute(
        _GET,
        {"top_up_id": top_up_id, "org_id": org_id},
    ).first()
    if row is None:
        raise NotFound(f"no top-up {top_up_id!r}")
    return _row(row)


_BY_REFERENCE = f"""
    SELECT {_COLUMNS} FROM top_ups
    WHERE provider = :provider AND provider_reference = :provider_reference
"""
_FIND_BY_REFERENCE = sql.statement("topups.find_by_reference", _BY_REFERENCE)
_LOCK_BY_REFERENCE = sql.statement("topups.lock_by_reference", _BY_REFERENCE + "    FOR UPDATE\n")


def _by_reference(conn: Connection, provider: str, reference: str, *, lock: bool) -> TopUp | None:
    row = conn.execute(
        _LOCK_BY_REFERENCE if lock else _FIND_BY_REFERENCE,
        {"provider": provider, "provider_reference": reference},
    ).first()
    return None if row is None else _row(row)


_FINISH = sql.statement(
    "topups.finish",
    """
    UPDATE top_ups SET status = :status, failure_reason = :failure_reason,
        payment_id = COALESCE(:payment_id, payment_id),
        credited_cents = COALESCE(:credited_cents, credited_cents), updated_at = now()
    WHERE top_up_id = :top_up_id AND status = ANY(:allowed_statuses)
    RETURNING org_id, amount_cents, credited_cents
    """,
)


def finish(
    conn: Connection,
    top_up_id: str,
    status: str,
    *,
    reason: str | None = None,
    payment_id: str | None = None,
    credited_cents: int | None = None,
) -> bool:
    """THE place a top-up becomes `completed`, `failed` or `expired` (once: a guarded UPDATE
    from an open status; True if it changed), recording `top_up.completed` or `top_up.failed`
    (which covers `expired`) for the host in the same transaction.

    A top-up that expired can still complete: money the provider took late is credited all
    the same, and the top-up says so."""
    assert status in FINAL, status
    allowed = (*OPEN, TopUpStatus.EXPIRED) if status == TopUpStatus.COMPLETED else OPEN
    changed = conn.execute(
        _FINISH,
        {
            "status": status,
            "failure_reason": reason,
            "payment_id": payment_id,
            "credited_cents": credited_cents,
            "top_up_id": top_up_id,
            "allowed_statuses": list(allowed),
        },
    ).first()
    if changed is not None:
        completed = status == TopUpStatus.COMPLETED
        outbound.record(
            conn,
            "top_up.completed" if completed else "top_up.failed",
            changed.org_id,
            {
                "org_id": changed.org_id,
                "top_up_id": top_up_id,
                # completed: what was credited (a buyer may have paid less than asked)
                "amount_cents": (
                    changed.credited_cents
                    if completed and changed.credited_cents is not None
                    else changed.amount_cents
                ),
                "status": status,
            },
        )
        log.info(
            "top-up finished",
            extra={
                "top_up_id": top_up_id,
                "org_id": changed.org_id,
                "status": status,
                "reason": reason,
            },
        )
    return changed is not None


# ---------------------------------------------------------------- PayPal: approve, capture


_APPROVE = sql.statement(
    "topups.approve",
    """
    UPDATE top_ups SET status = 'approved', updated_at = now()
    WHERE top_up_id = :top_up_id AND status IN ('created', 'expired')
    """,
)


def approve(conn: Connection, provider: str, order_id: str, org_hint: str | None) -> str | None:
    """The buyer approved the order: `approved`, and a capture task queued (again, if this
    approval arrives twice: the capture carries one PayPal-Request-Id, so it captures once).
    The organization, or None for an order that is not a top-up of Payguard's."""
    top_up = _by_reference(conn, provider, order_id, lock=True)
    if top_up is None:
        return None
    if org_hint is not None and org_hint != top_up.org_id:
        raise ParkEvent(f"order {order_id} names {org_hint!r} but is a top-up of {top_up.org_id!r}")
    if top_up.status in (TopUpStatus.CREATED, TopUpStatus.EXPIRED, TopUpStatus.APPROVED):
        conn.execute(
            _APPROVE,
            {"top_up_id": top_up.top_up_id},
        )
        outbox.enqueue(conn, CAPTURE_TASK, [top_up.top_up_id])
    return top_up.org_id


_BY_ID = sql.statement(
    "topups.by_id",
    f"SELECT {_COLUMNS} FROM top_ups WHERE top_up_id = :top_up_id",
)


def by_id(conn: Connection, top_up_id: str) -> TopUp | None:
    row = conn.execute(_BY_ID, {"top_up_id": top_up_id}).first()
    return None if row is None else _row(row)


# ---------------------------------------------------------------- the credit, either way


def payment_credited(
    conn: Connection, provider: str, reference: str, org_id: str, payment_id: str, cents: int
) -> None:
    """A payment of this order or session was credited to `org_id`: its top-up is completed."""
    top_up = _by_reference(conn, provider, reference, lock=True)
    if top_up is None:
        return
    if top_up.org_id != org_id:
        log.error(
            "payment of a top-up credited to another organization: top-up left open",
            extra={"top_up_id": top_up.top_up_id, "org_id": top_up.org_id, "credited": org_id},
        )
        return
    finish(
        conn, top_up.top_up_id, TopUpStatus.COMPLETED, payment_id=payment_id, credited_cents=cents
    )


# ---------------------------------------------------------------- expiry


_STALE = sql.statement(
    "topups.stale",
    """
    SELECT top_up_id FROM top_ups WHERE status = 'created' AND provider = :provider
    AND created_at < now() - make_interval(secs => :older_than_seconds)
    ORDER BY created_at LIMIT :limit FOR UPDATE SKIP LOCKED
    """,
)


def expire_stale(conn: Connection, provider: str, older_than_seconds: float, limit: int) -> int:
    """`created` top-ups of `provider` older than its approval window become `expired`;
    SKIP LOCKED, so two beats share the work."""
    ids = conn.execute(
        _STALE,
        {"provider": provider, "older_than_seconds": older_than_seconds, "limit": limit},
    ).scalars()
    return sum(
        finish(conn, i, TopUpStatus.EXPIRED, reason="not approved in time") for i in list(ids)
    )


def provider_of(value: str) -> str:
    if value not in PROVIDERS:
        raise InvalidInput(f"unknown provider {value!r}")
    return value
