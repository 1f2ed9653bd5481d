"""Verify one Stripe webhook delivery and return its event, or refuse it with one error type.

Pure: no I/O, no settings, the clock injectable. The HMAC comparison is the stripe package's
own (`stripe.WebhookSignature.verify_header`); this module adds what that call lacks:
- every configured endpoint secret is tried, so a secret can be rotated without downtime;
- freshness is checked both ways: Stripe's library only refuses old timestamps, we also
  refuse timestamps more than `tolerance` seconds in the future;
- the clock is a parameter, so tests need no monkeypatching of `time.time`;
- one `InvalidStripeWebhook` whose `cause` the receiver can count and log;
- the body must be a Stripe event object (`id` "evt_…", a `type`) before anyone stores it.

Checks run in the order headers, signature, timestamp, payload, so a `timestamp` refusal
always means an authentic but replayed or badly clocked delivery.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

import stripe

DEFAULT_TOLERANCE = 300
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class InvalidStripeWebhook(Exception):
    """A delivery that must not be stored. `cause` is headers | signature | timestamp | payload."""

    CAUSES = ("headers", "signature", "timestamp", "payload")

    def __init__(self, cause: str, message: str) -> None:
        if cause not in self.CAUSES:
            raise ValueError(f"unknown cause {cause!r}")
        super().__init__(f"{cause}: {message}")
        self.cause = cause


def verify_stripe(
    raw_body: bytes,
    sig_header: str | None,
    secrets: Sequence[str],
    now: float | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Return the event object if `sig_header` signs `raw_body` with any of `secrets`.

    Raises InvalidStripeWebhook for anything a sender controls, ValueError when the caller
    passes no usable secret or a non-positive tolerance (a configuration error, not a 400).
    """
    usable = [s for s in secrets if s and s.strip()]
    if not usable:
        raise ValueError("no Stripe webhook secret configured")
    if tolerance <= 0:
        raise ValueError("tolerance must be a positive number of seconds")

    timestamp, signatures = _parse_header(sig_header)
    try:
        body = raw_body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidStripeWebhook("payload", "body is not UTF-8") from None

    # Hand Stripe a header we rebuilt from what we parsed, so its parser and ours cannot
    # disagree about which timestamp or which signatures were meant.
    canonical = ",".join([f"t={timestamp}", *(f"v1={s}" for s in signatures)])
    if not any(_signed_with(body, canonical, secret) for secret in usable):
        raise InvalidStripeWebhook("signature", "no v1 signature matches a configured secret")

    clock = time.time() if now is None else now
    if timestamp < clock - tolerance:
        raise InvalidStripeWebhook("timestamp", f"signed {clock - timestamp:.0f}s ago")
    if timestamp > clock + tolerance:
        raise InvalidStripeWebhook("timestamp", f"signed {timestamp - clock:.0f}s in the future")

    return _parse_event(body)


def _parse_header(sig_header: str | None) -> tuple[int, list[str]]:
    if not sig_header:
        raise InvalidStripeWebhook("headers", "missing Stripe-Signature header")
    if not sig_header.isascii():
        # Stripe compares signatures with hmac.compare_digest on str: TypeError on non-ASCII.
        raise InvalidStripeWebhook("headers", "garbled Stripe-Signature header")
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in sig_header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not value:
            raise InvalidStripeWebhook("headers", "garbled Stripe-Signature header")
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            signatures.append(value)
        # Other schemes (v0 in test mode) are ignored, as Stripe's own libraries do.
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]):
        raise InvalidStripeWebhook("headers", "Stripe-Signature needs exactly one numeric t=")
    if not signatures:
        raise InvalidStripeWebhook("headers", "Stripe-Signature has no v1 signature")
    return int(timestamps[0]), signatures


def _signed_with(body: str, canonical_header: str, secret: str) -> bool:
    try:
        # tolerance=None: freshness is checked by the caller against the injected clock.
        stripe.WebhookSignature.verify_header(body, canonical_header, secret, tolerance=None)
    except stripe.SignatureVerificationError:
        return False
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_event(body: str) -> dict[str, Any]:
    try:
        event = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidStripeWebhook("payload", "body is not JSON") from None
    if not isinstance(event, dict):
        raise InvalidStripeWebhook("payload", "body is not a JSON object")
    event_id, event_type = event.get("id"), event.get("type")
    if not isinstance(event_id, str) or not event_id.startswith("evt_") or len(event_id) == 4:
        raise InvalidStripeWebhook("payload", "event id must be a string starting with evt_")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidStripeWebhook("payload", "event type must be a non-empty string")
    # Thin events (object "v2.core.event") carry no snapshot to act on.
    if event.get("object", "event") != "event":
        raise InvalidStripeWebhook("payload", "not a snapshot event object")
    return event
