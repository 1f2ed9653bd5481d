"""The broker the tasks go through, as Celery configuration: Redis (one machine, the default)
or RabbitMQ (`BROKER_URL=amqp://…`, several machines).

On RabbitMQ every Payguard queue is a durable quorum queue (replicated, and a message is only
confirmed to the publisher once a majority of the nodes has it), bound to a topic exchange of
its own name: Celery's native delayed delivery, which carries retry countdowns on quorum
queues instead of holding them unacknowledged in a worker, forwards through topic exchanges
only. Quorum queues refuse a global QoS prefetch; Celery sees the `x-queue-type` argument
(`worker_detect_quorum_queues`, on by default) and applies the prefetch per consumer.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from core.settings import is_amqp_url

# "celery" is Celery's default queue: the Procfile's worker consumes it too, so on RabbitMQ it
# is declared like the others rather than created as a classic queue on first use.
QUEUES = (
    "payguard.events",
    "payguard.send",
    "payguard.twilio",
    "payguard.beat",
    "payguard.outbound",
    "celery",
)

ROUTES = {
    "payguard.process_event": "payguard.events",
    "payguard.send_message": "payguard.send",
    "payguard.fan_out_sends": "payguard.send",
    "payguard.send_batch": "payguard.send",
    "payguard.sync_twilio_account": "payguard.twilio",
    "payguard.deliver_event": "payguard.outbound",
    # Money from a provider, as the events are (until 2026-12-01 it fell to the beat queue).
    "payguard.capture_top_up": "payguard.events",
}


def queue_for(task: str) -> str:
    return ROUTES.get(task, "payguard.beat")


def quorum_queues(delivery_limit: int) -> list[Queue]:
    """Every Payguard queue, durable and of type quorum. `x-delivery-limit` ends the loop of a
    message that kills its worker on every delivery (acks_late + reject_on_worker_lost
    requeue it each time): past the limit RabbitMQ drops it, and the outbox relay publishes
    an event still `received` or a message still `queued` again, EVENT_REDELIVER_SECONDS
    later, instead of a hot loop."""
    arguments = {"x-queue-type": "quorum", "x-delivery-limit": delivery_limit}
    return [
        Queue(
            name,
            Exchange(name, type="topic", durable=True),
            routing_key=name,
            durable=True,
            queue_arguments=arguments,
        )
        for name in QUEUES
    ]


def celery_options(
    broker_url: str,
    *,
    delivery_limit: int,
    visibility_timeout: int,
    publish_timeout: float | None = None,
) -> dict[str, Any]:
    """Celery settings that depend on the broker: its URL, transport options and queues.

    `publish_timeout` is for publishers that must fail fast (the receiver, the relay, the CLI):
    connecting, writing and waiting for the broker's confirm each give up after it."""
    if not is_amqp_url(broker_url):
        timeout = publish_timeout
        transport: dict[str, Any] = {
            # Longer than any retry countdown, or an ETA'd retry would be delivered twice.
            "visibility_timeout": visibility_timeout,
            "socket_connect_timeout": timeout or 2,
            # A broker that accepts connections but does not answer (stopped, swapping,
            # partitioned mid-stream) must not hold a publisher longer than its timeout.
            "socket_timeout": timeout or 5,
        }
        if publish_timeout is not None:
            transport["max_retries"] = 0
        return {"broker_url": broker_url, "broker_transport_options": transport}
    transport = {
        # Every publish waits for RabbitMQ's basic.ack: a message the broker could not take
        # (a queue over its limits, a node without quorum) raises instead of vanishing.
        "confirm_publish": True,
    }
    if publish_timeout is not None:
        # The confirm waits up to publish_timeout (Publisher passes confirm_timeout). After a
        # failure kombu closes the channel and then the connection politely, each close
        # waiting for the broker's answer up to the read timeout: a quarter of the budget each
        # keeps a publish to a broker that stopped answering within 1.5 x publish_timeout.
        # Answers to a healthy broker's declares and channel opens take milliseconds.
        # max_retries 0: kombu would otherwise sleep 2 s before connecting again.
        transport.update(
            read_timeout=publish_timeout / 4, write_timeout=publish_timeout, max_retries=0
        )
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport,
        "task_queues": quorum_queues(delivery_limit),
        "task_default_exchange_type": "topic",
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
    }
