"""What the plan is made of: deliveries, payments, subscriptions, their timeline, and the
stack the load posts to."""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bus.publisher import Publisher
from core import sending
from tests.support.fakes.fake_twilio import (
    FakeTwilio,
)


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
