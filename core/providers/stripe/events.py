"""What a verified Stripe event means for Payguard.

`normalize` turns one Stripe event (the dict `core.providers.stripe.verify.verify_stripe` returns) into
provider-neutral events from core/providers/events.py; an empty list means "a type Payguard
does not act on". A payload whose shape its type does not promise raises MalformedEvent.

Time. Every event's `occurred_at` is the event's own `created`, as an aware UTC datetime.
Stripe delivers in no particular order and retries for days, so consumers that keep a
latest state (the subscription status) must compare `occurred_at` and ignore an older
snapshot. The event's `created` is the moment Stripe took the snapshot in `data.object`;
the object's own timestamps (`created`, `canceled_at`, `current_period_start`) say when the
object began or a period turned, not when this status was set, so they cannot order two
snapshots. `created` has one-second resolution: two changes in the same second tie.

Statuses leave as Stripe spells them (lower-case); whether one may send is decided for every
provider in one place, core.subscriptions.allows_sending (active and trialing allow, past_due
for a grace period, anything else, including a status Stripe adds later, blocks).

Amounts are Stripe's integer minor units; currencies arrive lower-case and leave upper-case.

Refunds. A refund reaches us twice: as `refund.created` and inside `charge.refunded`. Both
yield the Stripe refund id (`re_…`), so the handler's idempotency by refund id keeps the
second harmless. Since API version 2022-11-15 a charge no longer embeds its `refunds` list;
then `charge.refunded` carries only the cumulative `amount_refunded`. Turning that into a
refund under an invented id would claw back the same money a second time next to
`refund.created` (and over-count every later partial refund, the amount being cumulative),
so such an event is only Recorded: the endpoint must subscribe to `refund.created`.

A refund can still fail or be canceled after `refund.created` (pending) clawed it back:
`refund.updated` and `refund.failed` with status failed or canceled, and a failed refund
embedded in `charge.refunded`, become RefundFailed, which gives the money back once.
Subscribe to `refund.updated` (and `refund.failed`) too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from core.errors import MalformedEvent
from core.money import normalize_currency
from core.providers.events import (
    DisputeClosed,
    DisputeOpened,
    NormalizedEvent,
    PaymentCaptured,
    PaymentRefunded,
    Recorded,
    RefundFailed,
    SubscriptionChanged,
    SubscriptionPayment,
)

PROVIDER = "stripe"

_REFUND_NOT_MOVING_MONEY = frozenset({"failed", "canceled"})

Handler = Callable[[dict[str, Any], dict[str, Any], datetime], list[NormalizedEvent]]


def normalize(event: dict[str, Any]) -> list[NormalizedEvent]:
    """The provider-neutral events one Stripe event stands for ([] when Payguard ignores it)."""
    if not isinstance(event, dict):
        raise MalformedEvent("a Stripe event must be a JSON object")
    event_type = event.get("type")
    if not isinstance(event_type, str):
        raise MalformedEvent("a Stripe event needs a string type")
    handler = _HANDLERS.get(event_type)
    if handler is None:
        return []
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise MalformedEvent(f"{event_type}: data.object must be an object")
    return handler(event, data["object"], _created_at(event))


# -- payments ---------------------------------------------------------------------------


def _checkout_session_paid(
    event: dict[str, Any], session: dict[str, Any], at: datetime
) -> list[NormalizedEvent]:
    mode, payment_status = session.get("mode"), session.get("payment_status")
    if mode != "payment" or payment_status != "paid":
        # Subscription checkouts are settled by invoice events; unpaid (delayed methods)
        # ones by checkout.session.async_payment_succeeded or payment_intent.succeeded.
        return [
            _recorded(
                event,
                "checkout session is not a paid one-off payment",
                session_id=session.get("id"),
                mode=mode,
                payment_status=payment_status,
            )
        ]
    payment_id = _id_of(session.get("payment_intent"), "checkout session payment_intent")
    if payment_id is None:
        raise MalformedEvent("a paid payment-mode checkout session needs a payment_intent")
    return [
        PaymentCaptured(
            provider=PROVIDER,
            payment_id=payment_id,
            org_id=_org(session.get("client_reference_id"), _metadata(session).get("org_id")),
            amount_cents=_positive_amount(session, "amount_total"),
            currency=normalize_currency(session.get("currency")),
            occurred_at=at,
            org_may_come_later=True,
            checkout_id=_id_of(session.get("id"), "checkout session id"),
        )
    ]


def _payment_intent_succeeded(
    event: dict[str, Any], intent: dict[str, Any], at: datetime
) -> list[NormalizedEvent]:
    if intent.get("invoice"):
        # Older API versions link a subscription invoice's intent to it: that money pays
        # the subscription (see invoice.paid) and is not prepaid credit.
        return [
            _recorded(
                event,
                "payment intent pays an invoice",
                payment_id=intent.get("id"),
                invoice=_id_of(intent["invoice"], "payment intent invoice"),
            )
        ]
    amount_key = "amount_received" if intent.get("amount_received") is not None else "amount"
    return [
        PaymentCaptured(
            provider=PROVIDER,
            payment_id=_required_str(intent, "id"),
            org_id=_org(_metadata(intent).get("org_id")),
            amount_cents=_positive_amount(intent, amount_key),
            currency=normalize_currency(intent.get("currency")),
            occurred_at=at,
            org_may_come_later=True,
        )
    ]


# -- refunds ----------------------------------------------------------------------------


def _charge_refunded(
    event: dict[str, Any], charge: dict[str, Any], at: datetime
) -> list[NormalizedEvent]:
    charge_id = _required_str(charge, "id")
    payment_id = _id_of(charge.get("payment_intent"), "charge payment_intent")
    org_id = _org(_metadata(charge).get("org_id"))
    refunds = charge.get("refunds")
    if refunds is None:
        # See the module docstring: without refund ids, refund.created is the only safe source.
        return [
            _recorded(
                event,
                "charge carries no refunds list; refund.created moves the money",
                charge_id=charge_id,
                payment_id=payment_id,
                amount_refunded=_amount(charge, "amount_refunded"),
                currency=normalize_currency(charge.get("currency")),
            )
        ]
    if not isinstance(refunds, dict) or not isinstance(refunds.get("data"), list):
        raise MalformedEvent("charge.refunds must be a list object with data")
    out: list[NormalizedEvent] = []
    for refund in refunds["data"]:
        if not isinstance(refund, dict):
            raise MalformedEvent("charge.refunds.data holds a non-object")
        if refund.get("status") in _REFUND_NOT_MOVING_MONEY:
            out.append(_refund_failed(refund, payment_id, at))
            continue
        out.append(
            PaymentRefunded(
                provider=PROVIDER,
                refund_id=_required_str(refund, "id"),
                payment_id=payment_id,
                org_id=org_id,
                amount_cents=_positive_amount(refund, "amount"),
                currency=normalize_currency(refund.get("currency") or charge.get("currency")),
                occurred_at=at,
            )
        )
    return out


def _refund_snapshot(
    event: dict[str, Any], refund: dict[str, Any], at: datetime
) -> list[NormalizedEvent]:
    """refund.created, refund.updated, refund.failed: the refund's state in its snapshot."""
    refund_id = _required_str(refund, "id")
    payment_id = _id_of(refund.get("payment_intent"), "refund payment_intent")
    if refund.get("status") in _REFUND_NOT_MOVING_MONEY:
        # Given back if an earlier snapshot (pending) took it; never taken if one arrives later.
        return [_refund_failed(refund, payment_id, at)]
    # A pending refund is clawed back at once: the money is leaving, and spending it
    # meanwhile is exactly what Payguard exists to prevent. A later snapshot of the same
    # refund (refund.updated, succeeded) names the same refund id and moves nothing more.
    return [
        PaymentRefunded(
            provider=PROVIDER,
            refund_id=refund_id,
            payment_id=payment_id,
            org_id=_org(_metadata(refund).get("org_id")),
            amount_cents=_positive_amount(refund, "amount"),
            currency=normalize_currency(refund.get("currency")),
            occurred_at=at,
        )
    ]


def _refund_failed(refund: dict[str, Any], payment_id: str | None, at: datetime) -> RefundFailed:
    return RefundFailed(
        provider=PROVIDER,
        refund_id=_required_str(refund, "id"),
        payment_id=payment_id,
        occurred_at=at,
    )


# -- disputes ---------------------------------------------------------------------------


def _dispute_payment_ids(dispute: dict[str, Any]) -> tuple[str, ...]:
    """(payment_intent, charge): the intent is what captures are keyed by, the charge is
    what older, intent-less payments have; a dispute always names its charge."""
    charge_id = _id_of(dispute.get("charge"), "dispute charge")
    if charge_id is None:
        raise MalformedEvent("a dispute needs its charge")
    payment_id = _id_of(dispute.get("payment_intent"), "dispute payment_intent")
    return (charge_id,) if payment_id is None else (payment_id, charge_id)


def _dispute_created(
    event: dict[str, Any], dispute: dict[str, Any], at: datetime
) -> list[NormalizedEvent]:
    return [
        DisputeOpened(
            provider=PROVIDER,
            dispute_id=_required_str(dispute, "id"),
            payment_ids=_dispute_payment_ids(dispute),
            org_id=_org(_metadata(dispute).get("org_id")),
            occurred_at=at,
        )
    ]


def _dispute_closed(
    event: dict[str, Any], dispute: dict[str, Any], at: datetime
) -> list[NormalizedEvent]:
    return [
        DisputeClosed(
            provider=PROVIDER,
            dispute_id=_required_str(dispute, "id"),
            payment_ids=_dispute_payment_ids(dispute),
            org_id=_org(_metadata(dispute).get("org_id")),
            lost=dispute.get("status") == "lost",
            amount_cents=_amount(dispute, "amount"),
            currency=normalize_currency(dispute.get("currency")),
            occurred_at=at,
        )
    ]


# -- subscriptions ----------------------------------------------------------------------


def _subscription_changed(
    event: dict[str, Any], subscription: dict[str, Any], at: datetime
) -> list[NormalizedEvent]:
    status = _required_str(subscription, "status").lower()
    if event["type"] == "customer.subscription.deleted":
        # A deleted subscription has ended, whatever status its last snapshot shows.
        status = "canceled"
    return [
        SubscriptionChanged(
            provider=PROVIDER,
            subscription_id=_required_str(subscription, "id"),
            org_id=_org(_metadata(subscription).get("org_id")),
            status=status,
            occurred_at=at,
        )
    ]


def _invoice_outcome(outcome: str) -> Handler:
    def handle(
        event: dict[str, Any], invoice: dict[str, Any], at: datetime
    ) -> list[NormalizedEvent]:
        subscription_id, subscription_metadata = _invoice_subscription(invoice)
        if subscription_id is None:
            return [
                _recorded(event, "invoice is not for a subscription", invoice_id=invoice.get("id"))
            ]
        return [
            SubscriptionPayment(
                provider=PROVIDER,
                subscription_id=subscription_id,
                org_id=_org(subscription_metadata.get("org_id"), _metadata(invoice).get("org_id")),
                outcome=outcome,
                # Only older API versions name the intent on the invoice; current ones
                # list payments separately (not expanded in webhooks).
                payment_id=_id_of(invoice.get("payment_intent"), "invoice payment_intent"),
                amount_cents=_amount(invoice, "amount_paid" if outcome == "paid" else "amount_due"),
                currency=normalize_currency(invoice.get("currency")),
                occurred_at=at,
            )
        ]

    return handle


def _invoice_subscription(invoice: dict[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """Subscription id and its metadata snapshot, from the current or the pre-2025 shape."""
    parent = invoice.get("parent")
    if parent is not None:
        if not isinstance(parent, dict):
            raise MalformedEvent("invoice.parent must be an object")
        details = parent.get("subscription_details")
        if details is not None:
            if not isinstance(details, dict):
                raise MalformedEvent("invoice.parent.subscription_details must be an object")
            subscription_id = _id_of(details.get("subscription"), "invoice subscription")
            if subscription_id is not None:
                return subscription_id, _metadata(details)
    # API versions before 2025-03-31 put both on the invoice itself.
    subscription_id = _id_of(invoice.get("subscription"), "invoice subscription")
    legacy_details = invoice.get("subscription_details")
    if legacy_details is not None and not isinstance(legacy_details, dict):
        raise MalformedEvent("invoice.subscription_details must be an object")
    return subscription_id, _metadata(legacy_details or {})


_HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": _checkout_session_paid,
    # Delayed methods (bank debits) complete the session unpaid, then announce the money here.
    "checkout.session.async_payment_succeeded": _checkout_session_paid,
    "payment_intent.succeeded": _payment_intent_succeeded,
    "charge.refunded": _charge_refunded,
    "refund.created": _refund_snapshot,
    "refund.updated": _refund_snapshot,
    "refund.failed": _refund_snapshot,
    "charge.dispute.created": _dispute_created,
    "charge.dispute.closed": _dispute_closed,
    "customer.subscription.created": _subscription_changed,
    "customer.subscription.updated": _subscription_changed,
    "customer.subscription.deleted": _subscription_changed,
    "invoice.paid": _invoice_outcome("paid"),
    "invoice.payment_failed": _invoice_outcome("failed"),
}

HANDLED_TYPES = frozenset(_HANDLERS)
"""The event types the Stripe endpoint should be subscribed to."""


# -- shape helpers ----------------------------------------------------------------------


def _created_at(event: dict[str, Any]) -> datetime:
    created = event.get("created")
    if isinstance(created, bool) or not isinstance(created, int) or created < 0:
        raise MalformedEvent("a Stripe event needs an integer created timestamp")
    return datetime.fromtimestamp(created, tz=UTC)


def _recorded(event: dict[str, Any], reason: str, **details: Any) -> Recorded:
    return Recorded(
        provider=PROVIDER,
        what=event["type"],
        details={
            key: value
            for key, value in {"event_id": event.get("id"), "reason": reason, **details}.items()
            if value is not None
        },
    )


def _required_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"{obj.get('object', 'object')}.{key} must be a non-empty string")
    return value


def _id_of(value: object, what: str) -> str | None:
    """A Stripe reference: an id string, an expanded object with an id, or null."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"{what} must be an id or an object with one")
    return value


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = obj.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise MalformedEvent("metadata must be an object")
    return metadata


def _org(*candidates: object) -> str | None:
    """The first non-blank string; Stripe metadata values are strings, '' means unset."""
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            return candidate
    return None


def _amount(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedEvent(f"{key} must be a non-negative integer of minor units")
    return value


def _positive_amount(obj: Mapping[str, Any], key: str) -> int:
    value = _amount(obj, key)
    if value == 0:
        raise MalformedEvent(f"{key} must be positive for money to move")
    return value
