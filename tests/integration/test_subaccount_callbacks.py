"""Status callbacks signed with a subaccount's own auth token are accepted too: Twilio may
sign a subaccount's callbacks with it. The token is asked of Twilio (with the parent's
credentials) only for subaccounts that belong to one of our organizations."""

from __future__ import annotations

import uuid

import pytest

from core import messages, orgs, wallet
from core.db import run_in_transaction
from core.providers.ports import SendOutcome, SendResult
from core.sending import Policy
from core.settings import Settings
from tests.support.fakes.fake_twilio import signed_status_callback, status_callback_params

PARENT = "AC" + "1" * 32
PUBLIC = "https://payguard.example.com"
URL = f"{PUBLIC}/webhooks/twilio/status"
SUBACCOUNT_TOKEN = "0" * 32  # what the fake answers for any subaccount


@pytest.fixture
def client(database_url, fake_twilio, make_app):
    settings = Settings(
        DATABASE_URL=database_url, REDIS_URL="redis://127.0.0.1:1/0",
        TWILIO_ACCOUNT_SID=PARENT, TWILIO_AUTH_TOKEN="parent-token",
        TWILIO_API_BASE=fake_twilio.base_url, PUBLIC_BASE_URL=PUBLIC, LOG_FORMAT="text",
    )  # fmt: skip
    return make_app(settings).test_client()


def _accepted(engine, subaccount: str) -> str:
    def setup(conn):
        orgs.create(
            conn, "acme", twilio_subaccount_sid=subaccount, sender="+15005550006", billing="prepaid"
        )
        wallet.credit(conn, "acme", 10, "seed")
        queued = messages.queue(conn, "acme", "+15005550010", "hi", Policy())
        messages.prepare(conn, queued.message_id, Policy())
        sid = "SM" + uuid.uuid4().hex
        result = SendResult(SendOutcome.ACCEPTED, sid=sid, status="queued")
        messages.record_result(conn, queued.message_id, result, Policy())
        return sid

    return run_in_transaction(engine, setup)


def test_callback_signed_with_our_subaccounts_token_is_accepted(engine, client, fake_twilio):
    subaccount = "AC" + uuid.uuid4().hex
    sid = _accepted(engine, subaccount)
    params, signature = signed_status_callback(
        SUBACCOUNT_TOKEN, URL, status_callback_params(sid, "delivered", subaccount)
    )

    first = client.post(
        "/webhooks/twilio/status", data=params, headers={"X-Twilio-Signature": signature}
    )
    again = client.post(
        "/webhooks/twilio/status", data=params, headers={"X-Twilio-Signature": signature}
    )

    assert (first.status_code, first.get_json()["status"]) == (200, "delivered")
    assert again.status_code == 200
    assert len(fake_twilio.requests(account_sid=subaccount)) == 1  # asked once, cached


def test_callback_for_a_subaccount_that_is_not_ours_is_refused_without_asking(
    engine, client, fake_twilio
):
    stranger = "AC" + uuid.uuid4().hex
    params, signature = signed_status_callback(
        SUBACCOUNT_TOKEN, URL, status_callback_params("SM" + "a" * 32, "failed", stranger)
    )

    answer = client.post(
        "/webhooks/twilio/status", data=params, headers={"X-Twilio-Signature": signature}
    )

    assert answer.status_code == 403
    assert fake_twilio.requests(account_sid=stranger) == []


def test_callback_signed_with_a_wrong_token_is_refused(engine, client):
    subaccount = "AC" + uuid.uuid4().hex
    sid = _accepted(engine, subaccount)
    params, signature = signed_status_callback(
        "not-the-token", URL, status_callback_params(sid, "failed", subaccount)
    )

    answer = client.post(
        "/webhooks/twilio/status", data=params, headers={"X-Twilio-Signature": signature}
    )

    assert answer.status_code == 403
    assert run_in_transaction(engine, lambda c: messages.get(c, _msg(c, sid))).status == "accepted"


def _msg(conn, sid: str) -> str:
    from sqlalchemy import text

    return conn.execute(
        text("SELECT message_id FROM messages WHERE twilio_sid = :s"), {"s": sid}
    ).scalar_one()
