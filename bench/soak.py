"""Soak: the whole stack under a disordered mix of webhooks, sends, refunds and disputes while
a worker dies twice and Redis restarts once; then proof that every payment, refund and charge
was applied exactly once.

    .venv/bin/python bench/soak.py [--seconds 60] [--orgs 50] [--seed 1] [--rate 25]
                                   [--clients 6] [--database-url URL] [--keep]

Everything runs on 127.0.0.1: its own PostgreSQL (embedded, fsync off; or a scratch database
on --database-url's server, created, migrated with migrations.upgrade and dropped unless
--keep), its own embedded Redis, a FakePayPal serving a generated signing certificate, a
FakeTwilio, gunicorn (2 workers), two Celery workers (concurrency 2) and beat, all as
subprocesses with retry and redelivery timings shortened from minutes to seconds.

Redis is NOT durable (no AOF, no RDB): its restart loses every queued and unacknowledged task,
so the run proves what the outbox relay and the redelivery paths recover, not what a broker
with an append-only file happens to keep (`--durable-redis` turns AOF on, to compare).

The load is a seeded plan (same --seed, same sequence of actions; thread timing still varies):
PayPal captures, Stripe payments announced twice (checkout.session.completed and
payment_intent.succeeded, the intent sometimes without the organization), duplicates of
earlier deliveries (byte-identical, or re-signed with a new transmission), partial and full
refunds (Stripe's sometimes announced again inside charge.refunded), refunds delivered
BEFORE their payment, disputes opened and closed (sometimes closed first; lost PayPal ones
followed by PAYMENT.CAPTURE.REVERSED), subscription changes delivered out of order, messages
queued through core.messages.queue, and signed Twilio status callbacks (delivered or failed,
duplicated, a stale `sent` after the final status). Every POST not answered 200 is delivered
again a second later, as the providers do.

Faults: kill -9 of worker 1 at 25% (restarted), Redis stopped at 40% for 5 s (same port),
kill -9 of worker 2 at 55% (restarted); beat runs throughout. A process that exits by itself
is restarted, as a platform's process manager would, and reported (a FAIL). After the load:
drain (no event `received`, no message queued/sending/retrying, no unpublished outbox row),
replay the events parked only because they came before what they refer to (core.inbox.replay,
the function behind `payguard events replay`), drain again, then check, and exit 1 on any
FAIL: `payguard ledger verify --json`; every webhook answered 200 in the inbox and applied;
one journal row per payment, refund and lost dispute sent, none other; balance - debt per
organization against what was sent and what was charged; charges against the messages table
and the fake Twilio's creates; status callbacks; subscriptions; freezes; processes.
HOLD_MAX_AGE_SECONDS is 30 here, so a send whose worker vanished settles within the drain.
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlencode, urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
import requests  # noqa: E402
from psycopg.rows import dict_row  # noqa: E402

import migrations  # noqa: E402
from core import inbox, messages, orgs, sending  # noqa: E402
from core.db import make_engine, run_in_transaction  # noqa: E402
from devtools.devstack import TEST_POSTGRES_SETTINGS, start_postgres, start_redis  # noqa: E402
from devtools.devstack import database_url as url_for  # noqa: E402
from tests.stack import BIN, Proc, Web, free_port, start_beat, start_worker, wait_for  # noqa: E402
from tests.support.fakes.fake_twilio import (  # noqa: E402
    FakeTwilio,
    signed_status_callback,
    status_callback_params,
    unused_port,
)
from tests.support.fakes.paypal_api import FakePayPal, make_signing_cert  # noqa: E402
from tests.support.payloads import paypal as pp  # noqa: E402
from tests.support.payloads import stripe as sp  # noqa: E402
from worker.publisher import Publisher  # noqa: E402

WEBHOOK_ID = "WH-SOAK"
STRIPE_SECRET = "whsec_payguard_soak_0123456789abcdef"
TWILIO_SID = "AC" + "50a4" * 8
TWILIO_TOKEN = "soak-auth-token-0123456789abcdef"
CALLBACK_PATH = "/webhooks/twilio/status"
MAX_ATTEMPTS = 30  # deliveries of one webhook until it is answered 200
# (Twilio's callback statuses `queued` and `sending` are left out: the script never posts
# them, and a message in either of Payguard's own is still pending.)
CHARGED_STATUSES = {"accepted", "unknown", "sent", "delivered", "undelivered", "failed", "read"}
SENT_STATUSES = CHARGED_STATUSES - {"unknown"}
UNCHARGED_STATUSES = {"blocked", "rejected", "not_sent"}
# Parked only because it came before what it refers to: the payment, or the organization
# that only the other announcement of a Stripe payment names.
ORDERING_ERRORS = ("of unknown payment", "names no organization yet")
# (fraction of the load, target, what): the workers are slots 0 and 1.
FAULTS = (
    (0.25, "worker 0", "kill -9 worker 1, restart"),
    (0.40, "redis", "stop Redis 5 s"),
    (0.55, "worker 1", "kill -9 worker 2, restart"),
)


# --------------------------------------------------------------------------- figures


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def dollars(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


class Stats:
    """What the script did and what it was answered; shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posts: Counter[str] = Counter()  # every webhook POST, by kind
        self.codes: Counter[str] = Counter()  # webhook answers by status code
        self.answers: Counter[str] = Counter()  # 200 answers: accepted / duplicate
        self.latencies: list[float] = []
        self.callbacks: Counter[str] = Counter()  # Twilio callbacks by "status code"
        self.queued = 0
        self.queue_errors: Counter[str] = Counter()
        self.publish_deferred = 0
        self.gave_up: list[str] = []

    def webhook(self, kind: str, code: int, elapsed: float, answer: str | None) -> None:
        with self.lock:
            self.posts[kind] += 1
            self.codes[str(code) if code else "connection error"] += 1
            self.latencies.append(elapsed)
            if answer:
                self.answers[answer] += 1


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


# --------------------------------------------------------------------------- processes


def start_web_on(env: dict[str, str], logs: Path, port: int, workers: int) -> Web:
    """gunicorn on a port chosen beforehand: PUBLIC_BASE_URL must name it before it starts."""
    argv = [str(BIN / "gunicorn"), "--workers", str(workers), "--bind", f"127.0.0.1:{port}"]
    argv += ["--timeout", "30", "webhook_receiver.app:create_app()"]
    web = Web("web", argv, env, logs)
    web.port = port
    web.start()
    wait_for(
        lambda: not web.alive() or requests.get(f"{web.url}/healthz", timeout=1).ok,
        60,
        what="web ready",
    )
    if not web.alive():
        raise RuntimeError(f"web died at start:\n{web.log()[-3000:]}")
    return web


class Processes:
    """Every subprocess this run started, stopped by pid (process group) at the end, and a
    supervisor that, like a platform's process manager, restarts one that exited by itself
    (and records it: that is a finding, not part of the plan)."""

    def __init__(self, env: dict[str, str], logs: Path, web_port: int) -> None:
        self.env, self.logs, self.web_port = env, logs, web_port
        self.lock = threading.Lock()
        self.all: list[Proc] = []
        self.roles: dict[int, str] = {}  # pid -> web | beat | worker <slot>
        self.workers: list[Proc] = []
        self.ended: set[int] = set()  # pids killed on purpose, or already reported
        self.unexpected: list[str] = []
        self.restarting: set[str] = set()

    def track(self, proc: Proc, role: str) -> Proc:
        with self.lock:
            self.all.append(proc)
            self.roles[proc.pid] = role
        return proc

    def start(self, role: str) -> Proc:
        if role == "web":
            return self.track(start_web_on(self.env, self.logs, self.web_port, 2), role)
        if role == "beat":
            return self.track(start_beat(self.env, self.logs), role)
        slot = int(role.split()[1])
        proc = start_worker(self.env, self.logs, concurrency=2, ready_timeout=90)
        self.track(proc, role)
        with self.lock:
            if slot == len(self.workers):
                self.workers.append(proc)
            else:
                self.workers[slot] = proc
        return proc

    def kill_worker(self, slot: int) -> str:
        """kill -9 the worker's whole process group and start another; a note if it had
        already exited."""
        deadline = time.monotonic() + 90
        while f"worker {slot}" in self.restarting and time.monotonic() < deadline:
            time.sleep(0.2)  # it died by itself and the supervisor is starting another
        with self.lock:
            proc = self.workers[slot]
            self.ended.add(proc.pid)
        note = "" if proc.alive() else f" (it had already exited, status {proc.popen.returncode})"
        proc.kill()
        self.start(f"worker {slot}")
        return note

    def supervise(self, stop: threading.Event, t0: float) -> None:
        while not stop.wait(0.5):
            with self.lock:
                dead = [p for p in self.all if p.pid not in self.ended and not p.alive()]
                self.ended.update(p.pid for p in dead)
            for proc in dead:
                role = self.roles[proc.pid]
                self.unexpected.append(
                    f"t={time.monotonic() - t0:.1f}s {role} pid {proc.pid} exited "
                    f"{proc.popen.returncode}: {last_critical(proc.log())}"
                )
                print(f"  [supervisor] {self.unexpected[-1]}; restarting it", flush=True)
                if not stop.is_set():
                    self.restarting.add(role)
                    try:
                        self.start(role)
                    except Exception as exc:
                        self.unexpected.append(f"{role} could not be restarted: {exc!r}")
                    finally:
                        self.restarting.discard(role)

    def stop_all(self) -> None:
        with self.lock:
            procs = list(reversed(self.all))
            self.ended.update(p.pid for p in procs)
        for proc in procs:
            try:
                proc.stop(timeout=15)
            except Exception as exc:  # keep stopping the others
                print(f"  could not stop {proc.name} pid {proc.pid}: {exc!r}", file=sys.stderr)
            log = getattr(proc, "_log", None)
            if log is not None:
                log.close()


def last_critical(log: str) -> str:
    """The last critical (else error) line of a process's JSON log, shortened."""
    found: dict[str, str] = {}
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") in ("critical", "error"):
            found[record["level"]] = str(record.get("msg"))[:160]
    return found.get("critical") or found.get("error") or "no error logged"


# --------------------------------------------------------------------------- database


def prepare_database(
    admin_url: str | None, tmp: Path, stack: ExitStack, keep: bool
) -> tuple[str, str]:
    """(URL of a fresh migrated scratch database, where it lives)."""
    if admin_url is None:
        server = start_postgres(tmp / "pgdata", database=None, settings=TEST_POSTGRES_SETTINGS)
        stack.callback(server.stop)
        admin_url, where = server.admin_url, "embedded PostgreSQL (fsync off)"
    else:
        parts = urlsplit(admin_url)
        where = f"PostgreSQL at {parts.hostname}:{parts.port}"
    name = f"payguard_soak_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    if not keep:
        stack.callback(drop)
    url = url_for(admin_url, name)
    migrations.upgrade(url)
    return url, f"{where}, database {name}" + (" (kept)" if keep else "")


def create_orgs(engine, rng: random.Random, count: int, policy: sending.Policy):
    """N organizations with a Twilio subaccount and sender each, one in five "hungry" (a high
    price per segment, small payments: it runs dry and its refunds end in debt)."""
    org_ids, hungry, campaigns = [], set(), {}
    for i in range(count):
        org_id = f"soak-{i:03d}"
        is_hungry = i % 5 == 0
        price = rng.randint(40, 120) if is_hungry else rng.choice((None, 1, 2, 3))
        names = [f"c{j}" for j in range(1, rng.randint(1, 3) + 1)]

        def create(conn, org_id=org_id, price=price, names=names, i=i):
            orgs.create(
                conn,
                org_id,
                twilio_subaccount_sid="AC"
                + "".join(rng.choice("0123456789abcdef") for _ in range(32)),
                sender=f"+1415555{i:04d}",
                segment_price_cents=price,
                # Half send on money alone; the other half also need their subscription.
                billing="prepaid" if i % 2 else "subscription",
            )
            for name in names:
                sending.create_campaign(conn, org_id, name, policy)

        run_in_transaction(engine, create)
        org_ids.append(org_id)
        campaigns[org_id] = names
        if is_hungry:
            hungry.add(org_id)
    return org_ids, hungry, campaigns


def backlog(conn) -> dict[str, int]:
    row = conn.execute("""
SELECT (SELECT count(*) FROM webhook_events WHERE status = 'received') AS events_received,
       (SELECT count(*) FROM messages WHERE status IN ('queued', 'sending', 'retrying'))
           AS messages_pending,
       (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS outbox_unpublished
""").fetchone()
    return dict(row)


def drain(
    database_url: str, timeout: float, label: str, origin: float
) -> tuple[bool, dict, float | None]:
    """Wait until nothing is left to do: (drained, last backlog, seconds from `origin` until
    the events and the outbox alone were done)."""
    started = time.monotonic()
    last_print, events_done = started, None
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        while True:
            left = backlog(conn)
            now = time.monotonic()
            if (
                events_done is None
                and not left["events_received"]
                and not left["outbox_unpublished"]
            ):
                events_done = now - origin
            if not any(left.values()):
                return True, left, events_done
            if now - started > timeout:
                return False, left, events_done
            if now - last_print > 10:
                print(f"  [{label}] {now - started:4.0f}s still pending: {left}", flush=True)
                last_print = now
            time.sleep(0.5)


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    what: str
    at: float  # seconds since the load started
    recovered_at: float | None = None  # restarted / back
    # From the recovery until every event stored / message queued before it was done.
    events_after: float | None = None
    messages_after: float | None = None
    stuck: int = 0  # messages from before the recovery still pending when the watch ended
    note: str = ""


def watch_catch_up(database_url: str, fault: Fault, stop: threading.Event, limit: float) -> None:
    """After a fault: how long until every event stored before the recovery is out of
    `received`, and every message queued before it is out of queued/sending/retrying."""
    recovered = time.monotonic()
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            max_id, db_now = conn.execute(
                "SELECT coalesce(max(id), 0), now() FROM webhook_events"
            ).fetchone()
            while time.monotonic() - recovered < limit:
                events, msgs = conn.execute(
                    "SELECT (SELECT count(*) FROM webhook_events WHERE id <= %s "
                    "AND status = 'received'), (SELECT count(*) FROM messages "
                    "WHERE created_at <= %s AND status IN ('queued', 'sending', 'retrying'))",
                    (max_id, db_now),
                ).fetchone()
                now = time.monotonic() - recovered
                if events == 0 and fault.events_after is None:
                    fault.events_after = now
                if msgs == 0 and fault.messages_after is None:
                    fault.messages_after = now
                fault.stuck = msgs
                if (events == 0 and msgs == 0) or stop.wait(0.25):
                    return
    except Exception as exc:
        fault.note = f"watch failed: {exc!r}"


def inject_faults(
    seconds: float,
    t0: float,
    procs: Processes,
    redis,
    database_url: str,
    faults: list[Fault],
    stop: threading.Event,
    watch_stop: threading.Event,
    watchers: list,
) -> None:
    def at(fraction: float) -> bool:
        remaining = t0 + seconds * fraction - time.monotonic()
        return not stop.wait(max(0.0, remaining))

    def recovered(fault: Fault) -> None:
        fault.recovered_at = time.monotonic() - t0
        watcher = threading.Thread(
            target=watch_catch_up,
            args=(database_url, fault, watch_stop, 240),
            daemon=True,
        )
        watcher.start()
        watchers.append(watcher)

    try:
        for fraction, target, what in FAULTS:
            if not at(fraction):
                return
            fault = Fault(what, time.monotonic() - t0)
            faults.append(fault)
            print(f"  [fault] t={fault.at:5.1f}s {what}", flush=True)
            if target == "redis":
                redis.stop()
                stop.wait(5.0)
                redis.start()
            else:
                fault.note = procs.kill_worker(int(target.split()[1]))
            recovered(fault)
            print(f"  [fault] t={fault.recovered_at:5.1f}s recovered from: {what}", flush=True)
    except Exception as exc:
        faults.append(Fault(f"fault injection failed: {exc!r}", time.monotonic() - t0))


# --------------------------------------------------------------------------- load


def run_load(  # noqa: C901 (until bench/soak.py is split by concern)
    plan: Plan,
    timeline: Timeline,
    pool: ThreadPoolExecutor,
    seconds: float,
    rate: float,
    clients: int,
    stats: Stats,
    t0: float,
    database_url: str,
) -> float:
    """Generate actions at `rate` for `seconds` and run the due jobs; then keep delivering what
    is still scheduled (delayed halves, redeliveries), in its own time so the disorder stays
    as planned. Returns the moment the generation stopped."""
    slots = threading.BoundedSemaphore(clients * 4)
    inflight = [0]
    lock = threading.Lock()

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:
            with stats.lock:
                stats.queue_errors[f"job {type(exc).__name__}: {exc}"[:120]] += 1
        finally:
            with lock:
                inflight[0] -= 1
            slots.release()

    def submit_due(now: float) -> None:
        for job in timeline.due(now):
            waited = time.monotonic()
            while not slots.acquire(timeout=1):
                if time.monotonic() - waited > 60:
                    raise RuntimeError("client threads stuck for 60 s")
            with lock:
                inflight[0] += 1
            pool.submit(run, job)

    end = t0 + seconds
    next_action, next_report = t0, t0 + 10
    while (now := time.monotonic()) < end:
        if next_action < now - 1.0:
            next_action = now - 1.0  # behind: drop the backlog of actions, not the deadline
        while next_action <= now:
            plan.next_action()
            next_action += 1.0 / rate
        submit_due(now)
        if now >= next_report:
            with stats.lock:
                posts, queued = sum(stats.posts.values()), stats.queued
            with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
                left = backlog(conn)
            print(
                f"  t={now - t0:5.1f}s webhooks posted {posts}, messages queued {queued}, "
                f"backlog {left}",
                flush=True,
            )
            next_report += 10
        time.sleep(0.005)
    stopped = time.monotonic()
    flush_deadline = stopped + 90
    while time.monotonic() < flush_deadline:
        with lock:
            busy = inflight[0]
        if not busy and not len(timeline):
            break
        submit_due(time.monotonic())
        time.sleep(0.02)
    pool.shutdown(wait=True)
    return stopped


def replay_parked(database_url: str, engine, publisher: Publisher) -> tuple[Counter, list]:
    """Replay events parked because they arrived before what they refer to; the others stay
    parked (and fail a check). Same function as `payguard events replay ID`."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        parked = conn.execute(
            "SELECT id, provider, event_type, last_error FROM webhook_events "
            "WHERE status = 'parked' ORDER BY id"
        ).fetchall()
    replayed: Counter[str] = Counter()
    others = []
    for inbox_id, provider, event_type, error in parked:
        if not any(pattern in (error or "") for pattern in ORDERING_ERRORS):
            others.append((inbox_id, provider, event_type, error))
            continue
        event, outbox_id = run_in_transaction(
            engine, lambda c, i=inbox_id: inbox.replay(c, i, actor="soak")
        )
        replayed[f"{provider} {event_type}"] += 1
        try:
            publisher.publish(inbox.PROCESS_EVENT_TASK, [event.id], task_id=f"outbox-{outbox_id}")
            run_in_transaction(engine, lambda c, o=outbox_id: inbox.mark_published(c, [o]))
        except Exception:
            pass  # the relay publishes it
    return replayed, others


# --------------------------------------------------------------------------- checks


class Checks:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.rows)

    def print(self) -> None:
        width = max(len(name) for name, _, _ in self.rows)
        print(f"\n{'check':<{width}}  result  detail")
        for name, ok, detail in self.rows:
            print(f"{name:<{width}}  {'PASS' if ok else 'FAIL':<6}  {detail}")


def sample(items, n: int = 3) -> str:
    items = list(items)
    return "; ".join(str(i) for i in items[:n]) + (
        f" … (+{len(items) - n})" if len(items) > n else ""
    )


def run_checks(  # noqa: C901 (until bench/soak.py is split by concern)
    database_url: str,
    env: dict[str, str],
    plan: Plan,
    twilio: FakeTwilio,
    drained: bool,
    leftover: dict,
    other_parked: list,
) -> Checks:
    checks = Checks()
    checks.add(
        "drained (no event received, no message pending, outbox published)",
        drained,
        "all done" if drained else f"still pending: {leftover}",
    )

    # 1. the operator's own verification, as a console script
    verify = subprocess.run(
        [str(BIN / "payguard"), "ledger", "verify", "--json"],
        env={**env, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        verdict = json.loads(verify.stdout)
    except ValueError:
        verdict = {"ok": False, "error": (verify.stdout + verify.stderr)[-300:]}
    checks.add(
        "payguard ledger verify --json",
        verify.returncode == 0 and verdict.get("ok") is True,
        f"exit {verify.returncode}, ok={verdict.get('ok')}, "
        f"wallets {verdict.get('wallets_checked')}, mismatches "
        f"{sample(verdict.get('mismatches') or []) or 'none'}",
    )

    expected_journal, expected_subs, acked = plan.expectations()
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        events = conn.execute(
            "SELECT provider, event_id, status, last_error FROM webhook_events"
        ).fetchall()
        journal = conn.execute(
            "SELECT org_id, reference, kind, amount_cents, requested_cents, debt_delta_cents "
            "FROM journal"
        ).fetchall()
        wallets = conn.execute(
            "SELECT org_id, balance_cents, held_cents, debt_cents FROM wallets"
        ).fetchall()
        msgs = conn.execute(
            "SELECT message_id, org_id, status, price_cents, charged_cents, refunded, "
            "twilio_sid, body FROM messages"
        ).fetchall()
        subs = conn.execute(
            "SELECT provider, subscription_id, status FROM subscriptions"
        ).fetchall()
        freezes = conn.execute(
            "SELECT org_id, reason FROM wallet_freezes WHERE lifted_at IS NULL"
        ).fetchall()
        early = conn.execute("SELECT count(*) AS n FROM early_callbacks").fetchone()["n"]

    # 2. none lost: every acknowledged webhook is in the inbox, applied or ignored
    stored = {(e["provider"], e["event_id"]): e for e in events}
    missing = [k for k in acked if k not in stored]
    unsettled = [
        (k, stored[k]["status"], stored[k]["last_error"])
        for k in acked
        if k in stored and stored[k]["status"] not in ("processed", "ignored")
    ]
    strangers = [k for k in stored if k not in acked]
    by_status = Counter(e["status"] for e in events)
    checks.add(
        "every webhook answered 200 is in the inbox, processed or ignored",
        not missing and not unsettled and not strangers,
        f"{len(acked)} acknowledged; inbox {dict(by_status)}"
        + (f"; MISSING {sample(missing)}" if missing else "")
        + (f"; NOT APPLIED {sample(unsettled)}" if unsettled else "")
        + (f"; never sent {sample(strangers)}" if strangers else ""),
    )
    checks.add(
        "no event parked or failed for another reason than ordering",
        not other_parked and by_status.get("failed", 0) == 0,
        "none"
        if not other_parked and not by_status.get("failed")
        else f"parked {sample(other_parked)}; failed {by_status.get('failed', 0)}",
    )

    # 3. the journal: one row per payment and refund reference sent, nothing else
    rows_by_ref: dict[str, list[dict]] = defaultdict(list)
    captures: dict[str, list[dict]] = defaultdict(list)
    msg_refunds: dict[str, list[dict]] = defaultdict(list)
    for row in journal:
        ref = row["reference"]
        if ref.startswith("hold:msg:"):
            captures[ref.removeprefix("hold:msg:")].append(row)
        elif ref.startswith("msg:") and ref.endswith(":refund"):
            msg_refunds[ref.removeprefix("msg:").removesuffix(":refund")].append(row)
        else:
            rows_by_ref[ref].append(row)
    problems = []
    for ref, (org, cents) in expected_journal.items():
        rows = rows_by_ref.get(ref, [])
        if len(rows) != 1:
            problems.append(f"{ref}: {len(rows)} rows")
        elif rows[0]["org_id"] != org or rows[0]["requested_cents"] != cents:
            problems.append(
                f"{ref}: {rows[0]['org_id']} {rows[0]['requested_cents']} != {org} {cents}"
            )
    extra = [ref for ref in rows_by_ref if ref not in expected_journal]
    payments = sum(1 for ref in expected_journal if ":payment:" in ref)
    checks.add(
        "journal: exactly one row per payment / refund / lost dispute sent",
        not problems and not extra,
        f"{payments} payments, {len(expected_journal) - payments} refunds and lost disputes"
        + (f"; WRONG {sample(problems)}" if problems else "")
        + (f"; UNEXPECTED {sample(extra)}" if extra else ""),
    )

    # 4. messages: charged once, at their price, only when they may have gone out
    by_sid = {m["twilio_sid"]: m for m in msgs if m["twilio_sid"]}
    posts = Counter(r.params.get("Body") for r in twilio.requests("messages") if r.method == "POST")
    created: dict[str, list[str]] = defaultdict(list)
    for m in twilio.messages():
        created[m["body"]].append(m["sid"])
    bodies = {m["body"] for m in msgs}
    charge_problems, twilio_problems, refund_problems = [], [], []
    for m in msgs:
        mid, status, charged, price = (
            m["message_id"],
            m["status"],
            m["charged_cents"],
            m["price_cents"],
        )
        if status in CHARGED_STATUSES and charged != price:
            charge_problems.append(f"{mid} {status} charged {charged} of {price}")
        if status in UNCHARGED_STATUSES and charged != 0:
            charge_problems.append(f"{mid} {status} charged {charged}")
        rows = captures.get(mid, [])
        if (len(rows) != 1 or rows[0]["amount_cents"] != -charged) if charged else rows:
            charge_problems.append(f"{mid} {status}: {len(rows)} capture rows for {charged}")
        n_posts, sids = posts.get(m["body"], 0), created.get(m["body"], [])
        if n_posts > 1:
            twilio_problems.append(f"{mid} {status}: {n_posts} creates")
        if status in SENT_STATUSES and (len(sids) != 1 or sids[0] != m["twilio_sid"]):
            twilio_problems.append(f"{mid} {status}: created {sids}, recorded {m['twilio_sid']}")
        if status in ("blocked", "not_sent") and n_posts:
            twilio_problems.append(f"{mid} {status}: {n_posts} creates")
        refunds = msg_refunds.get(mid, [])
        should_refund = status == "failed" and charged > 0
        if (
            m["refunded"] != should_refund
            or len(refunds) != int(should_refund)
            or (refunds and refunds[0]["requested_cents"] != charged)
        ):
            refund_problems.append(f"{mid} {status} refunded={m['refunded']} rows={len(refunds)}")
    orphans = [str(b)[:24] for b in itertools.chain(posts, created) if b not in bodies]
    statuses = Counter(m["status"] for m in msgs)
    checks.add(
        "messages: accepted/unknown charged their price once, others 0",
        not charge_problems,
        f"{len(msgs)} messages {dict(statuses)}"
        + (f"; WRONG {sample(charge_problems)}" if charge_problems else ""),
    )
    checks.add(
        "Twilio: <= 1 create per message, exactly 1 for each one sent",
        not twilio_problems and not orphans,
        f"{sum(posts.values())} creates for {len(msgs)} messages"
        + (f"; WRONG {sample(twilio_problems)}" if twilio_problems else "")
        + (f"; creates of no message {sample(orphans)}" if orphans else ""),
    )
    callback_problems = []
    for sid, (final, ok) in plan.terminal_callback.items():
        m = by_sid.get(sid)
        if ok and m and m["status"] != final:
            callback_problems.append(f"{m['message_id']}: {m['status']} after {final}")
    checks.add(
        "status callbacks: final status kept, failed refunded once",
        not refund_problems and not callback_problems,
        f"{len(plan.terminal_callback)} messages called back, "
        f"{sum(1 for m in msgs if m['refunded'])} refunded, {early} callbacks kept for SIDs "
        "never recorded (messages settled `unknown`)"
        + (
            f"; WRONG {sample(refund_problems + callback_problems)}"
            if refund_problems or callback_problems
            else ""
        ),
    )

    # 5. money per organization: balance - debt is what the script paid in, minus what it
    #    took back, minus the charges Payguard decided (checked above), plus their refunds
    net: Counter[str] = Counter()
    for ref, (org, cents) in expected_journal.items():
        net[org] += cents if ":payment:" in ref else -cents
    for m in msgs:
        net[m["org_id"]] -= m["charged_cents"] - (m["charged_cents"] if m["refunded"] else 0)
    wrong, negative = [], []
    for w in wallets:
        got = w["balance_cents"] - w["debt_cents"]
        if got != net[w["org_id"]]:
            wrong.append(f"{w['org_id']}: {got} != {net[w['org_id']]}")
        if w["balance_cents"] < 0 or w["held_cents"] != 0 or w["debt_cents"] < 0:
            negative.append(
                f"{w['org_id']} {w['balance_cents']}/{w['held_cents']}/{w['debt_cents']}"
            )
    in_debt = sum(1 for w in wallets if w["debt_cents"] > 0)
    checks.add(
        "per org: balance - debt == payments - refunds - charges + refunds of charges",
        not wrong,
        f"{len(wallets)} wallets, {in_debt} in debt"
        + (f"; WRONG {sample(wrong)}" if wrong else ""),
    )
    checks.add(
        "no wallet negative, nothing left held",
        not negative,
        "balance >= 0, held = 0, debt >= 0 everywhere" if not negative else sample(negative),
    )

    # 6. subscriptions: the newest status sent wins, whatever the order of arrival
    actual_subs = {(s["provider"], s["subscription_id"]): s["status"] for s in subs}
    sub_problems = [
        f"{k[1]}: {actual_subs.get(k)} != {v}"
        for k, v in expected_subs.items()
        if actual_subs.get(k) != v
    ]
    checks.add(
        "subscriptions: newest status wins over out-of-order deliveries",
        not sub_problems,
        f"{len(expected_subs)} subscriptions {dict(Counter(expected_subs.values()))}"
        + (f"; WRONG {sample(sub_problems)}" if sub_problems else ""),
    )

    # 7. freezes: every dispute closed, a debt freeze exactly where there is debt
    active = defaultdict(set)
    for f in freezes:
        active[f["org_id"]].add(f["reason"])
    freeze_problems = [
        f"{org}: {sorted(r)}"
        for org, r in active.items()
        if any(x.startswith("dispute:") for x in r)
    ]
    debt = {w["org_id"]: w["debt_cents"] for w in wallets}
    freeze_problems += [
        f"{org}: debt {debt[org]} freeze {'debt' in active.get(org, ())}"
        for org in debt
        if (debt[org] > 0) != ("debt" in active.get(org, ()))
    ]
    checks.add(
        "freezes: no dispute freeze left, debt freeze iff debt",
        not freeze_problems,
        f"{sum(len(r) for r in active.values())} active freezes"
        + (f"; WRONG {sample(freeze_problems)}" if freeze_problems else ""),
    )
    return checks


# --------------------------------------------------------------------------- main


def subprocess_env(
    database_url: str, redis_url: str, paypal: FakePayPal, twilio: FakeTwilio, public_url: str
) -> dict[str, str]:
    prefixes = (
        "PAYPAL_",
        "STRIPE_",
        "TWILIO_",
        "TASK_",
        "BROKER_",
        "DATABASE_",
        "REDIS_",
        "EVENT_",
        "OUTBOX_",
        "RELAY_",
        "HOLD_",
        "SMS_",
        "PUBLIC_",
        "WORKER_",
        "BEAT_",
        "WEB_",
        "SUBSCRIPTION_",
        "PROMETHEUS_",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.pop("PORT", None)
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PAYPAL_WEBHOOK_ID=WEBHOOK_ID,
        PAYPAL_CERT_URL_PREFIXES=paypal.cert_prefix,
        PAYPAL_API_BASE=paypal.base_url,  # never the internet, even if a job wanted to ask
        STRIPE_WEBHOOK_SECRET=STRIPE_SECRET,
        STRIPE_API_BASE=f"http://127.0.0.1:{unused_port()}",
        TWILIO_ACCOUNT_SID=TWILIO_SID,
        TWILIO_AUTH_TOKEN=TWILIO_TOKEN,
        TWILIO_API_BASE=twilio.base_url,
        PUBLIC_BASE_URL=public_url,
        TASK_MAX_RETRIES="3",  # a refund before its capture parks within about a second
        TASK_RETRY_BASE_SECONDS="0.2",
        TASK_RETRY_MAX_SECONDS="2",
        BROKER_VISIBILITY_TIMEOUT="10",
        EVENT_REDELIVER_SECONDS="5",
        OUTBOX_GRACE_SECONDS="1",
        RELAY_INTERVAL_SECONDS="0.5",
        HOLD_MAX_AGE_SECONDS="30",  # a send lost with its worker settles within the drain
        WORKER_METRICS_PORT="0",
        BEAT_METRICS_PORT="0",
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )
    return env


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--orgs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=25.0, help="actions per second")
    parser.add_argument("--clients", type=int, default=6, help="client threads")
    parser.add_argument("--drain-timeout", type=float, default=150.0)
    parser.add_argument(
        "--database-url", default=None, help="a server where we may CREATE DATABASE"
    )
    parser.add_argument("--durable-redis", action="store_true", help="AOF on (default: off)")
    parser.add_argument("--keep", action="store_true", help="keep the database and the logs")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="payguard-soak-"))
    logs = tmp / "logs"
    keep_tmp = args.keep
    stop = threading.Event()
    status = 1
    with ExitStack() as stack:
        stack.callback(lambda: None if keep_tmp else shutil.rmtree(tmp, ignore_errors=True))
        print(
            f"soak: seed {args.seed}, {args.orgs} orgs, {args.seconds:.0f}s at {args.rate}/s, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        database_url, where = prepare_database(args.database_url, tmp, stack, args.keep)
        redis = stack.enter_context(start_redis(tmp / "redis", durable=args.durable_redis))
        signer = make_signing_cert()
        paypal = stack.enter_context(FakePayPal(webhook_id=WEBHOOK_ID))
        cert_url = paypal.install_signing_cert(signer)
        twilio = stack.enter_context(FakeTwilio(credentials=(TWILIO_SID, TWILIO_TOKEN)))
        web_port = free_port()
        public_url = f"http://127.0.0.1:{web_port}"
        env = subprocess_env(database_url, redis.url, paypal, twilio, public_url)
        print(
            f"  database {where}\n  redis {redis.url} "
            f"({'AOF' if args.durable_redis else 'not durable'}); logs {logs}",
            flush=True,
        )

        engine = make_engine(database_url, pool_size=args.clients + 2, max_overflow=4)
        stack.callback(engine.dispose)
        policy = sending.Policy(default_segment_price_cents=1)
        org_ids, hungry, campaigns = create_orgs(engine, rng, args.orgs, policy)

        procs = Processes(env, logs, web_port)
        stack.callback(procs.stop_all)
        for role in ("web", "worker 0", "worker 1", "beat"):
            procs.start(role)
        print(
            f"  web {public_url} (gunicorn 2 workers), 2 workers (concurrency 2), beat; "
            f"{len(org_ids)} orgs ({len(hungry)} hungry)",
            flush=True,
        )

        stats, timeline = Stats(), Timeline()
        driver = Stack(
            web_port=web_port,
            signer=signer,
            cert_url=cert_url,
            engine=engine,
            redis_url=redis.url,
            twilio=twilio,
            public_url=public_url,
            policy=policy,
        )
        plan = Plan(rng, org_ids, hungry, campaigns, driver, timeline, stats, args.seed)
        faults: list[Fault] = []
        watchers: list[threading.Thread] = []
        watch_stop = threading.Event()
        stack.callback(watch_stop.set)
        pool = ThreadPoolExecutor(args.clients, thread_name_prefix="client")
        stack.callback(lambda: pool.shutdown(wait=False, cancel_futures=True))
        stack.callback(stop.set)
        try:
            t0, t0_wall = time.monotonic(), time.time()
            fault_thread = threading.Thread(
                target=inject_faults,
                args=(
                    args.seconds,
                    t0,
                    procs,
                    redis,
                    database_url,
                    faults,
                    stop,
                    watch_stop,
                    watchers,
                ),
                daemon=True,
            )
            fault_thread.start()
            supervisor = threading.Thread(target=procs.supervise, args=(stop, t0), daemon=True)
            supervisor.start()
            print("load:", flush=True)
            stopped = run_load(
                plan, timeline, pool, args.seconds, args.rate, args.clients, stats, t0, database_url
            )
            load_seconds = stopped - t0
            fault_thread.join(timeout=180)
            print("drain:", flush=True)
            drained, left, events_drained = drain(
                database_url, args.drain_timeout, "drain", stopped
            )
            publisher = Publisher(redis.url, timeout=0.5)
            replayed, other_parked = replay_parked(database_url, engine, publisher)
            publisher.close()
            if replayed:
                # What the first drain could not finish will not finish now: a shorter wait.
                limit = args.drain_timeout if drained else 30.0
                drained, left, events_drained = drain(database_url, limit, "replay", stopped)
            drain_seconds = time.monotonic() - stopped
            watch_stop.set()
            for watcher in watchers:
                watcher.join(timeout=5)
            figures = Figures(load_seconds, drain_seconds, events_drained, replayed, drained)
            report(args, plan, stats, faults, figures, database_url)
            if not drained:
                describe_stuck(database_url, t0_wall, faults)
            checks = run_checks(database_url, env, plan, twilio, drained, left, other_parked)
            checks.add(
                "processes: none exited by itself",
                not procs.unexpected,
                "web, beat and workers up but for the kills"
                if not procs.unexpected
                else sample(procs.unexpected),
            )
            checks.print()
            status = 0 if checks.ok else 1
            if status:
                keep_tmp = True
                print(f"\nlogs kept in {logs}")
        except KeyboardInterrupt:
            print("\nsoak: interrupted; stopping every process", file=sys.stderr, flush=True)
            status = 130
    return status


@dataclass
class Figures:
    load_seconds: float
    drain_seconds: float
    events_drained: float | None  # events and outbox alone, after the replay
    replayed: Counter
    drained: bool


def report(args, plan: Plan, stats: Stats, faults: list[Fault], fig: Figures, database_url: str):
    load_seconds, replayed = fig.load_seconds, fig.replayed
    with psycopg.connect(database_url, autocommit=True) as conn:
        to_debt = conn.execute(
            "SELECT count(*) FROM journal WHERE debt_delta_cents > 0"
        ).fetchone()[0]
        retried = conn.execute("SELECT count(*) FROM webhook_events WHERE attempts > 1").fetchone()[
            0
        ]
        replay_ok = conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'events.replay'"
        ).fetchone()[0]
    posts = sum(stats.posts.values())
    first = {k: v for k, v in stats.posts.items() if not k.startswith(("duplicate", "redelivery"))}
    print(f"\nwhat it did ({load_seconds:.1f}s of load, seed {args.seed}):")
    print(
        f"  actions {sum(plan.actions.values())}: "
        + ", ".join(f"{k} {v}" for k, v in plan.actions.most_common())
    )
    print(f"  webhooks posted {posts} ({posts / load_seconds:.1f}/s over the load):")
    for kind, n in sorted(first.items()):
        print(f"    {kind:<44} {n:5d}")
    for kind in ("duplicate (same bytes)", "duplicate (re-signed)", "redelivery"):
        print(f"    {kind:<44} {stats.posts.get(kind, 0):5d}")
    print(f"  answers: {dict(stats.codes)}; 200s: {dict(stats.answers)}")
    print(
        f"  POST latency p50 {pct(stats.latencies, 50) * 1000:.1f} ms, p99 "
        f"{pct(stats.latencies, 99) * 1000:.1f} ms, max {max(stats.latencies, default=0) * 1000:.0f} ms"
        + (f", mean {statistics.mean(stats.latencies) * 1000:.1f} ms" if stats.latencies else "")
    )
    print(
        f"  refunds sent before their payment: {dict(plan.refund_first)}; events retried "
        f"(attempts > 1) {retried}; parked for ordering and replayed {sum(replayed.values())} "
        f"{dict(replayed)} (audit rows {replay_ok})"
    )
    print(f"  clawbacks that went into debt: {to_debt}")
    print(
        f"  messages queued {stats.queued} ({stats.queued / load_seconds:.1f}/s), publish left "
        f"to the relay {stats.publish_deferred}; queue errors {dict(stats.queue_errors) or 'none'}"
    )
    print(f"  Twilio status callbacks: {dict(stats.callbacks)}")
    if stats.gave_up:
        print(f"  webhooks never answered 200: {sample(stats.gave_up)}")
    print(
        f"  drain after the load stopped: everything {fig.drain_seconds:.1f}s"
        + (" (gave up)" if not fig.drained else "")
        + ", events and outbox "
        + (f"{fig.events_drained:.1f}s" if fig.events_drained is not None else "never")
        + " (after the replay of the parked ones)"
    )
    print("  faults (t from load start; caught up = done with every event / message from before")
    print("  the recovery):")
    for f in faults:
        back = f"back t={f.recovered_at:.1f}s" if f.recovered_at is not None else "not back"
        events = "never" if f.events_after is None else f"{f.events_after:.1f}s"
        msgs = "never" if f.messages_after is None else f"{f.messages_after:.1f}s"
        stuck = f" ({f.stuck} messages still pending)" if f.messages_after is None else ""
        print(
            f"    t={f.at:5.1f}s {f.what:<26} {back}; events caught up {events}, "
            f"messages {msgs}{stuck} {f.note}"
        )


def describe_stuck(database_url: str, t0_wall: float, faults: list[Fault]) -> None:
    """What the drain left behind, with times from the load's start (for the report)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            """
SELECT m.message_id, m.status, m.send_attempt, extract(epoch FROM m.created_at),
       extract(epoch FROM m.updated_at), o.id, extract(epoch FROM o.published_at), o.attempts,
       o.last_error
FROM messages m LEFT JOIN outbox o ON o.task = %s AND o.args = jsonb_build_array(m.message_id)
WHERE m.status IN ('queued', 'sending', 'retrying') ORDER BY m.created_at LIMIT 10""",
            (messages.SEND_TASK,),
        ).fetchall()
        events = conn.execute(
            "SELECT id, provider, event_type, attempts, last_error FROM webhook_events "
            "WHERE status = 'received' ORDER BY id LIMIT 10"
        ).fetchall()
    print("\nleft pending by the drain (t from load start):")
    print(
        "  faults: "
        + ", ".join(f"{f.what} t={f.at:.1f}-{f.recovered_at or 0:.1f}s" for f in faults)
    )
    for mid, status, attempt, created, updated, oid, published, attempts, error in rows:
        print(
            f"  message {mid} {status} (task {attempt}): queued t={float(created) - t0_wall:.1f}s, "
            f"last change t={float(updated) - t0_wall:.1f}s; outbox {oid} published "
            + (f"t={float(published) - t0_wall:.1f}s" if published else "never")
            + f" ({attempts} publishes{', ' + error if error else ''})"
        )
    for inbox_id, provider, event_type, attempts, error in events:
        print(f"  event {inbox_id} {provider} {event_type} received, {attempts} attempts: {error}")


if __name__ == "__main__":
    raise SystemExit(main())
