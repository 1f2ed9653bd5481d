"""Which adapter reads which provider's webhooks: a stored body becomes provider-neutral
events (core/providers/events.py) that core/handlers.py applies without naming a provider."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.errors import MalformedEvent
from core.providers.events import NormalizedEvent
from core.providers.paypal import events as paypal_events
from core.providers.stripe import events as stripe_events

_NORMALIZERS: dict[str, Callable[[dict[str, Any]], list[NormalizedEvent]]] = {
    "paypal": paypal_events.normalize,
    "stripe": stripe_events.normalize,
}


def normalize(provider: str, payload: dict[str, Any]) -> list[NormalizedEvent]:
    """The events one verified payload of `provider` means; MalformedEvent for an unknown one."""
    normalizer = _NORMALIZERS.get(provider)
    if normalizer is None:
        raise MalformedEvent(f"unknown provider {provider!r}")
    return normalizer(payload)
