"""What each Stripe event means for Payguard."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from core.errors import MalformedEvent
from core.providers.events import (
    DisputeClosed,
    DisputeOpened,
    PaymentCaptured,
    PaymentRefunded,
    Recorded,
    RefundFailed,
    SubscriptionChanged,
    SubscriptionPayment,
)
from core.providers.stripe.events import HANDLED_TYPES, normalize
from tests.support.payloads import stripe as sp

CREATED = 1_760_000_000
AT = datetime.fromtimestamp(CREATED, tz=UTC)


def only(events):
    assert len(events) == 1, events
    return events[0]


# -- payments ---------------------------------------------------------------------------


@pytest.mark.parametrize("org_in", ["client_reference_id", "metadata"])
def test_paid_checkout_session_captures_its_payment_intent(org_in):
    event = sp.checkout_session_completed(
        org_id="org_7", org_in=org_in, payment_intent_id="pi_1", amount=2500, created=CREATED
    )

    assert only(normalize(event)) == PaymentCaptured(
        provider="stripe",
        payment_id="pi_1",
        org_id="org_7",
        amount_cents=2500,
        currency="USD",
        occurred_at=AT,
        org_may_come_later=True,
        checkout_id=event["data"]["object"]["id"],  # the session: how its top-up is found
    )


def test_checkout_session_with_expanded_payment_intent_uses_its_id():
    event = sp.checkout_session_completed(payment_intent_id="pi_2", expand_payment_intent=True)

    assert only(normalize(event)).payment_id == "pi_2"


def test_client_reference_id_wins_over_metadata():
    event = sp.checkout_session_completed(org_id="org_ref")
    event["data"]["object"]["metadata"] = {"org_id": "org_meta"}

    assert only(normalize(event)).org_id == "org_ref"


def test_checkout_session_without_any_org_still_captures_for_the_handler_to_park():
    event = sp.checkout_session_completed(org_id=None)

    assert only(normalize(event)).org_id is None


@pytest.mark.parametrize(
    ("mode", "payment_status"),
    [("subscription", "paid"), ("setup", "no_payment_required"), ("payment", "unpaid")],
)
def test_checkout_session_that_is_not_a_paid_payment_is_only_recorded(mode, payment_status):
    event = sp.checkout_session_completed(mode=mode, payment_status=payment_status)

    recorded = only(normalize(event))
    assert isinstance(recorded, Recorded)
    assert recorded.what == "checkout.session.completed"
    assert recorded.details["mode"] == mode
    assert recorded.details["event_id"] == event["id"]


def test_async_payment_succeeded_captures_like_a_paid_session():
    event = sp.checkout_session_async_payment_succeeded(payment_intent_id="pi_3", amount=900)

    captured = only(normalize(event))
    assert isinstance(captured, PaymentCaptured)
    assert (captured.payment_id, captured.amount_cents) == ("pi_3", 900)


def test_payment_intent_succeeded_captures_the_amount_received():
    event = sp.payment_intent_succeeded(
        org_id="org_7", payment_intent_id="pi_4", amount=5000, amount_received=4000, created=CREATED
    )

    assert only(normalize(event)) == PaymentCaptured(
        provider="stripe",
        payment_id="pi_4",
        org_id="org_7",
        amount_cents=4000,
        currency="USD",
        occurred_at=AT,
        org_may_come_later=True,
    )


def test_payment_intent_without_amount_received_falls_back_to_amount():
    event = sp.payment_intent_succeeded(amount=1234, omit_amount_received=True)

    assert only(normalize(event)).amount_cents == 1234


def test_zero_decimal_currency_amount_is_taken_as_is():
    event = sp.payment_intent_succeeded(amount=500, currency="jpy")

    captured = only(normalize(event))
    assert (captured.amount_cents, captured.currency) == (500, "JPY")


def test_payment_intent_for_a_subscription_invoice_is_not_prepaid_credit():
    event = sp.payment_intent_succeeded(invoice="in_1")

    recorded = only(normalize(event))
    assert isinstance(recorded, Recorded)
    assert recorded.details["invoice"] == "in_1"


def test_one_payment_announced_by_session_and_intent_has_one_payment_id():
    session = sp.checkout_session_completed(payment_intent_id="pi_same", amount=5000)
    intent = sp.payment_intent_succeeded(payment_intent_id="pi_same", amount=5000)

    from_session, from_intent = only(normalize(session)), only(normalize(intent))
    assert from_session.payment_id == from_intent.payment_id == "pi_same"
    assert from_session.amount_cents == from_intent.amount_cents


# -- refunds ----------------------------------------------------------------------------


def test_charge_refunded_yields_each_embedded_refund():
    refunds = [
        sp.refund(refund_id="re_1", amount=1000, payment_intent_id="pi_5", charge_id="ch_5"),
        sp.refund(refund_id="re_2", amount=1500, payment_intent_id="pi_5", charge_id="ch_5"),
    ]
    event = sp.charge_refunded(
        payment_intent_id="pi_5", charge_id="ch_5", amount=5000, refunds=refunds, created=CREATED
    )

    assert normalize(event) == [
        PaymentRefunded(
            provider="stripe",
            refund_id=refund_id,
            payment_id="pi_5",
            org_id=None,
            amount_cents=amount,
            currency="USD",
            occurred_at=AT,
        )
        for refund_id, amount in [("re_1", 1000), ("re_2", 1500)]
    ]


def test_charge_refunded_reports_refunds_that_failed_as_failed():
    refunds = [
        sp.refund(refund_id="re_ok", amount=100),
        sp.refund(refund_id="re_no", amount=200, status="failed"),
    ]

    events = normalize(sp.charge_refunded(refunds=refunds))

    assert [(type(e).__name__, e.refund_id) for e in events] == [
        ("PaymentRefunded", "re_ok"),
        ("RefundFailed", "re_no"),
    ]


def test_charge_refunded_and_refund_created_name_the_same_refund():
    refund = sp.refund(refund_id="re_9", amount=700, payment_intent_id="pi_9", charge_id="ch_9")
    from_charge = sp.charge_refunded(payment_intent_id="pi_9", charge_id="ch_9", refunds=[refund])
    from_refund = sp.refund_created(
        refund_id="re_9", amount=700, payment_intent_id="pi_9", charge_id="ch_9"
    )

    assert normalize(from_charge) == normalize(from_refund)


def test_charge_refunded_without_refund_list_is_only_recorded():
    # Current API versions: refund.created carries the refund id; an invented one here
    # would claw the same money back twice.
    event = sp.charge_refunded(
        payment_intent_id="pi_6", charge_id="ch_6", amount=5000, embed_refunds=False
    )

    recorded = only(normalize(event))
    assert isinstance(recorded, Recorded)
    assert recorded.details == {
        "event_id": event["id"],
        "reason": "charge carries no refunds list; refund.created moves the money",
        "charge_id": "ch_6",
        "payment_id": "pi_6",
        "amount_refunded": 5000,
        "currency": "USD",
    }


def test_refund_created_claws_back_the_refund():
    event = sp.refund_created(
        refund_id="re_3", amount=800, currency="eur", payment_intent_id="pi_7", created=CREATED
    )

    assert only(normalize(event)) == PaymentRefunded(
        provider="stripe",
        refund_id="re_3",
        payment_id="pi_7",
        org_id=None,
        amount_cents=800,
        currency="EUR",
        occurred_at=AT,
    )


def test_pending_refund_is_clawed_back_at_once():
    assert isinstance(only(normalize(sp.refund_created(status="pending"))), PaymentRefunded)


@pytest.mark.parametrize("build", [sp.refund_created, sp.refund_updated, sp.refund_failed])
@pytest.mark.parametrize("status", ["failed", "canceled"])
def test_a_refund_that_failed_or_was_canceled_is_a_failed_refund(build, status):
    event = build(refund_id="re_f", payment_intent_id="pi_f", status=status, created=CREATED)

    assert only(normalize(event)) == RefundFailed(
        provider="stripe", refund_id="re_f", payment_id="pi_f", occurred_at=AT
    )


def test_a_refund_updated_while_pending_or_succeeded_is_the_same_refund():
    created = sp.refund_created(refund_id="re_u", payment_intent_id="pi_u", status="pending")
    updated = sp.refund_updated(refund_id="re_u", payment_intent_id="pi_u", status="succeeded")

    assert normalize(updated) == normalize({**created, "created": updated["created"]})


# -- disputes ---------------------------------------------------------------------------


def test_dispute_created_opens_a_dispute_on_intent_and_charge():
    event = sp.charge_dispute_created(
        dispute_id="dp_1", payment_intent_id="pi_8", charge_id="ch_8", created=CREATED
    )

    assert only(normalize(event)) == DisputeOpened(
        provider="stripe", dispute_id="dp_1", payment_ids=("pi_8", "ch_8"), occurred_at=AT
    )


def test_dispute_on_a_bare_charge_names_only_the_charge():
    event = sp.charge_dispute_created(charge_id="ch_old")
    event["data"]["object"]["payment_intent"] = None

    assert only(normalize(event)).payment_ids == ("ch_old",)


def test_lost_dispute_closes_with_its_amount():
    event = sp.charge_dispute_closed(
        dispute_id="dp_2",
        payment_intent_id="pi_9",
        charge_id="ch_9",
        amount=3000,
        status="lost",
        created=CREATED,
    )

    assert only(normalize(event)) == DisputeClosed(
        provider="stripe",
        dispute_id="dp_2",
        payment_ids=("pi_9", "ch_9"),
        lost=True,
        amount_cents=3000,
        currency="USD",
        occurred_at=AT,
    )


@pytest.mark.parametrize("status", ["won", "warning_closed"])
def test_dispute_closed_otherwise_is_not_lost(status):
    closed = only(normalize(sp.charge_dispute_closed(status=status)))

    assert isinstance(closed, DisputeClosed)
    assert closed.lost is False


# -- subscriptions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "status"),
    [
        (sp.customer_subscription_created, "incomplete"),
        (sp.customer_subscription_created, "trialing"),
        (sp.customer_subscription_updated, "active"),
        (sp.customer_subscription_updated, "past_due"),
        (sp.customer_subscription_updated, "unpaid"),
        (sp.customer_subscription_updated, "paused"),
        (sp.customer_subscription_deleted, "canceled"),
    ],
)
def test_subscription_event_carries_its_status(build, status):
    event = build(subscription_id="sub_1", org_id="org_7", status=status, created=CREATED)

    assert only(normalize(event)) == SubscriptionChanged(
        provider="stripe", subscription_id="sub_1", org_id="org_7", status=status, occurred_at=AT
    )


def test_deleted_subscription_is_canceled_whatever_its_snapshot_says():
    event = sp.customer_subscription_deleted(status="active")

    assert only(normalize(event)).status == "canceled"


def test_subscription_events_are_ordered_by_event_creation_not_delivery():
    older = sp.customer_subscription_updated(status="past_due", created=CREATED)
    newer = sp.customer_subscription_updated(status="active", created=CREATED + 60)

    delivered = [only(normalize(newer)), only(normalize(older))]
    assert max(delivered, key=lambda e: e.occurred_at).status == "active"


# -- invoices ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["parent", "legacy"])
@pytest.mark.parametrize(
    ("build", "outcome", "amount"),
    [(sp.invoice_paid, "paid", 2900), (sp.invoice_payment_failed, "failed", 2900)],
)
def test_invoice_outcome_for_a_subscription(shape, build, outcome, amount):
    event = build(
        subscription_id="sub_2",
        org_id="org_7",
        amount=amount,
        shape=shape,
        payment_intent_id="pi_inv",
        created=CREATED,
    )

    assert only(normalize(event)) == SubscriptionPayment(
        provider="stripe",
        subscription_id="sub_2",
        org_id="org_7",
        outcome=outcome,
        payment_id="pi_inv" if shape == "legacy" else None,
        amount_cents=amount,
        currency="USD",
        occurred_at=AT,
    )


@pytest.mark.parametrize("shape", ["parent", "legacy"])
def test_invoice_org_falls_back_to_invoice_metadata(shape):
    event = sp.invoice_paid(org_id=None, shape=shape)
    event["data"]["object"]["metadata"] = {"org_id": "org_inv"}

    assert only(normalize(event)).org_id == "org_inv"


def test_invoice_with_expanded_subscription_uses_its_id():
    event = sp.invoice_payment_failed(shape="legacy")
    event["data"]["object"]["subscription"] = {"id": "sub_x", "object": "subscription"}

    assert only(normalize(event)).subscription_id == "sub_x"


@pytest.mark.parametrize("shape", ["parent", "legacy"])
@pytest.mark.parametrize("build", [sp.invoice_paid, sp.invoice_payment_failed])
def test_invoice_without_subscription_is_only_recorded(shape, build):
    event = build(subscription_id=None, shape=shape)

    recorded = only(normalize(event))
    assert isinstance(recorded, Recorded)
    assert recorded.details["invoice_id"] == event["data"]["object"]["id"]


# -- everything else --------------------------------------------------------------------


@pytest.mark.parametrize(
    "event_type",
    ["customer.created", "payment_intent.created", "checkout.session.async_payment_failed"],
)
def test_other_event_types_mean_nothing(event_type):
    assert normalize(sp.unhandled_event(event_type)) == []


def test_handled_types_cover_every_builder():
    built = {
        sp.checkout_session_completed()["type"],
        sp.checkout_session_async_payment_succeeded()["type"],
        sp.payment_intent_succeeded()["type"],
        sp.charge_refunded()["type"],
        sp.refund_created()["type"],
        sp.refund_updated()["type"],
        sp.refund_failed()["type"],
        sp.charge_dispute_created()["type"],
        sp.charge_dispute_closed()["type"],
        sp.customer_subscription_created()["type"],
        sp.customer_subscription_updated()["type"],
        sp.customer_subscription_deleted()["type"],
        sp.invoice_paid()["type"],
        sp.invoice_payment_failed()["type"],
    }
    assert built == HANDLED_TYPES


# -- malformed --------------------------------------------------------------------------


def _broken(event, *path_and_value):
    *path, key, value = path_and_value
    event = copy.deepcopy(event)
    target = event
    for step in path:
        target = target[step]
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    return event


DELETE = object()
OBJ = ("data", "object")


@pytest.mark.parametrize(
    ("event", "change"),
    [
        (sp.payment_intent_succeeded(), ("data", DELETE)),
        (sp.payment_intent_succeeded(), ("data", "object", "not an object")),
        (sp.payment_intent_succeeded(), ("created", DELETE)),
        (sp.payment_intent_succeeded(), ("created", "yesterday")),
        (sp.payment_intent_succeeded(), (*OBJ, "id", None)),
        (sp.payment_intent_succeeded(), (*OBJ, "amount_received", "50.00")),
        (sp.payment_intent_succeeded(), (*OBJ, "amount_received", 50.0)),
        (sp.payment_intent_succeeded(), (*OBJ, "amount_received", True)),
        (sp.payment_intent_succeeded(), (*OBJ, "amount_received", -1)),
        (sp.payment_intent_succeeded(), (*OBJ, "amount_received", 0)),
        (sp.payment_intent_succeeded(), (*OBJ, "currency", "dollars")),
        (sp.payment_intent_succeeded(), (*OBJ, "metadata", ["org_1"])),
        (sp.checkout_session_completed(), (*OBJ, "payment_intent", None)),
        (sp.checkout_session_completed(), (*OBJ, "payment_intent", {"object": "pi"})),
        (sp.checkout_session_completed(), (*OBJ, "amount_total", None)),
        (sp.charge_refunded(), (*OBJ, "refunds", {"data": "none"})),
        (sp.charge_refunded(), (*OBJ, "refunds", "data", ["re_1"])),
        (sp.refund_created(), (*OBJ, "amount", DELETE)),
        (sp.charge_dispute_created(), (*OBJ, "charge", None)),
        (sp.charge_dispute_closed(), (*OBJ, "currency", None)),
        (sp.customer_subscription_updated(), (*OBJ, "status", None)),
        (sp.customer_subscription_updated(), (*OBJ, "id", "")),
        (sp.invoice_paid(), (*OBJ, "parent", "sub_1")),
        (sp.invoice_paid(), (*OBJ, "parent", "subscription_details", 7)),
        (sp.invoice_paid(shape="legacy"), (*OBJ, "subscription", 42)),
        (sp.invoice_paid(), (*OBJ, "amount_paid", None)),
    ],
    ids=lambda v: v["type"] if isinstance(v, dict) and "type" in v else None,
)
def test_wrong_shape_is_malformed(event, change):
    with pytest.raises(MalformedEvent):
        normalize(_broken(event, *change))


@pytest.mark.parametrize("event", [None, [], "evt_1", {"id": "evt_1"}, {"type": 3}])
def test_non_event_is_malformed(event):
    with pytest.raises(MalformedEvent):
        normalize(event)
