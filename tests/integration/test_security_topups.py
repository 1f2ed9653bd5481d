"""Top-ups under attack. The threat model:

* **Forge an approval.** CHECKOUT.ORDER.APPROVED is what makes Payguard capture: it is a
  PayPal webhook like any other, verified before it is stored (guarantee 8), so a forged one
  is refused with 400 and nothing is approved or captured. A genuine approval of an order
  that is not a top-up of Payguard's captures nothing; one naming another organization than
  the top-up's is parked, nothing captured.
* **A capture answer for another organization's order.** The order was created with
  `custom_id` = the top-up's organization; a capture (answer or webhook) naming another is
  never credited to the top-up's organization nor completes it, and the order's own org is
  the one credited by the existing PAYMENT.CAPTURE.COMPLETED path only (custom_id is set by
  Payguard at creation, so an order left behind by a crash can credit no other org).
* **Replay a capture.** The capture's answer and PAYMENT.CAPTURE.COMPLETED, delivered any
  number of times, credit one journal entry (`paypal:payment:<capture id>`).
* **Top up another organization through a confined key.** A key confined to one
  organization sees the others as 404, makes no order, and cannot read their top-ups.
* **Pay less than asked.** What is credited is what PayPal captured, not what the top-up
  asked: a capture of 5.00 for a top-up of 15.00 credits 500 cents (`credited_cents`), and the
  top-up says both figures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from core import top_up_capture, topups
from core.db import run_in_transaction
from core.settings import Settings
from tests.support.api import Client, api_org, assert_problem, count, make_key
from tests.support.db import tx
from tests.support.fakes.paypal_api import make_signing_cert
from tests.support.topups import (
    balance,
    capture,
    capture_completed,
    captures_queued,
    create,
    deliver,
    journal,
    order_approved,
    paypal_api,
)
from webhook_receiver.app import create_app

WEBHOOK_ID = "WH-TEST"


@pytest.fixture
def signed_app(database_url, redis_clean, fake_paypal) -> Iterator:
    """The web app verifying PayPal webhooks against the fake's certificate, with top-ups
    made at the same fake."""
    app = create_app(
        Settings(
            _env_file=None, DATABASE_URL=database_url, REDIS_URL=redis_clean,
            LOG_FORMAT="text", BROKER_PUBLISH_TIMEOUT=0.2,
            PAYPAL_WEBHOOK_ID=WEBHOOK_ID, PAYPAL_CERT_URL_PREFIXES=fake_paypal.cert_prefix,
            PAYPAL_API_BASE=fake_paypal.base_url, PAYPAL_CLIENT_ID=fake_paypal.client_id,
            PAYPAL_CLIENT_SECRET=fake_paypal.client_secret, TOP_UP_PROVIDER_TIMEOUT_SECONDS=1.0,
        )
    )  # fmt: skip
    yield app
    app.extensions["payguard"].close()


def _status(api, key, org, top_up_id) -> dict:
    return api.get(f"/organizations/{org}/top-ups/{top_up_id}", key).body


def test_a_forged_approval_webhook_approves_and_captures_nothing(
    signed_app, engine, fake_paypal, paypal_signer
):
    api = Client(signed_app.test_client())
    key, org = make_key(engine), tx(engine, api_org)
    top_up = create(api, key, org).body
    fake_paypal.approve(top_up["provider_reference"])
    raw = json.dumps(order_approved(top_up["provider_reference"], org)).encode()
    impostor = make_signing_cert()  # a key PayPal's certificate does not vouch for
    forged_headers = impostor.sign(WEBHOOK_ID, raw, fake_paypal.signing_cert_url)
    web = signed_app.test_client()
    answer = web.post("/webhooks/paypal", data=raw, headers=forged_headers)
    assert answer.status_code == 400
    assert count(engine, "webhook_events") == 0
    assert _status(api, key, org, top_up["top_up_id"])["status"] == "created"
    assert captures_queued(engine, top_up["top_up_id"]) == 0
    # The same approval, signed by PayPal's key, is accepted and queues the capture.
    genuine = paypal_signer.sign(WEBHOOK_ID, raw, fake_paypal.signing_cert_url)
    assert web.post("/webhooks/paypal", data=raw, headers=genuine).status_code == 200
    with engine.connect() as conn:
        inbox_id = conn.execute(text("SELECT id FROM webhook_events")).scalar_one()
    from core import handlers
    from tests.support.topups import POLICY

    run_in_transaction(engine, lambda c: handlers.process(c, inbox_id, POLICY))
    assert captures_queued(engine, top_up["top_up_id"]) == 1
    assert capture(signed_app, engine, top_up["top_up_id"]) == "completed"


def test_an_approval_naming_another_organization_is_parked(signed_app, engine, fake_paypal):
    api = Client(signed_app.test_client())
    key, victim, attacker = make_key(engine), tx(engine, api_org), tx(engine, api_org)
    top_up = create(api, key, victim).body
    stored = deliver(engine, "paypal", order_approved(top_up["provider_reference"], attacker))
    assert stored.status == "parked"
    assert captures_queued(engine, top_up["top_up_id"]) == 0
    assert _status(api, key, victim, top_up["top_up_id"])["status"] == "created"


def test_an_approval_of_an_order_that_is_no_top_up_captures_nothing(engine, fake_paypal):
    org = tx(engine, api_org)
    assert deliver(engine, "paypal", order_approved("ORDNOTOURS", org)).status == "processed"
    assert count(engine, "outbox", "task = :t", t=topups.CAPTURE_TASK) == 0


def test_a_capture_answer_naming_another_organization_credits_nobody(
    signed_app, engine, fake_paypal
):
    api = Client(signed_app.test_client())
    key, victim, attacker = make_key(engine), tx(engine, api_org), tx(engine, api_org)
    top_up = create(api, key, attacker).body
    order_id = top_up["provider_reference"]
    fake_paypal.approve(order_id)
    deliver(engine, "paypal", order_approved(order_id, attacker))
    fake_paypal.orders[order_id]["custom_id"] = victim  # the answer claims another org
    assert capture(signed_app, engine, top_up["top_up_id"]) == "failed"
    assert (balance(engine, victim), balance(engine, attacker)) == (0, 0)
    shown = _status(api, key, attacker, top_up["top_up_id"])
    assert shown["status"] == "failed" and "another organization" in shown["failure_reason"]


def test_a_replayed_capture_credits_once(signed_app, engine, fake_paypal):
    api = Client(signed_app.test_client())
    key, org = make_key(engine), tx(engine, api_org)
    top_up = create(api, key, org, amount=1500).body
    order_id, top_up_id = top_up["provider_reference"], top_up["top_up_id"]
    fake_paypal.approve(order_id)
    deliver(engine, "paypal", order_approved(order_id, org))
    answer = paypal_api(signed_app).capture_order(
        order_id, top_up_capture.capture_request_id(order_id)
    )
    for _ in range(3):
        run_in_transaction(engine, lambda c: top_up_capture.record_capture(c, top_up_id, answer))
    webhook = capture_completed(order_id, fake_paypal.orders[order_id]["capture"])
    for _ in range(2):
        deliver(engine, "paypal", {**webhook, "id": webhook["id"] + "x" * _})
    assert capture(signed_app, engine, top_up_id) == "completed"
    assert balance(engine, org) == 1500
    assert len(journal(engine, org)) == 1
    assert fake_paypal.captures_made == 1


def test_a_confined_key_cannot_top_up_or_read_another_organization(signed_app, engine, fake_paypal):
    api = Client(signed_app.test_client())
    mine, theirs = tx(engine, api_org), tx(engine, api_org)
    confined = make_key(engine, "admin", org=mine)
    assert_problem(create(api, confined, theirs), 404)
    assert fake_paypal.create_requests == 0
    their_top_up = create(api, make_key(engine), theirs).body["top_up_id"]
    assert_problem(api.get(f"/organizations/{theirs}/top-ups/{their_top_up}", confined), 404)
    assert_problem(api.get(f"/organizations/{mine}/top-ups/{their_top_up}", confined), 404)
    reader = make_key(engine, "read", org=mine)
    assert_problem(create(api, reader, mine), 403)
    assert count(engine, "top_ups") == 1


def test_paying_less_than_asked_credits_what_was_captured(signed_app, engine, fake_paypal):
    api = Client(signed_app.test_client())
    key, org = make_key(engine), tx(engine, api_org)
    top_up = create(api, key, org, amount=1500).body
    fake_paypal.approve(top_up["provider_reference"])
    fake_paypal.capture_amount = "5.00"
    deliver(engine, "paypal", order_approved(top_up["provider_reference"], org))
    assert capture(signed_app, engine, top_up["top_up_id"]) == "completed"
    assert balance(engine, org) == 500
    shown = _status(api, key, org, top_up["top_up_id"])
    assert (shown["amount_cents"], shown["credited_cents"]) == (1500, 500)
