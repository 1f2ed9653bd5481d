"""Stripe webhook verification: signature under rotation, freshness both ways, body shape."""

from __future__ import annotations

import json

import pytest
import stripe

from core.providers.stripe.verify import InvalidStripeWebhook, verify_stripe
from tests.support.payloads import stripe as sp

NOW = 1_760_000_000
SECRETS = [sp.TEST_SECRET]

EVERY_HANDLED_ROW = [
    sp.checkout_session_completed,
    sp.checkout_session_async_payment_succeeded,
    sp.payment_intent_succeeded,
    sp.charge_refunded,
    sp.refund_created,
    sp.charge_dispute_created,
    sp.charge_dispute_closed,
    sp.customer_subscription_created,
    sp.customer_subscription_updated,
    sp.customer_subscription_deleted,
    sp.invoice_paid,
    sp.invoice_payment_failed,
]


def refused(cause: str, body: bytes, header: str | None, secrets=SECRETS, **kw) -> None:
    with pytest.raises(InvalidStripeWebhook) as caught:
        verify_stripe(body, header, secrets, now=kw.pop("now", NOW), **kw)
    assert caught.value.cause == cause


@pytest.mark.parametrize("build", EVERY_HANDLED_ROW, ids=lambda b: b.__name__)
def test_signed_event_of_every_handled_type_is_returned_parsed(build):
    event = build(created=NOW)
    body, header = sp.signed(event, timestamp=NOW)

    assert verify_stripe(body, header, SECRETS, now=NOW) == event


def test_real_clock_is_used_when_none_is_injected():
    body, header = sp.signed(sp.payment_intent_succeeded())

    assert verify_stripe(body, header, SECRETS)["type"] == "payment_intent.succeeded"


def test_header_made_by_the_stripe_library_is_accepted():
    body = sp.encode(sp.refund_created())
    header = stripe.WebhookSignature.generate_signature_header(
        body.decode(), sp.TEST_SECRET, timestamp=NOW
    )

    assert verify_stripe(body, header, SECRETS, now=NOW)["type"] == "refund.created"


@pytest.mark.parametrize("signing_secret", [sp.TEST_SECRET, sp.ROTATED_SECRET])
def test_any_configured_secret_is_accepted_during_rotation(signing_secret):
    body, header = sp.signed(sp.invoice_paid(), secret=signing_secret, timestamp=NOW)

    verify_stripe(body, header, [sp.TEST_SECRET, sp.ROTATED_SECRET], now=NOW)


def test_blank_entries_in_the_secret_list_are_skipped():
    body, header = sp.signed(sp.invoice_paid(), secret=sp.ROTATED_SECRET, timestamp=NOW)

    verify_stripe(body, header, ["", "  ", sp.ROTATED_SECRET], now=NOW)


def test_wrong_secret_is_refused():
    body, header = sp.signed(sp.invoice_paid(), secret="whsec_someone_else", timestamp=NOW)

    refused("signature", body, header, secrets=[sp.TEST_SECRET, sp.ROTATED_SECRET])


def test_tampered_body_is_refused():
    body, header = sp.signed(sp.payment_intent_succeeded(amount=100), timestamp=NOW)
    tampered = body.replace(b'"amount": 100', b'"amount": 100000')
    assert tampered != body

    refused("signature", tampered, header)


def test_signature_over_another_timestamp_is_refused():
    body, header = sp.signed(sp.invoice_paid(), timestamp=NOW)
    signature = header.split(",v1=")[1]

    refused("signature", body, f"t={NOW + 1},v1={signature}")


def test_several_v1_values_are_accepted_when_one_matches():
    body, header = sp.signed(sp.invoice_paid(), timestamp=NOW)
    good = header.split(",v1=")[1]
    other = sp.stripe_signature_header(body, "whsec_old", NOW).split(",v1=")[1]

    verify_stripe(
        body, f"t={NOW},v1={other},v1={'0' * 64},v1={good},v0={'f' * 64}", SECRETS, now=NOW
    )


def test_several_v1_values_none_matching_is_refused():
    body, _ = sp.signed(sp.invoice_paid(), timestamp=NOW)

    refused("signature", body, f"t={NOW},v1={'0' * 64},v1={'1' * 64}")


@pytest.mark.parametrize("age", [301, 3600, NOW])
def test_stale_timestamp_is_refused(age):
    body, header = sp.signed(sp.invoice_paid(), timestamp=NOW - age)

    refused("timestamp", body, header)


@pytest.mark.parametrize("ahead", [301, 3600])
def test_future_timestamp_is_refused(ahead):
    body, header = sp.signed(sp.invoice_paid(), timestamp=NOW + ahead)

    refused("timestamp", body, header)


@pytest.mark.parametrize("skew", [-300, -5, 0, 5, 300])
def test_timestamp_within_tolerance_either_way_is_accepted(skew):
    body, header = sp.signed(sp.invoice_paid(), timestamp=NOW + skew)

    verify_stripe(body, header, SECRETS, now=NOW)


def test_tolerance_is_configurable():
    body, header = sp.signed(sp.invoice_paid(), timestamp=NOW - 61)

    refused("timestamp", body, header, tolerance=60)
    verify_stripe(body, header, SECRETS, now=NOW, tolerance=120)


def test_signature_is_checked_before_freshness():
    body, header = sp.signed(sp.invoice_paid(), secret="whsec_forger", timestamp=NOW - 10_000)

    refused("signature", body, header)


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header_is_refused(header):
    body, _ = sp.signed(sp.invoice_paid(), timestamp=NOW)

    refused("headers", body, header)


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "t=,v1=abc",
        f"t=abc,v1={'0' * 64}",
        f"t=-{NOW},v1={'0' * 64}",
        f"t=1.5,v1={'0' * 64}",
        f"v1={'0' * 64}",
        f"t={NOW}",
        f"t={NOW},v0={'0' * 64}",
        f"t={NOW},t={NOW},v1={'0' * 64}",
        f"t={NOW},v1",
        f"t=\u0661\u0662,v1={'0' * 64}",
    ],
)
def test_garbled_header_is_refused(header):
    body, _ = sp.signed(sp.invoice_paid(), timestamp=NOW)

    refused("headers", body, header)


def _signed_body(body: bytes) -> tuple[bytes, str]:
    return body, sp.stripe_signature_header(body, sp.TEST_SECRET, NOW)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b'{"id": "evt_1", "type": "invoice.paid"',
        b"[1, 2]",
        b'"evt_1"',
        b'{"id": "evt_1", "type": "invoice.paid", "amount": NaN}',
        json.dumps({"type": "invoice.paid"}).encode(),
        json.dumps({"id": "in_123", "type": "invoice.paid"}).encode(),
        json.dumps({"id": "evt_", "type": "invoice.paid"}).encode(),
        json.dumps({"id": 7, "type": "invoice.paid"}).encode(),
        json.dumps({"id": "evt_1"}).encode(),
        json.dumps({"id": "evt_1", "type": ""}).encode(),
        json.dumps({"id": "evt_1", "type": "v1.x", "object": "v2.core.event"}).encode(),
        b"[" * 100_000,
    ],
    ids=lambda b: b[:40].decode(errors="replace"),
)
def test_signed_body_that_is_not_a_stripe_event_is_refused(body):
    refused("payload", *_signed_body(body))


def test_body_that_is_not_utf8_is_refused():
    refused("payload", *_signed_body(b'{"id": "evt_\xff"}'))


@pytest.mark.parametrize("secrets", [[], [""], ["  "]])
def test_no_configured_secret_is_a_configuration_error(secrets):
    body, header = sp.signed(sp.invoice_paid(), timestamp=NOW)

    with pytest.raises(ValueError, match="secret"):
        verify_stripe(body, header, secrets, now=NOW)


def test_error_names_its_cause():
    error = InvalidStripeWebhook("timestamp", "signed 900s ago")

    assert error.cause == "timestamp"
    assert "900s" in str(error)
    with pytest.raises(ValueError, match="unknown cause"):
        InvalidStripeWebhook("other", "x")
