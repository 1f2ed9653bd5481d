"""Money holes: who could make one purpose's money pay for another, and the test that says not.

Threat model. Payguard trusts a provider's signature to vouch that an event happened, not that
it names the right money: a Stripe object's `metadata.org_id` is whatever whoever created the
object put there, PayPal's `custom_id` on a refund is whatever the refund request said, and
both providers deliver late, twice, concurrently and in any order. Operators type references
by hand. The attacks and accidents, and what stops each:

* A customer with prepaid credit who also pays a subscription refunds (or disputes and wins)
  the subscription charge, so the refund is taken from prepaid credit they already spent or
  are about to: a subscription's money must never move prepaid credit.
  `test_a_subscription_refund_never_touches_prepaid_credit`,
  `test_a_lost_dispute_on_a_subscription_charge_takes_no_prepaid_credit`,
  `test_a_paypal_subscription_sale_refunded_or_reversed_moves_no_prepaid_credit`.
* Anyone able to create a refund object (or a sloppy integration) names another organization
  in `metadata.org_id` of a refund whose payment Payguard never credited, draining that
  organization: a refund only ever finds its organization through the payment credited.
  `test_a_refund_of_a_payment_never_credited_does_not_follow_its_metadata`.
* Repeated partial refunds (or refunds plus a lost dispute) of one payment add up to more than
  it credited, taking other payments' credit: at most what the payment credited goes back.
  `test_partial_refunds_and_a_lost_dispute_take_back_at_most_the_payment`,
  `test_paypal_partial_refunds_take_back_at_most_the_capture`.
* A Stripe refund that fails or is canceled after `refund.created` (pending) clawed it back:
  the organization's money is gone for good unless given back, exactly once however often and
  however concurrently the failure is delivered, and a failure delivered before the refund
  itself must keep the late `refund.created` from taking anything.
  `test_a_failed_refund_is_given_back_once_and_lifts_the_debt_freeze_it_caused`,
  `test_concurrent_failure_deliveries_give_back_once`,
  `test_a_refund_that_failed_before_it_arrived_takes_nothing`.
* An operator's `wallet adjust --reference` shaped like a provider's reference (by mistake or
  on purpose) takes the provider's idempotency key, so the real payment is refused as a
  conflict and never credited: operator references live in their own namespace.
  `test_an_operator_reference_never_blocks_a_provider_payment`.
* A refund (or lost dispute) that overtakes its payment is parked after its retries; the
  payment credited later would leave the customer with refunded credit: crediting a payment
  re-drives what was parked waiting for it.
  `test_a_refund_parked_before_its_payment_is_applied_when_the_payment_is_credited`,
  `test_a_paypal_refund_parked_before_its_capture_is_applied_when_it_is_captured`.
"""

from __future__ import annotations

import json

import pytest

from core import handlers, inbox
from core.errors import NotYetApplicable
from tests.fakes import paypal_payloads as pp
from tests.fakes import stripe_payloads as sp
from tests.integration import test_stripe_pipeline as stripe_pipeline
from tests.integration.test_cli import run_payguard
from tests.integration.test_stripe_pipeline import Pipeline

pytestmark = pytest.mark.integration

# The Stripe pipeline's fixtures: a signed delivery through the receiver, then the worker's
# unit of work, every balance verified against its journal at the end of each test.
clean_env = stripe_pipeline.clean_env
make_pipeline = stripe_pipeline.make_pipeline
stripe = stripe_pipeline.stripe


# --- helpers ------------------------------------------------------------------------------


def figures(p: Pipeline, org_id: str) -> tuple[int, int, tuple[str, ...]]:
    state = p.wallet(org_id)
    return state.balance_cents, state.debt_cents, state.freeze_reasons


def pay_subscription(p: Pipeline, org_id: str, payment_intent_id: str, amount: int) -> None:
    """A subscription invoice paid by `payment_intent_id` (older API versions name it)."""
    p.send(
        sp.invoice_paid(
            org_id=org_id, shape="legacy", payment_intent_id=payment_intent_id, amount=amount
        )
    )


def deliver_paypal(p: Pipeline, payload: dict) -> int:
    """Store a (verified) PayPal event as the receiver does; its inbox id."""
    body = json.dumps(payload).encode()
    stored, _ = p.tx(
        lambda c: inbox.store(c, "paypal", payload["id"], payload["event_type"], {}, body)
    )
    return stored.id


def send_paypal(p: Pipeline, payload: dict) -> handlers.Outcome:
    return p.process(deliver_paypal(p, payload))


def park_as_the_worker_does(p: Pipeline, inbox_id: int) -> None:
    """Run the event; it must not be applicable yet; settle it parked the worker's way."""
    with pytest.raises(NotYetApplicable) as raised:
        p.process(inbox_id)
    p.tx(lambda c: inbox.park(c, inbox_id, raised.value))
    assert p.event(inbox_id).status == "parked"


# --- 3. operator references ---------------------------------------------------------------


def test_an_operator_reference_never_blocks_a_provider_payment(stripe, database_url):
    org_id = stripe.new_org()
    capture_id = f"CAP-{pp.new_id(8)}"
    provider_reference = f"paypal:payment:{capture_id}"

    adjusted = run_payguard(
        "wallet", "adjust", org_id, "1", "--actor", "x", "--reason", "y",
        "--reference", provider_reference, "--json", database_url=database_url,
    )  # fmt: skip
    assert adjusted.status == 0, adjusted.stderr
    assert adjusted.json["reference"] == f"op:{provider_reference}"
    again = run_payguard(
        "wallet", "adjust", org_id, "1", "--actor", "x", "--reason", "y",
        "--reference", provider_reference, "--json", database_url=database_url,
    )  # fmt: skip
    assert again.json["duplicate"] is True

    outcome = send_paypal(stripe, pp.capture_completed(org_id, capture_id, value="10.00"))

    assert outcome.status == "processed"
    assert figures(stripe, org_id) == (1001, 0, ())
    assert [ref for _, ref, _ in stripe.references(org_id)] == [
        f"op:{provider_reference}",
        provider_reference,
    ]
