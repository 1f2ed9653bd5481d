"""The may-send decision and what it does to campaigns and the Twilio subaccount, in process.

One decision gives every reason that applies (subscription_inactive, twilio_suspended,
wallet_frozen, insufficient_balance). Whatever changes the answer pauses every running
campaign of the organization as `system` with the reasons, in the same unit of work, and the
change back resumes exactly those: a campaign the user paused stays paused, and a user's
resume is refused, with the reasons, while the organization may not send.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from sqlalchemy import text

from core import handlers, inbox, messages, orgs, sending, subscriptions, wallet
from core.campaigns import create_campaign, list_campaigns, pause_campaign, resume_campaign
from core.db import driver_autocommit
from core.errors import NotFound, Refused
from core.providers.twilio import accounts as twilio_accounts
from core.providers.twilio.gateway import AccountOutcome
from core.sending import (
    INSUFFICIENT_BALANCE,
    SUBSCRIPTION_INACTIVE,
    TWILIO_SUSPENDED,
    WALLET_FROZEN,
    Policy,
)
from tests.support.db import tx
from tests.support.factories import new_org
from tests.support.fakes.recording_gateway import RecordingGateway
from tests.support.payloads import paypal as paypal_payloads

POLICY = Policy(default_segment_price_cents=1, past_due_grace=timedelta(hours=72))
SENDER = "+15005550006"
TO = "+15005550010"
ALL_REASONS = [SUBSCRIPTION_INACTIVE, TWILIO_SUSPENDED, WALLET_FROZEN, INSUFFICIENT_BALANCE]

# --- helpers ------------------------------------------------------------------------------


sending_org = partial(new_org, balance=100, twilio=True, active=True)


def set_subscription(conn, org: str, status: str, at: datetime | None = None) -> None:
    subscriptions.apply_status(conn, "paypal", f"I-{org}", org, status, at or datetime.now(UTC))


def change(engine, org: str, fn) -> sending.Reconciled:
    """One unit of work: the change, then reconcile (as every handler does)."""

    def unit(conn):
        fn(conn)
        return sending.reconcile(conn, org, POLICY)

    return tx(engine, unit)


def cancel(engine, org: str) -> sending.Reconciled:
    return change(engine, org, lambda c: set_subscription(c, org, "cancelled"))


def decide(engine, org: str, **kw) -> sending.Decision:
    decision = tx(engine, lambda c: sending.decide(c, org, POLICY, **kw))
    if not kw:  # /v1's can-send decides on the driver's own connection: the same answer
        with driver_autocommit(engine) as conn:
            assert sending.decide_on_driver(conn, org, POLICY) == decision
    return decision


def campaigns(engine, org: str) -> dict[str, tuple]:
    return {
        c.campaign_id: (c.status, c.paused_by, c.pause_reason)
        for c in tx(engine, lambda conn: list_campaigns(conn, org))
    }


def user_pause(engine, org: str, campaign: str) -> None:
    tx(engine, lambda c: pause_campaign(c, org, campaign))


def sync_rows(engine, org: str) -> int:
    with engine.connect() as c:
        return c.execute(
            text("SELECT count(*) FROM outbox WHERE task = :t AND args = CAST(:a AS jsonb)"),
            {"t": sending.SYNC_TWILIO_TASK, "a": json.dumps([org])},
        ).scalar_one()


def org_row(engine, org: str):
    return tx(engine, lambda c: orgs.get(c, org))


# --- the decision -------------------------------------------------------------------------


def test_an_organization_in_good_standing_may_send(engine):
    org = tx(engine, sending_org, balance=5)

    decision = decide(engine, org)

    assert decision.can_send is True
    assert decision.reasons == ()
    assert decision.as_dict()["reasons"] == []
    assert decision.available_cents == 5


def test_an_unknown_organization_is_not_found_on_either_connection(engine):
    with pytest.raises(NotFound):
        tx(engine, lambda c: sending.decide(c, "nobody", POLICY))
    with pytest.raises(NotFound), driver_autocommit(engine) as conn:
        sending.decide_on_driver(conn, "nobody", POLICY)


def test_every_reason_is_given_at_once(engine):
    org = tx(engine, sending_org, balance=0)
    cancel(engine, org)  # inactive subscription, and the subaccount marked to be suspended
    tx(engine, lambda c: wallet.freeze(c, org, "chargeback", actor="test"))

    decision = decide(engine, org)

    assert list(decision.reasons) == ALL_REASONS
    assert decision.can_send is False
    assert decision.freeze_reasons == ("chargeback",)
    assert decision.as_dict()["reasons"] == ALL_REASONS


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda c, org: set_subscription(c, org, "cancelled"), SUBSCRIPTION_INACTIVE),
        (lambda c, org: set_subscription(c, org, "suspended"), SUBSCRIPTION_INACTIVE),
        (
            lambda c, org: c.execute(
                text("UPDATE organizations SET twilio_status = 'suspended' WHERE org_id = :o"),
                {"o": org},
            ),
            TWILIO_SUSPENDED,
        ),
        (
            lambda c, org: c.execute(
                text(
                    "UPDATE organizations SET twilio_desired_status = 'suspended' WHERE org_id = :o"
                ),
                {"o": org},
            ),
            TWILIO_SUSPENDED,
        ),
        (lambda c, org: wallet.freeze(c, org, "dispute:PP-1", actor="paypal"), WALLET_FROZEN),
        (lambda c, org: wallet.hold(c, org, 3, "msg:other"), INSUFFICIENT_BALANCE),
    ],
    ids=[
        "cancelled",
        "subscription-suspended",
        "twilio-suspended",
        "twilio-to-be-suspended",
        "frozen",
        "all-held",
    ],
)
def test_each_reason_alone(engine, make, reason):
    org = tx(engine, sending_org, balance=3)
    tx(engine, lambda c: make(c, org))

    assert decide(engine, org).reasons == (reason,)


def test_past_due_allows_sending_during_the_grace_period_only(engine):
    org = tx(engine, sending_org)
    since = datetime.now(UTC) - timedelta(hours=1)
    tx(engine, lambda c: set_subscription(c, org, "past_due", since))

    assert decide(engine, org, now=since + timedelta(hours=71)).can_send
    late = decide(engine, org, now=since + timedelta(hours=73))
    assert late.reasons == (SUBSCRIPTION_INACTIVE,)


def test_the_organizations_segment_price_decides_what_one_send_needs(engine):
    org = tx(engine, sending_org, balance=4, price=5)
    assert decide(engine, org).reasons == (INSUFFICIENT_BALANCE,)
    assert decide(engine, org).segment_price_cents == 5
    assert decide(engine, org, needed_cents=4).can_send

    default_priced = tx(engine, sending_org, balance=1)
    assert decide(engine, default_priced).can_send
    assert decide(engine, default_priced).segment_price_cents == POLICY.default_segment_price_cents


# --- campaigns ----------------------------------------------------------------------------


def test_a_lapsed_subscription_pauses_running_campaigns_and_suspends_the_subaccount_at_once(
    engine,
):
    org = tx(engine, sending_org, campaigns=["spring", "summer", "autumn"])
    user_pause(engine, org, "autumn")

    result = cancel(engine, org)

    assert sorted(result.paused) == ["spring", "summer"]
    assert result.twilio_desired_changed is True
    state = campaigns(engine, org)
    assert state["spring"] == ("paused", "system", f"{SUBSCRIPTION_INACTIVE},{TWILIO_SUSPENDED}")
    assert state["autumn"] == ("paused", "user", "paused by user")
    # Sending is blocked before Twilio has been asked: the desire alone blocks.
    row = org_row(engine, org)
    assert (row.twilio_desired_status, row.twilio_status) == ("suspended", "active")
    assert TWILIO_SUSPENDED in decide(engine, org).reasons
    assert sync_rows(engine, org) == 1
    # Reconciling again (a beat run, the next event) finds nothing left to change.
    again = change(engine, org, lambda c: None)
    assert (again.paused, again.resumed, again.twilio_desired_changed) == ((), (), False)
    assert sync_rows(engine, org) == 1


def test_the_pause_is_part_of_the_change_and_rolls_back_with_it(engine):
    org = tx(engine, sending_org, campaigns=["spring"])

    class Boom(Exception):
        pass

    def unit(conn):
        set_subscription(conn, org, "cancelled")
        sending.reconcile(conn, org, POLICY)
        raise Boom

    with pytest.raises(Boom):
        tx(engine, unit)

    assert campaigns(engine, org)["spring"] == ("running", None, None)
    assert decide(engine, org).can_send
    assert sync_rows(engine, org) == 0


def test_a_cancellation_event_pauses_campaigns_in_the_handlers_unit_of_work(engine):
    org = tx(engine, sending_org, campaigns=["spring"])
    payload = paypal_payloads.subscription_event("BILLING.SUBSCRIPTION.CANCELLED", f"I-{org}", org)

    def deliver(conn):
        stored, _ = inbox.store(
            conn,
            "paypal",
            payload["id"],
            payload["event_type"],
            {},
            json.dumps(payload).encode(),
        )
        return handlers.process(conn, stored.id, POLICY)

    outcome = tx(engine, deliver)

    assert outcome.status == "processed"
    assert campaigns(engine, org)["spring"][:2] == ("paused", "system")
    assert org_row(engine, org).twilio_desired_status == "suspended"


def test_running_out_of_money_pauses_and_a_payment_resumes_only_what_the_system_paused(engine):
    org = tx(engine, sending_org, balance=2, campaigns=["spring", "summer", "autumn"])
    user_pause(engine, org, "autumn")
    first = change(engine, org, lambda c: wallet.hold(c, org, 2, "msg:last"))
    assert sorted(first.paused) == ["spring", "summer"]
    user_pause(engine, org, "summer")  # the user's pause takes over the system's

    result = change(engine, org, lambda c: wallet.credit(c, org, 500, "paypal:payment:P1"))

    assert result.resumed == ("spring",)
    assert campaigns(engine, org) == {
        "spring": ("running", None, None),
        "summer": ("paused", "user", "paused by user"),
        "autumn": ("paused", "user", "paused by user"),
    }


def test_the_pause_reason_follows_the_reasons(engine):
    org = tx(engine, sending_org, balance=0, campaigns=["spring"])
    change(engine, org, lambda c: None)
    assert campaigns(engine, org)["spring"] == ("paused", "system", INSUFFICIENT_BALANCE)

    change(engine, org, lambda c: wallet.freeze(c, org, "chargeback", actor="test"))
    assert campaigns(engine, org)["spring"] == (
        "paused",
        "system",
        f"{WALLET_FROZEN},{INSUFFICIENT_BALANCE}",
    )

    change(engine, org, lambda c: wallet.credit(c, org, 10, "paypal:payment:P1"))
    assert campaigns(engine, org)["spring"] == ("paused", "system", WALLET_FROZEN)

    change(engine, org, lambda c: wallet.unfreeze(c, org, "chargeback", actor="test"))
    assert campaigns(engine, org)["spring"] == ("running", None, None)


def test_a_campaign_created_while_sending_is_blocked_waits_paused_by_the_system(engine):
    org = tx(engine, sending_org, balance=0)
    created = tx(engine, lambda c: create_campaign(c, org, "winter", POLICY))
    assert (created.status, created.paused_by) == ("paused", "system")

    change(engine, org, lambda c: wallet.credit(c, org, 5, "paypal:payment:P1"))
    assert campaigns(engine, org)["winter"] == ("running", None, None)


def test_a_users_resume_is_refused_with_the_reasons_while_sending_is_blocked(engine):
    org = tx(engine, sending_org, balance=0, campaigns=["spring"])
    user_pause(engine, org, "spring")
    tx(engine, lambda c: wallet.freeze(c, org, "chargeback", actor="test"))

    with pytest.raises(Refused) as refused:
        tx(engine, lambda c: resume_campaign(c, org, "spring", POLICY))

    assert WALLET_FROZEN in str(refused.value)
    assert INSUFFICIENT_BALANCE in str(refused.value)
    assert campaigns(engine, org)["spring"] == ("paused", "user", "paused by user")

    change(engine, org, lambda c: wallet.unfreeze(c, org, "chargeback", actor="test"))
    change(engine, org, lambda c: wallet.credit(c, org, 5, "paypal:payment:P1"))
    assert campaigns(engine, org)["spring"] == ("paused", "user", "paused by user")
    resumed = tx(engine, lambda c: resume_campaign(c, org, "spring", POLICY))
    assert (resumed.status, resumed.paused_by) == ("running", None)


def test_a_reactivated_subscription_resumes_campaigns_only_once_twilio_has_confirmed(engine):
    org = tx(engine, sending_org, campaigns=["spring"])
    cancel(engine, org)
    gateway = RecordingGateway()
    assert twilio_accounts.converge_one(engine, gateway, org, POLICY) == "changed"
    assert org_row(engine, org).twilio_status == "suspended"

    change(engine, org, lambda c: set_subscription(c, org, "active"))

    # The subscription allows sending again, the subaccount is still suspended at Twilio.
    assert decide(engine, org).reasons == (TWILIO_SUSPENDED,)
    assert campaigns(engine, org)["spring"][:2] == ("paused", "system")
    assert org_row(engine, org).twilio_desired_status == "active"

    assert twilio_accounts.converge_one(engine, gateway, org, POLICY) == "changed"
    sid = org_row(engine, org).twilio_subaccount_sid
    assert gateway.calls == [(sid, "suspended"), (sid, "active")]
    assert decide(engine, org).can_send
    assert campaigns(engine, org)["spring"] == ("running", None, None)


def test_convergence_records_nothing_twilio_did_not_confirm(engine):
    org = tx(engine, sending_org, campaigns=["spring"])
    cancel(engine, org)

    gateway = RecordingGateway(AccountOutcome.RETRY, AccountOutcome.FAILED)
    assert twilio_accounts.converge_one(engine, gateway, org, POLICY) == "retry"
    assert twilio_accounts.converge_one(engine, gateway, org, POLICY) == "failed"
    assert org_row(engine, org).twilio_status == "active"
    assert TWILIO_SUSPENDED in decide(engine, org).reasons  # still blocked meanwhile

    assert twilio_accounts.converge_one(engine, gateway, org, POLICY) == "changed"
    assert twilio_accounts.converge_one(engine, gateway, org, POLICY) == "in_sync"
    assert [status for _, status in gateway.calls] == ["suspended"] * 3  # never "closed"


# --- the send decision --------------------------------------------------------------------


def queue_and_prepare(engine, org: str, body: str = "hello", campaign: str | None = None):
    message = tx(engine, lambda c: messages.queue(c, org, TO, body, POLICY, campaign))
    plan = tx(engine, lambda c: messages.prepare(c, message.message_id, POLICY))
    return tx(engine, lambda c: messages.get(c, message.message_id)), plan


def test_a_refused_send_is_blocked_with_every_reason_and_holds_nothing(engine):
    org = tx(engine, sending_org, balance=0, campaigns=["spring"])
    cancel(engine, org)
    tx(engine, lambda c: wallet.freeze(c, org, "chargeback", actor="test"))

    message, plan = queue_and_prepare(engine, org, campaign="spring")

    assert plan is None
    assert message.status == "blocked"
    assert message.block_reasons == [*ALL_REASONS, messages.CAMPAIGN_PAUSED]
    state = tx(engine, lambda c: wallet.show(c, org))
    assert state.held_cents == 0
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM holds")).scalar_one() == 0


def test_a_send_of_a_user_paused_campaign_is_blocked(engine):
    org = tx(engine, sending_org, balance=10, campaigns=["spring"])
    user_pause(engine, org, "spring")

    message, plan = queue_and_prepare(engine, org, campaign="spring")

    assert plan is None
    assert (message.status, message.block_reasons) == ("blocked", [messages.CAMPAIGN_PAUSED])
    assert tx(engine, lambda c: wallet.show(c, org)).held_cents == 0


@pytest.mark.parametrize(
    ("body", "segments", "encoding"),
    [
        ("a" * 160, 1, "GSM-7"),
        ("a" * 161, 2, "GSM-7"),
        ("é" * 70, 1, "GSM-7"),
        ("ж" * 71, 2, "UCS-2"),
    ],
)
def test_a_send_holds_segments_times_the_organizations_price(engine, body, segments, encoding):
    org = tx(engine, sending_org, balance=100, price=3)

    message, plan = queue_and_prepare(engine, org, body=body)

    assert plan is not None and plan.body == body
    assert (message.segments, message.encoding) == (segments, encoding)
    assert message.status == "sending"
    assert message.price_cents == segments * 3
    assert tx(engine, lambda c: wallet.show(c, org)).held_cents == segments * 3


def test_a_send_the_balance_cannot_cover_in_full_is_blocked(engine):
    org = tx(engine, sending_org, balance=5, price=3)

    message, plan = queue_and_prepare(engine, org, body="a" * 161)  # 2 segments, 6 cents

    assert plan is None
    assert message.block_reasons == [INSUFFICIENT_BALANCE]
    assert tx(engine, lambda c: wallet.show(c, org)).held_cents == 0


# --- billing modes ------------------------------------------------------------------------


def bare_org(engine, billing: str, balance: int = 100) -> str:
    """An organization that never had a subscription, with money, under `billing`."""
    org = f"org-{uuid.uuid4().hex[:10]}"

    def create(conn):
        orgs.create(conn, org, sender=SENDER, billing=billing)
        wallet.credit(conn, org, balance, f"seed:{org}")

    tx(engine, create)
    return org


def test_under_subscription_billing_no_subscription_at_all_blocks_sending(engine):
    org = bare_org(engine, "subscription")

    decision = decide(engine, org)

    assert decision.reasons == (SUBSCRIPTION_INACTIVE,)
    assert decision.subscription_status == "none"


def test_subscription_billing_is_the_default(engine):
    org = f"org-{uuid.uuid4().hex[:10]}"
    tx(engine, lambda c: orgs.create(c, org))

    assert org_row(engine, org).billing == "subscription"
    assert SUBSCRIPTION_INACTIVE in decide(engine, org).reasons


def test_a_prepaid_organization_sends_on_money_alone(engine):
    org = bare_org(engine, "prepaid")

    assert decide(engine, org).can_send
    # A lapsed subscription it may have is reported, never a reason to stop a prepaid org.
    tx(engine, lambda c: set_subscription(c, org, "cancelled"))
    decision = decide(engine, org)
    assert decision.can_send
    assert decision.subscription_status == "cancelled"
    # Money still decides.
    assert INSUFFICIENT_BALANCE in decide(engine, org, needed_cents=101).reasons


def test_a_subscription_billed_organization_resumes_when_its_first_subscription_activates(
    engine,
):
    org = bare_org(engine, "subscription")
    tx(engine, lambda c: create_campaign(c, org, "spring", POLICY))
    assert campaigns(engine, org)["spring"][:2] == ("paused", "system")

    change(engine, org, lambda c: set_subscription(c, org, "active"))

    assert campaigns(engine, org)["spring"][:2] == ("running", None)


def test_an_unknown_billing_mode_is_refused_and_nothing_is_stored(engine):
    from core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="billing"):
        tx(engine, lambda c: orgs.create(c, "acme", billing="free"))
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM organizations")).scalar_one() == 0
