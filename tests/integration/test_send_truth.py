"""A message settles to what Twilio did, whatever fails between Payguard and Twilio.

Twilio takes no idempotency key, so a message is created at most once and a send that may
have gone out is never repeated. Within that rule a message ends as what really happened:
a recording of Twilio's answer that fails is tried again rather than abandoned; a second
copy of the send task (the outbox relay republishes with the same task id) leaves a send in
flight to its owner while the owner's lease lasts; a status callback names its message
(`?m=<message id>` in the callback URL), so it settles a message whose SID was never
recorded. Only a lease that expired with no SID and no callback leaves a message `unknown`
(charged, never sent again), and a later answer or callback still corrects that.
"""

from __future__ import annotations

import time
import uuid
from functools import partial

import pytest
from sqlalchemy import text

from bus.publisher import Publisher
from core import messages, wallet
from core.providers.ports import SendOutcome, SendResult
from core.sending import Policy
from core.settings import Settings
from tests.stack import start_worker, wait_for
from tests.support.db import tx
from tests.support.factories import new_org, subaccount_of
from tests.support.fakes.fake_twilio import Reply, signed_status_callback, status_callback_params
from webhook_receiver.app import create_app

PARENT = "AC" + "1" * 32
TOKEN = "parent-auth-token"
PUBLIC = "https://payguard.example.com"
PATH = "/webhooks/twilio/status"
SENDER = "+15005550006"
TO = "+15005550010"
POLICY = Policy()


sending_org = partial(new_org, balance=10, price=2, twilio=True, active=True)


def queue(engine, org: str) -> str:
    return tx(engine, lambda c: messages.queue(c, org, TO, "hello", POLICY)).message_id


def message(engine, message_id: str) -> messages.Message:
    return tx(engine, lambda c: messages.get(c, message_id))


def holds(engine, org: str) -> list[tuple]:
    with engine.connect() as c:
        return [
            tuple(r)
            for r in c.execute(
                text("SELECT reference, status, captured_cents FROM holds WHERE org_id = :o"),
                {"o": org},
            )
        ]


def captures(engine, org: str) -> int:
    with engine.connect() as c:
        return c.execute(
            text("SELECT count(*) FROM journal WHERE org_id = :o AND kind = 'capture'"),
            {"o": org},
        ).scalar_one()


def expire_lease(engine, message_id: str) -> None:
    with engine.begin() as c:
        c.execute(
            text(
                "UPDATE messages SET send_lease_until = now() - interval '1 second' "
                "WHERE message_id = :m"
            ),
            {"m": message_id},
        )


# --- in one process: the rules --------------------------------------------------------------


@pytest.fixture
def client(database_url):
    settings = Settings(
        DATABASE_URL=database_url, REDIS_URL="redis://127.0.0.1:1/0",
        TWILIO_ACCOUNT_SID=PARENT, TWILIO_AUTH_TOKEN=TOKEN, PUBLIC_BASE_URL=PUBLIC,
        LOG_FORMAT="text",
    )  # fmt: skip
    app = create_app(settings)
    yield app.test_client()
    app.extensions["payguard"].close()


def callback(client, message_id: str, sid: str, status: str):
    """A parent-signed callback to the URL the worker gives Twilio for this message."""
    url = f"{PUBLIC}{PATH}?m={message_id}"
    params, signature = signed_status_callback(
        TOKEN, url, status_callback_params(sid, status, "AC" + "2" * 32)
    )
    return client.post(
        f"{PATH}?m={message_id}", data=params, headers={"X-Twilio-Signature": signature}
    )


def test_a_copy_of_the_task_leaves_a_send_under_a_live_lease_alone(engine):
    org = tx(engine, sending_org)
    mid = queue(engine, org)
    assert isinstance(tx(engine, lambda c: messages.prepare(c, mid, POLICY)), messages.Plan)

    again = tx(engine, lambda c: messages.prepare(c, mid, POLICY))

    assert isinstance(again, messages.LeaseHeld)
    assert 0 < again.seconds_left <= POLICY.send_lease.total_seconds()
    assert message(engine, mid).status == "sending"


def test_only_a_lease_that_expired_with_no_sid_and_no_callback_is_unknown(engine):
    org = tx(engine, sending_org)
    mid = queue(engine, org)
    assert isinstance(tx(engine, lambda c: messages.prepare(c, mid, POLICY)), messages.Plan)
    expire_lease(engine, mid)

    assert tx(engine, lambda c: messages.prepare(c, mid, POLICY)) is None

    m = message(engine, mid)
    assert (m.status, m.twilio_sid, m.charged_cents) == ("unknown", None, 2)
    assert holds(engine, org) == [(f"msg:{mid}", "captured", 2)]


def test_a_callback_settles_a_message_whose_sid_was_never_recorded(client, engine):
    org = tx(engine, sending_org)
    mid = queue(engine, org)
    assert isinstance(tx(engine, lambda c: messages.prepare(c, mid, POLICY)), messages.Plan)
    sid = "SM" + uuid.uuid4().hex

    # Twilio accepted and delivered it; the worker's recording of the answer never happens.
    assert callback(client, mid, sid, "delivered").status_code == 200
    expire_lease(engine, mid)
    assert tx(engine, lambda c: messages.prepare(c, mid, POLICY)) is None

    m = message(engine, mid)
    assert (m.status, m.twilio_sid, m.charged_cents) == ("delivered", sid, 2)
    assert holds(engine, org) == [(f"msg:{mid}", "captured", 2)]
    assert captures(engine, org) == 1


def test_a_callback_corrects_a_message_given_up_as_unknown(client, engine):
    org = tx(engine, sending_org)
    mid = queue(engine, org)
    assert isinstance(tx(engine, lambda c: messages.prepare(c, mid, POLICY)), messages.Plan)
    expire_lease(engine, mid)
    assert tx(engine, lambda c: messages.prepare(c, mid, POLICY)) is None
    sid = "SM" + uuid.uuid4().hex

    assert callback(client, mid, sid, "failed").status_code == 200

    m = message(engine, mid)
    assert (m.status, m.twilio_sid) == ("failed", sid)
    assert tx(engine, lambda c: wallet.show(c, org)).balance_cents == 10  # refunded once
    assert captures(engine, org) == 1


def test_a_late_answer_corrects_a_message_given_up_as_unknown(engine):
    org = tx(engine, sending_org)
    mid = queue(engine, org)
    assert isinstance(tx(engine, lambda c: messages.prepare(c, mid, POLICY)), messages.Plan)
    expire_lease(engine, mid)
    assert tx(engine, lambda c: messages.prepare(c, mid, POLICY)) is None
    sid = "SM" + uuid.uuid4().hex

    result = SendResult(SendOutcome.ACCEPTED, sid=sid, status="queued")
    assert tx(engine, lambda c: messages.record_result(c, mid, result, POLICY)) == "accepted"

    m = message(engine, mid)
    assert (m.status, m.twilio_sid, m.charged_cents) == ("accepted", sid, 2)
    assert captures(engine, org) == 1


def test_a_late_refusal_gives_back_what_unknown_charged(engine):
    org = tx(engine, sending_org)
    mid = queue(engine, org)
    assert isinstance(tx(engine, lambda c: messages.prepare(c, mid, POLICY)), messages.Plan)
    expire_lease(engine, mid)
    assert tx(engine, lambda c: messages.prepare(c, mid, POLICY)) is None
    assert tx(engine, lambda c: wallet.show(c, org)).balance_cents == 8

    refused = SendResult(SendOutcome.REJECTED, http_status=400, error_code=21211)
    assert tx(engine, lambda c: messages.record_result(c, mid, refused, POLICY)) == "rejected"
    again = tx(engine, lambda c: messages.record_result(c, mid, refused, POLICY))

    assert again == "rejected"
    assert message(engine, mid).status == "rejected"
    assert tx(engine, lambda c: wallet.show(c, org)).balance_cents == 10  # given back once
    assert tx(engine, lambda c: wallet.verify(c, org)) == []


# --- real workers: failures between Twilio's answer and the database ------------------------


@pytest.fixture
def env(twilio_env):
    """twilio_env, with a failed recording of Twilio's answer retried after a second."""
    return dict(twilio_env, RECORD_RESULT_RETRY_SECONDS="1")


def publish(env, message_id: str, task_id: str | None = None) -> None:
    publisher = Publisher(env["REDIS_URL"], timeout=2.0)
    try:
        publisher.publish(messages.SEND_TASK, [message_id], task_id=task_id)
    finally:
        publisher.close()


FAIL_FIRST_RECORDING = """
CREATE SEQUENCE recordings_seen;
CREATE FUNCTION fail_first_recording() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A sequence is not transactional: the second try of the recording sees 2 and passes.
    IF OLD.status = 'sending' AND NEW.status <> 'sending'
       AND nextval('recordings_seen') = 1 THEN
        RAISE EXCEPTION 'the database went away' USING ERRCODE = '57P01';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fail_first_recording BEFORE UPDATE ON messages
    FOR EACH ROW EXECUTE FUNCTION fail_first_recording();
"""


def test_a_recording_that_fails_after_twilio_accepted_is_retried_to_the_truth(
    engine, env, fake_twilio, tmp_path
):
    org = tx(engine, sending_org)
    sub = subaccount_of(org)
    mid = queue(engine, org)
    with engine.begin() as c:
        c.exec_driver_sql(FAIL_FIRST_RECORDING)

    with start_worker(env, tmp_path) as worker:
        publish(env, mid)
        m = wait_for(
            lambda: (found := message(engine, mid)).status == "accepted" and found,
            60,
            what="the message recorded as accepted",
        )
        time.sleep(1.0)  # room for a (wrong) second create to show
        log = worker.log()

    [created] = fake_twilio.messages(sub)
    assert (m.twilio_sid, m.charged_cents) == (created["sid"], 2), log
    assert created["status_callback"] == f"{env['PUBLIC_BASE_URL']}{PATH}?m={mid}"
    assert fake_twilio.message_count(sub) == 1
    assert holds(engine, org) == [(f"msg:{mid}", "captured", 2)]
    assert captures(engine, org) == 1
    with engine.connect() as c:
        assert c.execute(text("SELECT last_value FROM recordings_seen")).scalar_one() >= 2


def test_a_relayed_copy_with_the_same_task_id_leaves_a_live_send_to_its_owner(
    engine, env, fake_twilio, tmp_path
):
    fake_twilio.script("messages", [Reply(201, delay=4.0)])  # Twilio is slow to answer
    org = tx(engine, sending_org)
    sub = subaccount_of(org)
    mid = queue(engine, org)

    with start_worker(env, tmp_path, concurrency=2) as worker:
        publish(env, mid, task_id="outbox-1")
        wait_for(lambda: fake_twilio.message_count(sub) == 1, 30, what="the create in flight")
        publish(env, mid, task_id="outbox-1")  # the relay again, with the same task id
        m = wait_for(
            lambda: (found := message(engine, mid)).status not in ("queued", "sending") and found,
            60,
            what="the message settled",
        )
        time.sleep(2.0)  # room for the copy to come back and do something wrong
        m = message(engine, mid)
        log = worker.log()

    [created] = fake_twilio.messages(sub)
    assert (m.status, m.twilio_sid) == ("accepted", created["sid"]), log
    assert fake_twilio.message_count(sub) == 1
    assert holds(engine, org) == [(f"msg:{mid}", "captured", 2)]
