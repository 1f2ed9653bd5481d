"""kombu's Redis transport, keeping one client per channel for its synchronous commands.

kombu builds a new `redis.Redis` for every message it publishes (`Channel.conn_or_acquire`),
and a redis-py client builds its table of response callbacks anew each time: about a quarter
of what a publish costs the receiver. The client only borrows connections from the channel's
pool for each command, so one per channel does the same work; it is built again when the
channel's pool is (kombu drops its pools after a connection error).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):  # type: ignore[misc]  # kombu ships no types
    _kept_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        kept = self._kept_client
        if kept is None or kept.connection_pool is not self.pool:
            kept = self._kept_client = self._create_client()
        yield kept


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """This transport for a redis:// or rediss:// broker; None (the URL's own) for others."""
    scheme = broker_url.partition("://")[0].lower()
    return f"{__name__}:Transport" if scheme in ("redis", "rediss") else None
