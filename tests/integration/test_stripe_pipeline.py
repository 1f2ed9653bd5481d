"""Stripe webhooks end to end, in process: signed deliveries through the Flask receiver
(verify, store, answer), then core.handlers.process for the stored event in one unit of
work, as the worker runs it, on a real PostgreSQL database of the test's own.

Every test that builds a receiver ends with every balance verified against its journal
(the `make_pipeline` fixture).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from core import campaigns, handlers, inbox, sending, wallet
from core.db import run_in_transaction
from core.errors import NotYetApplicable, ParkEvent
from core.providers.events import PaymentCaptured
from core.settings import Settings
from tests.stack import wait_for
from tests.support.factories import new_org
from tests.support.payloads import paypal as pp
from tests.support.payloads import stripe as sp
from webhook_receiver.app import create_app

GRACE = timedelta(hours=72)
POLICY = sending.Policy(past_due_grace=GRACE)
NOT_MY_SECRET = "whsec_payguard_test_somebody_else_000000"


# --- the pipeline -------------------------------------------------------------------------


@dataclass
class Pipeline:
    """One receiver and the database behind it; deliver() is Stripe, process() the worker."""

    client: FlaskClient
    engine: Engine

    def post(
        self,
        event: dict,
        secret: str = sp.TEST_SECRET,
        timestamp: int | None = None,
        header: str | None = None,
    ):
        body, signature = sp.signed(event, secret, timestamp)
        return self.client.post(
            "/webhooks/stripe",
            data=body,
            headers={"Stripe-Signature": header or signature, "Content-Type": "application/json"},
        )

    def deliver(self, event: dict, **kw) -> int:
        """POST a signed delivery, expect it stored; its inbox id."""
        response = self.post(event, **kw)
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["status"] == "accepted"
        assert response.get_json()["event_id"] == event["id"]
        return response.get_json()["id"]

    def process(self, inbox_id: int, policy: sending.Policy = POLICY) -> handlers.Outcome:
        return self.tx(lambda c: handlers.process(c, inbox_id, policy))

    def send(self, event: dict, policy: sending.Policy = POLICY) -> handlers.Outcome:
        """Deliver and process one event; the outcome."""
        return self.process(self.deliver(event), policy)

    def park(self, inbox_id: int, error: ParkEvent) -> None:
        """What the worker does with an event that raised ParkEvent (after retries for a
        NotYetApplicable): it leaves `received` for `parked`, replayable."""
        self.tx(lambda c: inbox.finish(c, inbox_id, "parked", error=str(error)))

    def tx(self, fn):
        return run_in_transaction(self.engine, fn)

    def rows(self, sql: str, **params) -> list:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def new_org(
        self, *, campaign: bool = False, currency: str = "USD", billing: str = "prepaid"
    ) -> str:
        # A campaign is created before any money: Payguard pauses it, and must resume it itself.
        return self.tx(
            lambda c: new_org(
                c, currency=currency, billing=billing, campaigns=["spring"] if campaign else ()
            )
        )

    def wallet(self, org_id: str) -> wallet.WalletState:
        return self.tx(lambda c: wallet.show(c, org_id))

    def decide(self, org_id: str, policy: sending.Policy = POLICY) -> sending.Decision:
        return self.tx(lambda c: sending.decide(c, org_id, policy))

    def campaign(self, org_id: str) -> campaigns.Campaign:
        (campaign,) = self.tx(lambda c: campaigns.list_campaigns(c, org_id))
        return campaign

    def references(self, org_id: str) -> list[tuple[str, str, int]]:
        """(kind, reference, amount) of every journal row of the organization, oldest first."""
        return [
            tuple(r)
            for r in self.rows(
                "SELECT kind, reference, amount_cents FROM journal WHERE org_id = :o ORDER BY id",
                o=org_id,
            )
        ]

    def event(self, inbox_id: int) -> inbox.StoredEvent:
        return self.tx(lambda c: inbox.get(c, inbox_id))

    def stored_counts(self) -> tuple[int, int]:
        (row,) = self.rows(
            "SELECT (SELECT count(*) FROM webhook_events), (SELECT count(*) FROM outbox)"
        )
        return tuple(row)

    def subscription(self, subscription_id: str):
        (row,) = self.rows(
            "SELECT * FROM subscriptions WHERE provider = 'stripe' AND subscription_id = :s",
            s=subscription_id,
        )
        return row


def _settings(database_url: str, redis_url: str, **extra) -> Settings:
    values = {"STRIPE_WEBHOOK_SECRET": sp.TEST_SECRET, "LOG_FORMAT": "text", **extra}
    return Settings(DATABASE_URL=database_url, REDIS_URL=redis_url, **values)


@pytest.fixture
def clean_env(monkeypatch):
    """No Payguard variable from the developer's shell reaches Settings()."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_pipeline(clean_env, database_url, redis_url, engine):
    apps = []

    def make(**settings) -> Pipeline:
        app = create_app(_settings(database_url, redis_url, **settings))
        apps.append(app)
        return Pipeline(app.test_client(), engine)

    yield make
    for app in apps:
        app.extensions["payguard"].close()
    with engine.connect() as conn:
        assert wallet.verify(conn) == [], "a balance disagrees with its journal"


@pytest.fixture
def stripe(make_pipeline) -> Pipeline:
    return make_pipeline()


def pay(stripe: Pipeline, org_id: str, amount: int = 5000, payment_intent_id: str | None = None):
    """A completed one-off payment, announced by payment_intent.succeeded; its intent id."""
    pi = payment_intent_id or sp.new_id("pi")
    stripe.send(sp.payment_intent_succeeded(org_id=org_id, payment_intent_id=pi, amount=amount))
    return pi


# --- signatures and answers ---------------------------------------------------------------


def test_a_verified_delivery_is_stored_once_and_a_redelivery_answers_duplicate(stripe):
    event = sp.unhandled_event()

    first = stripe.post(event)
    again = stripe.post(event)

    assert first.status_code == again.status_code == 200
    assert first.get_json()["status"] == "accepted"
    assert again.get_json() == {**first.get_json(), "status": "duplicate"}
    assert stripe.stored_counts() == (1, 1)
    (row,) = stripe.rows("SELECT provider, event_id, event_type, status FROM webhook_events")
    assert tuple(row) == ("stripe", event["id"], "customer.created", "received")


def test_several_v1_values_verify_if_any_one_matches(stripe):
    event = sp.unhandled_event()
    body, good = sp.signed(event)
    t, v1 = good.split(",")
    _, wrong = sp.stripe_signature_header(body, NOT_MY_SECRET, int(t[2:])).split(",")

    response = stripe.client.post(
        "/webhooks/stripe", data=body, headers={"Stripe-Signature": f"{t},{wrong},{v1}"}
    )

    assert response.status_code == 200


def test_every_configured_secret_verifies_during_a_rotation(make_pipeline):
    stripe = make_pipeline(STRIPE_WEBHOOK_SECRET=f"{sp.ROTATED_SECRET}, {sp.TEST_SECRET}")

    assert stripe.post(sp.unhandled_event(), secret=sp.ROTATED_SECRET).status_code == 200
    assert stripe.post(sp.unhandled_event(), secret=sp.TEST_SECRET).status_code == 200
    refused = stripe.post(sp.unhandled_event(), secret=NOT_MY_SECRET)
    assert (refused.status_code, refused.get_json()["cause"]) == (400, "signature")
    assert stripe.stored_counts() == (2, 2)


def test_a_secret_no_longer_configured_is_refused(make_pipeline):
    stripe = make_pipeline(STRIPE_WEBHOOK_SECRET=sp.ROTATED_SECRET)

    refused = stripe.post(sp.unhandled_event(), secret=sp.TEST_SECRET)

    assert (refused.status_code, refused.get_json()["cause"]) == (400, "signature")
    assert stripe.stored_counts() == (0, 0)


@pytest.mark.parametrize("offset", [-301, +301], ids=["stale", "future"])
def test_a_timestamp_beyond_five_minutes_either_way_is_refused_and_nothing_stored(stripe, offset):
    org_id = stripe.new_org()
    event = sp.payment_intent_succeeded(org_id=org_id)

    refused = stripe.post(event, timestamp=int(time.time()) + offset)

    assert (refused.status_code, refused.get_json()["cause"]) == (400, "timestamp")
    assert stripe.stored_counts() == (0, 0)
    assert stripe.wallet(org_id).balance_cents == 0


@pytest.mark.parametrize("offset", [-280, +280], ids=["recent", "slightly-ahead"])
def test_a_timestamp_within_five_minutes_either_way_is_accepted(stripe, offset):
    assert stripe.post(sp.unhandled_event(), timestamp=int(time.time()) + offset).status_code == 200


def test_a_tampered_body_is_refused_and_nothing_stored(stripe):
    org_id = stripe.new_org()
    body, header = sp.signed(sp.payment_intent_succeeded(org_id=org_id, amount=100))

    refused = stripe.client.post(
        "/webhooks/stripe",
        data=body.replace(b'"amount": 100', b'"amount": 999900'),
        headers={"Stripe-Signature": header},
    )

    assert (refused.status_code, refused.get_json()["cause"]) == (400, "signature")
    assert stripe.stored_counts() == (0, 0)


def test_an_oversized_body_is_refused_with_413(stripe):
    event = sp.unhandled_event()
    event["data"]["object"]["padding"] = "x" * (1024 * 1024)

    assert stripe.post(event).status_code == 413
    assert stripe.stored_counts() == (0, 0)


def test_storage_that_cannot_complete_answers_503(clean_env, redis_url):
    app = create_app(_settings("postgresql://nobody@127.0.0.1:1/nothing", redis_url))
    try:
        body, header = sp.signed(sp.unhandled_event())
        response = app.test_client().post(
            "/webhooks/stripe", data=body, headers={"Stripe-Signature": header}
        )
    finally:
        app.extensions["payguard"].close()
    assert response.status_code == 503


def test_an_event_type_payguard_does_not_act_on_is_ignored(stripe):
    assert stripe.send(sp.unhandled_event()).status == "ignored"


# --- payments -----------------------------------------------------------------------------


@pytest.mark.parametrize("org_in", ["client_reference_id", "metadata"])
def test_paid_checkout_session_credits_the_wallet_and_resumes_sending(stripe, org_in):
    org_id = stripe.new_org(campaign=True)
    assert stripe.campaign(org_id).status == "paused"
    event = sp.checkout_session_completed(
        org_id=org_id, org_in=org_in, payment_intent_id="pi_checkout", amount=2500
    )

    outcome = stripe.send(event)

    assert outcome.status == "processed" and outcome.org_ids == (org_id,)
    assert stripe.references(org_id) == [("credit", "stripe:payment:pi_checkout", 2500)]
    assert stripe.campaign(org_id).status == "running"
    assert stripe.decide(org_id).can_send


def test_payment_intent_succeeded_credits_the_amount_received(stripe):
    org_id = stripe.new_org()

    stripe.send(
        sp.payment_intent_succeeded(
            org_id=org_id, payment_intent_id="pi_direct", amount=5000, amount_received=4000
        )
    )

    assert stripe.references(org_id) == [("credit", "stripe:payment:pi_direct", 4000)]


@pytest.mark.parametrize(
    ("mode", "payment_status"), [("payment", "unpaid"), ("subscription", "paid")]
)
def test_checkout_session_that_is_not_a_paid_payment_moves_no_money(stripe, mode, payment_status):
    org_id = stripe.new_org()

    outcome = stripe.send(
        sp.checkout_session_completed(org_id=org_id, mode=mode, payment_status=payment_status)
    )

    assert outcome.status == "processed"
    assert stripe.references(org_id) == []


@pytest.mark.parametrize("first", ["checkout_session", "payment_intent"])
def test_one_payment_announced_by_both_events_credits_once(stripe, first):
    org_id = stripe.new_org()
    session = sp.checkout_session_completed(org_id=org_id, payment_intent_id="pi_one", amount=5000)
    intent = sp.payment_intent_succeeded(org_id=org_id, payment_intent_id="pi_one", amount=5000)
    events = [session, intent] if first == "checkout_session" else [intent, session]

    outcomes = [stripe.send(event) for event in events]

    assert [o.status for o in outcomes] == ["processed", "processed"]
    assert stripe.references(org_id) == [("credit", "stripe:payment:pi_one", 5000)]
    assert stripe.wallet(org_id).balance_cents == 5000
    payments = stripe.rows("SELECT provider, payment_id, org_id, amount_cents FROM payments")
    assert [tuple(p) for p in payments] == [("stripe", "pi_one", org_id, 5000)]


@pytest.mark.parametrize("intent_first", [False, True], ids=["session-first", "intent-first"])
def test_a_payment_intent_without_organization_waits_for_its_checkout_session(stripe, intent_first):
    # The host application names the organization on the Checkout Session only; Stripe
    # does not copy it onto the payment intent, whose event often arrives first.
    org_id = stripe.new_org()
    session = sp.checkout_session_completed(org_id=org_id, payment_intent_id="pi_bare")
    intent = sp.payment_intent_succeeded(org_id=None, payment_intent_id="pi_bare")

    if intent_first:
        intent_inbox = stripe.deliver(intent)
        with pytest.raises(NotYetApplicable):
            stripe.process(intent_inbox)
        assert stripe.send(session).status == "processed"
        # The worker's next retry finds the payment credited: nothing more moves.
        assert stripe.process(intent_inbox).org_ids == (org_id,)
    else:
        stripe.send(session)
        assert stripe.send(intent).status == "processed"

    assert stripe.references(org_id) == [("credit", "stripe:payment:pi_bare", 5000)]


def test_one_payment_naming_two_organizations_credits_only_the_first(stripe):
    # The journal's references are unique per organization, so only the payments table can
    # tell that a second organization claims a payment already credited.
    first_org, other_org = stripe.new_org(), stripe.new_org()
    stripe.send(sp.checkout_session_completed(org_id=first_org, payment_intent_id="pi_claim"))
    claim = stripe.deliver(
        sp.payment_intent_succeeded(org_id=other_org, payment_intent_id="pi_claim")
    )

    with pytest.raises(ParkEvent, match="pi_claim"):
        stripe.process(claim)

    assert stripe.wallet(first_org).balance_cents == 5000
    assert stripe.references(other_org) == []


@pytest.mark.parametrize("same_org", [True, False], ids=["same-org", "other-org"])
def test_two_announcements_of_one_payment_applied_concurrently_credit_once(stripe, same_org):
    org_id = stripe.new_org()
    other_org = org_id if same_org else stripe.new_org()
    first = stripe.deliver(
        sp.checkout_session_completed(org_id=org_id, payment_intent_id="pi_race")
    )
    second = stripe.deliver(
        sp.payment_intent_succeeded(org_id=other_org, payment_intent_id="pi_race")
    )
    results: list = []

    def apply_second() -> None:
        try:
            results.append(stripe.process(second))
        except ParkEvent as exc:
            results.append(exc)

    with stripe.engine.connect() as conn:
        with conn.begin():
            handlers.process(conn, first, POLICY)
            racer = threading.Thread(target=apply_second)
            racer.start()
            # The second unit of work is inside, waiting for the first to commit.
            wait_for(lambda: waiting_on_a_lock(stripe), timeout=10, what="the racer to block")
        racer.join(timeout=10)

    assert stripe.wallet(org_id).balance_cents == 5000
    if same_org:
        assert results[0].status == "processed"
    else:
        assert isinstance(results[0], ParkEvent)
        assert stripe.references(other_org) == []


def waiting_on_a_lock(stripe: Pipeline) -> bool:
    (row,) = stripe.rows(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return row[0] > 0


def test_payment_for_an_unknown_organization_is_parked_and_moves_nothing(stripe):
    inbox_id = stripe.deliver(sp.payment_intent_succeeded(org_id="org-nobody"))

    with pytest.raises(ParkEvent, match="unknown organization"):
        stripe.process(inbox_id)

    assert stripe.rows("SELECT * FROM journal") == []
    assert stripe.event(inbox_id).status == "received"  # the worker parks it, see park()


# --- refunds ------------------------------------------------------------------------------


def test_refund_created_claws_back_the_refund_once(stripe):
    org_id = stripe.new_org()
    pi = pay(stripe, org_id, 5000)
    refund = sp.refund_created(refund_id="re_once", payment_intent_id=pi, amount=2000)

    stripe.send(refund)
    stripe.send(sp.refund_created(refund_id="re_once", payment_intent_id=pi, amount=2000))

    assert stripe.references(org_id)[1:] == [("refund", "stripe:refund:re_once", -2000)]
    assert stripe.wallet(org_id).balance_cents == 3000


def test_charge_refunded_claws_back_only_the_newly_refunded_amount(stripe):
    org_id = stripe.new_org()
    pi, ch = pay(stripe, org_id, 5000), sp.new_id("ch")
    first = sp.refund(refund_id="re_a", amount=1000, payment_intent_id=pi, charge_id=ch)
    second = sp.refund(refund_id="re_b", amount=1500, payment_intent_id=pi, charge_id=ch)
    failed = sp.refund(
        refund_id="re_failed", amount=700, payment_intent_id=pi, charge_id=ch, status="failed"
    )

    # refund.created for the first, then charge.refunded listing it: nothing more.
    stripe.send(sp.refund_created(refund_id="re_a", amount=1000, payment_intent_id=pi))
    stripe.send(sp.charge_refunded(payment_intent_id=pi, charge_id=ch, refunds=[first]))
    assert stripe.wallet(org_id).balance_cents == 4000
    # The charge's refund list is cumulative: the second event adds re_b and nothing else.
    stripe.send(
        sp.charge_refunded(payment_intent_id=pi, charge_id=ch, refunds=[first, second, failed])
    )
    stripe.send(sp.refund_created(refund_id="re_b", amount=1500, payment_intent_id=pi))

    assert stripe.references(org_id)[1:] == [
        ("refund", "stripe:refund:re_a", -1000),
        ("refund", "stripe:refund:re_b", -1500),
    ]
    assert stripe.wallet(org_id).balance_cents == 2500


def test_charge_refunded_without_its_refund_list_moves_no_money(stripe):
    org_id = stripe.new_org()
    pi = pay(stripe, org_id, 5000)

    outcome = stripe.send(sp.charge_refunded(payment_intent_id=pi, embed_refunds=False))

    assert outcome.status == "processed"
    assert stripe.wallet(org_id).balance_cents == 5000


def test_refund_beyond_the_balance_leaves_debt_and_freezes(stripe):
    org_id = stripe.new_org()
    pi = pay(stripe, org_id, 5000)
    stripe.tx(lambda c: wallet.debit(c, org_id, 4000, "spent"))

    stripe.send(sp.refund_created(payment_intent_id=pi, amount=5000))

    state = stripe.wallet(org_id)
    assert (state.balance_cents, state.debt_cents, state.freeze_reasons) == (0, 4000, ("debt",))


def test_refund_before_its_payment_is_parked_then_applied_by_a_replay(stripe):
    org_id = stripe.new_org()
    refund_inbox = stripe.deliver(
        sp.refund_created(refund_id="re_early", payment_intent_id="pi_late", amount=2000)
    )

    with pytest.raises(NotYetApplicable, match="re_early"):
        stripe.process(refund_inbox)
    stripe.park(refund_inbox, NotYetApplicable("refund of unknown payment"))
    assert stripe.event(refund_inbox).status == "parked"
    assert stripe.rows("SELECT * FROM journal") == []

    pay(stripe, org_id, 5000, payment_intent_id="pi_late")
    replayed, _ = stripe.tx(lambda c: inbox.replay(c, refund_inbox, actor="test"))
    assert replayed.status == "received"
    outcome = stripe.process(refund_inbox)

    assert outcome.status == "processed"
    assert stripe.event(refund_inbox).status == "processed"
    assert stripe.references(org_id) == [
        ("credit", "stripe:payment:pi_late", 5000),
        ("refund", "stripe:refund:re_early", -2000),
    ]


# --- disputes -----------------------------------------------------------------------------


def test_dispute_freezes_until_won_and_moves_no_money(stripe):
    org_id = stripe.new_org(campaign=True)
    pi = pay(stripe, org_id, 5000)

    stripe.send(sp.charge_dispute_created(dispute_id="dp_won", payment_intent_id=pi))
    assert stripe.wallet(org_id).freeze_reasons == ("dispute:dp_won",)
    assert sending.WALLET_FROZEN in stripe.decide(org_id).reasons
    assert stripe.campaign(org_id).status == "paused"

    stripe.send(sp.charge_dispute_closed(dispute_id="dp_won", payment_intent_id=pi, status="won"))

    assert stripe.wallet(org_id).freeze_reasons == ()
    assert stripe.wallet(org_id).balance_cents == 5000
    assert stripe.campaign(org_id).status == "running"


def test_lost_dispute_claws_back_once_and_lifts_its_freeze(stripe):
    org_id = stripe.new_org()
    pi = pay(stripe, org_id, 5000)
    stripe.send(sp.charge_dispute_created(dispute_id="dp_lost", payment_intent_id=pi))
    closed = sp.charge_dispute_closed(dispute_id="dp_lost", payment_intent_id=pi, amount=5000)

    stripe.send(closed)
    assert stripe.post(closed).get_json()["status"] == "duplicate"

    state = stripe.wallet(org_id)
    assert (state.balance_cents, state.freeze_reasons) == (0, ())
    assert stripe.references(org_id)[1:] == [("dispute_lost", "stripe:dispute:dp_lost", -5000)]


def test_dispute_of_an_unknown_payment_waits_for_it(stripe):
    inbox_id = stripe.deliver(sp.charge_dispute_created(payment_intent_id="pi_unseen"))

    with pytest.raises(NotYetApplicable):
        stripe.process(inbox_id)


# --- subscriptions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "status", "allows"),
    [
        (sp.customer_subscription_created, "active", True),
        (sp.customer_subscription_created, "trialing", True),
        (sp.customer_subscription_updated, "past_due", True),
        (sp.customer_subscription_created, "incomplete", False),
        (sp.customer_subscription_updated, "unpaid", False),
        (sp.customer_subscription_updated, "canceled", False),
        (sp.customer_subscription_updated, "incomplete_expired", False),
        (sp.customer_subscription_updated, "paused", False),
        (sp.customer_subscription_deleted, "canceled", False),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_subscription_status_decides_whether_the_organization_may_send(
    stripe, build, status, allows
):
    org_id = stripe.new_org(campaign=True, billing="subscription")
    pay(stripe, org_id, 5000)
    # Money alone does not let a subscription-billed organization send.
    assert stripe.campaign(org_id).status == "paused"

    stripe.send(build(subscription_id="sub_t", org_id=org_id, status=status))

    decision = stripe.decide(org_id)
    assert (decision.subscription_status, decision.subscription_allows) == (status, allows)
    assert (sending.SUBSCRIPTION_INACTIVE not in decision.reasons) is allows
    assert stripe.campaign(org_id).status == ("running" if allows else "paused")
    assert decision.twilio_desired_status == ("active" if allows else "suspended")


def test_a_deleted_subscription_blocks_whatever_its_last_snapshot_says(stripe):
    org_id = stripe.new_org()

    stripe.send(sp.customer_subscription_deleted(org_id=org_id, status="active"))

    assert not stripe.decide(org_id).subscription_allows


def test_past_due_allows_sending_for_the_configured_grace_only(stripe):
    org_id = stripe.new_org()
    pay(stripe, org_id, 5000)
    # Stripe retries a delivery for days: this snapshot was taken 73 hours ago.
    went_past_due = int(time.time()) - 73 * 3600

    stripe.send(
        sp.customer_subscription_updated(org_id=org_id, status="past_due", created=went_past_due)
    )

    assert not stripe.decide(org_id, POLICY).subscription_allows  # 72 h grace
    longer = sending.Policy(past_due_grace=timedelta(hours=74))
    assert stripe.decide(org_id, longer).subscription_allows


def test_past_due_grace_is_read_from_stripe_past_due_grace_hours(monkeypatch, clean_env):
    from worker import runtime

    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1/unused")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1/0")
    monkeypatch.setenv("STRIPE_PAST_DUE_GRACE_HOURS", "5")
    monkeypatch.setattr(runtime, "_state", {})

    assert runtime.policy().past_due_grace == timedelta(hours=5)


def test_an_older_subscription_snapshot_delivered_late_does_not_win(stripe):
    org_id = stripe.new_org()
    now = int(time.time())
    older = sp.customer_subscription_updated(
        subscription_id="sub_ooo", org_id=org_id, status="unpaid", created=now - 60
    )
    newer = sp.customer_subscription_updated(
        subscription_id="sub_ooo", org_id=org_id, status="active", created=now
    )

    stripe.send(newer)
    stripe.send(older)

    row = stripe.subscription("sub_ooo")
    assert (row.status, int(row.status_at.timestamp())) == ("active", now)
    assert stripe.decide(org_id).subscription_allows


def test_a_redelivered_subscription_event_is_stored_and_applied_once(stripe):
    org_id = stripe.new_org()
    event = sp.customer_subscription_created(subscription_id="sub_dup", org_id=org_id)
    inbox_id = stripe.deliver(event)
    stripe.process(inbox_id)

    again = stripe.post(event)

    assert again.get_json() == {"status": "duplicate", "event_id": event["id"], "id": inbox_id}
    assert stripe.process(inbox_id).status == "skipped"
    assert stripe.stored_counts() == (1, 1)


def test_a_subscription_event_naming_no_known_organization_is_parked(stripe):
    inbox_id = stripe.deliver(sp.customer_subscription_updated(org_id=None))

    with pytest.raises(ParkEvent, match="names no organization"):
        stripe.process(inbox_id)


# --- invoices -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["parent", "legacy"])
@pytest.mark.parametrize(
    ("build", "outcome"), [(sp.invoice_paid, "paid"), (sp.invoice_payment_failed, "failed")]
)
def test_invoice_outcome_is_recorded_on_the_subscription_without_credit(
    stripe, shape, build, outcome
):
    org_id = stripe.new_org()
    stripe.send(sp.customer_subscription_created(subscription_id="sub_inv", org_id=org_id))

    stripe.send(
        build(subscription_id="sub_inv", org_id=org_id, shape=shape, payment_intent_id="pi_inv")
    )

    row = stripe.subscription("sub_inv")
    assert (row.org_id, row.status, row.last_payment_outcome) == (org_id, "active", outcome)
    assert stripe.references(org_id) == []
    payments = [tuple(p) for p in stripe.rows("SELECT payment_id, kind FROM payments")]
    assert payments == ([("pi_inv", "subscription")] if shape == "legacy" else [])


def test_an_older_invoice_outcome_delivered_late_does_not_win(stripe):
    org_id = stripe.new_org()
    now = int(time.time())
    failed = sp.invoice_payment_failed(subscription_id="sub_io", org_id=org_id, created=now)
    paid_before = sp.invoice_paid(subscription_id="sub_io", org_id=org_id, created=now - 60)

    stripe.send(failed)
    stripe.send(paid_before)

    assert stripe.subscription("sub_io").last_payment_outcome == "failed"


# --- two providers ------------------------------------------------------------------------


@pytest.fixture
def both(make_pipeline, fake_paypal) -> Pipeline:
    return make_pipeline(
        PAYPAL_WEBHOOK_ID="WH-TEST", PAYPAL_CERT_URL_PREFIXES=fake_paypal.cert_prefix
    )


def deliver_paypal(pipeline: Pipeline, signer, cert_url: str, payload: dict) -> int:
    body = json.dumps(payload).encode()
    response = pipeline.client.post(
        "/webhooks/paypal", data=body, headers=signer.sign("WH-TEST", body, cert_url)
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()["id"]


def test_one_organization_paying_through_both_providers_with_equal_ids_is_credited_twice(
    both, fake_paypal, paypal_signer
):
    org_id = both.new_org()
    shared_id = pp.new_id()  # a PayPal capture id, and by chance a Stripe intent's too

    both.process(
        deliver_paypal(
            both,
            paypal_signer,
            fake_paypal.signing_cert_url,
            pp.capture_completed(org_id, shared_id, value="25.00"),
        )
    )
    both.send(sp.payment_intent_succeeded(org_id=org_id, payment_intent_id=shared_id, amount=4000))

    assert both.references(org_id) == [
        ("credit", f"paypal:payment:{shared_id}", 2500),
        ("credit", f"stripe:payment:{shared_id}", 4000),
    ]
    assert both.wallet(org_id).balance_cents == 6500
    payments = both.rows("SELECT provider, payment_id FROM payments ORDER BY provider")
    assert [tuple(p) for p in payments] == [("paypal", shared_id), ("stripe", shared_id)]
    with both.engine.connect() as conn:
        assert wallet.verify(conn) == []


def test_a_stripe_refund_never_finds_a_paypal_payment_of_the_same_id(stripe):
    org_id = stripe.new_org()
    shared_id = pp.new_id()
    stripe.tx(
        lambda c: handlers.credit_payment(
            c,
            PaymentCaptured(
                provider="paypal",
                payment_id=shared_id,
                org_id=org_id,
                amount_cents=5000,
                currency="USD",
            ),
        )
    )
    refund = stripe.deliver(sp.refund_created(payment_intent_id=shared_id, amount=5000))

    with pytest.raises(NotYetApplicable):
        stripe.process(refund)
    assert stripe.wallet(org_id).balance_cents == 5000
