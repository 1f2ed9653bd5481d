"""Beat's repair of missed subscription webhooks (worker/reconcile_providers.refresh_stale)
against local fakes of Stripe's and PayPal's REST APIs on 127.0.0.1, never the internet:
a subscription whose last event is old is asked about, and what the provider says now is
applied with its consequences (campaigns, Twilio subaccount), in one unit of work.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from core import campaigns, orgs, sending, subscriptions, wallet
from core.db import run_in_transaction
from core.providers.stripe.api import StripeApi
from core.providers.twilio.accounts import converge_one
from core.settings import Settings
from tests.support.fakes.fake_stripe import STRIPE_KEY, FakeStripe
from tests.support.fakes.paypal_api import FakePayPal
from worker.reconcile_providers import refresh_stale

POLICY = sending.Policy()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No Payguard variable from the developer's shell reaches Settings()."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)


# --- a tiny Stripe: tests/support/fakes/fake_stripe.py -----------------------------------


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


# --- helpers ------------------------------------------------------------------------------


def settings(database_url: str, **extra: Any) -> Settings:
    return Settings(DATABASE_URL=database_url, LOG_FORMAT="text", **extra)


def stripe_settings(database_url: str, fake: FakeStripe, **extra: Any) -> Settings:
    return settings(database_url, STRIPE_API_KEY=STRIPE_KEY, STRIPE_API_BASE=fake.base_url, **extra)


def paypal_settings(database_url: str, fake: FakePayPal, **extra: Any) -> Settings:
    return settings(
        database_url,
        PAYPAL_API_BASE=fake.base_url,
        PAYPAL_CLIENT_ID=fake.client_id,
        PAYPAL_CLIENT_SECRET=fake.client_secret,
        **extra,
    )


def serve_paypal_subscription(fake: FakePayPal, sub_id: str, status: str, at: datetime) -> str:
    path = f"/v1/billing/subscriptions/{sub_id}"
    body = {
        "id": sub_id,
        "status": status,
        "status_update_time": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "update_time": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    fake.serve(path, json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return path


def funded_org_with_campaign(engine: Engine) -> str:
    org_id = f"org-{uuid.uuid4().hex[:10]}"

    def create(conn):
        orgs.create(conn, org_id)
        wallet.credit(conn, org_id, 5000, f"seed:{org_id}")
        campaigns.create_campaign(conn, org_id, "spring", POLICY)

    run_in_transaction(engine, create)
    return org_id


def subscribed(
    engine: Engine, provider: str, sub_id: str, org_id: str, status: str, *, last_event: timedelta
) -> None:
    """A subscription as webhooks left it, its last event `last_event` ago."""
    at = datetime.now(UTC) - last_event

    def record(conn):
        subscriptions.apply_status(conn, provider, sub_id, org_id, status, at)
        sending.reconcile(conn, org_id, POLICY)
        conn.execute(
            text(
                "UPDATE subscriptions SET last_event_at = :at "
                "WHERE provider = :p AND subscription_id = :s"
            ),
            {"at": at, "p": provider, "s": sub_id},
        )

    run_in_transaction(engine, record)


def subscription(engine: Engine, provider: str, sub_id: str):
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT * FROM subscriptions WHERE provider = :p AND subscription_id = :s"),
            {"p": provider, "s": sub_id},
        ).one()


def decision(engine: Engine, org_id: str) -> sending.Decision:
    return run_in_transaction(engine, lambda c: sending.decide(c, org_id, POLICY))


def campaign_status(engine: Engine, org_id: str) -> str:
    (campaign,) = run_in_transaction(engine, lambda c: campaigns.list_campaigns(c, org_id))
    return campaign.status


STALE = timedelta(days=2)  # SUBSCRIPTION_STALE_SECONDS defaults to one day


# --- Stripe -------------------------------------------------------------------------------


def test_a_missed_stripe_cancellation_is_applied_and_stops_sending(
    engine, database_url, fake_stripe
):
    org_id = funded_org_with_campaign(engine)
    subscribed(engine, "stripe", "sub_missed", org_id, "active", last_event=STALE)
    fake_stripe.subscriptions["sub_missed"] = "canceled"

    changed = refresh_stale(stripe_settings(database_url, fake_stripe), engine, POLICY)

    assert changed == 1
    row = subscription(engine, "stripe", "sub_missed")
    assert (row.status, row.checked_at is not None) == ("canceled", True)
    assert not decision(engine, org_id).subscription_allows
    assert decision(engine, org_id).twilio_desired_status == "suspended"
    assert campaign_status(engine, org_id) == "paused"
    ((method, path, headers),) = fake_stripe.requests
    assert (method, path) == ("GET", "/v1/subscriptions/sub_missed")
    assert headers["Authorization"] == f"Bearer {STRIPE_KEY}"
    assert "Stripe-Version" in headers


def test_a_missed_stripe_reactivation_reactivates_twilio_then_resumes_campaigns(
    engine, database_url, fake_stripe
):
    org_id = funded_org_with_campaign(engine)
    subscribed(engine, "stripe", "sub_back", org_id, "unpaid", last_event=STALE)
    assert converge_one(engine, None, org_id, POLICY) == "changed"  # Twilio suspended it
    fake_stripe.subscriptions["sub_back"] = "active"

    assert refresh_stale(stripe_settings(database_url, fake_stripe), engine, POLICY) == 1

    assert decision(engine, org_id).subscription_allows
    assert decision(engine, org_id).twilio_desired_status == "active"
    with engine.connect() as conn:
        queued = conn.execute(
            text("SELECT args FROM outbox WHERE task = :t"), {"t": sending.SYNC_TWILIO_TASK}
        ).scalars()
        assert [org_id] in list(queued)
    # Campaigns wait for Twilio to confirm the subaccount is active again, then resume.
    assert campaign_status(engine, org_id) == "paused"
    assert converge_one(engine, None, org_id, POLICY) == "changed"
    assert campaign_status(engine, org_id) == "running"
    assert decision(engine, org_id).can_send


def test_an_unchanged_stripe_subscription_is_marked_checked_and_not_asked_again(
    engine, database_url, fake_stripe
):
    org_id = funded_org_with_campaign(engine)
    subscribed(engine, "stripe", "sub_same", org_id, "active", last_event=STALE)
    fake_stripe.subscriptions["sub_same"] = "active"
    s = stripe_settings(database_url, fake_stripe)

    assert refresh_stale(s, engine, POLICY) == 0
    assert refresh_stale(s, engine, POLICY) == 0

    assert fake_stripe.asked() == ["/v1/subscriptions/sub_same"]
    assert subscription(engine, "stripe", "sub_same").checked_at is not None


def test_a_subscription_with_recent_events_is_not_asked(engine, database_url, fake_stripe):
    org_id = funded_org_with_campaign(engine)
    subscribed(engine, "stripe", "sub_fresh", org_id, "active", last_event=timedelta(hours=1))
    fake_stripe.subscriptions["sub_fresh"] = "canceled"

    assert refresh_stale(stripe_settings(database_url, fake_stripe), engine, POLICY) == 0

    assert fake_stripe.requests == []
    assert subscription(engine, "stripe", "sub_fresh").status == "active"


@pytest.mark.parametrize("failure", ["unknown subscription", "wrong api key"])
def test_a_stripe_answer_that_is_not_a_status_changes_nothing_and_is_asked_again(
    engine, database_url, fake_stripe, failure
):
    org_id = funded_org_with_campaign(engine)
    subscribed(engine, "stripe", "sub_err", org_id, "active", last_event=STALE)
    if failure == "wrong api key":
        fake_stripe.subscriptions["sub_err"] = "canceled"
        fake_stripe.api_key = "sk_test_rotated"
    s = stripe_settings(database_url, fake_stripe)

    assert refresh_stale(s, engine, POLICY) == 0
    assert refresh_stale(s, engine, POLICY) == 0

    row = subscription(engine, "stripe", "sub_err")
    assert (row.status, row.checked_at) == ("active", None)
    assert len(fake_stripe.requests) == 2
    assert decision(engine, org_id).can_send


def test_stripe_is_not_asked_without_an_api_key(engine, database_url, fake_stripe):
    org_id = funded_org_with_campaign(engine)
    subscribed(engine, "stripe", "sub_nokey", org_id, "active", last_event=STALE)
    fake_stripe.subscriptions["sub_nokey"] = "canceled"

    changed = refresh_stale(
        settings(database_url, STRIPE_API_BASE=fake_stripe.base_url), engine, POLICY
    )

    assert (changed, fake_stripe.requests) == (0, [])


def test_stripe_api_maps_answers_to_status_or_payguard_errors(fake_stripe):
    from core.errors import NotFound, TransientError

    fake_stripe.subscriptions["sub_PAUSED"] = "paused"
    api = StripeApi(fake_stripe.base_url, STRIPE_KEY)

    assert api.subscription_status("sub_PAUSED") == ("paused", None)
    with pytest.raises(NotFound):
        api.subscription_status("sub_missing")
    with pytest.raises(TransientError):
        StripeApi(fake_stripe.base_url, "sk_test_wrong").subscription_status("sub_PAUSED")
    with pytest.raises(TransientError):
        StripeApi("http://127.0.0.1:1", STRIPE_KEY, timeout=2).subscription_status("sub_PAUSED")


# --- PayPal -------------------------------------------------------------------------------


def test_a_missed_paypal_suspension_is_applied_and_stops_sending(engine, database_url):
    org_id = funded_org_with_campaign(engine)
    subscribed(engine, "paypal", "I-MISSED0001", org_id, "active", last_event=STALE)
    suspended_at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)

    with FakePayPal() as paypal:
        path = serve_paypal_subscription(paypal, "I-MISSED0001", "SUSPENDED", suspended_at)
        changed = refresh_stale(paypal_settings(database_url, paypal), engine, POLICY)
        assert (paypal.oauth_hits, paypal.cert_hits[path]) == (1, 1)

    assert changed == 1
    row = subscription(engine, "paypal", "I-MISSED0001")
    assert (row.status, row.status_at, row.checked_at is not None) == (
        "suspended",
        suspended_at,
        True,
    )
    assert not decision(engine, org_id).subscription_allows
    assert campaign_status(engine, org_id) == "paused"


def test_paypal_refresh_failing_at_oauth_changes_nothing(engine, database_url):
    org_id = funded_org_with_campaign(engine)
    subscribed(engine, "paypal", "I-OAUTHDOWN01", org_id, "active", last_event=STALE)

    with FakePayPal() as paypal:
        path = serve_paypal_subscription(paypal, "I-OAUTHDOWN01", "CANCELLED", datetime.now(UTC))
        paypal.oauth_status = 503
        changed = refresh_stale(paypal_settings(database_url, paypal), engine, POLICY)
        assert paypal.cert_hits[path] == 0

    assert changed == 0
    assert subscription(engine, "paypal", "I-OAUTHDOWN01").checked_at is None
    assert decision(engine, org_id).can_send


# --- both ---------------------------------------------------------------------------------


def test_one_run_asks_each_subscription_at_its_own_provider(engine, database_url, fake_stripe):
    org_id = funded_org_with_campaign(engine)
    # Equal ids at two providers are two subscriptions.
    subscribed(engine, "stripe", "I-SAMEID00001", org_id, "active", last_event=STALE)
    subscribed(engine, "paypal", "I-SAMEID00001", org_id, "active", last_event=STALE)
    fake_stripe.subscriptions["I-SAMEID00001"] = "past_due"

    with FakePayPal() as paypal:
        serve_paypal_subscription(paypal, "I-SAMEID00001", "CANCELLED", datetime.now(UTC))
        s = stripe_settings(
            database_url,
            fake_stripe,
            PAYPAL_API_BASE=paypal.base_url,
            PAYPAL_CLIENT_ID=paypal.client_id,
            PAYPAL_CLIENT_SECRET=paypal.client_secret,
        )
        changed = refresh_stale(s, engine, POLICY)

    assert changed == 2
    assert subscription(engine, "stripe", "I-SAMEID00001").status == "past_due"
    assert subscription(engine, "paypal", "I-SAMEID00001").status == "cancelled"
    assert fake_stripe.asked() == ["/v1/subscriptions/I-SAMEID00001"]
    # past_due is within its grace: the organization may still send.
    assert decision(engine, org_id).can_send
