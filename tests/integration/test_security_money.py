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
  `test_a_paypal_refund_parked_before_its_capture_is_applied_when_it_is_captured`,
  and if the payment lands between the worker's last try and its parking:
  `test_a_refund_whose_payment_arrived_while_it_was_being_parked_is_queued_again`.
"""

from __future__ import annotations

import json
import threading

import pytest

from core import handlers, inbox, wallet
from core.errors import NotYetApplicable
from tests.integration import test_stripe_pipeline as stripe_pipeline
from tests.integration.test_cli import run_payguard
from tests.integration.test_stripe_pipeline import Pipeline, pay
from tests.support.payloads import paypal as pp
from tests.support.payloads import stripe as sp

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


# --- 1. purposes --------------------------------------------------------------------------


def test_a_subscription_refund_never_touches_prepaid_credit(stripe):
    org_id = stripe.new_org()
    pay(stripe, org_id, 1000)
    pay_subscription(stripe, org_id, "pi_S", 2000)

    outcome = stripe.send(sp.refund_created(payment_intent_id="pi_S", amount=2000))

    assert outcome.status == "processed"
    assert figures(stripe, org_id) == (1000, 0, ())
    assert [kind for kind, _, _ in stripe.references(org_id)] == ["credit"]


def test_a_refund_of_a_payment_never_credited_does_not_follow_its_metadata(stripe):
    org_id = stripe.new_org()
    pay(stripe, org_id, 1000)
    refund = stripe.deliver(
        sp.refund_created(payment_intent_id=sp.new_id("pi"), amount=500, org_id=org_id)
    )

    with pytest.raises(NotYetApplicable):
        stripe.process(refund)

    assert figures(stripe, org_id) == (1000, 0, ())


def test_a_lost_dispute_on_a_subscription_charge_takes_no_prepaid_credit(stripe):
    org_id = stripe.new_org()
    pay(stripe, org_id, 1000)
    pay_subscription(stripe, org_id, "pi_SD", 2000)

    stripe.send(sp.charge_dispute_created(dispute_id="dp_sub", payment_intent_id="pi_SD"))
    stripe.send(
        sp.charge_dispute_closed(dispute_id="dp_sub", payment_intent_id="pi_SD", amount=2000)
    )

    assert figures(stripe, org_id) == (1000, 0, ())
    assert [kind for kind, _, _ in stripe.references(org_id)] == ["credit"]


def test_partial_refunds_and_a_lost_dispute_take_back_at_most_the_payment(stripe):
    org_id = stripe.new_org()
    small = pay(stripe, org_id, 1000)
    pay(stripe, org_id, 5000)

    stripe.send(sp.refund_created(refund_id="re_p1", payment_intent_id=small, amount=600))
    stripe.send(sp.refund_created(refund_id="re_p2", payment_intent_id=small, amount=600))
    stripe.send(sp.charge_dispute_closed(dispute_id="dp_p", payment_intent_id=small, amount=1000))

    assert figures(stripe, org_id) == (5000, 0, ())
    assert stripe.references(org_id)[2:] == [
        ("refund", "stripe:refund:re_p1", -600),
        ("refund", "stripe:refund:re_p2", -400),
        ("dispute_lost", "stripe:dispute:dp_p", 0),
    ]


def test_a_paypal_subscription_sale_refunded_or_reversed_moves_no_prepaid_credit(stripe):
    org_id = stripe.new_org()
    send_paypal(stripe, pp.capture_completed(org_id, pp.new_id(), value="10.00"))
    sale_id, sub_id = pp.new_id(), f"I-{pp.new_id(12)}"
    send_paypal(stripe, pp.sale_completed(org_id, sale_id, sub_id, value="20.00"))

    send_paypal(stripe, pp.sale_refunded(sale_id, pp.new_id(), "20.00", org_id=org_id))
    # The same sale named as if it were a capture: still subscription money.
    send_paypal(stripe, pp.capture_refunded(sale_id, pp.new_id(), "20.00", org_id=org_id))
    send_paypal(stripe, pp.capture_reversed(sale_id, pp.new_id(), "20.00", org_id=org_id))

    balance, debt, _ = figures(stripe, org_id)
    assert (balance, debt) == (1000, 0)
    assert [kind for kind, _, _ in stripe.references(org_id)] == ["credit"]


def test_paypal_partial_refunds_take_back_at_most_the_capture(stripe):
    org_id = stripe.new_org()
    capture_id = pp.new_id()
    send_paypal(stripe, pp.capture_completed(org_id, capture_id, value="10.00"))
    send_paypal(stripe, pp.capture_completed(org_id, pp.new_id(), value="50.00"))

    send_paypal(stripe, pp.capture_refunded(capture_id, pp.new_id(), "6.00"))
    send_paypal(stripe, pp.capture_refunded(capture_id, pp.new_id(), "6.00"))

    assert figures(stripe, org_id) == (5000, 0, ())


# --- 2. failed refunds --------------------------------------------------------------------


def _refund_pending_into_debt(stripe: Pipeline, refund_id: str) -> tuple[str, str]:
    """1000 paid, 800 spent, a pending refund of 400 taken back: 200 taken, 200 owed."""
    org_id = stripe.new_org()
    pi = pay(stripe, org_id, 1000)
    stripe.tx(lambda c: wallet.debit(c, org_id, 800, f"spent-{refund_id}"))
    stripe.send(
        sp.refund_created(refund_id=refund_id, payment_intent_id=pi, amount=400, status="pending")
    )
    assert figures(stripe, org_id) == (0, 200, ("debt",))
    return org_id, pi


@pytest.mark.parametrize(
    ("build", "status"),
    [(sp.refund_updated, "failed"), (sp.refund_failed, "failed"), (sp.refund_updated, "canceled")],
)
def test_a_failed_refund_is_given_back_once_and_lifts_the_debt_freeze_it_caused(
    stripe, build, status
):
    org_id, pi = _refund_pending_into_debt(stripe, "re_fail")
    failed = build(refund_id="re_fail", payment_intent_id=pi, amount=400, status=status)

    stripe.send(failed)
    assert stripe.post(failed).get_json()["status"] == "duplicate"
    # Stripe sends both refund.updated and refund.failed for one failure.
    stripe.send(
        sp.refund_failed(refund_id="re_fail", payment_intent_id=pi, amount=400, status=status)
    )

    assert figures(stripe, org_id) == (200, 0, ())
    assert stripe.references(org_id)[2:] == [
        ("refund", "stripe:refund:re_fail", -200),
        ("refund_reversal", "stripe:refund:re_fail:reversed", 200),
    ]
    # Given back means it may be refunded again in full later.
    stripe.send(sp.refund_created(refund_id="re_again", payment_intent_id=pi, amount=1000))
    assert figures(stripe, org_id) == (0, 800, ("debt",))


def test_concurrent_failure_deliveries_give_back_once(stripe):
    org_id, pi = _refund_pending_into_debt(stripe, "re_race")
    inbox_ids = [
        stripe.deliver(
            sp.refund_updated(
                refund_id="re_race", payment_intent_id=pi, amount=400, status="failed"
            )
        )
        for _ in range(4)
    ]
    barrier = threading.Barrier(len(inbox_ids))
    errors: list[BaseException] = []

    def run(inbox_id: int) -> None:
        barrier.wait()
        try:
            stripe.process(inbox_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in inbox_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert figures(stripe, org_id) == (200, 0, ())
    assert [kind for kind, _, _ in stripe.references(org_id)].count("refund_reversal") == 1


def test_a_refund_that_failed_before_it_arrived_takes_nothing(stripe):
    org_id = stripe.new_org()
    pi = pay(stripe, org_id, 1000)

    stripe.send(sp.refund_failed(refund_id="re_late", payment_intent_id=pi, amount=400))
    stripe.send(
        sp.refund_created(refund_id="re_late", payment_intent_id=pi, amount=400, status="pending")
    )

    assert figures(stripe, org_id) == (1000, 0, ())
    assert [kind for kind, _, _ in stripe.references(org_id)] == ["credit"]


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


# --- 4. refunds before their payment ------------------------------------------------------


def test_a_refund_parked_before_its_payment_is_applied_when_the_payment_is_credited(stripe):
    org_id = stripe.new_org()
    refund = stripe.deliver(
        sp.refund_created(refund_id="re_first", payment_intent_id="pi_after", amount=2000)
    )
    dispute = stripe.deliver(
        sp.charge_dispute_created(dispute_id="dp_first", payment_intent_id="pi_after")
    )
    park_as_the_worker_does(stripe, refund)
    park_as_the_worker_does(stripe, dispute)

    pay(stripe, org_id, 5000, payment_intent_id="pi_after")

    # Back in the inbox's hands: `received`, with an outbox row for the relay to publish.
    assert stripe.event(refund).status == stripe.event(dispute).status == "received"
    queued = stripe.rows("SELECT args FROM outbox WHERE task = 'payguard.process_event'")
    assert [refund] in [row.args for row in queued] and [dispute] in [row.args for row in queued]
    assert stripe.process(refund).status == "processed"
    assert stripe.process(dispute).status == "processed"
    assert figures(stripe, org_id) == (3000, 0, ("dispute:dp_first",))
    assert stripe.references(org_id) == [
        ("credit", "stripe:payment:pi_after", 5000),
        ("refund", "stripe:refund:re_first", -2000),
    ]


def test_a_paypal_refund_parked_before_its_capture_is_applied_when_it_is_captured(stripe):
    org_id = stripe.new_org()
    capture_id = pp.new_id()
    refund = deliver_paypal(stripe, pp.capture_refunded(capture_id, pp.new_id(), "4.00"))
    park_as_the_worker_does(stripe, refund)

    send_paypal(stripe, pp.capture_completed(org_id, capture_id, value="10.00"))

    assert stripe.event(refund).status == "received"
    assert stripe.process(refund).status == "processed"
    assert figures(stripe, org_id) == (600, 0, ())


def test_a_refund_whose_payment_arrived_while_it_was_being_parked_is_queued_again(stripe):
    org_id = stripe.new_org()
    refund = stripe.deliver(
        sp.refund_created(refund_id="re_between", payment_intent_id="pi_between", amount=700)
    )
    with pytest.raises(NotYetApplicable) as last_try:
        stripe.process(refund)

    pay(stripe, org_id, 5000, payment_intent_id="pi_between")  # its re-drive finds nothing
    parked = stripe.tx(lambda c: inbox.park(c, refund, last_try.value))

    assert parked is False
    assert stripe.event(refund).status == "received"
    assert stripe.process(refund).status == "processed"
    assert figures(stripe, org_id) == (4300, 0, ())
