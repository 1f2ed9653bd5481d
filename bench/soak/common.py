"""Constants of the soak and its figures (percentiles, money, counters)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

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
