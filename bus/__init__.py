"""The message bus: how a task message reaches the broker (Celery over Redis or RabbitMQ).

core/outbox.py decides what to publish and when (after the commit that recorded it) and
names only a `Publisher` protocol; this package is the Celery side of it, so that the
receiver, the CLI and the worker can all publish without core importing Celery or kombu,
and without the receiver or the CLI importing the worker. broker.py is the broker's
configuration (queues, routes, quorum queues) that the worker reads too."""
