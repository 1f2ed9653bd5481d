"""PayPal's REST API: the subscription status the reconciliation asks for, and the orders a
top-up creates and captures. The only module that calls PayPal's REST API (webhooks are
verified in core/providers/paypal/verify.py).

Subscriptions go through `requests` (OAuth client-credentials and GET
/v1/billing/subscriptions/{id}); an answer is `(status lower-case, when it was set or None)`,
NotFound when PayPal has no such subscription, TransientError for anything else (the next
reconciliation run asks again).

Orders go through `paypalrestsdk.Api`, the SDK the customer named, for its OAuth token and
its HTTP call, with two measured corrections: its `http_call` passes no timeout to requests
(a silent PayPal would hang the request forever), so `_TimedApi` adds one; and its `request`
turns a 400 into a returned dict and retries a 401 by recursing without bound, so calls go
through `http_call` here, retrying an expired token once. `WebhookEvent.verify` is never used.
Each call either answers or raises `ProviderRefused` / `ProviderUnavailable`
(core/providers/ports.py), and carries the caller's `PayPal-Request-Id`.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from typing import Any

import paypalrestsdk
import requests
from paypalrestsdk import exceptions as paypal_errors

from core.errors import NotFound, TransientError
from core.money import from_minor_units
from core.providers.paypal.events import parse_time
from core.providers.ports import Checkout, ProviderRefused, ProviderUnavailable


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


# paypalrestsdk ships no type information: its Api is Any to mypy.
class _TimedApi(paypalrestsdk.Api):  # type: ignore[misc]
    """The SDK's Api with a timeout on every HTTP call (it sets none)."""

    def __init__(self, timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout

    def http_call(self, url: str, method: str, **kwargs: Any) -> Any:
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

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None, request_id: str
    ) -> dict[str, Any]:
        for attempt in (1, 2):
            try:
                with self._lock:
                    headers = self._api.headers()
                headers["PayPal-Request-Id"] = request_id
                headers["Prefer"] = "return=representation"
                answer: dict[str, Any] = self._api.http_call(
                    self.api_base + path, method,
                    data=json.dumps(body) if body is not None else None, headers=headers,
                )  # fmt: skip
                return answer
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

    def capture_order(self, order_id: str, request_id: str) -> dict[str, Any]:
        """PayPal's answer to the capture (the order, with its captures)."""
        return self._call("POST", f"/v2/checkout/orders/{order_id}/capture", {}, request_id)
