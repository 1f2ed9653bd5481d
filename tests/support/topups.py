"""Helpers for top-up tests: an app whose PayPal and Stripe are local fakes, webhooks stored
and applied as the worker applies them, and the capture task's work called directly."""

from __future__ import annotations

import json
import secrets
from typing import Any

from core import handlers, inbox, sending, top_up_capture, topups, wallet
from core.db import run_in_transaction
from core.errors import ParkEvent
from tests.support.payloads import paypal as pp

POLICY = sending.Policy()
RETURN = {"return_url": "https://host.example/paid", "cancel_url": "https://host.example/cancel"}


def body(provider: str = "paypal", amount: int = 1500, **extra: Any) -> dict:
    return {"provider": provider, "amount_cents": amount, **RETURN, **extra}


def create(api, key: str, org: str, idem: str | None = None, **kw: Any):
    return api.post(
        f"/organizations/{org}/top-ups", key, body(**kw),
        headers={"Idempotency-Key": idem or secrets.token_hex(8)},
    )  # fmt: skip


def deliver(engine, provider: str, payload: dict) -> inbox.StoredEvent:
    """Store a verified event in the inbox and apply it as worker.tasks.process_event does;
    an event that cannot be applied is settled `parked`."""
    raw = json.dumps(payload).encode()
    event_type = payload.get("event_type") or payload.get("type")
    stored, _ = run_in_transaction(
        engine, lambda c: inbox.store(c, provider, payload["id"], event_type, {}, raw)
    )
    try:
        run_in_transaction(engine, lambda c: handlers.process(c, stored.id, POLICY))
    except ParkEvent as exc:
        error = str(exc)
        run_in_transaction(engine, lambda c: inbox.finish(c, stored.id, "parked", error=error))
    return run_in_transaction(engine, lambda c: inbox.get(c, stored.id))


def order_approved(order_id: str, org_id: str | None, event_id: str | None = None) -> dict:
    """CHECKOUT.ORDER.APPROVED as PayPal sends it (resource: the order)."""
    return {
        "id": event_id or pp.new_event_id(),
        "event_version": "1.0",
        "create_time": pp.paypal_time(),
        "resource_type": "checkout-order",
        "resource_version": "2.0",
        "event_type": "CHECKOUT.ORDER.APPROVED",
        "summary": "An order has been approved by buyer",
        "resource": {
            "id": order_id,
            "intent": "CAPTURE",
            "status": "APPROVED",
            "purchase_units": [{"custom_id": org_id, "reference_id": "default"}],
        },
    }


def capture_completed(order_id: str, capture: dict, event_id: str | None = None) -> dict:
    """PAYMENT.CAPTURE.COMPLETED for the fake's capture of `order_id`."""
    payload = pp.capture_completed(
        capture["custom_id"], capture["id"], capture["amount"]["value"],
        capture["amount"]["currency_code"], event_id=event_id,
    )  # fmt: skip
    payload["resource"]["supplementary_data"] = {"related_ids": {"order_id": order_id}}
    return payload


def paypal_api(app):
    return app.extensions["payguard_api"].top_up_apis["paypal"]


def capture(app, engine, top_up_id: str) -> str:
    """What the worker's payguard.capture_top_up does, called directly."""
    return top_up_capture.capture(engine, paypal_api(app), top_up_id)


def captures_queued(engine, top_up_id: str) -> int:
    with engine.connect() as conn:
        from sqlalchemy import text

        return conn.execute(
            text("SELECT count(*) FROM outbox WHERE task = :t AND args = CAST(:a AS jsonb)"),
            {"t": topups.CAPTURE_TASK, "a": json.dumps([top_up_id])},
        ).scalar()


def balance(engine, org: str) -> int:
    return run_in_transaction(engine, lambda c: wallet.show(c, org)).balance_cents


def journal(engine, org: str) -> list[wallet.Entry]:
    return run_in_transaction(engine, lambda c: wallet.history(c, org, limit=100))
