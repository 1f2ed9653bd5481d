"""Publishing task messages by name, fast: a broker that is down must fail the publish within
about a second (the outbox relay publishes it later), never hold a webhook request.

The receiver, the beat relay and the CLI all publish through this, to the configured broker
(`Settings.broker_url`: BROKER_URL, else REDIS_URL), with the queues declared as the worker
declares them (quorum queues on RabbitMQ, `bus/broker.py`)."""

from __future__ import annotations

import logging

from celery import Celery

from bus import broker, redis_transport
from core.settings import Settings, is_amqp_url

log = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self,
        broker_url: str,
        timeout: float = 0.5,
        *,
        delivery_limit: int = Settings.model_fields["BROKER_DELIVERY_LIMIT"].default,
    ) -> None:
        self._timeout = timeout
        self._confirms = is_amqp_url(broker_url)
        self._app = Celery("payguard-publisher", set_as_current=False)
        self._app.conf.update(
            # One Redis client per channel rather than one per message (bus/redis_transport.py).
            broker_transport=redis_transport.transport_for(broker_url),
            broker_connection_timeout=timeout,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
            broker_pool_limit=4,
            task_serializer="json",
            **broker.celery_options(
                broker_url,
                delivery_limit=delivery_limit,
                # Only the worker consumes; a publisher's Redis visibility timeout is unused.
                visibility_timeout=Settings.model_fields["BROKER_VISIBILITY_TIMEOUT"].default,
                publish_timeout=timeout,
            ),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Publisher:
        return cls(
            settings.broker_url,
            timeout=settings.BROKER_PUBLISH_TIMEOUT,
            delivery_limit=settings.BROKER_DELIVERY_LIMIT,
        )

    def publish(self, task: str, args: list, *, task_id: str | None = None) -> None:
        """Send one message; raises on any broker failure (the caller records it). On RabbitMQ
        it returns only once the broker confirmed the message (publisher confirms)."""
        extra = {"confirm_timeout": self._timeout} if self._confirms else {}
        self._app.send_task(
            task,
            args=args,
            queue=broker.queue_for(task),
            task_id=task_id,
            retry=False,
            **extra,
        )

    def close(self) -> None:
        self._app.close()
