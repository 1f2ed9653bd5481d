"""Twilio's limits, shared by every worker through Redis (REDIS_URL).

* A concurrency cap per Twilio account (TWILIO_MAX_CONCURRENCY): a sorted set of slot leases
  per account, each scored by when it expires. Slots are taken by one Lua script (check the
  backoff, drop the expired, count, add as many as asked and free: a batch takes its slots in
  one round trip) and each is given back when its call returns; the slot of a worker that died
  mid-call expires by itself after `slot_seconds` (longer than any call lasts), so a crash
  never shrinks the cap for good.
* A backoff per account: a 429 from Twilio sets a key that expires after the backoff; sends for
  that account wait it out, sends for every other account go on.

Times come from Redis (`TIME`), so workers on machines whose clocks disagree share one clock.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable

import redis

# Takes up to len(ARGV) - 2 slots (one per token given) of those free, unless the account is
# backing off: then it takes none and answers minus the backoff's milliseconds left.
_ACQUIRE = """
local backoff = redis.call('PTTL', KEYS[2])
if backoff > 0 then
    return -backoff
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
local n = math.min(tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1]), #ARGV - 2)
for i = 1, n do
    redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[2 + i])
end
if n > 0 then
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return math.max(n, 0)
"""

# Sets the backoff unless a longer one is already running.
_BACK_OFF = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], '1', 'PX', tonumber(ARGV[1]))
end
return 1
"""


class TwilioLimits:
    def __init__(
        self,
        client: redis.Redis,
        max_concurrency: int,
        *,
        slot_seconds: float = 30.0,
        prefix: str = "payguard:twilio",
    ) -> None:
        self.client = client
        self.max_concurrency = max_concurrency
        self.slot_ms = int(slot_seconds * 1000)
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._back_off = client.register_script(_BACK_OFF)

    @classmethod
    def from_url(cls, url: str, max_concurrency: int, **kw) -> TwilioLimits:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        return cls(client, max_concurrency, **kw)

    def _slots(self, account: str) -> str:
        return f"{self.prefix}:slots:{account}"

    def _backoff(self, account: str) -> str:
        return f"{self.prefix}:backoff:{account}"

    def try_acquire(self, account: str) -> str | None:
        """A slot's token, or None when the account has every slot taken or is backing off."""
        tokens, _ = self.try_acquire_many(account, 1)
        return tokens[0] if tokens else None

    def try_acquire_many(self, account: str, n: int) -> tuple[list[str], float]:
        """Up to `n` slots' tokens, as many as are free, in one round trip; and while the
        account backs off, none and the seconds left of the backoff."""
        if n <= 0:
            return [], 0.0
        tokens = [uuid.uuid4().hex for _ in range(n)]
        got = int(
            self._acquire(
                keys=[self._slots(account), self._backoff(account)],
                args=[self.max_concurrency, self.slot_ms, *tokens],
            )
        )
        if got < 0:
            return [], -got / 1000
        return tokens[:got], 0.0

    def acquire(
        self, account: str, timeout: float, sleep: Callable[[float], None] = time.sleep
    ) -> str | None:
        """Wait up to `timeout` seconds for a slot (and for the account's backoff to pass);
        None when none came."""
        deadline = time.monotonic() + timeout
        while True:
            tokens, wait = self.try_acquire_many(account, 1)
            if tokens:
                return tokens[0]
            if wait <= 0:
                wait = random.uniform(0.002, 0.02)  # a slot frees when a call returns
            if time.monotonic() + wait > deadline:
                return None
            sleep(wait)

    def release(self, account: str, *tokens: str) -> None:
        if tokens:
            self.client.zrem(self._slots(account), *tokens)

    def in_use(self, account: str) -> int:
        return int(self.client.zcard(self._slots(account)))

    def back_off(self, account: str, seconds: float) -> None:
        """Twilio said 429 for this account: no new call to it for `seconds`."""
        self._back_off(keys=[self._backoff(account)], args=[max(1, int(seconds * 1000))])

    def backoff_left(self, account: str) -> float:
        left = int(self.client.pttl(self._backoff(account)))
        return left / 1000 if left > 0 else 0.0
