"""Twilio status callbacks from the attacker's side.

Threat model. Every organization has a Twilio subaccount of its own, and Twilio may sign a
subaccount's status callbacks with that subaccount's auth token. A customer who can read
their own subaccount's token (Twilio's console shows it to them) can therefore sign any
callback they like, naming their own subaccount in `AccountSid`: they can forge, replay and
reorder callbacks for any `MessageSid` and any `?m=` message id in the URL. What they must
never reach is another organization's message: a forged `failed` refunds that message's
charge (money moves into a wallet Twilio did bill), a forged `NumSegments` charges extra
segments (money moves out of it), a forged `delivered` hides a real failure. So a callback
signed with a subaccount's token counts only for messages sent through that very subaccount:
checked when it arrives, and again when a callback that arrived before its message's SID was
recorded ("early") is applied. Callbacks signed with the parent account's token (ours alone)
count for every message, and the `?m=` message id is part of the signed URL, so a captured
signature cannot be pointed at another message. Within its own subaccount a signer can still
reorder or replay only within what callbacks allow anyway: a message moves forward only and a
refund happens once. What is out of reach here: a customer forging `failed` for their own
messages to be refunded (telling that from Twilio's word would take asking Twilio's API).

A second, availability threat: when asking Twilio for a subaccount's token fails once, every
callback of that subaccount would be refused for as long as the failure is remembered, and
Twilio does not send a status callback again. A failure is remembered for seconds only.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from core import messages, wallet
from core.providers.ports import SendOutcome, SendResult
from core.sending import Policy
from core.settings import Settings
from tests.support.db import tx
from tests.support.factories import new_org, subaccount_of
from tests.support.fakes.fake_twilio import signed_status_callback, status_callback_params
from webhook_receiver.app import create_app

PARENT = "AC" + "1" * 32
PARENT_TOKEN = "parent-token"
PUBLIC = "https://payguard.example.com"
PATH = "/webhooks/twilio/status"
URL = f"{PUBLIC}{PATH}"
POLICY = Policy()


@pytest.fixture
def app(database_url, fake_twilio):
    settings = Settings(
        DATABASE_URL=database_url, REDIS_URL="redis://127.0.0.1:1/0",
        TWILIO_ACCOUNT_SID=PARENT, TWILIO_AUTH_TOKEN=PARENT_TOKEN,
        TWILIO_API_BASE=fake_twilio.base_url, PUBLIC_BASE_URL=PUBLIC, LOG_FORMAT="text",
    )  # fmt: skip
    flask_app = create_app(settings)
    yield flask_app
    flask_app.extensions["payguard"].close()


@pytest.fixture
def client(app):
    return app.test_client()


class Tenant:
    """An organization with a subaccount whose token only it (and Twilio) knows."""

    def __init__(self, engine, fake_twilio, *, balance: int = 10, price: int = 2):
        self.org = tx(engine, new_org, balance=balance, price=price, twilio=True, active=True)
        self.subaccount = subaccount_of(self.org)
        self.token = uuid.uuid4().hex
        fake_twilio.set_auth_token(self.subaccount, self.token)

    def sending(self, engine) -> str:
        """A message held and marked `sending`: the worker is in its Twilio call."""
        queued = tx(engine, lambda c: messages.queue(c, self.org, "+15005550010", "hello", POLICY))
        assert tx(engine, lambda c: messages.prepare(c, queued.message_id, POLICY)) is not None
        return queued.message_id

    def accepted(self, engine, sid: str | None = None) -> tuple[str, str]:
        """A message Twilio accepted: (message id, SID)."""
        message_id = self.sending(engine)
        sid = record(engine, message_id, sid)
        return message_id, sid


def record(engine, message_id: str, sid: str | None = None) -> str:
    sid = sid or "SM" + uuid.uuid4().hex
    result = SendResult(SendOutcome.ACCEPTED, sid=sid, status="queued")
    tx(engine, lambda c: messages.record_result(c, message_id, result, POLICY))
    return sid


def post(client, *, token: str, account: str, sid: str, status: str, m: str | None = None):
    url = URL if m is None else f"{URL}?m={m}"
    params, signature = signed_status_callback(
        token, url, status_callback_params(sid, status, account)
    )
    path = PATH if m is None else f"{PATH}?m={m}"
    return client.post(path, data=params, headers={"X-Twilio-Signature": signature})


def stored(engine, message_id: str) -> messages.Message:
    return tx(engine, lambda c: messages.get(c, message_id))


def balance(engine, org: str) -> int:
    return tx(engine, lambda c: wallet.show(c, org)).balance_cents


def refunds(engine, org: str) -> int:
    with engine.connect() as c:
        return c.execute(
            text("SELECT count(*) FROM journal WHERE org_id = :o AND kind = 'message_refund'"),
            {"o": org},
        ).scalar_one()


# --- one subaccount's token never reaches another organization's message -------------------


def test_a_subaccount_cannot_fail_another_organizations_message(client, engine, fake_twilio):
    attacker, victim = Tenant(engine, fake_twilio), Tenant(engine, fake_twilio)
    message_id, sid = victim.accepted(engine)

    answer = post(
        client, token=attacker.token, account=attacker.subaccount, sid=sid, status="failed"
    )

    assert answer.status_code == 403
    assert stored(engine, message_id).status == "accepted"
    assert (refunds(engine, victim.org), balance(engine, victim.org)) == (0, 8)


def test_a_subaccount_cannot_mark_another_organizations_message_delivered(
    client, engine, fake_twilio
):
    attacker, victim = Tenant(engine, fake_twilio), Tenant(engine, fake_twilio)
    message_id, sid = victim.accepted(engine)

    answer = post(
        client, token=attacker.token, account=attacker.subaccount, sid=sid, status="delivered"
    )

    assert answer.status_code == 403
    assert stored(engine, message_id).status == "accepted"


def test_an_early_callback_of_another_subaccount_is_dropped_when_the_sid_is_recorded(
    client, engine, fake_twilio
):
    attacker, victim = Tenant(engine, fake_twilio), Tenant(engine, fake_twilio)
    message_id = victim.sending(engine)
    sid = "SM" + uuid.uuid4().hex

    # Before the victim's worker records the SID nobody can tell whose message it is: kept.
    early = post(
        client, token=attacker.token, account=attacker.subaccount, sid=sid, status="failed"
    )
    assert early.status_code == 200
    record(engine, message_id, sid)

    assert stored(engine, message_id).status == "accepted"
    assert (refunds(engine, victim.org), balance(engine, victim.org)) == (0, 8)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM early_callbacks")).scalar_one() == 0


def test_an_early_callback_of_the_messages_own_subaccount_is_applied(client, engine, fake_twilio):
    tenant = Tenant(engine, fake_twilio)
    message_id = tenant.sending(engine)
    sid = "SM" + uuid.uuid4().hex

    early = post(client, token=tenant.token, account=tenant.subaccount, sid=sid, status="failed")
    assert early.status_code == 200
    record(engine, message_id, sid)

    assert stored(engine, message_id).status == "failed"
    assert (refunds(engine, tenant.org), balance(engine, tenant.org)) == (1, 10)


def test_a_callback_naming_another_organizations_message_in_its_url_is_refused(
    client, engine, fake_twilio
):
    attacker, victim = Tenant(engine, fake_twilio), Tenant(engine, fake_twilio)
    message_id = victim.sending(engine)

    answer = post(
        client, token=attacker.token, account=attacker.subaccount,
        sid="SM" + uuid.uuid4().hex, status="failed", m=message_id,
    )  # fmt: skip

    assert answer.status_code == 403
    assert stored(engine, message_id).status == "sending"
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM early_callbacks")).scalar_one() == 0


def test_a_message_belongs_to_the_subaccount_it_was_sent_through(client, engine, fake_twilio):
    tenant = Tenant(engine, fake_twilio)
    message_id, sid = tenant.accepted(engine)
    old_subaccount, old_token = tenant.subaccount, tenant.token
    # The organization moves to another subaccount after the message went out.
    new_subaccount, new_token = "AC" + uuid.uuid4().hex, uuid.uuid4().hex
    fake_twilio.set_auth_token(new_subaccount, new_token)
    with engine.begin() as c:
        c.execute(
            text("UPDATE organizations SET twilio_subaccount_sid = :s WHERE org_id = :o"),
            {"s": new_subaccount, "o": tenant.org},
        )

    by_new = post(client, token=new_token, account=new_subaccount, sid=sid, status="failed")
    assert by_new.status_code == 403
    assert stored(engine, message_id).status == "accepted"

    by_old = post(client, token=old_token, account=old_subaccount, sid=sid, status="delivered")
    assert by_old.status_code == 200
    assert stored(engine, message_id).status == "delivered"


def test_the_parent_account_signs_for_every_subaccounts_messages(client, engine, fake_twilio):
    one, other = Tenant(engine, fake_twilio), Tenant(engine, fake_twilio)
    first, first_sid = one.accepted(engine)
    second, second_sid = other.accepted(engine)

    for sid in (first_sid, second_sid):
        # AccountSid names the subaccount, as Twilio's does; the parent's token signs.
        answer = post(client, token=PARENT_TOKEN, account=one.subaccount, sid=sid, status="sent")
        assert answer.status_code == 200

    assert [stored(engine, m).status for m in (first, second)] == ["sent", "sent"]


# --- a failed token lookup is not remembered for long --------------------------------------


def test_a_failed_token_lookup_is_forgotten_within_seconds(app, client, engine, fake_twilio):
    tenant = Tenant(engine, fake_twilio)
    message_id, sid = tenant.accepted(engine)
    now = [1000.0]
    app.extensions["payguard"].clock = lambda: now[0]
    fake_twilio.script("account", [503], account_sid=tenant.subaccount)  # Twilio hiccups once

    first = post(client, token=tenant.token, account=tenant.subaccount, sid=sid, status="sent")
    assert first.status_code in (403, 503)
    now[0] += 11  # a little over ten seconds later
    second = post(
        client, token=tenant.token, account=tenant.subaccount, sid=sid, status="delivered"
    )

    assert second.status_code == 200
    assert stored(engine, message_id).status == "delivered"
    assert len(fake_twilio.requests("account", tenant.subaccount)) == 2


def test_a_found_token_is_still_remembered(app, client, engine, fake_twilio):
    tenant = Tenant(engine, fake_twilio)
    _, sid = tenant.accepted(engine)
    now = [1000.0]
    app.extensions["payguard"].clock = lambda: now[0]

    for status in ("sent", "delivered"):
        answer = post(client, token=tenant.token, account=tenant.subaccount, sid=sid, status=status)
        assert answer.status_code == 200
        now[0] += 600

    assert len(fake_twilio.requests("account", tenant.subaccount)) == 1


def test_the_message_named_in_the_url_is_covered_by_the_signature(client, engine, fake_twilio):
    tenant, victim = Tenant(engine, fake_twilio), Tenant(engine, fake_twilio)
    own = tenant.sending(engine)
    target = victim.sending(engine)
    params, signature = signed_status_callback(
        PARENT_TOKEN, f"{URL}?m={own}", status_callback_params("SM" + "c" * 32, "failed", PARENT)
    )

    # A signature captured for one message, replayed with another message's id in the URL.
    answer = client.post(
        f"{PATH}?m={target}", data=params, headers={"X-Twilio-Signature": signature}
    )

    assert answer.status_code == 403
    assert [stored(engine, m).status for m in (own, target)] == ["sending", "sending"]
