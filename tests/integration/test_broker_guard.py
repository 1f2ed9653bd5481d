"""worker/broker_guard.py: kombu 5.7 killed a worker whose Redis went away while it held
unacknowledged tasks, first when it closed the broken channel, then when a task that finished
during the outage was acked through that channel after the reconnect ("Unrecoverable error:
AttributeError('NoneType' object has no attribute 'hostname')", seen in bench/soak.py). The
guard leaves the message in Redis's unacked set, to be delivered again after the visibility
timeout, and keeps the worker alive; a channel whose connection still stands is untouched."""

from __future__ import annotations

import pytest
from kombu import Connection

from worker import broker_guard


@pytest.fixture
def channel(redis_clean):
    broker_guard.install()
    with Connection(redis_clean) as conn:
        yield conn.default_channel


def _gone(channel) -> None:
    """The state kombu leaves an old channel in after the reconnect: no client, no pool."""
    channel.connection.client = None
    channel._pool = None


@pytest.mark.parametrize("settle", ["ack", "reject"])
def test_settling_a_message_through_a_channel_whose_connection_is_gone_keeps_the_worker(
    channel, settle
):
    _gone(channel)
    getattr(channel.qos, settle)("a-delivery-tag")  # no AttributeError: the guard took it


def test_a_channel_whose_connection_stands_still_settles_as_kombu_does(channel):
    channel.qos.ack("a-delivery-tag")  # an unknown tag: kombu removes nothing, and no error
