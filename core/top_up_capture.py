"""The capture of an approved PayPal top-up (the worker's `payguard.capture_top_up`): ask
PayPal to capture the order with no transaction open, then credit what was captured through
the same rule a PAYMENT.CAPTURE.COMPLETED webhook uses (core/handlers.py::credit_payment), so
whichever comes first credits once. Apart from core/topups.py because it applies an event:
handlers applies top-up events, and this applies handlers, with no circle between them.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, Engine

from core import handlers, topups
from core.db import run_in_transaction
from core.errors import MalformedEvent
from core.money import normalize_currency, to_minor_units
from core.providers.events import PaymentCaptured
from core.providers.ports import ProviderRefused
from core.statuses import TopUpStatus

log = logging.getLogger(__name__)


def capture_request_id(order_id: str) -> str:
    """One PayPal-Request-Id per order: every capture of it is the same request to PayPal."""
    return f"payguard-capture-{order_id}"


def capture(engine: Engine, api: Any, top_up_id: str) -> str:
    """Capture an approved PayPal order and credit what was captured; the top-up's status.

    PayPal is called with no transaction open. ProviderUnavailable propagates (the task
    retries with the same PayPal-Request-Id); a refusal fails the top-up."""
    top_up = run_in_transaction(engine, lambda c: topups.by_id(c, top_up_id))
    if top_up is None or top_up.status != TopUpStatus.APPROVED:
        return top_up.status if top_up else "unknown"
    try:
        answer = api.capture_order(
            top_up.provider_reference, capture_request_id(top_up.provider_reference)
        )
    except ProviderRefused as exc:
        reason = f"PayPal refused the capture: {exc}"
        run_in_transaction(
            engine, lambda c: topups.finish(c, top_up_id, TopUpStatus.FAILED, reason=reason)
        )
        return TopUpStatus.FAILED
    return run_in_transaction(engine, lambda c: record_capture(c, top_up_id, answer))


def record_capture(conn: Connection, top_up_id: str, answer: Any) -> str:
    """Apply PayPal's answer to a capture: credit a completed capture once (the reference
    PAYMENT.CAPTURE.COMPLETED uses too), fail a declined one; its status after."""
    top_up = topups.by_id(conn, top_up_id)
    assert top_up is not None
    try:
        captured = _completed_capture(answer, top_up.provider_reference)
    except MalformedEvent as exc:
        topups.finish(conn, top_up_id, TopUpStatus.FAILED, reason=f"capture answer unusable: {exc}")
        return TopUpStatus.FAILED
    if captured is None:  # PENDING: PAYMENT.CAPTURE.COMPLETED will credit it
        return top_up.status
    capture_id, org_id, amount_cents, currency, status = captured
    if status in ("DECLINED", "FAILED"):
        topups.finish(
            conn, top_up_id, TopUpStatus.FAILED, reason=f"PayPal capture {capture_id} {status}"
        )
        return TopUpStatus.FAILED
    if org_id is not None and org_id != top_up.org_id:
        # Never credit an organization from another's top-up: the order was made for ours.
        log.error(
            "capture names another organization",
            extra={"top_up_id": top_up_id, "org_id": top_up.org_id, "named": org_id},
        )
        topups.finish(
            conn, top_up_id, TopUpStatus.FAILED, reason="capture names another organization"
        )
        return TopUpStatus.FAILED
    handlers.credit_payment(
        conn,
        PaymentCaptured(
            provider=top_up.provider, payment_id=capture_id, org_id=top_up.org_id,
            amount_cents=amount_cents, currency=currency,
            checkout_id=top_up.provider_reference,
        ),
    )  # fmt: skip
    return TopUpStatus.COMPLETED


def _completed_capture(answer: Any, order_id: str) -> tuple[str, str | None, int, str, str] | None:
    """(capture id, custom_id, cents, currency, status) of the order's capture; None while
    it is PENDING."""
    if not isinstance(answer, dict) or answer.get("id") != order_id:
        raise MalformedEvent("the answer is not this order")
    units = answer.get("purchase_units")
    if not isinstance(units, list) or not units or not isinstance(units[0], dict):
        raise MalformedEvent("no purchase unit")
    payments = units[0].get("payments") or {}
    captures = payments.get("captures") if isinstance(payments, dict) else None
    if not isinstance(captures, list) or not captures or not isinstance(captures[0], dict):
        raise MalformedEvent("no capture")
    c = captures[0]
    status = str(c.get("status") or "")
    if status == "PENDING":
        return None
    amount = c.get("amount")
    if not isinstance(amount, dict) or not isinstance(c.get("id"), str):
        raise MalformedEvent("capture without id or amount")
    currency = normalize_currency(amount.get("currency_code"))
    custom = c.get("custom_id") or units[0].get("custom_id")
    return (
        c["id"],
        custom if isinstance(custom, str) else None,
        to_minor_units(amount.get("value"), currency),
        currency,
        status,
    )
