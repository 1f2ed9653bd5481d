"""Asking the providers' REST APIs what a subscription's status is now, for the reconciliation
of missed webhooks. An adapter like core/twilio_gateway.py: the only place these calls live."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import requests

from core.errors import NotFound, TransientError


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
