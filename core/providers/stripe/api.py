"""Stripe's REST API through the stripe package, against STRIPE_API_BASE: the subscription
status the reconciliation asks for, and the Checkout Session a top-up creates. The only
module that calls Stripe's REST API (webhooks are verified in core/providers/stripe/verify.py).

Errors: NotFound / TransientError for subscriptions (the next reconciliation run asks
again); `ProviderRefused` / `ProviderUnavailable` (core/providers/ports.py) for checkouts.
"""

from __future__ import annotations

from datetime import datetime

import stripe

from core.errors import NotFound, TransientError
from core.providers.ports import Checkout, ProviderRefused, ProviderUnavailable


class StripeApi:
    """GET /v1/subscriptions/{id} through the stripe package, against STRIPE_API_BASE."""

    def __init__(self, api_base: str, api_key: str, timeout: float = 10.0) -> None:
        self.api_base = api_base.rstrip("/")
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": self.api_base},
            # The next reconciliation run is the retry; a beat job must not sleep on backoff.
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout),
        )

    def subscription_status(self, subscription_id: str) -> tuple[str, datetime | None]:
        try:
            subscription = self._client.v1.subscriptions.retrieve(subscription_id)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise NotFound(f"Stripe has no subscription {subscription_id}") from None
            raise TransientError(f"Stripe API refused: {exc.user_message or exc}") from None
        except stripe.StripeError as exc:
            raise TransientError(
                f"Stripe API failed ({type(exc).__name__}, {exc.http_status})"
            ) from None
        status = getattr(subscription, "status", None)
        if not isinstance(status, str) or not status:
            raise TransientError(f"Stripe answered subscription {subscription_id} without status")
        # A subscription carries no time its status was set (see core/providers/stripe/events.py), so
        # the answer is as of now: the caller dates it with its own clock.
        return status.lower(), None


class StripeCheckout:
    """POST /v1/checkout/sessions through the stripe package, against STRIPE_API_BASE."""

    def __init__(self, api_base: str, api_key: str, timeout: float = 5.0) -> None:
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base.rstrip("/")},
            # The host asks again (503 + Retry-After); a request must not sleep on backoff.
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout),
        )

    def create_checkout(
        self, *, org_id: str, amount_cents: int, currency: str, return_url: str,
        cancel_url: str, idempotency_key: str,
    ) -> Checkout:  # fmt: skip
        try:
            session = self._client.v1.checkout.sessions.create(
                {
                    "mode": "payment",
                    "client_reference_id": org_id,
                    "metadata": {"org_id": org_id},
                    "payment_intent_data": {"metadata": {"org_id": org_id}},
                    "line_items": [
                        {
                            "quantity": 1,
                            "price_data": {
                                "currency": currency.lower(),
                                "unit_amount": amount_cents,
                                "product_data": {"name": "Prepaid SMS credit"},
                            },
                        }
                    ],
                    "success_url": return_url,
                    "cancel_url": cancel_url,
                },
                {"idempotency_key": idempotency_key},
            )
        except (stripe.InvalidRequestError, stripe.CardError, stripe.IdempotencyError) as exc:
            raise ProviderRefused(f"Stripe refused: {exc.user_message or exc}") from None
        except stripe.StripeError as exc:
            raise ProviderUnavailable(
                f"Stripe failed ({type(exc).__name__}, {exc.http_status})"
            ) from None
        session_id, url = getattr(session, "id", None), getattr(session, "url", None)
        if not isinstance(session_id, str) or not isinstance(url, str):
            raise ProviderUnavailable("Stripe answered a session without id or url")
        return Checkout(session_id, url)
