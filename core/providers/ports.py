"""What core asks of a provider's API, whichever provider it is: the shapes and errors that
core/providers/paypal/api.py and core/providers/stripe/api.py answer with, and the outcome of
sending an SMS that core/providers/twilio/gateway.py answers with, so that core (top-ups,
reconciliation, the send path) depends on these and never on a vendor SDK.

A call that creates something carries an idempotency key derived by the caller
(`PayPal-Request-Id`, Stripe's `Idempotency-Key`), so sending it again after a lost answer
returns the first result instead of a second order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Protocol

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


# --- sending an SMS ---------------------------------------------------------------------------


class SendOutcome(StrEnum):
    """How a request to send an SMS ended, as the send path acts on it: the create is not
    idempotent, so what matters is whether it may have gone out."""

    ACCEPTED = "accepted"  # Twilio created the message
    REJECTED = "rejected"  # Twilio refused the request (4xx); nothing was sent
    RETRY_SAFE = "retry_safe"  # nothing reached Twilio, or it said 429: safe to try again
    UNKNOWN = "unknown"  # it may have been sent: never repeat the create


@dataclass(frozen=True)
class SendResult:
    """The SMS provider's answer to one send: its outcome, and what it said about the message."""

    outcome: SendOutcome
    sid: str | None = None
    status: str | None = None
    price: Decimal | None = None
    price_unit: str | None = None
    num_segments: int | None = None
    http_status: int | None = None
    error_code: int | None = None
    error_message: str | None = None

    @property
    def may_have_been_sent(self) -> bool:
        return self.outcome in (SendOutcome.ACCEPTED, SendOutcome.UNKNOWN)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe, for a retried task to carry Twilio's answer to its next try."""
        fields = asdict(self)
        fields["outcome"] = str(self.outcome)
        fields["price"] = None if self.price is None else str(self.price)
        return fields

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> SendResult:
        return cls(
            SendOutcome(fields["outcome"]),
            sid=fields.get("sid"),
            status=fields.get("status"),
            price=decimal_or_none(fields.get("price")),
            price_unit=fields.get("price_unit"),
            num_segments=fields.get("num_segments"),
            http_status=fields.get("http_status"),
            error_code=fields.get("error_code"),
            error_message=fields.get("error_message"),
        )


def decimal_or_none(value: object) -> Decimal | None:
    """A provider's amount as a Decimal; None when it is absent or no number."""
    if value in (None, ""):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None
