"""PayPal webhook payloads turned into provider-neutral events (core/providers/events.py).

`normalize` reads one verified PayPal webhook event and says what it means for Payguard:
a capture credits a wallet, a refund or reversal claws back, a subscription changes status,
a dispute freezes. It touches no database and trusts nothing about the shape it is given:
a payload whose known type does not carry what that type promises raises MalformedEvent.
A type Payguard does not act on gives [] and the caller marks it ignored.

Two PayPal API generations meet here: v2 resources (captures, refunds, subscriptions,
disputes) spell money `{"value", "currency_code"}`, v1 sale resources `{"total", "currency"}`.
The organization id travels as `custom_id` on v2 resources, as `custom` on v1 sales and
on disputed transactions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from core.errors import MalformedEvent
from core.money import normalize_currency, to_minor_units
from core.providers.events import (
    ChargebackOpened,
    DisputeClosed,
    DisputeOpened,
    NormalizedEvent,
    OrderApproved,
    PaymentCaptured,
    PaymentRefunded,
    Recorded,
    SubscriptionChanged,
    SubscriptionPayment,
)

PROVIDER = "paypal"

# Disputes API dispute_outcome.outcome_code values where the merchant's money went back to
# the buyer. RESOLVED_WITH_PAYOUT (PayPal paid the buyer itself), RESOLVED_SELLER_FAVOUR,
# CANCELED_BY_BUYER, DENIED and NONE leave the merchant's funds where they were.
LOST_OUTCOMES = frozenset({"RESOLVED_BUYER_FAVOUR", "ACCEPTED"})

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
    r"(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?",
    re.ASCII,
)
_PAYPAL_ID = re.compile(r"[A-Za-z0-9-]+")

# A PayPal JSON object (the event, its resource, or a part of it): fields of any JSON type,
# each checked where it is read.
Resource = dict[str, Any]


def event_meta(payload: object) -> tuple[str, str]:
    """(event id, event type) of a webhook payload; MalformedEvent unless both are non-empty strings."""
    if not isinstance(payload, dict):
        raise MalformedEvent("a PayPal event must be a JSON object")
    return _required_str(payload, "id", "event"), _required_str(payload, "event_type", "event")


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp as an aware UTC datetime; None for anything unusable, never raises.

    Lenient on purpose: fractions of any length, `Z`, an offset or none (read as UTC) are all
    accepted, because PayPal's own samples carry dates such as "2018-19-12T22:20:32.000Z".
    """
    if not isinstance(value, str):
        return None
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, _z, sign, off_h, off_m = match.groups()
    if int(off_m or 0) > 59:
        return None
    try:
        offset = timedelta(hours=int(off_h or 0), minutes=int(off_m or 0))
        tz = timezone(-offset if sign == "-" else offset)
        parsed = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def normalize(payload: Resource) -> list[NormalizedEvent]:
    """What one PayPal webhook event means for Payguard: one event, or [] for a type it ignores."""
    _event_id, event_type = event_meta(payload)
    build = _BUILDERS.get(event_type)
    if build is None:
        return []
    resource = payload.get("resource")
    if not isinstance(resource, dict):
        raise MalformedEvent(f"{event_type}: resource must be an object")
    return [build(payload, resource)]


# --- Payments v2: captures, refunds, reversals -------------------------------------------


def _capture_completed(payload: Resource, resource: Resource) -> NormalizedEvent:
    amount_cents, currency = _money(
        resource.get("amount"), "resource.amount", "value", "currency_code", positive=True
    )
    return PaymentCaptured(
        provider=PROVIDER,
        payment_id=_required_str(resource, "id", "resource"),
        org_id=_optional_str(resource, "custom_id"),
        amount_cents=amount_cents,
        currency=currency,
        occurred_at=_first_time(payload, resource, "update_time", "create_time"),
        checkout_id=_related_order(resource),
    )


def _related_order(resource: Resource) -> str | None:
    """The order a v2 capture belongs to: supplementary_data.related_ids.order_id."""
    supplementary = _optional_dict(resource, "supplementary_data", "resource")
    related = _optional_dict(supplementary, "related_ids", "resource.supplementary_data")
    return _optional_str(related, "order_id", "related_ids")


def _order_approved(payload: Resource, resource: Resource) -> NormalizedEvent:
    units = resource.get("purchase_units")
    first = units[0] if isinstance(units, list) and units and isinstance(units[0], dict) else {}
    return OrderApproved(
        provider=PROVIDER,
        order_id=_required_str(resource, "id", "resource"),
        org_id=_optional_str(first, "custom_id", "purchase_units[0]"),
        occurred_at=_first_time(payload, resource, "update_time", "create_time"),
    )


def _capture_refunded(payload: Resource, resource: Resource, *, kind: str) -> NormalizedEvent:
    amount_cents, currency = _money(
        resource.get("amount"), "resource.amount", "value", "currency_code", positive=True
    )
    return PaymentRefunded(
        provider=PROVIDER,
        refund_id=_required_str(resource, "id", "resource"),
        payment_id=_captured_id(resource),
        org_id=_optional_str(resource, "custom_id"),
        amount_cents=amount_cents,
        currency=currency,
        kind=kind,
        occurred_at=_first_time(payload, resource, "update_time", "create_time"),
    )


def _capture_not_completed(payload: Resource, resource: Resource) -> NormalizedEvent:
    return _recorded(
        payload,
        capture_id=_optional_str(resource, "id"),
        status=_optional_str(resource, "status"),
        org_id=_optional_str(resource, "custom_id"),
    )


def _captured_id(resource: Resource) -> str | None:
    """The refunded capture's id, from the `up` link (.../v2/payments/captures/<id>).

    Some samples drop `rel`, so a captures link without it is the fallback: a refund links to
    itself under /refunds/ and to nothing else under /captures/.
    """
    links = resource.get("links")
    if not isinstance(links, list):
        return None
    candidates = [link for link in links if isinstance(link, dict)]
    candidates.sort(key=lambda link: link.get("rel") != "up")  # stable: `up` links first
    for link in candidates:
        capture_id = _id_after(link.get("href"), "captures")
        if capture_id is not None:
            return capture_id
    return None


def _id_after(href: object, collection: str) -> str | None:
    if not isinstance(href, str):
        return None
    parts = urlsplit(href).path.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == collection and _PAYPAL_ID.fullmatch(parts[-1]):
        return parts[-1]
    return None


# --- Subscriptions v1 (resource_version 2.0) ---------------------------------------------


def _subscription_changed(payload: Resource, resource: Resource) -> NormalizedEvent:
    return SubscriptionChanged(
        provider=PROVIDER,
        subscription_id=_required_str(resource, "id", "resource"),
        org_id=_optional_str(resource, "custom_id"),
        status=_required_str(resource, "status", "resource").lower(),
        occurred_at=_first_time(payload, resource, "update_time", "status_update_time"),
    )


def _subscription_payment_failed(payload: Resource, resource: Resource) -> NormalizedEvent:
    billing_info = _optional_dict(resource, "billing_info", "resource")
    failed = _optional_dict(billing_info, "last_failed_payment", "resource.billing_info")
    amount_cents: int | None = None
    currency: str | None = None
    if failed.get("amount") is not None:
        amount_cents, currency = _money(
            failed["amount"], "last_failed_payment.amount", "value", "currency_code"
        )
    return SubscriptionPayment(
        provider=PROVIDER,
        subscription_id=_required_str(resource, "id", "resource"),
        org_id=_optional_str(resource, "custom_id"),
        outcome="failed",
        amount_cents=amount_cents,
        currency=currency,
        status=_required_str(resource, "status", "resource").lower(),
        # The status it carries is as of the resource's update, not of the failed charge.
        occurred_at=_first_time(payload, resource, "update_time", "status_update_time")
        or parse_time(failed.get("time")),
    )


# --- Payments v1: sales made by a subscription -------------------------------------------


def _sale_completed(payload: Resource, resource: Resource) -> NormalizedEvent:
    sale_id = _required_str(resource, "id", "resource")
    subscription_id = _optional_str(resource, "billing_agreement_id")
    if subscription_id is None:
        # A one-off v1 sale: not subscription money, and prepaid credit arrives as captures.
        return _recorded(payload, sale_id=sale_id, org_id=_optional_str(resource, "custom"))
    amount_cents, currency = _money(resource.get("amount"), "resource.amount", "total", "currency")
    return SubscriptionPayment(
        provider=PROVIDER,
        subscription_id=subscription_id,
        org_id=_optional_str(resource, "custom"),
        outcome="paid",
        payment_id=sale_id,
        amount_cents=amount_cents,
        currency=currency,
        occurred_at=_first_time(payload, resource, "update_time", "create_time"),
    )


def _sale_reversed(payload: Resource, resource: Resource) -> NormalizedEvent:
    # PayPal's sample carries the reversed sale's id as resource.id; a refund-shaped resource
    # names it `sale_id` instead, as PAYMENT.SALE.REFUNDED does.
    sale_id = _optional_str(resource, "sale_id") or _required_str(resource, "id", "resource")
    return ChargebackOpened(
        provider=PROVIDER,
        payment_id=sale_id,
        org_id=_optional_str(resource, "custom"),
        subscription_id=_optional_str(resource, "billing_agreement_id"),
        occurred_at=_first_time(payload, resource, "update_time", "create_time"),
    )


def _sale_refunded(payload: Resource, resource: Resource) -> NormalizedEvent:
    # Subscription money never entered a wallet, so its refund takes nothing out of one.
    return _recorded(
        payload,
        refund_id=_optional_str(resource, "id"),
        sale_id=_optional_str(resource, "sale_id"),
        org_id=_optional_str(resource, "custom"),
    )


# --- Disputes v1 -------------------------------------------------------------------------


def _dispute_created(payload: Resource, resource: Resource) -> NormalizedEvent:
    payment_ids, org_id = _disputed_transactions(resource)
    return DisputeOpened(
        provider=PROVIDER,
        dispute_id=_required_str(resource, "dispute_id", "resource"),
        payment_ids=payment_ids,
        org_id=org_id,
        occurred_at=_first_time(payload, resource, "create_time", "update_time"),
    )


def _dispute_resolved(payload: Resource, resource: Resource) -> NormalizedEvent:
    payment_ids, org_id = _disputed_transactions(resource)
    outcome = _optional_dict(resource, "dispute_outcome", "resource")
    lost = outcome.get("outcome_code") in LOST_OUTCOMES
    amount_cents: int | None = None
    currency: str | None = None
    if lost:
        refunded = outcome.get("amount_refunded")
        where = "dispute_outcome.amount_refunded"
        if refunded is None:
            refunded, where = resource.get("dispute_amount"), "resource.dispute_amount"
        amount_cents, currency = _money(refunded, where, "value", "currency_code")
    return DisputeClosed(
        provider=PROVIDER,
        dispute_id=_required_str(resource, "dispute_id", "resource"),
        payment_ids=payment_ids,
        org_id=org_id,
        lost=lost,
        amount_cents=amount_cents,
        currency=currency,
        occurred_at=_first_time(payload, resource, "update_time"),
        # PAYMENT.CAPTURE.REVERSED carries the money of a lost dispute.
        loss_arrives_separately=True,
    )


def _disputed_transactions(resource: Resource) -> tuple[tuple[str, ...], str | None]:
    """Every seller and buyer transaction id in the dispute, and the organization if one is named.

    `custom` on a disputed transaction echoes the custom_id we set on the payment; several
    transactions naming different organizations name none.
    """
    transactions = resource.get("disputed_transactions")
    if not isinstance(transactions, list):
        raise MalformedEvent("resource.disputed_transactions must be a list")
    ids: list[str] = []
    orgs: set[str] = set()
    for transaction in transactions:
        if not isinstance(transaction, dict):
            raise MalformedEvent("resource.disputed_transactions[] must be objects")
        for key in ("seller_transaction_id", "buyer_transaction_id"):
            transaction_id = _optional_str(transaction, key, "disputed_transactions[]")
            if transaction_id is not None and transaction_id not in ids:
                ids.append(transaction_id)
        org_id = _optional_str(transaction, "custom", "disputed_transactions[]")
        if org_id is not None:
            orgs.add(org_id)
    if not ids:
        raise MalformedEvent("resource.disputed_transactions names no transaction id")
    return tuple(ids), orgs.pop() if len(orgs) == 1 else None


# --- Shared readers ----------------------------------------------------------------------


def _recorded(payload: Resource, **details: str | None) -> Recorded:
    return Recorded(
        provider=PROVIDER,
        what=payload["event_type"],
        details={key: value for key, value in details.items() if value is not None},
    )


def _money(
    amount: object, where: str, value_key: str, currency_key: str, *, positive: bool = False
) -> tuple[int, str]:
    """(minor units, currency) of a PayPal money object: never negative, above zero if `positive`."""
    if not isinstance(amount, dict):
        raise MalformedEvent(f"{where} must be an object")
    if value_key not in amount:
        raise MalformedEvent(f"{where}.{value_key} is missing")
    currency = normalize_currency(amount.get(currency_key))
    value = amount[value_key]
    if not isinstance(value, str):
        # PayPal sends money as decimal strings; a JSON number may already have been a float.
        raise MalformedEvent(f"{where}.{value_key} must be a decimal string")
    cents = to_minor_units(value, currency)
    if cents < 0 or (positive and cents == 0):
        raise MalformedEvent(
            f"{where}.{value_key} must be {'above' if positive else 'at least'} zero"
        )
    return cents, currency


def _first_time(payload: Resource, resource: Resource, *keys: str) -> datetime | None:
    """The first of resource[keys...] then the event's create_time that parses."""
    for value in (*(resource.get(key) for key in keys), payload.get("create_time")):
        parsed = parse_time(value)
        if parsed is not None:
            return parsed
    return None


def _required_str(mapping: Resource, key: str, where: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MalformedEvent(f"{where}.{key} must be a non-empty string")
    return value


def _optional_str(mapping: Resource, key: str, where: str = "resource") -> str | None:
    """mapping[key] when it is a non-empty string; absent, null or "" is None."""
    value = mapping.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MalformedEvent(f"{where}.{key} must be a string")
    return value


def _optional_dict(mapping: Resource, key: str, where: str) -> Resource:
    value = mapping.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedEvent(f"{where}.{key} must be an object")
    return value


_BUILDERS: dict[str, Callable[[Resource, Resource], NormalizedEvent]] = {
    "PAYMENT.CAPTURE.COMPLETED": _capture_completed,
    "CHECKOUT.ORDER.APPROVED": _order_approved,
    "PAYMENT.CAPTURE.REFUNDED": partial(_capture_refunded, kind="refund"),
    "PAYMENT.CAPTURE.REVERSED": partial(_capture_refunded, kind="reversal"),
    "PAYMENT.CAPTURE.PENDING": _capture_not_completed,
    "PAYMENT.CAPTURE.DENIED": _capture_not_completed,
    "PAYMENT.CAPTURE.DECLINED": _capture_not_completed,
    "BILLING.SUBSCRIPTION.CREATED": _subscription_changed,  # APPROVAL_PENDING blocks
    "BILLING.SUBSCRIPTION.ACTIVATED": _subscription_changed,
    "BILLING.SUBSCRIPTION.RE-ACTIVATED": _subscription_changed,
    "BILLING.SUBSCRIPTION.UPDATED": _subscription_changed,
    "BILLING.SUBSCRIPTION.SUSPENDED": _subscription_changed,
    "BILLING.SUBSCRIPTION.CANCELLED": _subscription_changed,
    "BILLING.SUBSCRIPTION.EXPIRED": _subscription_changed,
    "BILLING.SUBSCRIPTION.PAYMENT.FAILED": _subscription_payment_failed,
    "PAYMENT.SALE.COMPLETED": _sale_completed,
    "PAYMENT.SALE.REVERSED": _sale_reversed,
    "PAYMENT.SALE.REFUNDED": _sale_refunded,
    "CUSTOMER.DISPUTE.CREATED": _dispute_created,
    "CUSTOMER.DISPUTE.RESOLVED": _dispute_resolved,
}
