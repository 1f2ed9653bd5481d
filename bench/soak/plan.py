"""The seeded plan: what the load sends, in which order, and what it expects to
have moved."""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import random
import string
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar
from urllib.parse import urlencode

from bench.soak.common import (
    CALLBACK_PATH,
    MAX_ATTEMPTS,
    STRIPE_SECRET,
    TWILIO_TOKEN,
    WEBHOOK_ID,
    Stats,
    dollars,
)
from core import inbox, messages, sending
from core.db import run_in_transaction
from tests.support.fakes.fake_twilio import (
    FakeTwilio,
    signed_status_callback,
    status_callback_params,
)
from tests.support.payloads import paypal as pp
from tests.support.payloads import stripe as sp
from worker.publisher import Publisher

# --------------------------------------------------------------------------- the plan


@dataclass(eq=False)
class Delivery:
    """One provider event as the script sends it, and what it obliges Payguard to do.

    effects: ("journal", org, reference, cents) money that must move once;
             ("subscription", provider, subscription id, status, epoch seconds)."""

    kind: str
    provider: str
    event_id: str
    body: bytes
    effects: tuple = ()
    headers: dict[str, str] | None = None  # PayPal: the last signed transmission
    acked: bool = False
    attempts: int = 0


@dataclass(eq=False)
class Payment:
    provider: str
    payment_id: str
    org: str
    amount: int
    remaining: int
    charge_id: str | None = None
    disputed: bool = False
    refunds: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Subscription:
    sub_id: str
    last_at: int
    ended: bool = False


class Timeline:
    """Jobs due at a monotonic time; the scheduler submits the due ones to the pool."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def at(self, due: float, job: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._heap, (due, next(self._seq), job))

    def due(self, now: float) -> list[Callable[[], None]]:
        out = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                out.append(heapq.heappop(self._heap)[2])
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)


class Stack:
    """What the jobs talk to."""

    def __init__(
        self,
        *,
        web_port: int,
        signer,
        cert_url: str,
        engine,
        redis_url: str,
        twilio: FakeTwilio,
        public_url: str,
        policy: sending.Policy,
    ) -> None:
        self.web_port = web_port
        self.signer = signer
        self.cert_url = cert_url
        self.engine = engine
        self.redis_url = redis_url
        self.twilio = twilio
        self.public_url = public_url
        self.policy = policy
        self._local = threading.local()

    def publisher(self) -> Publisher:
        if not hasattr(self._local, "publisher"):
            self._local.publisher = Publisher(self.redis_url, timeout=0.5)
        return self._local.publisher


def http_post(
    port: int, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, float, dict]:
    """(status or 0 for a connection error, seconds, JSON answer)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        return 0, time.perf_counter() - started, {"error": repr(exc)}
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {}
    return status, time.perf_counter() - started, answer if isinstance(answer, dict) else {}


class Plan:
    """Generates the seeded sequence of actions and keeps the ledger of what was sent.

    `next_action` runs on the scheduler thread only; jobs run on the pool and touch shared
    state under `lock`."""

    KINDS: ClassVar[dict[str, int]] = {
        "paypal_capture": 16,
        "stripe_payment": 10,
        "duplicate": 12,
        "paypal_refund": 6,
        "stripe_refund": 5,
        "refund_first": 4,
        "dispute": 4,
        "subscription": 5,
        "message": 32,
        "callback": 6,
    }

    def __init__(
        self,
        rng: random.Random,
        org_ids: list[str],
        hungry: set[str],
        campaigns: dict[str, list[str]],
        stack: Stack,
        timeline: Timeline,
        stats: Stats,
        seed: int,
    ) -> None:
        self.rng = rng
        self.org_ids = org_ids
        self.hungry = hungry
        self.campaigns = campaigns
        self.stack = stack
        self.timeline = timeline
        self.stats = stats
        self.seed = seed
        self.lock = threading.Lock()
        self.deliveries: list[Delivery] = []
        self.posted: list[Delivery] = []
        self.payments: list[Payment] = []
        self.subscriptions: dict[tuple[str, str], Subscription] = {}
        self.sub_clock = int(time.time()) - 7200  # provider timestamps, seconds, increasing
        self.body_to_message: dict[str, str] = {}
        self.called_back: set[str] = set()
        self.terminal_callback: dict[str, tuple[str, bool]] = {}  # sid -> (status, acked)
        self.actions: Counter[str] = Counter()
        self.refund_first: Counter[str] = Counter()
        self.message_seq = 0

    # -- ids, drawn from the seeded generator

    def _chars(self, alphabet: str, n: int) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def pp_id(self) -> str:
        return self._chars(string.ascii_uppercase + string.digits, 17)

    def pp_event_id(self) -> str:
        return f"WH-{self.pp_id()}-{self.pp_id()}"

    def stripe_id(self, prefix: str) -> str:
        return f"{prefix}_{self._chars('0123456789abcdef', 24)}"

    # -- choices

    def org(self) -> str:
        if self.hungry and self.rng.random() < 0.35:
            return self.rng.choice(sorted(self.hungry))
        return self.rng.choice(self.org_ids)

    def amount(self, org: str) -> int:
        return self.rng.randint(100, 800) if org in self.hungry else self.rng.randint(100, 3000)

    def refundable(self, provider: str) -> Payment | None:
        candidates = [
            p for p in self.payments if p.provider == provider and p.remaining and not p.disputed
        ]
        return self.rng.choice(candidates) if candidates else None

    def refund_amount(self, payment: Payment) -> int:
        if self.rng.random() < 0.5:
            return payment.remaining
        return self.rng.randint(1, payment.remaining)

    # -- sending

    def send(self, d: Delivery, delay: float = 0.0) -> None:
        self.deliveries.append(d)
        self.timeline.at(time.monotonic() + delay, lambda: self.post(d, d.kind))

    def post(self, d: Delivery, label: str, *, resign: bool = False) -> None:
        if d.provider == "paypal":
            headers = d.headers
            if resign or headers is None:
                headers = self.stack.signer.sign(WEBHOOK_ID, d.body, self.stack.cert_url)
                d.headers = headers
            path = "/webhooks/paypal"
        else:
            signature = sp.stripe_signature_header(d.body, STRIPE_SECRET, int(time.time()))
            headers = {"Stripe-Signature": signature, "Content-Type": "application/json"}
            path = "/webhooks/stripe"
        with self.lock:
            if d.attempts == 0:
                self.posted.append(d)
            d.attempts += 1
            attempts = d.attempts
        code, elapsed, answer = http_post(self.stack.web_port, path, d.body, headers)
        self.stats.webhook(label, code, elapsed, answer.get("status") if code == 200 else None)
        if code == 200:
            with self.lock:
                d.acked = True
        elif attempts < MAX_ATTEMPTS:
            # Like the providers: not answered 200, delivered again later.
            self.timeline.at(time.monotonic() + 1.0, lambda: self.post(d, "redelivery"))
        else:
            with self.stats.lock:
                self.stats.gave_up.append(f"{d.provider} {d.event_id}")

    # -- actions

    def next_action(self) -> None:
        kinds = list(self.KINDS)
        kind = self.rng.choices(kinds, weights=[self.KINDS[k] for k in kinds])[0]
        self.actions[kind] += 1
        getattr(self, f"_{kind}")()

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

    def _message(self) -> None:
        org = self.org()
        self.message_seq += 1
        length = self.rng.choice((40, 150, 200, 320))
        head = f"soak {self.seed}-{self.message_seq:06d} "
        body = head + self._chars(string.ascii_lowercase, max(1, length - len(head)))
        to = f"+1202555{self.rng.randint(0, 9999):04d}"
        choices = [None, *self.campaigns.get(org, [])]
        campaign = self.rng.choice(choices)
        self.timeline.at(time.monotonic(), lambda: self.queue_message(org, to, body, campaign))

    def queue_message(self, org: str, to: str, body: str, campaign: str | None) -> None:
        """What the host application does: queue in its own transaction, publish after commit
        (a failed publish is left to the outbox relay)."""
        stack = self.stack
        try:
            msg = run_in_transaction(
                stack.engine,
                lambda c: messages.queue(c, org, to, body, stack.policy, campaign_id=campaign),
            )
        except Exception as exc:
            with self.stats.lock:
                self.stats.queue_errors[type(exc).__name__] += 1
            return
        with self.lock:
            self.body_to_message[body] = msg.message_id
        with self.stats.lock:
            self.stats.queued += 1
        try:
            stack.publisher().publish(messages.SEND_TASK, [msg.message_id])
            run_in_transaction(
                stack.engine,
                lambda c: inbox.mark_task_published(c, messages.SEND_TASK, [msg.message_id]),
            )
        except Exception:
            with self.stats.lock:
                self.stats.publish_deferred += 1

    def _callback(self) -> None:
        created = [m for m in self.stack.twilio.messages() if m["sid"] not in self.called_back]
        if not created:
            return self._message()
        m = self.rng.choice(created)
        self.called_back.add(m["sid"])
        final = "failed" if self.rng.random() < 0.3 else "delivered"
        plan = [final]
        if self.rng.random() < 0.3:
            plan.append("sent")  # a stale status after the final one: must not move it back
        if self.rng.random() < 0.2:
            plan.append(final)  # Twilio retried the callback
        for i, status in enumerate(plan):
            self.timeline.at(
                time.monotonic() + 0.3 * i,
                lambda s=status, last=i == 0: self.post_callback(m, s, final=last),
            )

    def post_callback(self, m: dict, status: str, *, final: bool) -> None:
        params = status_callback_params(m["sid"], status, m["account_sid"], m["to"], m["from"])
        url = self.stack.public_url + CALLBACK_PATH
        params, signature = signed_status_callback(TWILIO_TOKEN, url, params)
        headers = {
            "X-Twilio-Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded",
        }
        code, _, _ = http_post(
            self.stack.web_port, CALLBACK_PATH, urlencode(params).encode(), headers
        )
        with self.stats.lock:
            self.stats.callbacks[f"{status} -> {code or 'connection error'}"] += 1
        if final:
            with self.lock:
                self.terminal_callback[m["sid"]] = (status, code == 200)

    @staticmethod
    def _delivery(kind: str, provider: str, payload: dict, effects: tuple) -> Delivery:
        body = json.dumps(payload).encode()
        return Delivery(kind, provider, payload["id"], body, effects)

    # -- what the script sent

    def expectations(self) -> tuple[dict, dict, set]:
        """(journal reference -> (org, cents), (provider, sub id) -> status, acked event ids)
        from the deliveries answered 200 at least once."""
        journal: dict[str, tuple[str, int]] = {}
        newest: dict[tuple[str, str], tuple[int, str]] = {}
        acked = set()
        for d in self.deliveries:
            if not d.acked:
                continue
            acked.add((d.provider, d.event_id))
            for effect in d.effects:
                if effect[0] == "journal":
                    _, org, ref, cents = effect
                    assert journal.get(ref, (org, cents)) == (org, cents), ref
                    journal[ref] = (org, cents)
                else:
                    _, provider, sub_id, status, at = effect
                    if (provider, sub_id) not in newest or newest[(provider, sub_id)][0] < at:
                        newest[(provider, sub_id)] = (at, status)
        return journal, {k: v[1] for k, v in newest.items()}, acked
