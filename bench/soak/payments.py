"""The plan's provider actions: PayPal and Stripe payments, refunds (some before their
payment), duplicates, disputes and out-of-order subscription changes."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from bench.soak.common import (
    dollars,
)
from bench.soak.model import Payment, Subscription
from tests.support.payloads import paypal as pp
from tests.support.payloads import stripe as sp


class PaymentActions:
    """Mixed into Plan: each action builds deliveries and records what it expects."""

    def _paypal_capture(self, delay: float = 0.0, org: str | None = None) -> Payment:
        org = org or self.org()
        cents, capture_id = self.amount(org), self.pp_id()
        payload = pp.capture_completed(
            org, capture_id, value=dollars(cents), event_id=self.pp_event_id()
        )
        effect = ("journal", org, f"paypal:payment:{capture_id}", cents)
        self.send(self._delivery("paypal capture", "paypal", payload, (effect,)), delay)
        payment = Payment("paypal", capture_id, org, cents, cents)
        self.payments.append(payment)
        return payment

    def _stripe_payment(self, delay: float = 0.0, org: str | None = None) -> Payment:
        org = org or self.org()
        cents, intent_id = self.amount(org), self.stripe_id("pi")
        effect = (("journal", org, f"stripe:payment:{intent_id}", cents),)
        session = sp.checkout_session_completed(
            event_id=self.stripe_id("evt"),
            org_id=org,
            payment_intent_id=intent_id,
            amount=cents,
            session_id=self.stripe_id("cs_test"),
        )
        named = self.rng.random() < 0.5
        intent = sp.payment_intent_succeeded(
            event_id=self.stripe_id("evt"),
            org_id=org if named else None,
            payment_intent_id=intent_id,
            amount=cents,
        )
        first, second = (session, intent) if self.rng.random() < 0.5 else (intent, session)
        for payload, extra in ((first, 0.0), (second, self.rng.uniform(0, 1.5))):
            kind = "stripe checkout.session" if payload is session else "stripe payment_intent"
            if payload is intent and not named:
                kind += " (no org)"
            self.send(self._delivery(kind, "stripe", payload, effect), delay + extra)
        payment = Payment("stripe", intent_id, org, cents, cents, charge_id=self.stripe_id("ch"))
        self.payments.append(payment)
        return payment

    def _duplicate(self) -> None:
        with self.lock:
            earlier = self.rng.choice(self.posted) if self.posted else None
        if earlier is None:
            return self._paypal_capture()
        resign = earlier.provider == "paypal" and self.rng.random() < 0.5
        label = "duplicate (re-signed)" if resign else "duplicate (same bytes)"
        self.timeline.at(time.monotonic(), lambda: self.post(earlier, label, resign=resign))

    def _paypal_refund(self, payment: Payment | None = None, delay: float = 0.0) -> None:
        payment = payment or self.refundable("paypal")
        if payment is None:
            self._paypal_capture()
            return
        cents, refund_id = self.refund_amount(payment), self.pp_id()
        payment.remaining -= cents
        payload = pp.capture_refunded(
            payment.payment_id, refund_id, dollars(cents), event_id=self.pp_event_id()
        )
        effect = ("journal", payment.org, f"paypal:refund:{refund_id}", cents)
        self.send(self._delivery("paypal refund", "paypal", payload, (effect,)), delay)

    def _stripe_refund(self, payment: Payment | None = None, delay: float = 0.0) -> None:
        payment = payment or self.refundable("stripe")
        if payment is None:
            self._stripe_payment()
            return
        cents, refund_id = self.refund_amount(payment), self.stripe_id("re")
        payment.remaining -= cents
        payment.refunds.append((refund_id, cents))
        named = self.rng.random() < 0.5
        payload = sp.refund_created(
            event_id=self.stripe_id("evt"),
            refund_id=refund_id,
            amount=cents,
            payment_intent_id=payment.payment_id,
            charge_id=payment.charge_id,
            org_id=payment.org if named else None,
        )
        effect = ("journal", payment.org, f"stripe:refund:{refund_id}", cents)
        kind = "stripe refund.created" + ("" if named else " (no org)")
        self.send(self._delivery(kind, "stripe", payload, (effect,)), delay)
        if self.rng.random() < 0.4:
            # The same refund again, with every earlier one, inside charge.refunded.
            listed = [
                sp.refund(
                    refund_id=rid,
                    amount=amt,
                    payment_intent_id=payment.payment_id,
                    charge_id=payment.charge_id,
                )
                for rid, amt in payment.refunds
            ]
            charge = sp.charge_refunded(
                payment_intent_id=payment.payment_id,
                charge_id=payment.charge_id,
                amount=payment.amount,
                refunds=listed,
                event_id=self.stripe_id("evt"),
            )
            effects = tuple(
                ("journal", payment.org, f"stripe:refund:{rid}", amt)
                for rid, amt in payment.refunds
            )
            extra = delay + self.rng.uniform(0, 2)
            self.send(self._delivery("stripe charge.refunded", "stripe", charge, effects), extra)

    def _refund_first(self) -> None:
        """A refund delivered before the payment it refunds (which follows 0.5-4 s later)."""
        later = self.rng.uniform(0.5, 4.0)
        if self.rng.random() < 0.5:
            self.refund_first["paypal"] += 1
            self._paypal_refund(self._paypal_capture(delay=later))
        else:
            self.refund_first["stripe"] += 1
            self._stripe_refund(self._stripe_payment(delay=later))

    def _dispute(self) -> None:
        provider = self.rng.choice(("paypal", "stripe"))
        payment = self.refundable(provider)
        if payment is None:
            self._paypal_capture()
            return
        payment.disputed = True
        cents = self.refund_amount(payment)
        lost = self.rng.random() < 0.5
        if provider == "paypal":
            dispute_id = f"PP-D-{self.rng.randint(10**8, 10**9 - 1)}"
            org_hint = payment.org if self.rng.random() < 0.5 else None
            opened = pp.dispute_created(
                dispute_id,
                payment.payment_id,
                dollars(cents),
                org_id=org_hint,
                event_id=self.pp_event_id(),
            )
            outcome = "RESOLVED_BUYER_FAVOUR" if lost else "RESOLVED_SELLER_FAVOUR"
            closed = pp.dispute_resolved(
                dispute_id,
                payment.payment_id,
                outcome,
                dollars(cents),
                org_id=org_hint,
                event_id=self.pp_event_id(),
            )
            closed_effects: tuple = ()
        else:
            dispute_id = self.stripe_id("dp")
            ids = {"payment_intent_id": payment.payment_id, "charge_id": payment.charge_id}
            opened = sp.charge_dispute_created(
                event_id=self.stripe_id("evt"), dispute_id=dispute_id, amount=cents, **ids
            )
            closed = sp.charge_dispute_closed(
                event_id=self.stripe_id("evt"),
                dispute_id=dispute_id,
                amount=cents,
                status="lost" if lost else "won",
                **ids,
            )
            closed_effects = (
                (("journal", payment.org, f"stripe:dispute:{dispute_id}", cents),) if lost else ()
            )
        gap = self.rng.uniform(1, 5)
        closed_first = self.rng.random() < 0.25
        suffix = " (before its opening)" if closed_first else ""
        self.send(
            self._delivery(f"{provider} dispute opened", provider, opened, ()),
            gap if closed_first else 0.0,
        )
        self.send(
            self._delivery(f"{provider} dispute closed{suffix}", provider, closed, closed_effects),
            0.0 if closed_first else gap,
        )
        if lost:
            payment.remaining -= cents
            if provider == "paypal":
                # PayPal takes a lost dispute's money back as its own event.
                reversal_id = self.pp_id()
                reversed_ = pp.capture_reversed(
                    payment.payment_id, reversal_id, dollars(cents), event_id=self.pp_event_id()
                )
                effect = ("journal", payment.org, f"paypal:refund:{reversal_id}", cents)
                self.send(
                    self._delivery("paypal capture reversed", "paypal", reversed_, (effect,)),
                    gap + self.rng.uniform(0, 1),
                )

    def _subscription(self) -> None:
        org = self.org()
        provider = self.rng.choice(("paypal", "stripe"))
        sub = self.subscriptions.get((org, provider))
        if sub is None:
            sub_id = f"I-{self.pp_id()[:12]}" if provider == "paypal" else self.stripe_id("sub")
            sub = self.subscriptions[(org, provider)] = Subscription(sub_id, self.sub_clock)
        if sub.ended:
            return self._paypal_capture(org=org)
        count = self.rng.choice((2, 3))
        final = self.rng.choices(("active", "paused", "ended"), weights=(70, 18, 12))[0]
        states = [self.rng.choice(("active", "paused")) for _ in range(count - 1)] + [final]
        sub.ended = final == "ended"
        events = []
        for state in states:
            sub.last_at = max(sub.last_at, self.sub_clock) + self.rng.randint(2, 20)
            self.sub_clock = sub.last_at
            events.append((state, sub.last_at))
        self.rng.shuffle(events)  # delivered in any order; the provider's time decides
        for state, at in events:
            payload, status = self._subscription_event(provider, sub.sub_id, org, state, at)
            effect = ("subscription", provider, sub.sub_id, status, at)
            kind = f"{provider} subscription {status}"
            self.send(self._delivery(kind, provider, payload, (effect,)), self.rng.uniform(0, 2))

    def _subscription_event(
        self, provider: str, sub_id: str, org: str, state: str, at: int
    ) -> tuple[dict, str]:
        when = datetime.fromtimestamp(at, UTC)
        if provider == "paypal":
            event_type, status = {
                "active": ("BILLING.SUBSCRIPTION.ACTIVATED", "active"),
                "paused": ("BILLING.SUBSCRIPTION.SUSPENDED", "suspended"),
                "ended": ("BILLING.SUBSCRIPTION.CANCELLED", "cancelled"),
            }[state]
            payload = pp.subscription_event(
                event_type, sub_id, org, update_time=when, event_id=self.pp_event_id()
            )
            return payload, status
        common = {"event_id": self.stripe_id("evt"), "created": at}
        if state == "ended":
            payload = sp.customer_subscription_deleted(subscription_id=sub_id, org_id=org, **common)
            return payload, "canceled"
        status = "active" if state == "active" else "unpaid"
        payload = sp.customer_subscription_updated(
            subscription_id=sub_id, org_id=org, status=status, previous_status=None, **common
        )
        return payload, status
