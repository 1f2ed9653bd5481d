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

    # The same failure one step later: a task that finished while Redis was away is acked
    # (or rejected) after the reconnect through its old channel, whose connection is gone,
    # and the worker died with the same AttributeError (seen in bench/soak.py, 2026-12-01).
    # Its message stays in Redis's unacked set and is delivered again after the visibility
    # timeout; every task is idempotent, and finds its work done.
    for name in ("ack", "reject"):
        setattr(kombu_redis.QoS, name, _unless_gone(getattr(kombu_redis.QoS, name)))
    _installed = True


def _unless_gone(settle):  # kombu ships no types
    def guarded(self, delivery_tag, *args, **kwargs):
        try:
            return settle(self, delivery_tag, *args, **kwargs)
        except AttributeError as exc:
            transport = self.channel.connection
            if transport is not None and transport.client is not None:
                raise
            log.warning(
                "broker connection gone before the task's message was settled; it is "
                "delivered again after the visibility timeout",
                extra={"delivery_tag": delivery_tag, "error": str(exc)},
            )
            return None

    return guarded
