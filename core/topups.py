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

from sqlalchemy import Connection, text

from core import orgs, outbound, outbox
from core.errors import InvalidInput, NotFound, ParkEvent
from core.providers.ports import TopUpApi

log = logging.getLogger(__name__)

PROVIDERS = ("paypal", "stripe")
CAPTURE_TASK = outbox.CAPTURE_TOP_UP_TASK
OPEN = ("created", "approved")
FINAL = ("completed", "failed", "expired")
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
        text(
            "INSERT INTO top_ups (top_up_id, org_id, provider, provider_reference, amount_cents, "
            "currency, approval_url) VALUES (:id, :o, :p, :r, :a, :c, :u) "
            f"RETURNING {_COLUMNS}"
        ),
        {
            "id": "tu_" + secrets.token_hex(16),
            "o": org_id,
            "p": provider,
            "r": checkout.reference,
            "a": amount_cents,
            "c": currency,
            "u": checkout.approval_url,
        },
    ).one()
    log.info(
        "top-up created",
        extra={"org_id": org_id, "provider": provider, "reference": checkout.reference},
    )
    return _row(row)


def get(conn: Connection, org_id: str, top_up_id: str) -> TopUp:
    row = conn.execute(
        text(f"SELECT {_COLUMNS} FROM top_ups WHERE top_up_id = :id AND org_id = :o"),
        {"id": top_up_id, "o": org_id},
    ).first()
    if row is None:
        raise NotFound(f"no top-up {top_up_id!r}")
    return _row(row)


def _by_reference(conn: Connection, provider: str, reference: str, *, lock: bool) -> TopUp | None:
    row = conn.execute(
        text(
            f"SELECT {_COLUMNS} FROM top_ups WHERE provider = :p AND provider_reference = :r"
            + (" FOR UPDATE" if lock else "")
        ),
        {"p": provider, "r": reference},
    ).first()
    return None if row is None else _row(row)


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
    allowed = (*OPEN, "expired") if status == "completed" else OPEN
    changed = conn.execute(
        text(
            "UPDATE top_ups SET status = :s, failure_reason = :why, "
            "payment_id = COALESCE(:pid, payment_id), "
            "credited_cents = COALESCE(:cc, credited_cents), updated_at = now() "
            "WHERE top_up_id = :id AND status = ANY(:allowed) "
            "RETURNING org_id, amount_cents, credited_cents"
        ),
        {
            "s": status,
            "why": reason,
            "pid": payment_id,
            "cc": credited_cents,
            "id": top_up_id,
            "allowed": list(allowed),
        },
    ).first()
    if changed is not None:
        completed = status == "completed"
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


def approve(conn: Connection, provider: str, order_id: str, org_hint: str | None) -> str | None:
    """The buyer approved the order: `approved`, and a capture task queued (again, if this
    approval arrives twice: the capture carries one PayPal-Request-Id, so it captures once).
    The organization, or None for an order that is not a top-up of Payguard's."""
    top_up = _by_reference(conn, provider, order_id, lock=True)
    if top_up is None:
        return None
    if org_hint is not None and org_hint != top_up.org_id:
        raise ParkEvent(f"order {order_id} names {org_hint!r} but is a top-up of {top_up.org_id!r}")
    if top_up.status in ("created", "expired", "approved"):
        conn.execute(
            text(
                "UPDATE top_ups SET status = 'approved', updated_at = now() "
                "WHERE top_up_id = :id AND status IN ('created', 'expired')"
            ),
            {"id": top_up.top_up_id},
        )
        outbox.enqueue(conn, CAPTURE_TASK, [top_up.top_up_id])
    return top_up.org_id


def by_id(conn: Connection, top_up_id: str) -> TopUp | None:
    row = conn.execute(
        text(f"SELECT {_COLUMNS} FROM top_ups WHERE top_up_id = :id"), {"id": top_up_id}
    ).first()
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
    finish(conn, top_up.top_up_id, "completed", payment_id=payment_id, credited_cents=cents)


# ---------------------------------------------------------------- expiry


def expire_stale(conn: Connection, provider: str, older_than_seconds: float, limit: int) -> int:
    """`created` top-ups of `provider` older than its approval window become `expired`;
    SKIP LOCKED, so two beats share the work."""
    ids = conn.execute(
        text(
            "SELECT top_up_id FROM top_ups WHERE status = 'created' AND provider = :p "
            "AND created_at < now() - make_interval(secs => :age) "
            "ORDER BY created_at LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"p": provider, "age": older_than_seconds, "limit": limit},
    ).scalars()
    return sum(finish(conn, i, "expired", reason="not approved in time") for i in list(ids))


def provider_of(value: str) -> str:
    if value not in PROVIDERS:
        raise InvalidInput(f"unknown provider {value!r}")
    return value
