"""Provider-neutral events: what a PayPal or Stripe webhook means for Payguard.

Adapters (core/providers/paypal/events.py, core/providers/stripe/events.py) turn one verified payload into a
list of these; core/handlers.py applies them. Amounts are integers of minor units, currencies
upper-case ISO 4217, times aware UTC datetimes (None when the provider gave nothing usable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# What a payment was for: the `kind` of its row in `payments`, set by the event that brought
# it (PaymentCaptured: prepaid credit; SubscriptionPayment: a subscription). Refunds, reversals
# and lost disputes take back only from a PREPAID payment, at most what it credited.
PREPAID = "payment"
SUBSCRIPTION = "subscription"


@dataclass(frozen=True)
class PaymentCaptured:
    """Money arrived for prepaid credit: credit the wallet once per payment_id."""

    provider: str
    payment_id: str
    org_id: str | None
    amount_cents: int
    currency: str
    occurred_at: datetime | None = None
    # Stripe announces one Checkout payment twice (session and intent) and only the session is
    # sure to name the organization: an intent naming none waits for it instead of parking.
    org_may_come_later: bool = False
    # The PayPal order or Stripe Checkout Session this payment settles, when the provider
    # says: how a top-up learns it was paid (core/topups.py).
    checkout_id: str | None = None


@dataclass(frozen=True)
class OrderApproved:
    """A buyer approved a PayPal order: if it is a top-up's, capture it."""

    provider: str
    order_id: str
    org_id: str | None
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class PaymentRefunded:
    """Money went back (refund, reversal): claw back once per refund_id, at most what the
    payment credited.

    The organization is always the one the payment_id credited: org_id is the provider's hint
    only, never whose money goes back. A refund of a subscription's payment moves nothing."""

    provider: str
    refund_id: str
    payment_id: str | None
    org_id: str | None
    amount_cents: int
    currency: str
    kind: str = "refund"  # refund | reversal
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class RefundFailed:
    """A refund failed or was canceled: whatever it took back is given back once, and it
    never takes anything later."""

    provider: str
    refund_id: str
    payment_id: str | None
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class ChargebackOpened:
    """A payment was forcibly reversed by the payer's bank: freeze with reason `chargeback`."""

    provider: str
    payment_id: str
    org_id: str | None
    subscription_id: str | None = None
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class DisputeOpened:
    """Freeze reason `dispute:<dispute_id>` for the organization of the disputed payments."""

    provider: str
    dispute_id: str
    payment_ids: tuple[str, ...]
    org_id: str | None = None
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class DisputeClosed:
    """Lift `dispute:<dispute_id>`; when lost, claw back `amount_cents` once, at most what the
    disputed prepaid payment credited (a subscription's charge takes nothing)."""

    provider: str
    dispute_id: str
    payment_ids: tuple[str, ...]
    org_id: str | None = None
    lost: bool = False
    amount_cents: int | None = None
    currency: str | None = None
    occurred_at: datetime | None = None
    # PayPal reports the money of a lost dispute as its own reversal event: taking it on the
    # resolution too would take it twice.
    loss_arrives_separately: bool = False


@dataclass(frozen=True)
class SubscriptionChanged:
    """The provider's subscription status, lower-case as the provider spells it."""

    provider: str
    subscription_id: str
    org_id: str | None
    status: str
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class SubscriptionPayment:
    """A subscription charge succeeded or failed; recorded, no wallet credit."""

    provider: str
    subscription_id: str
    org_id: str | None
    outcome: str  # paid | failed
    payment_id: str | None = None
    amount_cents: int | None = None
    currency: str | None = None
    status: str | None = None  # subscription status carried by the event, if any
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class Recorded:
    """Known and stored, but no money or status moves (e.g. a capture still pending)."""

    provider: str
    what: str
    details: dict[str, Any] = field(default_factory=dict)


NormalizedEvent = (
    PaymentCaptured
    | PaymentRefunded
    | RefundFailed
    | ChargebackOpened
    | DisputeOpened
    | DisputeClosed
    | SubscriptionChanged
    | SubscriptionPayment
    | OrderApproved
    | Recorded
)
