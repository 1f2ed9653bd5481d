"""The providers' REST calls a top-up makes: create a PayPal order and capture it, create a
Stripe Checkout Session. Adapters like core/provider_api.py: the only place these calls live.

Each call either answers, or raises `ProviderRefused` (the provider said no: a 4xx, with its
reason, which the host may show) or `ProviderUnavailable` (down, 5xx, or no answer within the
timeout: the same call may work later). Every call that creates something carries an
idempotency key derived by the caller (`PayPal-Request-Id`, Stripe's `Idempotency-Key`), so
sending it again after a lost answer returns the first result instead of a second order.

PayPal goes through `paypalrestsdk.Api`, the SDK the customer named, for its OAuth token and
its HTTP call, with two measured corrections: its `http_call` passes no timeout to requests
(a silent PayPal would hang the request forever), so `_TimedApi` adds one; and its `request`
turns a 400 into a returned dict and retries a 401 by recursing without bound, so calls go
through `http_call` here, retrying an expired token once. `WebhookEvent.verify` is never used
(core/paypal_verify.py verifies webhooks).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import paypalrestsdk
import requests
import stripe
from paypalrestsdk import exceptions as paypal_errors

from core.errors import PayguardError, TransientError
from core.money import from_minor_units
from core.settings import Settings


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


def build_top_up_apis(settings: Settings) -> dict[str, TopUpApi]:
    """The providers a top-up can be made with, by name: those with API credentials set."""
    timeout = settings.TOP_UP_PROVIDER_TIMEOUT_SECONDS
    apis: dict[str, TopUpApi] = {}
    if settings.PAYPAL_CLIENT_ID and settings.PAYPAL_CLIENT_SECRET:
        apis["paypal"] = PayPalOrders(
            settings.PAYPAL_API_BASE,
            settings.PAYPAL_CLIENT_ID,
            settings.PAYPAL_CLIENT_SECRET,
            timeout=timeout,
        )
    if settings.STRIPE_API_KEY:
        apis["stripe"] = StripeCheckout(settings.STRIPE_API_BASE, settings.STRIPE_API_KEY, timeout)
    return apis


# ---------------------------------------------------------------- PayPal


class _TimedApi(paypalrestsdk.Api):
    """The SDK's Api with a timeout on every HTTP call (it sets none)."""

    def __init__(self, timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout

    def http_call(self, url, method, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("timeout", self.timeout)
        return super().http_call(url, method, **kwargs)


def _paypal_reason(exc: paypal_errors.ConnectionError) -> str:
    """PayPal's error document as one line: name, message and the first detail's issue."""
    try:
        body = json.loads(exc.content or "{}")
    except ValueError:
        return f"PayPal answered {getattr(exc.response, 'status_code', '?')}"
    details = body.get("details") or [{}]
    first = details[0] if isinstance(details, list) and details else {}
    parts = [body.get("name"), body.get("message"), first.get("issue"), first.get("description")]
    return ": ".join(str(p) for p in parts if p) or "PayPal refused the request"


class PayPalOrders:
    """Orders v2 at PAYPAL_API_BASE: create (intent CAPTURE) and capture."""

    def __init__(
        self, api_base: str, client_id: str, client_secret: str, *, timeout: float = 5.0
    ) -> None:
        self.api_base = api_base.rstrip("/")
        # mode "live": the SDK logs no request or response bodies (its rule for live).
        self._api = _TimedApi(
            timeout, mode="live", endpoint=self.api_base, client_id=client_id,
            client_secret=client_secret,
        )  # fmt: skip
        self._lock = threading.Lock()  # the SDK's token cache is not thread-safe

    def _call(self, method: str, path: str, body: dict | None, request_id: str) -> dict:
        for attempt in (1, 2):
            try:
                with self._lock:
                    headers = self._api.headers()
                headers["PayPal-Request-Id"] = request_id
                headers["Prefer"] = "return=representation"
                return self._api.http_call(
                    self.api_base + path, method,
                    data=json.dumps(body) if body is not None else None, headers=headers,
                )  # fmt: skip
            except paypal_errors.UnauthorizedAccess:
                with self._lock:
                    self._api.token_hash = None  # an expired token: fetch one, once
                if attempt == 2:
                    raise ProviderUnavailable("PayPal refused Payguard's credentials") from None
            except paypal_errors.ServerError as exc:
                raise ProviderUnavailable(f"PayPal failed ({exc.response.status_code})") from None
            except paypal_errors.ClientError as exc:
                raise ProviderRefused(_paypal_reason(exc)) from None
            except (paypal_errors.ConnectionError, requests.RequestException) as exc:
                raise ProviderUnavailable(f"PayPal unreachable: {type(exc).__name__}") from None
            except ValueError:  # an answer that is not JSON
                raise ProviderUnavailable("PayPal answered something that is not JSON") from None
        raise AssertionError("unreachable")

    def create_checkout(
        self, *, org_id: str, amount_cents: int, currency: str, return_url: str,
        cancel_url: str, idempotency_key: str,
    ) -> Checkout:  # fmt: skip
        order = self._call(
            "POST",
            "/v2/checkout/orders",
            {
                "intent": "CAPTURE",
                "purchase_units": [
                    {
                        "custom_id": org_id,
                        "description": "Prepaid SMS credit",
                        "amount": {
                            "currency_code": currency,
                            "value": from_minor_units(amount_cents, currency),
                        },
                    }
                ],
                "application_context": {
                    "return_url": return_url,
                    "cancel_url": cancel_url,
                    "user_action": "PAY_NOW",
                    "shipping_preference": "NO_SHIPPING",
                },
            },
            idempotency_key,
        )
        links = order.get("links") if isinstance(order, dict) else None
        approve = [
            link.get("href")
            for link in links or []
            if isinstance(link, dict) and link.get("rel") in ("approve", "payer-action")
        ]
        if not isinstance(order.get("id"), str) or not approve or not isinstance(approve[0], str):
            raise ProviderUnavailable("PayPal answered an order without id or approval link")
        return Checkout(order["id"], approve[0])

    def capture_order(self, order_id: str, request_id: str) -> dict:
        """PayPal's answer to the capture (the order, with its captures)."""
        return self._call("POST", f"/v2/checkout/orders/{order_id}/capture", {}, request_id)


# ---------------------------------------------------------------- Stripe


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
