"""PayPal webhook payloads for tests, shaped like the ones PayPal really sends.

Each builder starts from a published sample in `tests/fixtures/paypal/events/` and replaces the ids, organization, amount and times a test cares
about, so unit and integration tests feed Payguard the same shapes PayPal does:

    payload = capture_completed("org-1", "5O190127TN364715T", value="25.00")
    body = json.dumps(payload).encode()

Builders return a fresh dict every call; mutate it freely. Amounts are decimal strings, as
PayPal sends them. `org_id=None` leaves the organization out, as PayPal's own samples do.
Event ids default to a new random `WH-…` id, so two calls never collide in the inbox; pass
`event_id=` to build a redelivery. Times default to now, in UTC; pass `at=` to pin them.
"""

from __future__ import annotations

import copy
import json
import secrets
import string
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

# tests/support/payloads/paypal.py -> tests/ is parents[2].
FIXTURES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "paypal" / "events"

_API = "https://api.paypal.com"
_ID_ALPHABET = string.ascii_uppercase + string.digits

# The status PayPal gives a subscription in each BILLING.SUBSCRIPTION.* event.
SUBSCRIPTION_STATUS = {
    "BILLING.SUBSCRIPTION.CREATED": "APPROVAL_PENDING",
    "BILLING.SUBSCRIPTION.ACTIVATED": "ACTIVE",
    "BILLING.SUBSCRIPTION.RE-ACTIVATED": "ACTIVE",
    "BILLING.SUBSCRIPTION.UPDATED": "ACTIVE",
    "BILLING.SUBSCRIPTION.SUSPENDED": "SUSPENDED",
    "BILLING.SUBSCRIPTION.CANCELLED": "CANCELLED",
    "BILLING.SUBSCRIPTION.EXPIRED": "EXPIRED",
}

# The status of the capture resource in each PAYMENT.CAPTURE.* event about a capture.
CAPTURE_STATUS = {
    "PAYMENT.CAPTURE.COMPLETED": "COMPLETED",
    "PAYMENT.CAPTURE.PENDING": "PENDING",
    "PAYMENT.CAPTURE.DENIED": "DECLINED",
    "PAYMENT.CAPTURE.DECLINED": "DECLINED",
}


# --- Samples and ids ---------------------------------------------------------------------


def fixture_names() -> list[str]:
    """The published samples available, by event name ("payment.capture.completed", ...)."""
    return sorted(path.stem for path in FIXTURES_DIR.glob("*.json"))


def fixture(name: str) -> dict[str, Any]:
    """A fresh copy of one published sample, by event name, with or without ".json"."""
    return copy.deepcopy(_load(name.removesuffix(".json")))


@cache
def _load(name: str) -> dict[str, Any]:
    path = FIXTURES_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no PayPal sample {name!r} in {FIXTURES_DIR}")
    return json.loads(path.read_text(encoding="utf-8"))


def new_id(length: int = 17) -> str:
    """A PayPal-style transaction id: 17 upper-case letters and digits, like "42311647XV020574X"."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def new_event_id() -> str:
    """A PayPal-style webhook event id, like "WH-7Y7254563A4550640-11V2185806837105M"."""
    return f"WH-{new_id()}-{new_id()}"


def paypal_time(at: datetime | None = None) -> str:
    """`at` (default now) as PayPal writes times: "2024-05-01T12:00:00Z", in UTC."""
    moment = (at or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- Payments v2: captures, refunds, reversals -------------------------------------------


def capture_completed(
    org_id: str | None,
    capture_id: str,
    value: str = "10.00",
    currency: str = "USD",
    event_id: str | None = None,
    *,
    at: datetime | None = None,
) -> dict[str, Any]:
    """PAYMENT.CAPTURE.COMPLETED: `value` `currency` captured for `org_id` (its custom_id)."""
    return capture_event(
        "PAYMENT.CAPTURE.COMPLETED", org_id, capture_id, value, currency, event_id=event_id, at=at
    )


def capture_event(
    event_type: str,
    org_id: str | None,
    capture_id: str,
    value: str = "10.00",
    currency: str = "USD",
    *,
    event_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """Any PAYMENT.CAPTURE.* event about a capture itself: COMPLETED, PENDING, DENIED, DECLINED."""
    if event_type not in CAPTURE_STATUS:
        raise ValueError(
            f"not a capture event: {event_type!r}; use one of {sorted(CAPTURE_STATUS)}"
        )
    payload = fixture("payment.capture.completed")
    resource = payload["resource"]
    status = CAPTURE_STATUS[event_type]
    _stamp(payload, event_type, event_id, at)
    payload["summary"] = f"Payment {status.lower()} for {value} {currency}"
    resource.update(id=capture_id, status=status, final_capture=True)
    _set_money(resource, "amount", value, currency)
    resource["seller_receivable_breakdown"] = {
        "gross_amount": {"currency_code": currency, "value": value},
        "paypal_fee": {"currency_code": currency, "value": "0.00"},
        "net_amount": {"currency_code": currency, "value": value},
    }
    if status == "PENDING":
        resource["status_details"] = {"reason": "PENDING_REVIEW"}
    _set_optional(resource, "custom_id", org_id)
    resource["supplementary_data"]["related_ids"]["order_id"] = order_id = new_id()
    resource["links"] = [
        _link(f"{_API}/v2/payments/captures/{capture_id}", "self"),
        _link(f"{_API}/v2/payments/captures/{capture_id}/refund", "refund", "POST"),
        _link(f"{_API}/v2/checkout/orders/{order_id}", "up"),
    ]
    return payload


def capture_refunded(
    capture_id: str,
    refund_id: str,
    value: str,
    currency: str = "USD",
    *,
    org_id: str | None = None,
    event_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """PAYMENT.CAPTURE.REFUNDED: refund `refund_id` gave back `value` of capture `capture_id`.

    The capture is named only by the refund's `up` link, as PayPal does; `org_id` sets the
    refund's custom_id, which PayPal carries only when the refund request set one.
    """
    return _refund(
        "payment.capture.refunded", capture_id, refund_id, value, currency, org_id, event_id, at
    )


def capture_reversed(
    capture_id: str,
    refund_id: str,
    value: str,
    currency: str = "USD",
    *,
    org_id: str | None = None,
    event_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """PAYMENT.CAPTURE.REVERSED: PayPal took `value` of capture `capture_id` back (a chargeback)."""
    return _refund(
        "payment.capture.reversed", capture_id, refund_id, value, currency, org_id, event_id, at
    )


def _refund(
    sample: str,
    capture_id: str,
    refund_id: str,
    value: str,
    currency: str,
    org_id: str | None,
    event_id: str | None,
    at: datetime | None,
) -> dict[str, Any]:
    payload = fixture(sample)
    resource = payload["resource"]
    _stamp(payload, payload["event_type"], event_id, at)
    verb = "refunded" if sample.endswith("refunded") else "reversed"
    payload["summary"] = f"A {value} {currency} capture payment was {verb}"
    resource["id"] = refund_id
    _set_money(resource, "amount", value, currency)
    breakdown = resource["seller_payable_breakdown"]
    for key in ("gross_amount", "net_amount", "total_refunded_amount"):
        _set_money(breakdown, key, value, currency)
    _set_money(breakdown, "paypal_fee", "0.00", currency)
    _set_optional(resource, "custom_id", org_id)
    resource["links"] = [
        _link(f"{_API}/v2/payments/refunds/{refund_id}", "self"),
        _link(f"{_API}/v2/payments/captures/{capture_id}", "up"),
    ]
    return payload


# --- Subscriptions -----------------------------------------------------------------------


def subscription_event(
    event_type: str,
    sub_id: str,
    org_id: str | None,
    status: str | None = None,
    update_time: datetime | str | None = None,
    *,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A BILLING.SUBSCRIPTION.* status event for subscription `sub_id` of `org_id` (custom_id).

    `status` defaults to what PayPal reports with that event (SUSPENDED -> "SUSPENDED").
    `update_time` sets resource.update_time and status_update_time; a string is used as is,
    so a test can pass PayPal's impossible dates. The event's create_time is now.
    """
    if status is None:
        if event_type not in SUBSCRIPTION_STATUS:
            raise ValueError(f"no default status for {event_type!r}; pass status=")
        status = SUBSCRIPTION_STATUS[event_type]
    payload = fixture("billing.subscription.activated")
    resource = payload["resource"]
    _stamp(payload, event_type, event_id, None)
    payload["summary"] = f"Subscription {sub_id} is now {status.lower()}"
    when = update_time if isinstance(update_time, str) else paypal_time(update_time)
    resource.update(id=sub_id, status=status, update_time=when, status_update_time=when)
    _set_optional(resource, "custom_id", org_id)
    resource["links"] = [_link(f"{_API}/v1/billing/subscriptions/{sub_id}", "self")]
    return payload


def subscription_payment_failed(
    sub_id: str,
    org_id: str | None,
    value: str | None = "10.00",
    currency: str = "USD",
    *,
    status: str = "ACTIVE",
    event_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """BILLING.SUBSCRIPTION.PAYMENT.FAILED: the charge of `value` failed at `at`.

    `value=None` leaves out billing_info.last_failed_payment, as PayPal does before any failure
    has been recorded on the subscription.
    """
    payload = fixture("billing.subscription.payment.failed")
    resource = payload["resource"]
    _stamp(payload, "BILLING.SUBSCRIPTION.PAYMENT.FAILED", event_id, at)
    resource.update(id=sub_id, status=status)
    _set_optional(resource, "custom_id", org_id)
    billing_info = resource["billing_info"]
    if value is None:
        del billing_info["last_failed_payment"]
    else:
        failed = billing_info["last_failed_payment"]
        _set_money(failed, "amount", value, currency)
        failed["time"] = paypal_time(at)
    resource["links"] = [_link(f"{_API}/v1/billing/subscriptions/{sub_id}", "self")]
    return payload


# --- Payments v1: sales ------------------------------------------------------------------


def sale_completed(
    org_id: str | None,
    sale_id: str,
    sub_id: str | None,
    value: str = "10.00",
    currency: str = "USD",
    event_id: str | None = None,
    *,
    at: datetime | None = None,
) -> dict[str, Any]:
    """PAYMENT.SALE.COMPLETED: subscription `sub_id` charged `value` as sale `sale_id`.

    The organization goes in resource.custom, where PayPal echoes it on sales; `sub_id=None`
    builds a one-off sale without billing_agreement_id.
    """
    payload = fixture("payment.sale.completed")
    resource = payload["resource"]
    _stamp(payload, "PAYMENT.SALE.COMPLETED", event_id, at)
    payload["summary"] = f"Payment completed for {value} {currency}"
    payload.pop("transmissions", None)  # the simulator's delivery log, not part of an event
    resource["id"] = sale_id
    resource["amount"] = {"total": value, "currency": currency, "details": {}}
    resource["transaction_fee"] = {"value": "0.00", "currency": currency}
    _set_optional(resource, "billing_agreement_id", sub_id)
    _set_optional(resource, "custom", org_id)
    resource["links"] = [_link(f"{_API}/v1/payments/sale/{sale_id}", "self")]
    return payload


def sale_refunded(
    sale_id: str,
    refund_id: str,
    value: str,
    currency: str = "USD",
    *,
    org_id: str | None = None,
    event_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """PAYMENT.SALE.REFUNDED: refund `refund_id` gave back `value` of sale `sale_id`."""
    payload = fixture("payment.sale.refunded")
    resource = payload["resource"]
    _stamp(payload, "PAYMENT.SALE.REFUNDED", event_id, at)
    payload["summary"] = f"A {value} {currency} sale payment was refunded"
    resource.update(id=refund_id, sale_id=sale_id)
    for key in ("amount", "refund_to_payer", "total_refunded_amount"):
        resource[key] = {"total": value, "currency": currency}
    for key in ("refund_from_received_amount", "refund_from_transaction_fee"):
        resource.pop(key, None)  # PayPal's split of the sample's 0.02 fits no other value
    _set_optional(resource, "custom", org_id)
    parent = resource["parent_payment"]
    resource["links"] = [
        _link(f"{_API}/v1/payments/refund/{refund_id}", "self"),
        _link(f"{_API}/v1/payments/payment/{parent}", "parent_payment"),
        _link(f"{_API}/v1/payments/sale/{sale_id}", "sale"),
    ]
    return payload


def sale_reversed(
    org_id: str | None,
    sale_id: str,
    sub_id: str | None = None,
    value: str = "10.00",
    currency: str = "USD",
    event_id: str | None = None,
    *,
    at: datetime | None = None,
) -> dict[str, Any]:
    """PAYMENT.SALE.REVERSED: the payer's bank took sale `sale_id` back (a chargeback).

    No sample of this event is in tests/fixtures; the shape follows PayPal's published one:
    the reversed sale's id, a negative total and a self link to the reversal.
    """
    payload = fixture("payment.sale.completed")
    resource = payload["resource"]
    _stamp(payload, "PAYMENT.SALE.REVERSED", event_id, at)
    payload["summary"] = f"A {value} {currency} sale payment was reversed"
    payload.pop("transmissions", None)
    payload.pop("status", None)
    resource.clear()
    resource.update(
        id=sale_id,
        amount={"total": f"-{value}", "currency": currency},
        state="completed",
        create_time=paypal_time(at),
        update_time=paypal_time(at),
        links=[_link(f"{_API}/v1/payments/refund/{new_id()}", "self")],
    )
    _set_optional(resource, "billing_agreement_id", sub_id)
    _set_optional(resource, "custom", org_id)
    return payload


# --- Disputes ----------------------------------------------------------------------------


def dispute_created(
    dispute_id: str,
    payment_id: str,
    value: str = "10.00",
    currency: str = "USD",
    *,
    buyer_transaction_id: str | None = None,
    org_id: str | None = None,
    event_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """CUSTOMER.DISPUTE.CREATED: a buyer disputes `value` of our payment `payment_id`.

    `payment_id` is the seller transaction id (our capture or sale id); `org_id` sets the
    disputed transaction's `custom`, which PayPal copies from the payment's custom_id.
    """
    payload = fixture("customer.dispute.created")
    _dispute(payload, dispute_id, payment_id, value, currency, buyer_transaction_id, org_id)
    _stamp(payload, "CUSTOMER.DISPUTE.CREATED", event_id, at)
    payload["summary"] = f"A new dispute opened with Case # {dispute_id}"
    resource = payload["resource"]
    resource["refund_details"]["allowed_refund_amount"] = {
        "currency_code": currency,
        "value": value,
    }
    resource["links"] = [
        {"href": f"{_API}/v1/customer/disputes/{dispute_id}"}
    ]  # no rel, as published
    return payload


def dispute_resolved(
    dispute_id: str,
    payment_id: str,
    outcome_code: str = "RESOLVED_BUYER_FAVOUR",
    value: str = "10.00",
    currency: str = "USD",
    *,
    amount_refunded: str | None = None,
    buyer_transaction_id: str | None = None,
    org_id: str | None = None,
    event_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """CUSTOMER.DISPUTE.RESOLVED: the dispute over `payment_id` closed with `outcome_code`.

    `amount_refunded` adds dispute_outcome.amount_refunded (what went back to the buyer);
    without it only dispute_amount (`value`) says how much was disputed.
    """
    payload = fixture("customer.dispute.resolved")
    _dispute(payload, dispute_id, payment_id, value, currency, buyer_transaction_id, org_id)
    _stamp(payload, "CUSTOMER.DISPUTE.RESOLVED", event_id, at)
    payload["summary"] = f"A dispute was resolved with case # {dispute_id}"
    outcome: dict[str, Any] = {"outcome_code": outcome_code}
    if amount_refunded is not None:
        outcome["amount_refunded"] = {"currency_code": currency, "value": amount_refunded}
    payload["resource"]["dispute_outcome"] = outcome
    return payload


def _dispute(
    payload: dict[str, Any],
    dispute_id: str,
    payment_id: str,
    value: str,
    currency: str,
    buyer_transaction_id: str | None,
    org_id: str | None,
) -> None:
    resource = payload["resource"]
    resource["dispute_id"] = dispute_id
    transaction: dict[str, Any] = {
        "seller_transaction_id": payment_id,
        "seller_protection_eligible": True,
    }
    _set_optional(transaction, "buyer_transaction_id", buyer_transaction_id)
    _set_optional(transaction, "custom", org_id)
    resource["disputed_transactions"] = [transaction]
    resource["dispute_amount"] = {"currency_code": currency, "value": value}


# --- Anything else -----------------------------------------------------------------------


def unknown_event(
    event_type: str = "CHECKOUT.ORDER.APPROVED", *, event_id: str | None = None
) -> dict[str, Any]:
    """A well-formed event of a type Payguard does not act on (it should be ignored)."""
    payload: dict[str, Any] = {
        "event_version": "1.0",
        "resource_type": "checkout-order",
        "resource_version": "2.0",
        "summary": "An order has been approved by buyer",
        "resource": {"id": new_id(), "status": "APPROVED", "create_time": "", "update_time": ""},
    }
    _stamp(payload, event_type, event_id, None)
    return payload


# --- Helpers -----------------------------------------------------------------------------


def _stamp(
    payload: dict[str, Any], event_type: str, event_id: str | None, at: datetime | None
) -> None:
    """Set the envelope (id, type, time, self link) and the resource's own times."""
    payload["id"] = event_id or new_event_id()
    payload["event_type"] = event_type
    payload["create_time"] = paypal_time(at)
    payload["links"] = [_link(f"{_API}/v1/notifications/webhooks-events/{payload['id']}", "self")]
    resource = payload["resource"]
    for key in ("create_time", "update_time"):
        if key in resource:
            resource[key] = paypal_time(at)


def _set_money(container: dict[str, Any], key: str, value: str, currency: str) -> None:
    container[key] = {"currency_code": currency, "value": value}


def _set_optional(container: dict[str, Any], key: str, value: str | None) -> None:
    if value is None:
        container.pop(key, None)
    else:
        container[key] = value


def _link(href: str, rel: str, method: str = "GET") -> dict[str, str]:
    return {"href": href, "rel": rel, "method": method}
