"""Publishing task messages by name, fast: a broker that is down must fail the publish within
about a second (the outbox relay publishes it later), never hold a webhook request."""

from __future__ import annotations

import logging

from celery import Celery

log = logging.getLogger(__name__)

ROUTES = {
    "payguard.process_event": "payguard.events",
    "payguard.send_message": "payguard.send",
    "payguard.sync_twilio_account": "payguard.twilio",
    "payguard.deliver_event": "payguard.outbound",
}


class Publisher:
    def __init__(self, broker_url: str, timeout: float = 0.5) -> None:
        self._app = Celery("payguard-publisher", set_as_current=False)
        self._app.conf.update(
            broker_url=broker_url,
            broker_connection_timeout=timeout,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
            broker_transport_options={
                "socket_connect_timeout": timeout,
                # Not more than `timeout` either: a broker that accepts connections but does
                # not answer (stopped, swapping, partitioned mid-stream) would otherwise hold
                # each webhook request for a full second on top of its own work.
                "socket_timeout": timeout,
                "max_retries": 0,
            },
            broker_pool_limit=4,
            task_serializer="json",
        )

    def publish(self, task: str, args: list, *, task_id: str | None = None) -> None:
        """Send one message; raises on any broker failure (the caller records it)."""
        self._app.send_task(
            task,
            args=args,
            queue=ROUTES.get(task, "payguard.beat"),
            task_id=task_id,
            retry=False,
        )

    def close(self) -> None:
        self._app.close()
