"""What core asks of a payment provider's REST API, whichever provider it is: the shapes and
errors that core/providers/paypal/api.py and core/providers/stripe/api.py answer with, so
that core (top-ups, reconciliation) depends on these and never on a vendor SDK.

A call that creates something carries an idempotency key derived by the caller
(`PayPal-Request-Id`, Stripe's `Idempotency-Key`), so sending it again after a lost answer
returns the first result instead of a second order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from core.errors import PayguardError, TransientError


class ProviderRefused(PayguardError):
    """The provider refused the request (4xx); str() is its reason."""


class ProviderUnavailable(TransientError):
    """The provider is down, failed (5xx) or did not answer in time."""


@dataclass(frozen=True)
class Checkout:
    """What the buyer is sent to: the provider's reference and the approval link."""

    reference: str
    approval_url: str


class TopUpApi(Protocol):
    def create_checkout(
        self, *, org_id: str, amount_cents: int, currency: str, return_url: str,
        cancel_url: str, idempotency_key: str,
    ) -> Checkout: ...  # fmt: skip


class SubscriptionApi(Protocol):
    """`(status lower-case, when it was set or None)`; NotFound when the provider has no such
    subscription, TransientError for anything else (the next reconciliation asks again)."""

    def subscription_status(self, subscription_id: str) -> tuple[str, datetime | None]: ...
