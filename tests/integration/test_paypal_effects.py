"""What each PayPal event does once it is stored: the effects table, parking and ordering.

In-process and fast: events go into the inbox with core.inbox.store and are applied with
core.handlers.process inside one run_in_transaction, as the worker does. An event that
cannot be applied (ParkEvent, NotYetApplicable once retries are over) is settled `parked`
in a second transaction, as worker.tasks.process_event does.

The tests of this module share one database (cloning one per test costs more than all of
them together); each works on organizations and ids of its own and asserts only on those.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from core import handlers, inbox, sending, wallet
from core.db import make_engine
from core.errors import NotYetApplicable, ParkEvent, Refused
from tests.support.db import tx
from tests.support.factories import new_org
from tests.support.payloads import paypal as pp

POLICY = sending.Policy()
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def engine(pg_server, migrated_template):
    """One migrated database for this module (overrides the per-test `engine`)."""
    from psycopg import errors, sql

    name = f"payguard_effects_{secrets.token_hex(4)}"
    create = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(migrated_template)
    )
    for attempt in range(40):
        try:
            with pg_server.admin() as conn:
                conn.execute(create)
            break
        except errors.ObjectInUse:  # another session is cloning the template right now
            if attempt == 39:
                raise
            time.sleep(0.05)
    eng = make_engine(pg_server.url_for(name))
    try:
        yield eng
    finally:
        eng.dispose()
        with pg_server.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def unique(prefix: str = "org") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def store(engine, payload: dict) -> inbox.StoredEvent:
    body = json.dumps(payload).encode()
    stored, _ = tx(
        engine,
        lambda c: inbox.store(c, "paypal", payload["id"], payload["event_type"], {}, body),
    )
    return stored


def apply_stored(engine, inbox_id: int) -> inbox.StoredEvent:
    """handlers.process in one unit of work; a refusal to apply is settled `parked`."""
    try:
        tx(engine, lambda c: handlers.process(c, inbox_id, POLICY))
    except ParkEvent as exc:  # NotYetApplicable too, once the worker has stopped retrying
        error = str(exc)
        tx(engine, lambda c: inbox.finish(c, inbox_id, "parked", error=error))
    return tx(engine, lambda c: inbox.get(c, inbox_id))


def deliver(engine, payload: dict) -> inbox.StoredEvent:
    return apply_stored(engine, store(engine, payload).id)


def replay(engine, inbox_id: int) -> inbox.StoredEvent:
    tx(engine, lambda c: inbox.replay(c, inbox_id, actor="test"))
    return apply_stored(engine, inbox_id)


def balance(engine, org_id: str) -> int:
    return tx(engine, lambda c: wallet.show(c, org_id)).balance_cents


def freezes(engine, org_id: str) -> tuple[str, ...]:
    return tx(engine, lambda c: wallet.show(c, org_id)).freeze_reasons


def journal(engine, org_id: str) -> list[wallet.Entry]:
    return tx(engine, lambda c: wallet.history(c, org_id, limit=100))


def reasons(engine, org_id: str) -> tuple[str, ...]:
    return tx(engine, lambda c: sending.decide(c, org_id, POLICY)).reasons


def subscription(engine, sub_id: str):
    return tx(
        engine,
        lambda c: c.execute(
            text("SELECT * FROM subscriptions WHERE provider = 'paypal' AND subscription_id = :s"),
            {"s": sub_id},
        ).one(),
    )


def count(engine, table: str, where: str, **params) -> int:
    sql = text(f"SELECT count(*) FROM {table} WHERE {where}")
    return tx(engine, lambda c: c.execute(sql, params).scalar_one())


def nothing_moved(engine, org_id: str) -> bool:
    return balance(engine, org_id) == 0 and journal(engine, org_id) == []


def sub_event(event_type, sub_id, org_id, status=None, at=T0):
    return pp.subscription_event(event_type, sub_id, org_id, status, at)


# --------------------------------------------------------------------------- captures


def test_capture_completed_credits_the_custom_id_wallet_once(engine):
    org = tx(engine, new_org)
    capture_id = pp.new_id()

    event = deliver(engine, pp.capture_completed(org, capture_id, value="25.00"))

    assert (event.status, event.org_id) == ("processed", org)
    assert balance(engine, org) == 2500
    [entry] = journal(engine, org)
    assert (entry.kind, entry.amount_cents) == ("credit", 2500)
    assert entry.reference == f"paypal:payment:{capture_id}"


def test_the_same_capture_in_another_event_credits_once(engine):
    org = tx(engine, new_org)
    capture_id = pp.new_id()

    first = deliver(engine, pp.capture_completed(org, capture_id, value="25.00"))
    second = deliver(engine, pp.capture_completed(org, capture_id, value="25.00"))

    assert first.id != second.id
    assert (first.status, second.status) == ("processed", "processed")
    assert balance(engine, org) == 2500
    assert len(journal(engine, org)) == 1


def test_a_redelivered_event_is_stored_once_and_applied_once(engine):
    org = tx(engine, new_org)
    payload = pp.capture_completed(org, pp.new_id(), value="25.00")
    body = json.dumps(payload).encode()

    def put(c):
        return inbox.store(c, "paypal", payload["id"], payload["event_type"], {}, body)

    first, first_outbox = tx(engine, put)
    again, again_outbox = tx(engine, put)

    assert not first.duplicate and first_outbox is not None
    assert again.duplicate and again.id == first.id and again_outbox is None
    assert count(engine, "webhook_events", "event_id = :e", e=payload["id"]) == 1
    assert count(engine, "outbox", "args->>0 = CAST(:i AS text)", i=first.id) == 1
    assert tx(engine, lambda c: handlers.process(c, first.id, POLICY)).status == "processed"
    assert tx(engine, lambda c: handlers.process(c, first.id, POLICY)).status == "skipped"
    assert balance(engine, org) == 2500


@pytest.mark.parametrize(
    "event_type",
    ["PAYMENT.CAPTURE.PENDING", "PAYMENT.CAPTURE.DENIED", "PAYMENT.CAPTURE.DECLINED"],
)
def test_a_capture_not_completed_is_recorded_and_moves_no_money(engine, event_type):
    org = tx(engine, new_org)

    event = deliver(engine, pp.capture_event(event_type, org, pp.new_id(), "25.00"))

    assert event.status == "processed"
    assert nothing_moved(engine, org)


# --------------------------------------------------------------------------- refunds


@pytest.mark.parametrize(
    ("build", "kind"), [(pp.capture_refunded, "refund"), (pp.capture_reversed, "reversal")]
)
def test_refund_and_reversal_claw_back_from_the_captures_organization(engine, build, kind):
    org = tx(engine, new_org)
    capture_id, refund_id = pp.new_id(), pp.new_id()
    deliver(engine, pp.capture_completed(org, capture_id, value="25.00"))

    # PayPal names the capture only by the refund's `up` link; no custom_id on the refund.
    event = deliver(engine, build(capture_id, refund_id, "10.00"))
    again = deliver(engine, build(capture_id, refund_id, "10.00"))

    assert (event.status, event.org_id, again.status) == ("processed", org, "processed")
    assert balance(engine, org) == 1500
    latest = journal(engine, org)[0]
    assert (latest.kind, latest.amount_cents) == (kind, -1000)
    assert latest.reference == f"paypal:refund:{refund_id}"
    assert len(journal(engine, org)) == 2


def test_a_refund_is_taken_from_the_captures_organization_not_its_custom_id(engine):
    payer, other = tx(engine, new_org), tx(engine, new_org)
    capture_id = pp.new_id()
    deliver(engine, pp.capture_completed(payer, capture_id, value="25.00"))
    deliver(engine, pp.capture_completed(other, pp.new_id(), value="25.00"))

    deliver(engine, pp.capture_refunded(capture_id, pp.new_id(), "10.00", org_id=other))

    assert (balance(engine, payer), balance(engine, other)) == (1500, 2500)


@pytest.mark.parametrize("names_org", [False, True], ids=["no-custom-id", "custom-id"])
def test_a_refund_of_an_unknown_capture_waits_then_parks_and_replays(engine, names_org):
    org = tx(engine, new_org)
    capture_id = pp.new_id()
    custom_id = org if names_org else None
    stored = store(engine, pp.capture_refunded(capture_id, pp.new_id(), "10.00", org_id=custom_id))

    # NotYetApplicable is what the task retries with backoff before parking.
    with pytest.raises(NotYetApplicable):
        tx(engine, lambda c: handlers.process(c, stored.id, POLICY))
    assert apply_stored(engine, stored.id).status == "parked"
    assert nothing_moved(engine, org)

    deliver(engine, pp.capture_completed(org, capture_id, value="25.00"))
    assert replay(engine, stored.id).status == "processed"
    assert balance(engine, org) == 1500


# --------------------------------------------------------------------------- subscriptions


@pytest.mark.parametrize(
    ("event_type", "status", "blocks"),
    [
        ("BILLING.SUBSCRIPTION.ACTIVATED", "ACTIVE", False),
        ("BILLING.SUBSCRIPTION.RE-ACTIVATED", "ACTIVE", False),
        ("BILLING.SUBSCRIPTION.UPDATED", "ACTIVE", False),
        ("BILLING.SUBSCRIPTION.SUSPENDED", "SUSPENDED", True),
        ("BILLING.SUBSCRIPTION.CANCELLED", "CANCELLED", True),
        ("BILLING.SUBSCRIPTION.EXPIRED", "EXPIRED", True),
        # The status comes from the resource, not from the event's name.
        ("BILLING.SUBSCRIPTION.UPDATED", "SUSPENDED", True),
        ("BILLING.SUBSCRIPTION.ACTIVATED", "CANCELLED", True),
    ],
)
def test_a_subscription_event_sets_the_status_its_resource_carries(
    engine, event_type, status, blocks
):
    org = tx(engine, new_org)
    sub_id = f"I-{pp.new_id(12)}"

    event = deliver(engine, sub_event(event_type, sub_id, org, status))

    assert event.status == "processed"
    assert subscription(engine, sub_id).status == status.lower()
    assert ("subscription_inactive" in reasons(engine, org)) is blocks
    assert nothing_moved(engine, org)


def test_a_suspended_subscription_reactivated_allows_sending_again(engine):
    org = tx(engine, new_org)
    sub_id = f"I-{pp.new_id(12)}"

    deliver(engine, sub_event("BILLING.SUBSCRIPTION.SUSPENDED", sub_id, org, at=T0))
    assert "subscription_inactive" in reasons(engine, org)
    deliver(
        engine, sub_event("BILLING.SUBSCRIPTION.RE-ACTIVATED", sub_id, org, at=T0 + timedelta(1))
    )
    assert "subscription_inactive" not in reasons(engine, org)


def test_a_later_event_finds_the_organization_through_the_subscription(engine):
    org = tx(engine, new_org)
    sub_id = f"I-{pp.new_id(12)}"
    deliver(engine, sub_event("BILLING.SUBSCRIPTION.ACTIVATED", sub_id, org, at=T0))

    later = sub_event("BILLING.SUBSCRIPTION.SUSPENDED", sub_id, None, at=T0 + timedelta(1))
    event = deliver(engine, later)

    assert (event.status, event.org_id) == ("processed", org)
    assert "subscription_inactive" in reasons(engine, org)


def test_a_created_subscription_pending_approval_blocks_sending(engine):
    org = tx(engine, new_org)
    sub_id = f"I-{pp.new_id(12)}"

    event = deliver(engine, sub_event("BILLING.SUBSCRIPTION.CREATED", sub_id, org))

    assert event.status == "processed"
    assert "subscription_inactive" in reasons(engine, org)


@pytest.mark.parametrize(("status", "blocks"), [("ACTIVE", False), ("SUSPENDED", True)])
def test_a_failed_subscription_payment_is_recorded_and_the_status_follows(engine, status, blocks):
    org = tx(engine, new_org)
    sub_id = f"I-{pp.new_id(12)}"

    failed = pp.subscription_payment_failed(sub_id, org, "10.00", status=status, at=T0)
    event = deliver(engine, failed)

    assert event.status == "processed"
    row = subscription(engine, sub_id)
    assert (row.last_payment_outcome, row.status) == ("failed", status.lower())
    assert ("subscription_inactive" in reasons(engine, org)) is blocks
    assert nothing_moved(engine, org)


# --------------------------------------------------------------------------- sales


def test_a_completed_sale_is_recorded_against_its_subscription_without_credit(engine):
    org = tx(engine, new_org)
    sub_id, sale_id = f"I-{pp.new_id(12)}", pp.new_id()

    event = deliver(engine, pp.sale_completed(org, sale_id, sub_id, value="30.00"))

    assert (event.status, event.org_id) == ("processed", org)
    payment = tx(
        engine,
        lambda c: c.execute(
            text("SELECT * FROM payments WHERE provider = 'paypal' AND payment_id = :p"),
            {"p": sale_id},
        ).one(),
    )
    assert (payment.org_id, payment.subscription_id) == (org, sub_id)
    assert (payment.kind, payment.amount_cents) == ("subscription", 3000)
    assert subscription(engine, sub_id).last_payment_outcome == "paid"
    assert nothing_moved(engine, org)


def test_a_one_off_sale_is_recorded_without_credit(engine):
    org = tx(engine, new_org)
    sale_id = pp.new_id()

    event = deliver(engine, pp.sale_completed(org, sale_id, None, value="30.00"))

    assert event.status == "processed"
    assert count(engine, "payments", "payment_id = :p", p=sale_id) == 0
    assert nothing_moved(engine, org)


@pytest.mark.parametrize("names_org", [True, False], ids=["custom", "via-the-sale"])
def test_a_reversed_sale_freezes_the_wallet_for_chargeback(engine, names_org):
    org = tx(engine, new_org)
    custom = org if names_org else None
    sub_id, sale_id = f"I-{pp.new_id(12)}", pp.new_id()
    deliver(engine, pp.sale_completed(org, sale_id, sub_id))

    event = deliver(engine, pp.sale_reversed(custom, sale_id))

    assert (event.status, event.org_id) == ("processed", org)
    assert "chargeback" in freezes(engine, org)
    assert "wallet_frozen" in reasons(engine, org)
    assert balance(engine, org) == 0


# --------------------------------------------------------------------------- disputes


def test_a_dispute_freezes_while_open_and_its_resolution_lifts_only_its_own_freeze(engine):
    org = tx(engine, new_org)
    capture_id, dispute_id = pp.new_id(), f"PP-D-{pp.new_id(5)}"
    deliver(engine, pp.capture_completed(org, capture_id, value="25.00"))
    tx(engine, lambda c: wallet.freeze(c, org, "manual", actor="ops"))

    opened = deliver(engine, pp.dispute_created(dispute_id, capture_id, "25.00"))
    assert (opened.status, opened.org_id) == ("processed", org)
    assert set(freezes(engine, org)) == {"manual", f"dispute:{dispute_id}"}

    # PayPal moves a lost dispute's money as PAYMENT.CAPTURE.REVERSED; the resolution
    # itself takes nothing.
    resolved = deliver(engine, pp.dispute_resolved(dispute_id, capture_id, amount_refunded="25.00"))
    assert resolved.status == "processed"
    assert freezes(engine, org) == ("manual",)
    assert balance(engine, org) == 2500


# --------------------------------------------------------------------------- ignored


@pytest.mark.parametrize(
    "event_type",
    ["CHECKOUT.ORDER.VOIDED", "PAYMENT.AUTHORIZATION.CREATED", "BILLING.PLAN.CREATED"],
)
def test_a_type_payguard_does_not_act_on_is_ignored(engine, event_type):
    org = tx(engine, new_org)

    event = deliver(engine, pp.unknown_event(event_type))

    assert event.status == "ignored" and event.processed_at is not None
    assert nothing_moved(engine, org)
    assert count(engine, "subscriptions", "org_id = :o", o=org) == 0
    assert count(engine, "payments", "org_id = :o", o=org) == 0


# --------------------------------------------------------------------------- parking


def test_a_capture_for_an_unknown_organization_parks_and_replays_once_it_exists(engine):
    capture_id, not_yet = pp.new_id(), unique("not-yet")

    event = deliver(engine, pp.capture_completed(not_yet, capture_id, value="25.00"))

    assert event.status == "parked" and not_yet in (event.last_error or "")
    assert count(engine, "journal", "org_id = :o", o=not_yet) == 0
    assert count(engine, "payments", "payment_id = :p", p=capture_id) == 0
    tx(engine, new_org, org_id=not_yet)
    assert replay(engine, event.id).status == "processed"
    assert balance(engine, not_yet) == 2500


def test_a_capture_naming_no_organization_parks(engine):
    org = tx(engine, new_org)

    event = deliver(engine, pp.capture_completed(None, pp.new_id(), value="25.00"))

    assert event.status == "parked"
    assert nothing_moved(engine, org)


def test_a_capture_in_another_currency_parks(engine):
    org = tx(engine, new_org, currency="USD")

    capture_id = pp.new_id()
    event = deliver(engine, pp.capture_completed(org, capture_id, "25.00", "EUR"))

    assert event.status == "parked" and "EUR" in (event.last_error or "")
    assert nothing_moved(engine, org)
    assert count(engine, "payments", "payment_id = :p", p=capture_id) == 0


def test_a_refund_in_another_currency_parks(engine):
    org = tx(engine, new_org)
    capture_id = pp.new_id()
    deliver(engine, pp.capture_completed(org, capture_id, value="25.00"))

    event = deliver(engine, pp.capture_refunded(capture_id, pp.new_id(), "10.00", "EUR"))

    assert event.status == "parked"
    assert balance(engine, org) == 2500


def test_a_subscription_event_for_an_unknown_organization_parks(engine):
    sub_id = f"I-{pp.new_id(12)}"
    event = deliver(engine, sub_event("BILLING.SUBSCRIPTION.SUSPENDED", sub_id, unique("ghost")))

    assert event.status == "parked"
    assert count(engine, "subscriptions", "subscription_id = :s", s=sub_id) == 0


def test_only_parked_or_failed_events_replay(engine):
    org = tx(engine, new_org)
    event = deliver(engine, pp.capture_completed(org, pp.new_id()))

    with pytest.raises(Refused):
        tx(engine, lambda c: inbox.replay(c, event.id, actor="test"))
    assert balance(engine, org) == 1000


# --------------------------------------------------------------------------- ordering


def test_an_older_subscription_event_is_recorded_but_never_overwrites_a_newer_status(engine):
    org = tx(engine, new_org)
    sub_id = f"I-{pp.new_id(12)}"

    newer = deliver(engine, sub_event("BILLING.SUBSCRIPTION.SUSPENDED", sub_id, org, at=T0))
    older = deliver(
        engine, sub_event("BILLING.SUBSCRIPTION.ACTIVATED", sub_id, org, at=T0 - timedelta(hours=1))
    )

    assert (newer.status, older.status) == ("processed", "processed")
    assert subscription(engine, sub_id).status == "suspended"
    assert "subscription_inactive" in reasons(engine, org)


def test_an_older_event_without_a_usable_update_time_is_ordered_by_its_create_time(engine):
    org = tx(engine, new_org)
    sub_id = f"I-{pp.new_id(12)}"
    deliver(engine, sub_event("BILLING.SUBSCRIPTION.SUSPENDED", sub_id, org, at=T0))

    # A date PayPal's own samples carry: month 19. Lenient parsing skips it, not the event.
    stale = sub_event("BILLING.SUBSCRIPTION.ACTIVATED", sub_id, org, at="2018-19-12T22:20:32.000Z")
    stale["create_time"] = pp.paypal_time(T0 - timedelta(minutes=5))
    assert deliver(engine, stale).status == "processed"
    assert subscription(engine, sub_id).status == "suspended"

    fresh = sub_event("BILLING.SUBSCRIPTION.ACTIVATED", sub_id, org, at="2018-19-12T22:20:32.000Z")
    fresh["create_time"] = pp.paypal_time(T0 + timedelta(minutes=5))
    assert deliver(engine, fresh).status == "processed"
    assert subscription(engine, sub_id).status == "active"


def test_an_older_failed_payment_does_not_overwrite_a_newer_status(engine):
    org = tx(engine, new_org)
    sub_id = f"I-{pp.new_id(12)}"
    deliver(engine, sub_event("BILLING.SUBSCRIPTION.ACTIVATED", sub_id, org, at=T0))

    old = pp.subscription_payment_failed(sub_id, org, status="SUSPENDED", at=T0 - timedelta(1))
    old["resource"]["update_time"] = old["resource"]["status_update_time"] = pp.paypal_time(
        T0 - timedelta(1)
    )
    assert deliver(engine, old).status == "processed"

    row = subscription(engine, sub_id)
    assert (row.status, row.last_payment_outcome) == ("active", "failed")
    assert "subscription_inactive" not in reasons(engine, org)


def test_a_newer_failed_payment_suspends_even_if_the_failure_itself_is_older(engine):
    """Ordering is by the resource's update_time: the status it reports is as of then."""
    org = tx(engine, new_org)
    sub_id = f"I-{pp.new_id(12)}"
    deliver(engine, sub_event("BILLING.SUBSCRIPTION.ACTIVATED", sub_id, org, at=T0))

    failed = pp.subscription_payment_failed(sub_id, org, status="SUSPENDED", at=T0 - timedelta(1))
    failed["resource"]["update_time"] = failed["resource"]["status_update_time"] = pp.paypal_time(
        T0 + timedelta(1)
    )
    deliver(engine, failed)

    assert subscription(engine, sub_id).status == "suspended"
    assert "subscription_inactive" in reasons(engine, org)
