"""Apply one stored provider event: normalize it, move money or status once, reconcile.

Everything an event changes happens in the caller's single transaction together with the
event's status, so a crash anywhere leaves the event `received` and nothing half-applied;
idempotency references make a second delivery a no-op.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import ParamSpec, TypeVar

from sqlalchemy import Connection

from core import inbox, orgs, sending, sql, subscriptions, topups, wallet
from core.errors import InvalidInput, MalformedEvent, NotYetApplicable, ParkEvent
from core.providers import webhooks
from core.providers.events import (
    PREPAID,
    SUBSCRIPTION,
    ChargebackOpened,
    DisputeClosed,
    DisputeOpened,
    NormalizedEvent,
    OrderApproved,
    PaymentCaptured,
    PaymentRefunded,
    Recorded,
    RefundFailed,
    SubscriptionChanged,
    SubscriptionPayment,
)
from core.statuses import EventStatus

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    status: str  # processed | ignored | skipped (not in `received` any more)
    org_ids: tuple[str, ...] = ()


def process(conn: Connection, inbox_id: int, policy: sending.Policy) -> Outcome:
    """Apply a `received` event once. Raises ParkEvent (and NotYetApplicable) to park it."""
    row = inbox.lock_for_processing(conn, inbox_id)
    if row is None:
        return Outcome("skipped")
    try:
        payload = json.loads(bytes(row.body))
    except ValueError:
        raise ParkEvent("body is not JSON") from None
    try:
        events = webhooks.normalize(row.provider, payload)
    except MalformedEvent as exc:
        raise ParkEvent(f"malformed event: {exc}") from None
    if not events:
        inbox.finish(conn, inbox_id, EventStatus.IGNORED)
        return Outcome(EventStatus.IGNORED)
    touched: list[str] = []
    for event in events:
        org_id = apply(conn, event, received_at=row.received_at)
        if org_id and org_id not in touched:
            touched.append(org_id)
    for org_id in touched:
        sending.reconcile(conn, org_id, policy)
    inbox.finish(conn, inbox_id, EventStatus.PROCESSED, org_id=touched[0] if touched else None)
    log.info(
        "event applied",
        extra={
            "inbox_id": inbox_id,
            "provider": row.provider,
            "event_id": row.event_id,
            "org_ids": touched,
        },
    )
    return Outcome(EventStatus.PROCESSED, tuple(touched))


def apply(conn: Connection, event: NormalizedEvent, *, received_at: datetime) -> str | None:
    """Apply one normalized event; the organization it touched, if any."""
    match event:
        case PaymentCaptured():
            return credit_payment(conn, event)
        case PaymentRefunded():
            return claw_back_refund(conn, event)
        case RefundFailed():
            return give_back_failed_refund(conn, event)
        case ChargebackOpened():
            return freeze_for_chargeback(conn, event)
        case DisputeOpened():
            return open_dispute(conn, event)
        case DisputeClosed():
            return close_dispute(conn, event)
        case SubscriptionChanged():
            return apply_subscription_change(conn, event, received_at)
        case SubscriptionPayment():
            return record_subscription_payment(conn, event, received_at)
        case OrderApproved():
            return approve_top_up(conn, event)
        case Recorded():
            return None
    raise MalformedEvent(f"cannot apply {type(event).__name__}")


def _known_org(conn: Connection, org_id: str | None, what: str) -> str:
    if not org_id:
        raise ParkEvent(f"{what} names no organization")
    if not orgs.exists(conn, org_id):
        raise ParkEvent(f"unknown organization {org_id!r}")
    return org_id


@dataclass(frozen=True)
class _Paid:
    """A payment Payguard credited (kind PREPAID) or recorded (kind SUBSCRIPTION)."""

    payment_id: str
    org_id: str
    kind: str


_PAID = sql.statement(
    "handlers.paid",
    """
    SELECT payment_id, org_id, kind FROM payments
    WHERE provider = :provider AND payment_id = ANY(:payment_ids) ORDER BY created_at LIMIT 1
    """,
)


def _paid(conn: Connection, provider: str, payment_ids: Iterable[str | None]) -> _Paid | None:
    """The first of `payment_ids` that Payguard has seen paid: who, and for what."""
    row = conn.execute(
        _PAID,
        {"provider": provider, "payment_ids": [p for p in payment_ids if p]},
    ).first()
    return None if row is None else _Paid(row.payment_id, row.org_id, row.kind)


def _not_yet_paid(provider: str, payment_id: str | None, what: str) -> NotYetApplicable:
    return NotYetApplicable(
        f"{what} of unknown payment {payment_id}",
        awaiting=inbox.awaited_payment(provider, payment_id) if payment_id else None,
    )


def _payment_arrived(conn: Connection, provider: str, payment_id: str) -> None:
    """Refunds, chargebacks and disputes parked waiting for this payment go back in the queue."""
    redriven = inbox.redrive_awaiting(conn, inbox.awaited_payment(provider, payment_id))
    if redriven:
        log.info(
            "parked events re-driven by their payment",
            extra={"provider": provider, "payment_id": payment_id, "inbox_ids": redriven},
        )


def _money(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    try:
        return fn(*args, **kwargs)
    except InvalidInput as exc:  # currency not the wallet's, bad amount
        raise ParkEvent(str(exc)) from None


def credit_payment(conn: Connection, ev: PaymentCaptured) -> str:
    if not ev.org_id:
        # Stripe announces a Checkout payment twice, and only the session is sure to name the
        # organization: its payment intent, often delivered first, may not.
        credited = _paid(conn, ev.provider, [ev.payment_id])
        if credited is not None:
            return credited.org_id
        if ev.org_may_come_later:
            raise NotYetApplicable(f"payment {ev.payment_id} names no organization yet")
    org_id = _known_org(conn, ev.org_id, "payment")
    # Journal references are unique per organization only: the payment row, claimed before
    # any money moves, keeps two announcements naming two organizations from crediting both.
    owner, kind = _claim_payment(conn, ev, org_id)
    if kind != PREPAID:
        # Recorded as a subscription's payment: that money is not prepaid credit.
        log.info(
            "payment already recorded for another purpose: no credit",
            extra={"provider": ev.provider, "payment_id": ev.payment_id, "kind": kind},
        )
        return owner
    if owner != org_id:
        raise ParkEvent(
            f"{ev.provider} payment {ev.payment_id} names {org_id!r} but was credited to {owner!r}"
        )
    entry = _money(
        wallet.credit,
        conn,
        org_id,
        ev.amount_cents,
        f"{ev.provider}:payment:{ev.payment_id}",
        currency=ev.currency,
        reason=f"{ev.provider} payment {ev.payment_id}",
    )
    if not entry.duplicate:
        _payment_arrived(conn, ev.provider, ev.payment_id)
    if ev.checkout_id:
        # Whichever announcement of the payment comes first completes its top-up.
        topups.payment_credited(
            conn, ev.provider, ev.checkout_id, org_id, ev.payment_id, ev.amount_cents
        )
    return org_id


def approve_top_up(conn: Connection, ev: OrderApproved) -> str | None:
    """A buyer approved a top-up's order: queue its capture (core/topups.py)."""
    org_id = topups.approve(conn, ev.provider, ev.order_id, ev.org_id)
    if org_id is None:
        log.info("approved order is no top-up of Payguard's", extra={"order_id": ev.order_id})
    return org_id


_CLAIM_PAYMENT = sql.statement(
    "handlers.claim_payment",
    """
    INSERT INTO payments (provider, payment_id, org_id, kind, amount_cents, currency)
    VALUES (:provider, :payment_id, :org_id, :kind, :amount_cents, :currency)
    ON CONFLICT DO NOTHING RETURNING org_id, kind
    """,
)

_CLAIMED_PAYMENT = sql.statement(
    "handlers.claimed_payment",
    "SELECT org_id, kind FROM payments WHERE provider = :provider AND payment_id = :payment_id",
)


def _claim_payment(conn: Connection, ev: PaymentCaptured, org_id: str) -> tuple[str, str]:
    """Record the payment for `org_id` unless it is recorded already; its organization and
    what it was recorded for.

    A concurrent claim of the same payment waits on the primary key until this one commits."""
    params = {
        "provider": ev.provider,
        "payment_id": ev.payment_id,
        "org_id": org_id,
        "amount_cents": ev.amount_cents,
        "currency": ev.currency,
    }
    claimed = conn.execute(
        _CLAIM_PAYMENT,
        {**params, "kind": PREPAID},
    ).first()
    if claimed is None:
        # A separate statement: its snapshot sees the claim a concurrent transaction committed.
        claimed = conn.execute(
            _CLAIMED_PAYMENT,
            params,
        ).one()
    return claimed.org_id, claimed.kind


def claw_back_refund(conn: Connection, ev: PaymentRefunded) -> str | None:
    # Only the payment we credited says whose money goes back: a refund's own org hint
    # (Stripe metadata, PayPal custom_id) is whatever the refund's creator put there.
    paid = _paid(conn, ev.provider, [ev.payment_id])
    if paid is None:
        raise _not_yet_paid(ev.provider, ev.payment_id, f"refund {ev.refund_id}")
    if paid.kind != PREPAID:
        log.info(
            "refund of a payment that was not prepaid credit: no money moves",
            extra={"provider": ev.provider, "refund_id": ev.refund_id, "kind": paid.kind},
        )
        return paid.org_id
    org_id = _known_org(conn, paid.org_id, "refund")
    wallet.lock(conn, org_id)  # its failure may be applied at this very moment
    if _refund_failed(conn, ev.provider, ev.refund_id):
        return org_id  # the failure arrived first: this refund never moves money
    _money(
        wallet.clawback,
        conn,
        org_id,
        ev.amount_cents,
        f"{ev.provider}:refund:{ev.refund_id}",
        currency=ev.currency,
        kind=ev.kind,
        reason=f"{ev.provider} {ev.kind} {ev.refund_id} of {ev.payment_id}",
        payment=(ev.provider, paid.payment_id),
    )
    return org_id


_REFUND_FAILED = sql.statement(
    "handlers.refund_failed",
    "SELECT 1 FROM refund_failures WHERE provider = :provider AND refund_id = :refund_id",
)


def _refund_failed(conn: Connection, provider: str, refund_id: str) -> bool:
    return (
        conn.execute(
            _REFUND_FAILED,
            {"provider": provider, "refund_id": refund_id},
        ).first()
        is not None
    )


_RECORD_REFUND_FAILURE = sql.statement(
    "handlers.record_refund_failure",
    """
    INSERT INTO refund_failures (provider, refund_id, payment_id)
    VALUES (:provider, :refund_id, :payment_id) ON CONFLICT DO NOTHING
    """,
)


def give_back_failed_refund(conn: Connection, ev: RefundFailed) -> str | None:
    paid = _paid(conn, ev.provider, [ev.payment_id])
    org_id = paid.org_id if paid is not None and paid.kind == PREPAID else None
    if org_id is not None:
        wallet.lock(conn, org_id)  # the refund itself may be applied at this very moment
    # Remembered whatever happens next, so that a refund.created delivered late takes nothing.
    conn.execute(
        _RECORD_REFUND_FAILURE,
        {"provider": ev.provider, "refund_id": ev.refund_id, "payment_id": ev.payment_id},
    )
    if paid is None or org_id is None:
        return paid.org_id if paid is not None else None
    wallet.give_back(
        conn,
        org_id,
        f"{ev.provider}:refund:{ev.refund_id}",
        f"{ev.provider}:refund:{ev.refund_id}:reversed",
        payment=(ev.provider, paid.payment_id),
        reason=f"{ev.provider} refund {ev.refund_id} failed",
    )
    return org_id


def freeze_for_chargeback(conn: Connection, ev: ChargebackOpened) -> str:
    paid = _paid(conn, ev.provider, [ev.payment_id])
    org_id = paid.org_id if paid is not None else ev.org_id
    if not org_id and ev.subscription_id:
        org_id = subscriptions.org_of(conn, ev.provider, ev.subscription_id)
    if not org_id:
        raise _not_yet_paid(ev.provider, ev.payment_id, "chargeback")
    org_id = _known_org(conn, org_id, "chargeback")
    wallet.freeze(
        conn, org_id, "chargeback", actor=f"{ev.provider}", note=f"payment {ev.payment_id} reversed"
    )
    return org_id


def open_dispute(conn: Connection, ev: DisputeOpened) -> str:
    # The payment we credited is the reliable link; a dispute's own org hint comes second.
    paid = _paid(conn, ev.provider, ev.payment_ids)
    org_id = paid.org_id if paid is not None else ev.org_id
    if not org_id:
        raise _not_yet_paid(ev.provider, ev.payment_ids[0], f"dispute {ev.dispute_id}")
    org_id = _known_org(conn, org_id, "dispute")
    wallet.lock(conn, org_id)  # its close may be applied at this very moment
    reason = f"dispute:{ev.dispute_id}"
    # Providers order nothing: a dispute already closed must not freeze when its opening
    # arrives late, or nothing would ever lift that freeze.
    if not wallet.ever_lifted(conn, org_id, reason):
        wallet.freeze(conn, org_id, reason, actor=ev.provider, note="dispute opened")
    return org_id


def close_dispute(conn: Connection, ev: DisputeClosed) -> str:
    paid = _paid(conn, ev.provider, ev.payment_ids)
    takes_money = bool(ev.lost and ev.amount_cents and not ev.loss_arrives_separately)
    if paid is None and takes_money:
        # Only the payment credited says whose money goes back, and how much at most.
        raise _not_yet_paid(ev.provider, ev.payment_ids[0], f"lost dispute {ev.dispute_id}")
    org_id = paid.org_id if paid is not None else ev.org_id
    if not org_id:
        raise _not_yet_paid(ev.provider, ev.payment_ids[0], f"dispute {ev.dispute_id}")
    org_id = _known_org(conn, org_id, "dispute")
    wallet.lock(conn, org_id)  # its opening may be applied at this very moment
    if takes_money and paid is not None and paid.kind == PREPAID:
        assert ev.amount_cents is not None
        _money(
            wallet.clawback,
            conn,
            org_id,
            ev.amount_cents,
            f"{ev.provider}:dispute:{ev.dispute_id}",
            currency=ev.currency,
            kind="dispute_lost",
            reason=f"{ev.provider} dispute {ev.dispute_id} lost",
            payment=(ev.provider, paid.payment_id),
        )
    reason, note = f"dispute:{ev.dispute_id}", "dispute lost" if ev.lost else "dispute closed"
    if not wallet.unfreeze(conn, org_id, reason, actor=ev.provider, note=note) and (
        not wallet.ever_lifted(conn, org_id, reason)
    ):
        wallet.record_lifted(
            conn, org_id, reason, actor=ev.provider, note=f"{note} before it was opened"
        )
    return org_id


def apply_subscription_change(
    conn: Connection, ev: SubscriptionChanged, received_at: datetime
) -> str:
    org_id = ev.org_id or subscriptions.org_of(conn, ev.provider, ev.subscription_id)
    org_id = _known_org(conn, org_id, "subscription")
    subscriptions.apply_status(
        conn, ev.provider, ev.subscription_id, org_id, ev.status, ev.occurred_at or received_at
    )
    return org_id


_RECORD_SUBSCRIPTION_PAYMENT = sql.statement(
    "handlers.record_subscription_payment",
    """
    INSERT INTO payments (provider, payment_id, org_id, kind, amount_cents, currency,
                          subscription_id)
    VALUES (:provider, :payment_id, :org_id, :kind, :amount_cents, :currency, :subscription_id)
    ON CONFLICT DO NOTHING RETURNING 1
    """,
)


def record_subscription_payment(
    conn: Connection, ev: SubscriptionPayment, received_at: datetime
) -> str:
    org_id = ev.org_id or subscriptions.org_of(conn, ev.provider, ev.subscription_id)
    org_id = _known_org(conn, org_id, "subscription payment")
    at = ev.occurred_at or received_at
    subscriptions.record_payment(conn, ev.provider, ev.subscription_id, org_id, ev.outcome, at)
    if ev.status:
        subscriptions.apply_status(conn, ev.provider, ev.subscription_id, org_id, ev.status, at)
    if ev.payment_id:
        recorded = conn.execute(
            _RECORD_SUBSCRIPTION_PAYMENT,
            {
                "provider": ev.provider,
                "payment_id": ev.payment_id,
                "org_id": org_id,
                "kind": SUBSCRIPTION,
                "amount_cents": ev.amount_cents,
                "currency": ev.currency,
                "subscription_id": ev.subscription_id,
            },
        ).first()
        if recorded is not None:
            # A refund of it parked meanwhile now learns that it moves no prepaid credit.
            _payment_arrived(conn, ev.provider, ev.payment_id)
    return org_id
