"""The seeded plan: what the load sends, in which order, and what it expects to
have moved."""

from __future__ import annotations

import json
import random
import string
import threading
import time
from collections import Counter
from typing import ClassVar

from bench.soak.common import (
    MAX_ATTEMPTS,
    STRIPE_SECRET,
    WEBHOOK_ID,
    Stats,
)
from bench.soak.model import Delivery, Payment, Stack, Subscription, Timeline, http_post
from bench.soak.payments import PaymentActions
from bench.soak.sends import MessageActions
from tests.support.payloads import stripe as sp


class Plan(PaymentActions, MessageActions):
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
