"""Twilio's limits, shared by every worker through Redis (REDIS_URL).

* A concurrency cap per Twilio account (TWILIO_MAX_CONCURRENCY): a sorted set of slot leases
  per account, each scored by when it expires. A slot is taken by one Lua script (drop the
  expired, count, add) and given back when the call returns; the slot of a worker that died
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

_ACQUIRE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[3])
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
    return 1
end
return 0
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
        """A slot's token, or None when the account has every slot taken."""
        token = uuid.uuid4().hex
        got = self._acquire(
            keys=[self._slots(account)], args=[self.max_concurrency, self.slot_ms, token]
        )
        return token if got else None

    def acquire(
        self, account: str, timeout: float, sleep: Callable[[float], None] = time.sleep
    ) -> str | None:
        """Wait up to `timeout` seconds for a slot (and for the account's backoff to pass);
        None when none came."""
        deadline = time.monotonic() + timeout
        while True:
            wait = self.backoff_left(account)
            if wait <= 0:
                token = self.try_acquire(account)
                if token is not None:
                    return token
                wait = random.uniform(0.002, 0.02)  # a slot frees when a call returns
            if time.monotonic() + wait > deadline:
                return None
            sleep(wait)

    def release(self, account: str, token: str) -> None:
        self.client.zrem(self._slots(account), token)

    def in_use(self, account: str) -> int:
        return int(self.client.zcard(self._slots(account)))

    def back_off(self, account: str, seconds: float) -> None:
        """Twilio said 429 for this account: no new call to it for `seconds`."""
        self._back_off(keys=[self._backoff(account)], args=[max(1, int(seconds * 1000))])

    def backoff_left(self, account: str) -> float:
        left = int(self.client.pttl(self._backoff(account)))
        return left / 1000 if left > 0 else 0.0
