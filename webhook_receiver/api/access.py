"""Who may call `/v1`, and how often: API keys checked against a short per-process cache,
and a per-key request rate counted in Redis across every web process.

Keys are cached for KEY_CACHE_SECONDS (0.5 s), so a revocation takes effect in every web
process within one second while a busy key costs no database round trip per request.

The rate limit is a fixed one-second window per key, shared through Redis. A process does not
ask Redis for every request: it claims the window's requests in chunks (`INCRBY chunk`, and
`EXPIRE` on the window's first claim, in one Lua script) of `per_second // 50` (at least 1),
spends them locally, and remembers a refusal until the window ends. The total allowed in a
window never exceeds the limit; a key can be refused up to `chunk - 1` requests early per other
process holding unspent requests. When Redis does not answer, requests are let through (fail
open) and Redis is not asked again for REDIS_BACKOFF_SECONDS: the limit protects capacity, not money (every
rule of money is enforced in PostgreSQL), and failing closed would turn a Redis outage into
an outage of the whole API, `can-send` included. Each skipped check is logged.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Engine

from core import apikeys
from core.apikeys import ApiKey

log = logging.getLogger(__name__)

KEY_CACHE_SECONDS = 0.5
KEY_CACHE_MAX = 10_000  # unknown ids are cached too; an attacker's guesses must not grow it
REDIS_TIMEOUT_SECONDS = 0.1
REDIS_BACKOFF_SECONDS = 1.0


class Unauthenticated(Exception):
    pass


class KeyCache:
    def __init__(self, engine: Engine, ttl: float = KEY_CACHE_SECONDS) -> None:
        self._engine = engine
        self._ttl = ttl
        self._entries: dict[str, tuple[float, ApiKey | None]] = {}
        self._lock = threading.Lock()

    def _lookup(self, key_id: str) -> ApiKey | None:
        now = time.monotonic()
        cached = self._entries.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        with self._engine.connect() as conn:
            key = apikeys.get(conn.execution_options(isolation_level="AUTOCOMMIT"), key_id)
        with self._lock:
            if len(self._entries) >= KEY_CACHE_MAX:
                self._entries.clear()
            self._entries[key_id] = (now + self._ttl, key)
        return key

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an `Authorization: Bearer key_….…` header, else Unauthenticated."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("an API key is required: Authorization: Bearer <secret>")
        parts = apikeys.split_secret(token.strip())
        if parts is None:
            raise Unauthenticated("malformed API key")
        key = self._lookup(parts[0])
        # A known id with a wrong secret, an unknown id and a revoked key answer alike.
        if key is None or not key.matches(parts[1]) or key.revoked_at is not None:
            raise Unauthenticated("unknown or revoked API key")
        return key


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0


_CLAIM = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], 2) end
return n
"""

CHUNK_DIVISOR = 50


class RateLimiter:
    def __init__(self, redis_url: str, per_second: int) -> None:
        import redis

        self._redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
        self._claim = self._redis.register_script(_CLAIM)  # EVALSHA, EVAL when not cached
        self._errors = redis.RedisError
        self.per_second = per_second
        self.chunk = max(1, per_second // CHUNK_DIVISOR)
        self._skip_until = 0.0
        # key id -> (window, requests claimed from Redis and not yet spent; -1: refused)
        self._local: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def check(self, key_id: str) -> Verdict:
        if time.monotonic() < self._skip_until:
            return Verdict(True)
        now = time.time()
        window = int(now)
        with self._lock:
            held_window, left = self._local.get(key_id, (-1, 0))
            if held_window == window and left > 0:
                self._local[key_id] = (window, left - 1)
                return Verdict(True)
            if held_window == window and left < 0:
                return Verdict(False, max(1, math.ceil(window + 1 - now)))
        name = f"payguard:ratelimit:{key_id}:{window}"
        try:
            claimed = int(self._claim(keys=[name], args=[self.chunk]))
        except self._errors as exc:
            self._skip_until = time.monotonic() + REDIS_BACKOFF_SECONDS
            log.warning(
                "rate limit not checked: Redis unavailable, requests let through",
                extra={"key_id": key_id, "error": str(exc)[:200]},
            )
            return Verdict(True)
        granted = max(0, min(self.chunk, self.per_second - (claimed - self.chunk)))
        with self._lock:
            if len(self._local) >= KEY_CACHE_MAX:
                self._local.clear()
            self._local[key_id] = (window, granted - 1 if granted else -1)
        if granted:
            return Verdict(True)
        return Verdict(False, max(1, math.ceil(window + 1 - now)))
