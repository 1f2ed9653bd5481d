"""Asking the providers' REST APIs what a subscription's status is now, for the reconciliation
of missed webhooks. An adapter like core/twilio_gateway.py: the only place these calls live.

Each adapter answers `subscription_status(id) -> (status lower-case, when it was set or None)`
and raises NotFound when the provider has no such subscription, TransientError for anything
else that went wrong (the next reconciliation run asks again).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Protocol

import requests
import stripe

from core.errors import NotFound, TransientError
from core.settings import Settings


class SubscriptionApi(Protocol):
    def subscription_status(self, subscription_id: str) -> tuple[str, datetime | None]: ...


def build_subscription_apis(settings: Settings) -> dict[str, SubscriptionApi]:
    """The providers that can be asked, by provider name: those with API credentials set."""
    apis: dict[str, SubscriptionApi] = {}
    if settings.PAYPAL_CLIENT_ID and settings.PAYPAL_CLIENT_SECRET:
        apis["paypal"] = PayPalApi(
            settings.PAYPAL_API_BASE, settings.PAYPAL_CLIENT_ID, settings.PAYPAL_CLIENT_SECRET
        )
    if settings.STRIPE_API_KEY:
        apis["stripe"] = StripeApi(settings.STRIPE_API_BASE, settings.STRIPE_API_KEY)
    return apis


class PayPalApi:
    """OAuth client-credentials and GET /v1/billing/subscriptions/{id} against PAYPAL_API_BASE."""

    def __init__(
        self, api_base: str, client_id: str, client_secret: str, timeout: float = 10.0
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self._auth = (client_id, client_secret)
        self._timeout = timeout
        self._token: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def _access_token(self) -> str:
        with self._lock:
            if self._token and self._token[1] > time.monotonic():
                return self._token[0]
            try:
                r = requests.post(
                    f"{self.api_base}/v1/oauth2/token",
                    auth=self._auth,
                    data={"grant_type": "client_credentials"},
                    timeout=self._timeout,
                )
            except requests.RequestException as exc:
                raise TransientError(f"PayPal OAuth unreachable: {exc}") from None
            if r.status_code != 200:
                raise TransientError(f"PayPal OAuth answered {r.status_code}")
            body = r.json()
            self._token = (
                body["access_token"],
                time.monotonic() + max(60, int(body.get("expires_in", 300)) - 60),
            )
            return self._token[0]

    def subscription_status(self, subscription_id: str) -> tuple[str, datetime | None]:
        from core.paypal_events import parse_time

        try:
            r = requests.get(
                f"{self.api_base}/v1/billing/subscriptions/{subscription_id}",
                headers={"Authorization": f"Bearer {self._access_token()}"},
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise TransientError(f"PayPal API unreachable: {exc}") from None
        if r.status_code == 404:
            raise NotFound(f"PayPal has no subscription {subscription_id}")
        if r.status_code != 200:
            raise TransientError(f"PayPal API answered {r.status_code}")
        body = r.json()
        when = parse_time(body.get("status_update_time")) or parse_time(body.get("update_time"))
        return str(body["status"]).lower(), when


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
        # A subscription carries no time its status was set (see core/stripe_events.py), so
        # the answer is as of now: the caller dates it with its own clock.
        return status.lower(), None
