"""PayPal normalization: every published sample and every builder means exactly one thing,
times are read leniently, and shapes that do not fit their type are refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import MalformedEvent
from core.providers.events import (
    ChargebackOpened,
    DisputeClosed,
    DisputeOpened,
    PaymentCaptured,
    PaymentRefunded,
    Recorded,
    SubscriptionChanged,
    SubscriptionPayment,
)
from core.providers.paypal.events import event_meta, normalize, parse_time
from tests.support.payloads import paypal as pp

AT = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def only(payload: dict):
    events = normalize(payload)
    assert len(events) == 1, events
    return events[0]


# --- The published samples ---------------------------------------------------------------

SUB = "I-BW452GLLEP1G"
FIXTURE_EVENTS = {
    "payment.capture.completed": PaymentCaptured(
        provider="paypal",
        payment_id="42311647XV020574X",
        org_id="d93e4fce-d3af-137c-82fe-1a8101f1ad11",
        amount_cents=5700,
        currency="USD",
        occurred_at=utc(2022, 8, 26, 18, 29, 50),
        checkout_id="8U481631H66031715",  # supplementary_data.related_ids.order_id
    ),
    "payment.capture.refunded": PaymentRefunded(
        provider="paypal",
        refund_id="1Y107995YT783435V",
        payment_id="0JF852973C016714D",
        org_id=None,
        amount_cents=99,
        currency="USD",
        kind="refund",
        occurred_at=utc(2018, 8, 15, 19, 13, 29),  # 12:13:29-07:00
    ),
    "payment.capture.reversed": PaymentRefunded(
        provider="paypal",
        refund_id="09E71677NS257044M",
        payment_id="4L335234718889942",
        org_id=None,
        amount_cents=251,
        currency="USD",
        kind="reversal",
        occurred_at=utc(2018, 8, 15, 21, 30, 10),
    ),
    "billing.subscription.activated": SubscriptionChanged(
        provider="paypal",
        subscription_id=SUB,
        org_id=None,
        status="active",
        occurred_at=utc(2018, 12, 10, 21, 20, 49),
    ),
    "billing.subscription.cancelled": SubscriptionChanged(
        provider="paypal",
        subscription_id=SUB,
        org_id=None,
        status="cancelled",
        occurred_at=utc(2018, 12, 10, 21, 20, 49),
    ),
    "billing.subscription.payment.failed": SubscriptionPayment(
        provider="paypal",
        subscription_id=SUB,
        org_id=None,
        outcome="failed",
        amount_cents=50000,
        currency="USD",
        status="active",
        occurred_at=utc(2018, 12, 10, 21, 20, 49),  # update_time: the status is as of then
    ),
    "payment.sale.completed": SubscriptionPayment(
        provider="paypal",
        subscription_id="I-W0Y05RHBK9VG",
        org_id=None,
        outcome="paid",
        payment_id="7D51924877811803R",
        amount_cents=499,
        currency="USD",
        occurred_at=utc(2017, 8, 25, 17, 55, 9),
    ),
    "payment.sale.refunded": Recorded(
        provider="paypal",
        what="PAYMENT.SALE.REFUNDED",
        details={"refund_id": "6YX43824R4443062K", "sale_id": "9T0916710M1105906"},
    ),
    "customer.dispute.created": DisputeOpened(
        provider="paypal",
        dispute_id="PP-000-001-341-393",
        payment_ids=("45V487086B989905H",),
        occurred_at=utc(2016, 6, 9, 20, 38, 52),
    ),
    "customer.dispute.resolved": DisputeClosed(
        provider="paypal",
        dispute_id="PP-000-001-341-261",
        payment_ids=("6C589962JJ4368547", "22V23554K3057852G"),
        lost=True,
        amount_cents=998,
        currency="USD",
        occurred_at=utc(2016, 6, 7, 22, 56, 19),
        loss_arrives_separately=True,
    ),
}


def test_every_published_sample_has_an_expected_meaning():
    assert sorted(FIXTURE_EVENTS) == pp.fixture_names()


@pytest.mark.parametrize("name", sorted(FIXTURE_EVENTS))
def test_published_sample_normalizes_to_exactly_its_event(name):
    assert normalize(pp.fixture(name)) == [FIXTURE_EVENTS[name]]


def test_subscription_sample_with_impossible_create_time_still_normalizes():
    payload = pp.fixture("billing.subscription.activated")
    assert payload["create_time"] == "2018-19-12T22:20:32.000Z"
    del payload["resource"]["update_time"], payload["resource"]["status_update_time"]
    assert only(payload).occurred_at is None


# --- event_meta --------------------------------------------------------------------------


def test_event_meta_returns_id_and_type():
    payload = pp.fixture("payment.capture.completed")
    assert event_meta(payload) == (
        "WH-7Y7254563A4550640-11V2185806837105M",
        "PAYMENT.CAPTURE.COMPLETED",
    )


@pytest.mark.parametrize(
    "change",
    [
        {"id": None},
        {"id": ""},
        {"id": "   "},
        {"id": 42},
        {"event_type": None},
        {"event_type": ""},
        {"event_type": ["PAYMENT.CAPTURE.COMPLETED"]},
    ],
    ids=repr,
)
def test_event_meta_refuses_missing_or_non_string_id_and_type(change):
    payload = pp.fixture("payment.capture.completed") | change
    with pytest.raises(MalformedEvent):
        event_meta(payload)
    with pytest.raises(MalformedEvent):
        normalize(payload)


@pytest.mark.parametrize("payload", [None, [], "event", 7])
def test_payload_that_is_not_an_object_is_malformed(payload):
    with pytest.raises(MalformedEvent):
        event_meta(payload)
    with pytest.raises(MalformedEvent):
        normalize(payload)


# --- parse_time --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2018-12-10T21:20:49Z", utc(2018, 12, 10, 21, 20, 49)),
        ("2018-12-10T21:20:49.000Z", utc(2018, 12, 10, 21, 20, 49)),
        ("2018-08-15T19:14:04.543Z", utc(2018, 8, 15, 19, 14, 4, 543000)),
        ("2018-08-15T12:13:29-07:00", utc(2018, 8, 15, 19, 13, 29)),
        ("2018-08-15T12:13:29+0530", utc(2018, 8, 15, 6, 43, 29)),
        ("2016-07-10T20:38:52.000", utc(2016, 7, 10, 20, 38, 52)),  # no zone: UTC
        ("2016-07-10T20:38:52", utc(2016, 7, 10, 20, 38, 52)),
        ("2016-07-10 20:38:52z", utc(2016, 7, 10, 20, 38, 52)),
        ("2016-07-10T20:38:52.123456789Z", utc(2016, 7, 10, 20, 38, 52, 123456)),
        (" 2016-07-10T20:38Z ", utc(2016, 7, 10, 20, 38)),
    ],
)
def test_parse_time_reads_rfc3339_variants_as_aware_utc(value, expected):
    parsed = parse_time(value)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "value",
    [
        "2018-19-12T22:20:32.000Z",  # PayPal's own sample: month 19
        "2019-02-29T00:00:00Z",
        "2018-12-10T25:00:00Z",
        "2018-12-10T21:20:49+24:00",
        "2018-12-10T21:20:49+05:99",
        "0001-01-01T00:00:00+05:00",  # before datetime.min once in UTC
        "2018-12-10",
        "yesterday",
        "",
        None,
        1544476849,
        12.5,
        True,
        {"time": "2018-12-10T21:20:49Z"},
    ],
    ids=repr,
)
def test_parse_time_gives_none_for_anything_unusable(value):
    assert parse_time(value) is None


@given(
    st.one_of(
        st.text(), st.from_regex(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?")
    )
)
def test_parse_time_never_raises(value):
    parsed = parse_time(value)
    assert parsed is None or parsed.tzinfo is not None


# --- Captures, refunds, reversals --------------------------------------------------------


def test_capture_completed_builder_credits_its_org_in_cents():
    payload = pp.capture_completed(
        "org-1", "5O190127TN364715T", value="25.50", currency="eur", at=AT
    )
    assert only(payload) == PaymentCaptured(
        provider="paypal",
        payment_id="5O190127TN364715T",
        org_id="org-1",
        amount_cents=2550,
        currency="EUR",
        occurred_at=AT,
        checkout_id=payload["resource"]["supplementary_data"]["related_ids"]["order_id"],
    )


def test_capture_without_custom_id_has_no_org():
    assert only(pp.capture_completed(None, "5O190127TN364715T")).org_id is None


def test_capture_in_zero_decimal_currency():
    assert (
        only(pp.capture_completed("org-1", "CAP1", value="1500", currency="JPY")).amount_cents
        == 1500
    )


@pytest.mark.parametrize(
    "event_type", ["PAYMENT.CAPTURE.PENDING", "PAYMENT.CAPTURE.DENIED", "PAYMENT.CAPTURE.DECLINED"]
)
def test_capture_that_did_not_complete_is_only_recorded(event_type):
    payload = pp.capture_event(event_type, "org-1", "CAP1", "10.00")
    event = only(payload)
    assert isinstance(event, Recorded)
    assert event.what == event_type
    assert event.details["capture_id"] == "CAP1"
    assert event.details["org_id"] == "org-1"


@pytest.mark.parametrize(
    ("build", "kind"), [(pp.capture_refunded, "refund"), (pp.capture_reversed, "reversal")]
)
def test_refund_and_reversal_builders_name_the_capture_through_the_up_link(build, kind):
    payload = build("CAP1", "REF1", "3.00", org_id="org-1", at=AT)
    assert only(payload) == PaymentRefunded(
        provider="paypal",
        refund_id="REF1",
        payment_id="CAP1",
        org_id="org-1",
        amount_cents=300,
        currency="USD",
        kind=kind,
        occurred_at=AT,
    )


def test_refund_link_without_rel_still_names_the_capture():
    payload = pp.capture_refunded("CAP1", "REF1", "3.00")
    for link in payload["resource"]["links"]:
        del link["rel"]
    assert only(payload).payment_id == "CAP1"


def test_up_link_wins_over_another_captures_link():
    payload = pp.capture_refunded("CAP1", "REF1", "3.00")
    payload["resource"]["links"].insert(
        0, {"href": "https://api.paypal.com/v2/payments/captures/OTHER", "rel": "related"}
    )
    assert only(payload).payment_id == "CAP1"


@pytest.mark.parametrize(
    "links",
    [
        None,
        "https://api.paypal.com/v2/payments/captures/CAP1",
        [],
        ["https://api.paypal.com/v2/payments/captures/CAP1"],
        [{"href": "https://api.paypal.com/v2/checkout/orders/ORDER1", "rel": "up"}],
        [{"href": 5, "rel": "up"}],
        [{"rel": "up"}],
    ],
    ids=repr,
)
def test_refund_without_a_usable_capture_link_has_no_payment_id(links):
    payload = pp.capture_refunded("CAP1", "REF1", "3.00", org_id="org-1")
    payload["resource"]["links"] = links
    event = only(payload)
    assert event.payment_id is None
    assert event.org_id == "org-1"


def test_refund_occurred_at_falls_back_to_the_event_time():
    payload = pp.capture_refunded("CAP1", "REF1", "3.00", at=AT)
    payload["resource"]["update_time"] = payload["resource"]["create_time"] = "2018-19-12T00:00:00Z"
    assert only(payload).occurred_at == AT


# --- Subscriptions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "status"),
    [
        ("BILLING.SUBSCRIPTION.ACTIVATED", "active"),
        ("BILLING.SUBSCRIPTION.RE-ACTIVATED", "active"),
        ("BILLING.SUBSCRIPTION.UPDATED", "active"),
        ("BILLING.SUBSCRIPTION.SUSPENDED", "suspended"),
        ("BILLING.SUBSCRIPTION.CANCELLED", "cancelled"),
        ("BILLING.SUBSCRIPTION.EXPIRED", "expired"),
    ],
)
def test_subscription_builder_changes_status_lower_case(event_type, status):
    payload = pp.subscription_event(event_type, "I-SUB1", "org-1", update_time=AT)
    assert only(payload) == SubscriptionChanged(
        provider="paypal", subscription_id="I-SUB1", org_id="org-1", status=status, occurred_at=AT
    )


def test_subscription_status_given_explicitly_wins():
    payload = pp.subscription_event("BILLING.SUBSCRIPTION.UPDATED", "I-SUB1", "org-1", "SUSPENDED")
    assert only(payload).status == "suspended"


def test_subscription_occurred_at_prefers_update_time_over_status_update_time():
    payload = pp.subscription_event(
        "BILLING.SUBSCRIPTION.SUSPENDED", "I-SUB1", "org-1", update_time=AT
    )
    payload["resource"]["status_update_time"] = "2024-02-03T04:05:06Z"
    assert only(payload).occurred_at == AT


def test_subscription_occurred_at_takes_the_first_time_that_parses():
    payload = pp.subscription_event(
        "BILLING.SUBSCRIPTION.SUSPENDED", "I-SUB1", "org-1", update_time="2018-19-12T22:20:32Z"
    )
    resource = payload["resource"]
    resource["status_update_time"] = "2024-02-03T04:05:06Z"
    assert only(payload).occurred_at == utc(2024, 2, 3, 4, 5, 6)

    resource["status_update_time"] = "not a time"
    payload["create_time"] = "2024-02-03T10:00:00+02:00"
    assert only(payload).occurred_at == utc(2024, 2, 3, 8)

    payload["create_time"] = "2018-19-12T22:20:32.000Z"
    assert only(payload).occurred_at is None


def test_subscription_builder_keeps_a_time_string_as_given():
    payload = pp.subscription_event(
        "BILLING.SUBSCRIPTION.ACTIVATED", "I-SUB1", None, update_time="2018-19-12T22:20:32Z"
    )
    assert payload["resource"]["update_time"] == "2018-19-12T22:20:32Z"
    assert "custom_id" not in payload["resource"]


def test_subscription_builder_needs_a_status_for_an_event_it_does_not_know():
    with pytest.raises(ValueError, match="no default status"):
        pp.subscription_event("BILLING.SUBSCRIPTION.SOMETHING", "I-SUB1", "org-1")


def test_created_subscription_is_a_status_change_that_blocks_until_approved():
    [event] = normalize(pp.subscription_event("BILLING.SUBSCRIPTION.CREATED", "I-SUB1", "org-1"))
    assert isinstance(event, SubscriptionChanged)
    assert (event.subscription_id, event.org_id) == ("I-SUB1", "org-1")
    assert event.status == "approval_pending"


def test_subscription_payment_failed_builder():
    payload = pp.subscription_payment_failed("I-SUB1", "org-1", "19.99", status="SUSPENDED", at=AT)
    assert only(payload) == SubscriptionPayment(
        provider="paypal",
        subscription_id="I-SUB1",
        org_id="org-1",
        outcome="failed",
        amount_cents=1999,
        currency="USD",
        status="suspended",
        occurred_at=AT,
    )


def test_subscription_payment_failed_without_last_failed_payment_has_no_amount():
    event = only(pp.subscription_payment_failed("I-SUB1", "org-1", None, at=AT))
    assert (event.amount_cents, event.currency, event.occurred_at) == (None, None, AT)


# --- Sales -------------------------------------------------------------------------------


def test_sale_completed_builder_is_a_paid_subscription_charge():
    payload = pp.sale_completed("org-1", "SALE1", "I-SUB1", "4.99", at=AT)
    assert only(payload) == SubscriptionPayment(
        provider="paypal",
        subscription_id="I-SUB1",
        org_id="org-1",
        outcome="paid",
        payment_id="SALE1",
        amount_cents=499,
        currency="USD",
        occurred_at=AT,
    )


def test_sale_without_billing_agreement_is_only_recorded():
    event = only(pp.sale_completed("org-1", "SALE1", None))
    assert event == Recorded(
        provider="paypal",
        what="PAYMENT.SALE.COMPLETED",
        details={"sale_id": "SALE1", "org_id": "org-1"},
    )


def test_sale_reversed_builder_opens_a_chargeback():
    payload = pp.sale_reversed("org-1", "SALE1", "I-SUB1", at=AT)
    assert only(payload) == ChargebackOpened(
        provider="paypal",
        payment_id="SALE1",
        org_id="org-1",
        subscription_id="I-SUB1",
        occurred_at=AT,
    )


def test_sale_reversed_names_the_sale_by_sale_id_when_refund_shaped():
    payload = pp.sale_reversed(None, "REVERSAL1")
    payload["resource"]["sale_id"] = "SALE1"
    event = only(payload)
    assert (event.payment_id, event.org_id, event.subscription_id) == ("SALE1", None, None)


def test_sale_refunded_builder_is_only_recorded():
    payload = pp.sale_refunded("SALE1", "REF1", "4.99", org_id="org-1")
    assert only(payload) == Recorded(
        provider="paypal",
        what="PAYMENT.SALE.REFUNDED",
        details={"refund_id": "REF1", "sale_id": "SALE1", "org_id": "org-1"},
    )


# --- Disputes ----------------------------------------------------------------------------


def test_dispute_created_builder_names_every_disputed_transaction():
    payload = pp.dispute_created(
        "PP-D-1", "CAP1", "10.00", buyer_transaction_id="BUYER1", org_id="org-1", at=AT
    )
    assert only(payload) == DisputeOpened(
        provider="paypal",
        dispute_id="PP-D-1",
        payment_ids=("CAP1", "BUYER1"),
        org_id="org-1",
        occurred_at=AT,
    )


def test_dispute_over_several_transactions_keeps_each_id_once():
    payload = pp.dispute_created("PP-D-1", "CAP1")
    payload["resource"]["disputed_transactions"] += [
        {"seller_transaction_id": "CAP2", "buyer_transaction_id": "CAP1"},
        {"reference_id": "PARTNER-REF"},
    ]
    assert only(payload).payment_ids == ("CAP1", "CAP2")


def test_dispute_naming_two_organizations_names_none():
    payload = pp.dispute_created("PP-D-1", "CAP1", org_id="org-1")
    payload["resource"]["disputed_transactions"].append(
        {"seller_transaction_id": "CAP2", "custom": "org-2"}
    )
    assert only(payload).org_id is None


def test_dispute_lost_claws_back_the_disputed_amount():
    payload = pp.dispute_resolved("PP-D-1", "CAP1", value="7.25", org_id="org-1", at=AT)
    assert only(payload) == DisputeClosed(
        provider="paypal",
        dispute_id="PP-D-1",
        payment_ids=("CAP1",),
        org_id="org-1",
        lost=True,
        amount_cents=725,
        currency="USD",
        occurred_at=AT,
        loss_arrives_separately=True,  # as PAYMENT.CAPTURE.REVERSED
    )


def test_dispute_lost_prefers_the_amount_actually_refunded():
    payload = pp.dispute_resolved("PP-D-1", "CAP1", "ACCEPTED", "10.00", amount_refunded="4.00")
    event = only(payload)
    assert (event.lost, event.amount_cents, event.currency) == (True, 400, "USD")


@pytest.mark.parametrize(
    "outcome_code",
    ["RESOLVED_SELLER_FAVOUR", "CANCELED_BY_BUYER", "DENIED", "RESOLVED_WITH_PAYOUT", "NONE"],
)
def test_dispute_not_lost_moves_no_money(outcome_code):
    event = only(pp.dispute_resolved("PP-D-1", "CAP1", outcome_code))
    assert (event.lost, event.amount_cents, event.currency) == (False, None, None)


def test_dispute_resolved_without_outcome_is_not_lost():
    payload = pp.dispute_resolved("PP-D-1", "CAP1")
    del payload["resource"]["dispute_outcome"]
    assert only(payload).lost is False


# --- Builders themselves -----------------------------------------------------------------

EVERY_BUILDER = [
    lambda: pp.capture_completed("org-1", "CAP1"),
    lambda: pp.capture_event("PAYMENT.CAPTURE.PENDING", "org-1", "CAP1"),
    lambda: pp.capture_refunded("CAP1", "REF1", "1.00"),
    lambda: pp.capture_reversed("CAP1", "REF1", "1.00"),
    lambda: pp.subscription_event("BILLING.SUBSCRIPTION.ACTIVATED", "I-SUB1", "org-1"),
    lambda: pp.subscription_payment_failed("I-SUB1", "org-1"),
    lambda: pp.sale_completed("org-1", "SALE1", "I-SUB1"),
    lambda: pp.sale_refunded("SALE1", "REF1", "1.00"),
    lambda: pp.sale_reversed("org-1", "SALE1"),
    lambda: pp.dispute_created("PP-D-1", "CAP1"),
    lambda: pp.dispute_resolved("PP-D-1", "CAP1"),
    lambda: pp.unknown_event(),
]


@pytest.mark.parametrize("build", EVERY_BUILDER)
def test_every_builder_makes_a_fresh_paypal_shaped_event(build):
    first, second = build(), build()
    event_id, _event_type = event_meta(first)
    assert event_id.startswith("WH-") and event_id != second["id"]
    assert parse_time(first["create_time"]) is not None
    assert first["links"][0]["href"].endswith(f"/webhooks-events/{event_id}")
    assert isinstance(first["resource"], dict)
    normalize(first)  # well-formed for its type


def test_builder_reuses_a_given_event_id_for_a_redelivery():
    first = pp.capture_completed("org-1", "CAP1", event_id="WH-SAME")
    again = pp.capture_completed("org-1", "CAP1", event_id="WH-SAME")
    assert event_meta(first) == event_meta(again) == ("WH-SAME", "PAYMENT.CAPTURE.COMPLETED")


def test_builders_leave_the_published_samples_untouched():
    pp.capture_completed("org-1", "CAP1", value="1.00")["resource"]["amount"]["value"] = "999.00"
    assert only(pp.fixture("payment.capture.completed")).amount_cents == 5700


def test_capture_builder_refuses_an_event_type_that_is_not_about_a_capture():
    with pytest.raises(ValueError, match="not a capture event"):
        pp.capture_event("PAYMENT.CAPTURE.REFUNDED", "org-1", "CAP1")


def test_paypal_time_is_utc_with_z():
    assert pp.paypal_time(datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))) == (
        "2024-05-01T12:30:00Z"
    )


# --- Unknown types -----------------------------------------------------------------------


@pytest.mark.parametrize("resource", [{"id": "X"}, None, "not an object", []], ids=repr)
def test_unknown_event_type_is_ignored_whatever_its_resource(resource):
    payload = pp.unknown_event("CHECKOUT.ORDER.VOIDED")
    payload["resource"] = resource
    assert normalize(payload) == []


def test_event_type_is_matched_exactly():
    payload = pp.capture_completed("org-1", "CAP1")
    payload["event_type"] = "payment.capture.completed"
    assert normalize(payload) == []


# --- Malformed shapes --------------------------------------------------------------------

HANDLED_TYPES = [
    lambda: pp.capture_completed("org-1", "CAP1"),
    lambda: pp.capture_event("PAYMENT.CAPTURE.DENIED", "org-1", "CAP1"),
    lambda: pp.capture_refunded("CAP1", "REF1", "1.00"),
    lambda: pp.subscription_event("BILLING.SUBSCRIPTION.CANCELLED", "I-SUB1", "org-1"),
    lambda: pp.subscription_payment_failed("I-SUB1", "org-1"),
    lambda: pp.sale_completed("org-1", "SALE1", "I-SUB1"),
    lambda: pp.sale_refunded("SALE1", "REF1", "1.00"),
    lambda: pp.sale_reversed("org-1", "SALE1"),
    lambda: pp.dispute_created("PP-D-1", "CAP1"),
    lambda: pp.dispute_resolved("PP-D-1", "CAP1"),
]


@pytest.mark.parametrize("resource", [None, "CAP1", ["CAP1"], 5, "missing"], ids=repr)
@pytest.mark.parametrize("build", HANDLED_TYPES)
def test_handled_type_without_a_resource_object_is_malformed(build, resource):
    payload = build()
    if resource == "missing":
        del payload["resource"]
    else:
        payload["resource"] = resource
    with pytest.raises(MalformedEvent):
        normalize(payload)


def capture_with(amount) -> dict:
    payload = pp.capture_completed("org-1", "CAP1")
    payload["resource"]["amount"] = amount
    return payload


@pytest.mark.parametrize(
    "amount",
    [
        None,
        "57.00",
        {"currency_code": "USD"},  # no value
        {"value": "57.00"},  # no currency
        {"value": 57.0, "currency_code": "USD"},  # a float
        {"value": 57, "currency_code": "USD"},  # a number at all
        {"value": "57.001", "currency_code": "USD"},  # below a cent
        {"value": "12.5", "currency_code": "JPY"},  # below a yen
        {"value": "fifty", "currency_code": "USD"},
        {"value": "NaN", "currency_code": "USD"},
        {"value": "-57.00", "currency_code": "USD"},
        {"value": "0.00", "currency_code": "USD"},
        {"value": "57.00", "currency_code": "US"},
        {"value": "57.00", "currency_code": "US1"},
        {"value": "57.00", "currency_code": 840},
    ],
    ids=repr,
)
def test_capture_with_a_bad_amount_is_malformed(amount):
    with pytest.raises(MalformedEvent):
        normalize(capture_with(amount))


def test_missing_amount_is_malformed():
    payload = pp.capture_completed("org-1", "CAP1")
    del payload["resource"]["amount"]
    with pytest.raises(MalformedEvent):
        normalize(payload)


@pytest.mark.parametrize(
    ("build", "path", "value"),
    [
        (lambda: pp.capture_completed("org-1", "CAP1"), ("id",), None),
        (lambda: pp.capture_completed("org-1", "CAP1"), ("custom_id",), 42),
        (lambda: pp.capture_refunded("CAP1", "REF1", "1.00"), ("id",), ""),
        (lambda: pp.capture_refunded("CAP1", "REF1", "1.00"), ("amount", "value"), 1.0),
        (
            lambda: pp.capture_reversed("CAP1", "REF1", "1.00"),
            ("amount", "currency_code"),
            "dollars",
        ),
        (
            lambda: pp.subscription_event("BILLING.SUBSCRIPTION.ACTIVATED", "I-1", "o"),
            ("status",),
            None,
        ),
        (lambda: pp.subscription_event("BILLING.SUBSCRIPTION.ACTIVATED", "I-1", "o"), ("id",), 7),
        (lambda: pp.subscription_payment_failed("I-1", "o"), ("billing_info",), "x"),
        (
            lambda: pp.subscription_payment_failed("I-1", "o"),
            ("billing_info", "last_failed_payment"),
            [],
        ),
        (
            lambda: pp.subscription_payment_failed("I-1", "o"),
            ("billing_info", "last_failed_payment", "amount"),
            "5",
        ),
        (lambda: pp.sale_completed("o", "SALE1", "I-1"), ("amount", "total"), 4.99),
        (lambda: pp.sale_completed("o", "SALE1", "I-1"), ("amount", "currency"), None),
        (lambda: pp.sale_completed("o", "SALE1", "I-1"), ("billing_agreement_id",), ["I-1"]),
        (lambda: pp.sale_reversed("o", "SALE1"), ("id",), None),
        (lambda: pp.dispute_created("PP-D-1", "CAP1"), ("dispute_id",), None),
        (lambda: pp.dispute_created("PP-D-1", "CAP1"), ("disputed_transactions",), None),
        (lambda: pp.dispute_created("PP-D-1", "CAP1"), ("disputed_transactions",), []),
        (lambda: pp.dispute_created("PP-D-1", "CAP1"), ("disputed_transactions",), ["CAP1"]),
        (
            lambda: pp.dispute_created("PP-D-1", "CAP1"),
            ("disputed_transactions",),
            [{"seller": {}}],
        ),
        (
            lambda: pp.dispute_resolved("PP-D-1", "CAP1"),
            ("dispute_outcome",),
            "RESOLVED_BUYER_FAVOUR",
        ),
        (lambda: pp.dispute_resolved("PP-D-1", "CAP1"), ("dispute_amount",), None),
        (lambda: pp.dispute_resolved("PP-D-1", "CAP1"), ("dispute_amount", "value"), 10),
    ],
    ids=lambda x: ".".join(x) if isinstance(x, tuple) else None,
)
def test_field_of_the_wrong_shape_is_malformed(build, path, value):
    payload = build()
    target = payload["resource"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(MalformedEvent):
        normalize(payload)


def test_order_approved_names_the_order_and_its_custom_id():
    from core.providers.events import OrderApproved

    payload = pp.unknown_event("CHECKOUT.ORDER.APPROVED")
    payload["resource"] = {"id": "5O190127TN364715T", "status": "APPROVED",
                           "purchase_units": [{"custom_id": "org-1"}]}  # fmt: skip
    [event] = normalize(payload)
    assert isinstance(event, OrderApproved)
    assert (event.order_id, event.org_id) == ("5O190127TN364715T", "org-1")
