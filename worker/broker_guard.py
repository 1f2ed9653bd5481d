"""A guard around one kombu 5.7 failure: a worker whose Redis goes away while it holds
unacknowledged (acks_late) tasks died with "Unrecoverable error: AttributeError('NoneType'
object has no attribute 'hostname')".

Celery closes the broken connection first; kombu's channel close then tries to put the
unacknowledged messages back through that connection, whose client is already gone, and
raises AttributeError, which Celery's `ignore_errors` does not cover. With the guard the
close gives up on that restore instead: the messages stay in Redis's unacked set (restored
after the visibility timeout) and Payguard's outbox relay republishes the work anyway, and
the worker reconnects when Redis is back instead of exiting.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
_installed = False


def install() -> None:
    """Wrap kombu's Redis channel close once per process (called at worker start)."""
    global _installed
    if _installed:
        return
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel.close

    def close(self) -> None:
        try:
            original(self)
        except AttributeError as exc:
            if self.connection is not None and self.connection.client is not None:
                raise
            log.warning(
                "broker connection already gone; unacked messages left for redelivery",
                extra={"error": str(exc)},
            )

    kombu_redis.Channel.close = close  # type: ignore[method-assign]
    _installed = True
