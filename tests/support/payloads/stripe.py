"""Realistic Stripe webhook deliveries for tests: event builders and a signer.

Every builder returns the event dict Stripe would POST (shape of API version API_VERSION
unless stated): {"id": "evt_…", "object": "event", "api_version", "created", "type",
"data": {"object": {…}}, …}. Ids are fresh unless passed, so two calls are two events;
pass the same `payment_intent_id` (etc.) to make several events speak of one payment.

    event = payment_intent_succeeded(org_id="org_1", amount=5000)
    body, header = signed(event)                    # bytes + Stripe-Signature, TEST_SECRET
    client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": header})

The signer computes the HMAC itself (not through the stripe package), so tests check our
verifier against Stripe's documented scheme rather than against its own code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

API_VERSION = "2025-08-27.basil"
LEGACY_API_VERSION = "2024-06-20"  # invoices before the `parent` field
EMBEDDED_REFUNDS_API_VERSION = "2022-08-01"  # charges still embedding their refunds
TEST_SECRET = "whsec_payguard_test_primary_0123456789"
ROTATED_SECRET = "whsec_payguard_test_rotated_9876543210"
DEFAULT_ORG = "org_test"

Event = dict[str, Any]


# -- signing ----------------------------------------------------------------------------


def stripe_signature_header(raw_body: bytes | str, secret: str, timestamp: int) -> str:
    """The `Stripe-Signature` value: t=<timestamp>,v1=HMAC-SHA256(secret, "<t>.<body>")."""
    body = raw_body if isinstance(raw_body, bytes) else raw_body.encode("utf-8")
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def encode(event: Event) -> bytes:
    """The raw body as Stripe sends it (JSON, UTF-8)."""
    return json.dumps(event, indent=2).encode("utf-8")


def signed(
    event: Event, secret: str = TEST_SECRET, timestamp: int | None = None
) -> tuple[bytes, str]:
    """(raw body, Stripe-Signature header) for one delivery, signed now unless told."""
    body = encode(event)
    when = int(time.time()) if timestamp is None else timestamp
    return body, stripe_signature_header(body, secret, when)


# -- envelope ---------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A fresh Stripe-looking id: new_id("pi") -> "pi_3Qx…"."""
    return f"{prefix}_{secrets.token_hex(12)}"


def event(
    event_type: str,
    obj: dict[str, Any],
    *,
    event_id: str | None = None,
    created: int | None = None,
    api_version: str = API_VERSION,
    previous_attributes: dict[str, Any] | None = None,
) -> Event:
    """Wrap a Stripe object in the event envelope."""
    data: dict[str, Any] = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id or new_id("evt"),
        "object": "event",
        "api_version": api_version,
        "created": int(time.time()) if created is None else created,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": new_id("req"), "idempotency_key": None},
        "type": event_type,
    }


# -- payments ---------------------------------------------------------------------------


def checkout_session(
    *,
    org_id: str | None = DEFAULT_ORG,
    org_in: str = "client_reference_id",
    payment_intent_id: str | None = None,
    expand_payment_intent: bool = False,
    amount: int = 5000,
    currency: str = "usd",
    mode: str = "payment",
    payment_status: str = "paid",
    session_id: str | None = None,
) -> dict[str, Any]:
    """A Checkout Session object. org_in: "client_reference_id" or "metadata"."""
    if org_in not in ("client_reference_id", "metadata"):
        raise ValueError("org_in is client_reference_id or metadata")
    intent: Any = None
    if mode == "payment":
        intent = payment_intent_id or new_id("pi")
        if expand_payment_intent:
            intent = {"id": intent, "object": "payment_intent", "status": "succeeded"}
    return {
        "id": session_id or new_id("cs_test"),
        "object": "checkout.session",
        "amount_subtotal": amount,
        "amount_total": amount,
        "client_reference_id": org_id if org_in == "client_reference_id" else None,
        "created": int(time.time()),
        "currency": currency,
        "customer": new_id("cus"),
        "livemode": False,
        "metadata": {"org_id": org_id} if org_in == "metadata" and org_id else {},
        "mode": mode,
        "payment_intent": intent,
        "payment_status": payment_status,
        "status": "complete",
        "subscription": new_id("sub") if mode == "subscription" else None,
    }


def checkout_session_completed(
    *, event_id: str | None = None, created: int | None = None, **session: Any
) -> Event:
    """checkout.session.completed; keyword arguments as for checkout_session()."""
    return event(
        "checkout.session.completed",
        checkout_session(**session),
        event_id=event_id,
        created=created,
    )


def checkout_session_async_payment_succeeded(
    *, event_id: str | None = None, created: int | None = None, **session: Any
) -> Event:
    """checkout.session.async_payment_succeeded (a delayed method has paid)."""
    return event(
        "checkout.session.async_payment_succeeded",
        checkout_session(**session),
        event_id=event_id,
        created=created,
    )


def payment_intent(
    *,
    org_id: str | None = DEFAULT_ORG,
    payment_intent_id: str | None = None,
    amount: int = 5000,
    amount_received: int | None = None,
    currency: str = "usd",
    invoice: str | None = None,
    omit_amount_received: bool = False,
) -> dict[str, Any]:
    """A succeeded PaymentIntent. `invoice` mimics the pre-2025 link to a subscription invoice."""
    intent: dict[str, Any] = {
        "id": payment_intent_id or new_id("pi"),
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_received": amount if amount_received is None else amount_received,
        "capture_method": "automatic_async",
        "created": int(time.time()),
        "currency": currency,
        "customer": None,
        "latest_charge": new_id("ch"),
        "livemode": False,
        "metadata": {"org_id": org_id} if org_id else {},
        "payment_method_types": ["card"],
        "status": "succeeded",
    }
    if invoice is not None:
        intent["invoice"] = invoice
    if omit_amount_received:
        del intent["amount_received"]
    return intent


def payment_intent_succeeded(
    *, event_id: str | None = None, created: int | None = None, **intent: Any
) -> Event:
    """payment_intent.succeeded; keyword arguments as for payment_intent()."""
    return event(
        "payment_intent.succeeded", payment_intent(**intent), event_id=event_id, created=created
    )


# -- refunds ----------------------------------------------------------------------------


def refund(
    *,
    refund_id: str | None = None,
    amount: int = 5000,
    payment_intent_id: str | None = None,
    charge_id: str | None = None,
    currency: str = "usd",
    status: str = "succeeded",
    org_id: str | None = None,
) -> dict[str, Any]:
    """A Refund object."""
    return {
        "id": refund_id or new_id("re"),
        "object": "refund",
        "amount": amount,
        "balance_transaction": new_id("txn"),
        "charge": charge_id or new_id("ch"),
        "created": int(time.time()),
        "currency": currency,
        "metadata": {"org_id": org_id} if org_id else {},
        "payment_intent": payment_intent_id or new_id("pi"),
        "reason": "requested_by_customer",
        "status": status,
    }


def refund_created(
    *, event_id: str | None = None, created: int | None = None, **fields: Any
) -> Event:
    """refund.created; keyword arguments as for refund()."""
    return event("refund.created", refund(**fields), event_id=event_id, created=created)


def refund_updated(
    *, event_id: str | None = None, created: int | None = None, **fields: Any
) -> Event:
    """refund.updated (a refund's status changed); keyword arguments as for refund()."""
    return event("refund.updated", refund(**fields), event_id=event_id, created=created)


def refund_failed(
    *, event_id: str | None = None, created: int | None = None, **fields: Any
) -> Event:
    """refund.failed; status "failed" unless told."""
    fields.setdefault("status", "failed")
    return event("refund.failed", refund(**fields), event_id=event_id, created=created)


def charge_refunded(
    *,
    payment_intent_id: str | None = None,
    charge_id: str | None = None,
    amount: int = 5000,
    refunds: Sequence[dict[str, Any]] | None = None,
    embed_refunds: bool = True,
    currency: str = "usd",
    event_id: str | None = None,
    created: int | None = None,
) -> Event:
    """charge.refunded for a charge of `amount`.

    `refunds` defaults to one full refund (build others with refund()); amount_refunded is
    their sum. embed_refunds=False gives the shape of API versions since 2022-11-15, where
    the charge no longer carries its refunds list.
    """
    charge_id = charge_id or new_id("ch")
    payment_intent_id = payment_intent_id or new_id("pi")
    if refunds is None:
        refunds = [
            refund(
                amount=amount,
                payment_intent_id=payment_intent_id,
                charge_id=charge_id,
                currency=currency,
            )
        ]
    refunded = sum(r["amount"] for r in refunds if r.get("status") not in ("failed", "canceled"))
    charge: dict[str, Any] = {
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": refunded,
        "captured": True,
        "created": int(time.time()),
        "currency": currency,
        "disputed": False,
        "livemode": False,
        "metadata": {},
        "paid": True,
        "payment_intent": payment_intent_id,
        "refunded": refunded >= amount,
        "status": "succeeded",
    }
    if embed_refunds:
        charge["refunds"] = {
            "object": "list",
            "data": list(refunds),
            "has_more": False,
            "total_count": len(refunds),
            "url": f"/v1/charges/{charge_id}/refunds",
        }
    return event(
        "charge.refunded",
        charge,
        event_id=event_id,
        created=created,
        api_version=EMBEDDED_REFUNDS_API_VERSION if embed_refunds else API_VERSION,
    )


# -- disputes ---------------------------------------------------------------------------


def dispute(
    *,
    dispute_id: str | None = None,
    payment_intent_id: str | None = None,
    charge_id: str | None = None,
    amount: int = 5000,
    currency: str = "usd",
    status: str = "needs_response",
    reason: str = "fraudulent",
) -> dict[str, Any]:
    """A Dispute object."""
    return {
        "id": dispute_id or new_id("dp"),
        "object": "dispute",
        "amount": amount,
        "balance_transactions": [],
        "charge": charge_id or new_id("ch"),
        "created": int(time.time()),
        "currency": currency,
        "is_charge_refundable": False,
        "livemode": False,
        "metadata": {},
        "payment_intent": payment_intent_id or new_id("pi"),
        "reason": reason,
        "status": status,
    }


def charge_dispute_created(
    *, event_id: str | None = None, created: int | None = None, **fields: Any
) -> Event:
    """charge.dispute.created; keyword arguments as for dispute()."""
    fields.setdefault("status", "needs_response")
    return event("charge.dispute.created", dispute(**fields), event_id=event_id, created=created)


def charge_dispute_closed(
    *, event_id: str | None = None, created: int | None = None, **fields: Any
) -> Event:
    """charge.dispute.closed; status "lost" unless told ("won", "warning_closed")."""
    fields.setdefault("status", "lost")
    return event("charge.dispute.closed", dispute(**fields), event_id=event_id, created=created)


# -- subscriptions ----------------------------------------------------------------------


def subscription(
    *,
    subscription_id: str | None = None,
    org_id: str | None = DEFAULT_ORG,
    status: str = "active",
    customer_id: str | None = None,
) -> dict[str, Any]:
    """A Subscription object; org_id goes in its metadata."""
    now = int(time.time())
    return {
        "id": subscription_id or new_id("sub"),
        "object": "subscription",
        "cancel_at_period_end": False,
        "canceled_at": now if status == "canceled" else None,
        "created": now,
        "currency": "usd",
        "customer": customer_id or new_id("cus"),
        "ended_at": now if status == "canceled" else None,
        "items": {"object": "list", "data": [], "has_more": False},
        "latest_invoice": new_id("in"),
        "livemode": False,
        "metadata": {"org_id": org_id} if org_id else {},
        "start_date": now,
        "status": status,
    }


def customer_subscription_created(
    *, event_id: str | None = None, created: int | None = None, **fields: Any
) -> Event:
    """customer.subscription.created; keyword arguments as for subscription()."""
    return event(
        "customer.subscription.created",
        subscription(**fields),
        event_id=event_id,
        created=created,
    )


def customer_subscription_updated(
    *,
    event_id: str | None = None,
    created: int | None = None,
    previous_status: str | None = "active",
    **fields: Any,
) -> Event:
    """customer.subscription.updated, with previous_attributes naming the old status."""
    return event(
        "customer.subscription.updated",
        subscription(**fields),
        event_id=event_id,
        created=created,
        previous_attributes={"status": previous_status} if previous_status else {},
    )


def customer_subscription_deleted(
    *, event_id: str | None = None, created: int | None = None, **fields: Any
) -> Event:
    """customer.subscription.deleted (status "canceled" unless told)."""
    fields.setdefault("status", "canceled")
    return event(
        "customer.subscription.deleted",
        subscription(**fields),
        event_id=event_id,
        created=created,
    )


# -- invoices ---------------------------------------------------------------------------


def invoice(
    *,
    paid: bool,
    subscription_id: str | None = None,
    org_id: str | None = DEFAULT_ORG,
    amount: int = 2900,
    currency: str = "usd",
    shape: str = "parent",
    invoice_id: str | None = None,
    payment_intent_id: str | None = None,
) -> dict[str, Any]:
    """An Invoice object.

    shape "parent": API 2025-03-31.basil and later (parent.subscription_details);
    shape "legacy": earlier versions (top-level subscription, subscription_details,
    payment_intent). subscription_id=None makes a one-off invoice with no subscription.
    """
    if shape not in ("parent", "legacy"):
        raise ValueError("shape is parent or legacy")
    metadata = {"org_id": org_id} if org_id else {}
    obj: dict[str, Any] = {
        "id": invoice_id or new_id("in"),
        "object": "invoice",
        "amount_due": amount,
        "amount_paid": amount if paid else 0,
        "amount_remaining": 0 if paid else amount,
        "attempt_count": 1,
        "billing_reason": "subscription_cycle" if subscription_id else "manual",
        "created": int(time.time()),
        "currency": currency,
        "customer": new_id("cus"),
        "livemode": False,
        "metadata": {},
        "status": "paid" if paid else "open",
    }
    if shape == "parent":
        obj["parent"] = (
            {
                "type": "subscription_details",
                "quote_details": None,
                "subscription_details": {"metadata": metadata, "subscription": subscription_id},
            }
            if subscription_id
            else None
        )
    else:
        obj["subscription"] = subscription_id
        obj["subscription_details"] = {"metadata": metadata if subscription_id else {}}
        obj["payment_intent"] = payment_intent_id or new_id("pi")
    return obj


def invoice_paid(
    *, event_id: str | None = None, created: int | None = None, **fields: Any
) -> Event:
    """invoice.paid; keyword arguments as for invoice() (subscription_id fresh by default)."""
    return _invoice_event("invoice.paid", True, event_id, created, fields)


def invoice_payment_failed(
    *, event_id: str | None = None, created: int | None = None, **fields: Any
) -> Event:
    """invoice.payment_failed; keyword arguments as for invoice()."""
    return _invoice_event("invoice.payment_failed", False, event_id, created, fields)


def _invoice_event(
    event_type: str, paid: bool, event_id: str | None, created: int | None, fields: dict
) -> Event:
    fields.setdefault("subscription_id", new_id("sub"))
    legacy = fields.get("shape") == "legacy"
    return event(
        event_type,
        invoice(paid=paid, **fields),
        event_id=event_id,
        created=created,
        api_version=LEGACY_API_VERSION if legacy else API_VERSION,
    )


def unhandled_event(event_type: str = "customer.created") -> Event:
    """An event of a type Payguard does not act on."""
    return event(event_type, {"id": new_id("cus"), "object": "customer", "metadata": {}})
