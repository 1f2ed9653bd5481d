"""Twilio status callbacks through the receiver (Flask test client, real PostgreSQL).

A callback counts only with a valid X-Twilio-Signature computed over PUBLIC_BASE_URL's
callback URL; it moves a message forward only, whatever the order and however often it
arrives; `failed` refunds the charge exactly once; Twilio's price is recorded.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from core import campaigns, messages, orgs, subscriptions, wallet
from core.providers.ports import SendOutcome, SendResult
from core.sending import Policy
from core.settings import Settings
from tests.support.db import tx
from tests.support.fakes.fake_twilio import signed_status_callback, status_callback_params
from webhook_receiver.app import create_app

PARENT = "AC" + "1" * 32
TOKEN = "parent-auth-token"
PUBLIC = "https://payguard.example.com"
CALLBACK_URL = f"{PUBLIC}/webhooks/twilio/status"
PATH = "/webhooks/twilio/status"
POLICY = Policy()

# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def app(database_url):
    settings = Settings(
        DATABASE_URL=database_url,
        REDIS_URL="redis://127.0.0.1:1/0",  # never used by this route
        PAYPAL_WEBHOOK_ID=None,
        STRIPE_WEBHOOK_SECRET=None,
        TWILIO_ACCOUNT_SID=PARENT,
        TWILIO_AUTH_TOKEN=TOKEN,
        PUBLIC_BASE_URL=PUBLIC,
        LOG_FORMAT="text",
    )
    flask_app = create_app(settings)
    yield flask_app
    flask_app.extensions["payguard"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def accepted_message(engine, *, balance: int = 10, price: int = 2, campaign: str | None = None):
    """An organization and one message Twilio accepted (charged `price`): (org, message)."""
    org = f"org-{uuid.uuid4().hex[:10]}"
    sub = "AC" + uuid.uuid4().hex
    sid = "SM" + uuid.uuid4().hex

    def setup(conn):
        orgs.create(
            conn, org, twilio_subaccount_sid=sub, sender="+15005550006", segment_price_cents=price
        )
        wallet.credit(conn, org, balance, f"seed:{org}")
        subscriptions.apply_status(
            conn, "paypal", f"I-{org}", org, "active", datetime.now(UTC) - timedelta(days=1)
        )
        if campaign:
            campaigns.create_campaign(conn, org, campaign, POLICY)
        return messages.queue(conn, org, "+15005550010", "hello", POLICY, campaign)

    message = tx(engine, setup)
    assert tx(engine, lambda c: messages.prepare(c, message.message_id, POLICY)) is not None
    result = SendResult(SendOutcome.ACCEPTED, sid=sid, status="queued")
    assert tx(engine, lambda c: messages.record_result(c, message.message_id, result, POLICY)) == (
        "accepted"
    )
    return org, tx(engine, lambda c: messages.get(c, message.message_id))


def post(client, message, status: str, *, token: str = TOKEN, url: str = CALLBACK_URL, **extra):
    params = status_callback_params(message.twilio_sid, status, "AC" + "2" * 32)
    params.update(extra)
    params, signature = signed_status_callback(token, url, params)
    return client.post(PATH, data=params, headers={"X-Twilio-Signature": signature})


def status_of(engine, message) -> str:
    return tx(engine, lambda c: messages.get(c, message.message_id)).status


def balance(engine, org: str) -> int:
    return tx(engine, lambda c: wallet.show(c, org)).balance_cents


def refunds(engine, org: str) -> list:
    with engine.connect() as c:
        return list(
            c.execute(
                text(
                    "SELECT amount_cents FROM journal WHERE org_id = :o AND kind = 'message_refund'"
                ),
                {"o": org},
            ).scalars()
        )


# --- tests --------------------------------------------------------------------------------


def test_callbacks_move_a_message_forward(client, engine):
    _, message = accepted_message(engine)

    for status in ("queued", "sent", "delivered"):
        response = post(client, message, status)
        assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"status": "delivered"}
    assert status_of(engine, message) == "delivered"


def test_out_of_order_and_repeated_callbacks_never_move_a_message_back(client, engine):
    _, message = accepted_message(engine)

    assert post(client, message, "delivered").status_code == 200
    for late in ("sent", "sending", "queued", "delivered", "sent"):
        response = post(client, message, late)
        assert response.status_code == 200
        assert response.get_json() == {"status": "delivered"}
    assert status_of(engine, message) == "delivered"


def test_failed_refunds_the_charge_once_however_often_it_arrives(client, engine):
    org, message = accepted_message(engine, balance=10, price=2)
    assert message.charged_cents == 2
    assert balance(engine, org) == 8

    for _ in range(3):
        assert post(client, message, "failed", ErrorCode="30003").status_code == 200

    assert status_of(engine, message) == "failed"
    assert balance(engine, org) == 10
    assert refunds(engine, org) == [2]
    assert tx(engine, lambda c: wallet.verify(c, org)) == []


def test_concurrent_duplicate_failed_callbacks_refund_once(app, engine):
    org, message = accepted_message(engine, balance=10, price=2)
    n = 8
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def deliver() -> None:
        client = app.test_client()
        barrier.wait(timeout=30)
        codes.append(post(client, message, "failed").status_code)

    threads = [threading.Thread(target=deliver) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert codes == [200] * n
    assert refunds(engine, org) == [2]
    assert balance(engine, org) == 10


def test_failed_after_delivered_refunds_nothing(client, engine):
    org, message = accepted_message(engine, balance=10, price=2)

    assert post(client, message, "delivered").status_code == 200
    assert post(client, message, "failed").status_code == 200

    assert status_of(engine, message) == "delivered"
    assert refunds(engine, org) == []
    assert balance(engine, org) == 8


def test_twilios_price_is_recorded_even_from_a_callback_that_moves_nothing(client, engine):
    _, message = accepted_message(engine)

    assert post(client, message, "delivered").status_code == 200
    response = post(client, message, "sent", Price="-0.00790", PriceUnit="USD")

    assert response.status_code == 200
    stored = tx(engine, lambda c: messages.get(c, message.message_id))
    assert (stored.status, stored.twilio_price) == ("delivered", "-0.00790")
    with engine.connect() as c:
        unit = c.execute(
            text("SELECT twilio_price_unit FROM messages WHERE message_id = :m"),
            {"m": message.message_id},
        ).scalar_one()
    assert unit == "USD"


@pytest.mark.parametrize(
    "forge",
    [
        "missing",
        "wrong-token",
        "url-the-request-arrived-at",
        "tampered-status",
        "garbage",
    ],
)
def test_a_callback_without_a_valid_signature_is_refused_and_changes_nothing(client, engine, forge):
    org, message = accepted_message(engine, balance=10, price=2)
    params = status_callback_params(message.twilio_sid, "failed", "AC" + "2" * 32)
    params["Price"] = "-0.50"
    headers: dict[str, str] = {}
    if forge == "wrong-token":
        headers["X-Twilio-Signature"] = signed_status_callback("other", CALLBACK_URL, params)[1]
    elif forge == "url-the-request-arrived-at":
        # Signed for the URL the test client used, not PUBLIC_BASE_URL's.
        headers["X-Twilio-Signature"] = signed_status_callback(
            TOKEN, f"http://localhost{PATH}", params
        )[1]
    elif forge == "tampered-status":
        signed = dict(params, MessageStatus="delivered", SmsStatus="delivered")
        headers["X-Twilio-Signature"] = signed_status_callback(TOKEN, CALLBACK_URL, signed)[1]
    elif forge == "garbage":
        headers["X-Twilio-Signature"] = "not-base64!"

    response = client.post(PATH, data=params, headers=headers)

    assert response.status_code == 403
    stored = tx(engine, lambda c: messages.get(c, message.message_id))
    assert (stored.status, stored.twilio_price) == ("accepted", None)
    assert refunds(engine, org) == []
    assert balance(engine, org) == 8


def test_a_signed_callback_for_an_unknown_message_or_status_changes_nothing(client, engine):
    org, message = accepted_message(engine)
    stranger = messages.Message(**{**message.__dict__, "twilio_sid": "SM" + "f" * 32})

    # Kept in case its message's SID is recorded later; it changes nothing until then.
    assert post(client, stranger, "failed").get_json() == {"status": "pending"}
    assert post(client, message, "exploded").get_json() == {"status": "ignored"}
    assert status_of(engine, message) == "accepted"
    assert refunds(engine, org) == []


def test_a_refund_that_makes_sending_possible_again_resumes_system_paused_campaigns(client, engine):
    # The one message took the last of the balance: the campaign was paused for it.
    org, message = accepted_message(engine, balance=2, price=2, campaign="spring")
    paused = tx(engine, lambda c: campaigns.list_campaigns(c, org))
    assert [(c.status, c.paused_by) for c in paused] == [("paused", "system")]

    assert post(client, message, "failed").status_code == 200

    assert balance(engine, org) == 2
    [campaign] = tx(engine, lambda c: campaigns.list_campaigns(c, org))
    assert (campaign.status, campaign.paused_by) == ("running", None)


def test_a_failed_callback_that_overtakes_the_recorded_sid_still_refunds(client, engine):
    org = f"org-{uuid.uuid4().hex[:10]}"
    sid = "SM" + uuid.uuid4().hex

    def setup(conn):
        orgs.create(
            conn,
            org,
            twilio_subaccount_sid="AC" + uuid.uuid4().hex,
            sender="+15005550006",
            billing="prepaid",
        )
        wallet.credit(conn, org, 10, f"seed:{org}")
        return messages.queue(conn, org, "+15005550010", "hello", POLICY)

    queued = tx(engine, setup)
    assert tx(engine, lambda c: messages.prepare(c, queued.message_id, POLICY)) is not None
    # Twilio created the message and reported it failed before the worker's commit.
    early = messages.Message(**{**queued.__dict__, "twilio_sid": sid})
    assert post(client, early, "failed").status_code == 200
    result = SendResult(SendOutcome.ACCEPTED, sid=sid, status="queued")
    tx(engine, lambda c: messages.record_result(c, queued.message_id, result, POLICY))

    assert status_of(engine, queued) == "failed"
    assert balance(engine, org) == 10
