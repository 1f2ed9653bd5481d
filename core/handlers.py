"""Apply one stored provider event: normalize it, move money or status once, reconcile.

Everything an event changes happens in the caller's single transaction together with the
event's status, so a crash anywhere leaves the event `received` and nothing half-applied;
idempotency references make a second delivery a no-op.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text

from core import inbox, orgs, sending, subscriptions, wallet
from core.errors import InvalidInput, MalformedEvent, NotYetApplicable, ParkEvent
from core.provider_events import (
    ChargebackOpened,
    DisputeClosed,
    DisputeOpened,
    NormalizedEvent,
    PaymentCaptured,
    PaymentRefunded,
    Recorded,
    SubscriptionChanged,
    SubscriptionPayment,
)

log = logging.getLogger(__name__)

# PayPal reports the money of a lost dispute as its own PAYMENT.CAPTURE.REVERSED event;
# clawing back on the dispute's resolution too would take the money twice.
_DISPUTE_LOSS_ARRIVES_SEPARATELY = {"paypal"}
# Stripe announces one Checkout payment by two events (checkout.session.completed and
# payment_intent.succeeded) whose organization hints need not both be set.
_PAYMENT_ANNOUNCED_TWICE = {"stripe"}

# A PayPal refund's custom_id is whatever the refund request set, not necessarily the org the
# capture credited: only the capture we credited says whose money goes back.
_REFUND_NEEDS_ITS_PAYMENT = {"paypal"}


@dataclass(frozen=True)
class Outcome:
    status: str  # processed | ignored | skipped (not in `received` any more)
    org_ids: tuple[str, ...] = ()


def normalize(provider: str, payload: dict) -> list[NormalizedEvent]:
    if provider == "paypal":
        from core import paypal_events

        return paypal_events.normalize(payload)
    if provider == "stripe":
        from core import stripe_events

        return stripe_events.normalize(payload)
    raise MalformedEvent(f"unknown provider {provider!r}")


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
        events = normalize(row.provider, payload)
    except MalformedEvent as exc:
        raise ParkEvent(f"malformed event: {exc}") from None
    if not events:
        inbox.finish(conn, inbox_id, "ignored")
        return Outcome("ignored")
    touched: list[str] = []
    for event in events:
        org_id = apply(conn, event, received_at=row.received_at)
        if org_id and org_id not in touched:
            touched.append(org_id)
    for org_id in touched:
        sending.reconcile(conn, org_id, policy)
    inbox.finish(conn, inbox_id, "processed", org_id=touched[0] if touched else None)
    log.info(
        "event applied",
        extra={
            "inbox_id": inbox_id,
            "provider": row.provider,
            "event_id": row.event_id,
            "org_ids": touched,
        },
    )
    return Outcome("processed", tuple(touched))


def apply(conn: Connection, event: NormalizedEvent, *, received_at: datetime) -> str | None:
    """Apply one normalized event; the organization it touched, if any."""
    match event:
        case PaymentCaptured():
            return credit_payment(conn, event)
        case PaymentRefunded():
            return claw_back_refund(conn, event)
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
        case Recorded():
            return None
    raise MalformedEvent(f"cannot apply {type(event).__name__}")


def _known_org(conn: Connection, org_id: str | None, what: str) -> str:
    if not org_id:
        raise ParkEvent(f"{what} names no organization")
    if not orgs.exists(conn, org_id):
        raise ParkEvent(f"unknown organization {org_id!r}")
    return org_id


def _payment_org(conn: Connection, provider: str, payment_ids) -> str | None:
    return conn.execute(
        text(
            "SELECT org_id FROM payments WHERE provider = :p AND payment_id = ANY(:ids) "
            "ORDER BY created_at LIMIT 1"
        ),
        {"p": provider, "ids": [p for p in payment_ids if p]},
    ).scalar()


def _money(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except InvalidInput as exc:  # currency not the wallet's, bad amount
        raise ParkEvent(str(exc)) from None


def credit_payment(conn: Connection, ev: PaymentCaptured) -> str:
    if not ev.org_id:
        # Stripe announces a Checkout payment twice, and only the session is sure to name the
        # organization: its payment intent, often delivered first, may not.
        credited_to = _payment_org(conn, ev.provider, [ev.payment_id])
        if credited_to:
            return credited_to
        if ev.provider in _PAYMENT_ANNOUNCED_TWICE:
            raise NotYetApplicable(f"payment {ev.payment_id} names no organization yet")
    org_id = _known_org(conn, ev.org_id, "payment")
    # Journal references are unique per organization only: the payment row, claimed before
    # any money moves, keeps two announcements naming two organizations from crediting both.
    owner = _claim_payment(conn, ev, org_id)
    if owner != org_id:
        raise ParkEvent(
            f"{ev.provider} payment {ev.payment_id} names {org_id!r} but was credited to {owner!r}"
        )
    _money(
        wallet.credit,
        conn,
        org_id,
        ev.amount_cents,
        f"{ev.provider}:payment:{ev.payment_id}",
        currency=ev.currency,
        reason=f"{ev.provider} payment {ev.payment_id}",
    )
    return org_id


def _claim_payment(conn: Connection, ev: PaymentCaptured, org_id: str) -> str:
    """Record the payment for `org_id` unless it is recorded already; its organization.

    A concurrent claim of the same payment waits on the primary key until this one commits."""
    params = {
        "p": ev.provider,
        "id": ev.payment_id,
        "o": org_id,
        "a": ev.amount_cents,
        "c": ev.currency,
    }
    claimed = conn.execute(
        text(
            "INSERT INTO payments (provider, payment_id, org_id, kind, amount_cents, currency) "
            "VALUES (:p, :id, :o, 'payment', :a, :c) ON CONFLICT DO NOTHING RETURNING org_id"
        ),
        params,
    ).scalar()
    if claimed is not None:
        return claimed
    # A separate statement: its snapshot sees the claim a concurrent transaction committed.
    return conn.execute(
        text("SELECT org_id FROM payments WHERE provider = :p AND payment_id = :id"), params
    ).scalar_one()


def claw_back_refund(conn: Connection, ev: PaymentRefunded) -> str:
    org_id = _payment_org(conn, ev.provider, [ev.payment_id])
    if not org_id and ev.provider not in _REFUND_NEEDS_ITS_PAYMENT:
        org_id = ev.org_id
    if not org_id:
        raise NotYetApplicable(f"refund {ev.refund_id} of unknown payment {ev.payment_id}")
    org_id = _known_org(conn, org_id, "refund")
    _money(
        wallet.clawback,
        conn,
        org_id,
        ev.amount_cents,
        f"{ev.provider}:refund:{ev.refund_id}",
        currency=ev.currency,
        kind=ev.kind,
        reason=f"{ev.provider} {ev.kind} {ev.refund_id} of {ev.payment_id}",
    )
    return org_id


def freeze_for_chargeback(conn: Connection, ev: ChargebackOpened) -> str:
    org_id = ev.org_id or _payment_org(conn, ev.provider, [ev.payment_id])
    if not org_id and ev.subscription_id:
        org_id = subscriptions.org_of(conn, ev.provider, ev.subscription_id)
    if not org_id:
        raise NotYetApplicable(f"chargeback of unknown payment {ev.payment_id}")
    org_id = _known_org(conn, org_id, "chargeback")
    wallet.freeze(
        conn, org_id, "chargeback", actor=f"{ev.provider}", note=f"payment {ev.payment_id} reversed"
    )
    return org_id


def open_dispute(conn: Connection, ev: DisputeOpened) -> str:
    # The payment we credited is the reliable link; a dispute's own org hint comes second.
    org_id = _payment_org(conn, ev.provider, ev.payment_ids) or ev.org_id
    if not org_id:
        raise NotYetApplicable(f"dispute {ev.dispute_id} of unknown payments")
    org_id = _known_org(conn, org_id, "dispute")
    wallet.lock(conn, org_id)  # its close may be applied at this very moment
    reason = f"dispute:{ev.dispute_id}"
    # Providers order nothing: a dispute already closed must not freeze when its opening
    # arrives late, or nothing would ever lift that freeze.
    if not wallet.ever_lifted(conn, org_id, reason):
        wallet.freeze(conn, org_id, reason, actor=ev.provider, note="dispute opened")
    return org_id


def close_dispute(conn: Connection, ev: DisputeClosed) -> str:
    org_id = _payment_org(conn, ev.provider, ev.payment_ids) or ev.org_id
    if not org_id:
        raise NotYetApplicable(f"dispute {ev.dispute_id} of unknown payments")
    org_id = _known_org(conn, org_id, "dispute")
    wallet.lock(conn, org_id)  # its opening may be applied at this very moment
    if ev.lost and ev.amount_cents and ev.provider not in _DISPUTE_LOSS_ARRIVES_SEPARATELY:
        _money(
            wallet.clawback,
            conn,
            org_id,
            ev.amount_cents,
            f"{ev.provider}:dispute:{ev.dispute_id}",
            currency=ev.currency,
            kind="dispute_lost",
            reason=f"{ev.provider} dispute {ev.dispute_id} lost",
        )
    reason, note = f"dispute:{ev.dispute_id}", "dispute lost" if ev.lost else "dispute closed"
    if not wallet.unfreeze(conn, org_id, reason, actor=ev.provider, note=note):
        if not wallet.ever_lifted(conn, org_id, reason):
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
        conn.execute(
            text(
                "INSERT INTO payments (provider, payment_id, org_id, kind, amount_cents, "
                "currency, subscription_id) VALUES (:p, :id, :o, 'subscription', :a, :c, :s) "
                "ON CONFLICT DO NOTHING"
            ),
            {
                "p": ev.provider,
                "id": ev.payment_id,
                "o": org_id,
                "a": ev.amount_cents,
                "c": ev.currency,
                "s": ev.subscription_id,
            },
        )
    return org_id
