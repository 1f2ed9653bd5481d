"""The task publisher over Redis (bus/publisher.py, bus/redis_transport.py): every message
lands in its queue, one Redis client serves a channel's publishes instead of one built per
message, and connections the server dropped are replaced on the next publish."""

from __future__ import annotations

import base64
import json

import redis

from bus.publisher import Publisher
from core.outbox import PROCESS_EVENT_TASK


def queued_args(client: redis.Redis) -> list[list]:
    """The args of the messages in payguard.events, oldest first (kombu LPUSHes JSON with a
    base64 body of [args, kwargs, embed])."""
    return [
        json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        for raw in reversed(client.lrange("payguard.events", 0, -1))
    ]


def test_publishes_share_one_redis_client_and_every_message_lands(redis_clean, monkeypatch):
    built = []
    real_init = redis.Redis.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        real_init(self, *args, **kwargs)

    publisher = Publisher(redis_clean, timeout=2.0)
    monkeypatch.setattr(redis.Redis, "__init__", counting_init)
    try:
        for n in range(20):
            publisher.publish(PROCESS_EVENT_TASK, [n])
    finally:
        monkeypatch.undo()
        publisher.close()

    # kombu's own transport builds one client per message: 20 here, plus its channel's.
    assert len(built) <= 2
    check = redis.Redis.from_url(redis_clean)
    assert queued_args(check) == [[n] for n in range(20)]


def test_a_publish_after_the_server_dropped_the_connections_goes_through(redis_clean):
    publisher = Publisher(redis_clean, timeout=2.0)
    check = redis.Redis.from_url(redis_clean)
    try:
        publisher.publish(PROCESS_EVENT_TASK, [1])
        check.client_kill_filter(_type="normal", skipme=True)
        for n in (2, 3):
            try:
                publisher.publish(PROCESS_EVENT_TASK, [n])
            except Exception:  # the first command on a dead connection may fail once...
                publisher.publish(PROCESS_EVENT_TASK, [n])  # ...the next one reconnects
    finally:
        publisher.close()
    assert queued_args(check) == [[1], [2], [3]]
