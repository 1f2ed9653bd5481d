"""The Flask receiver's app factory: settings, engine, publisher and verifier built once at
start, then the webhook routes (webhook_receiver/routes.py) and the host API
(webhook_receiver/api/). What the routes share lives in webhook_receiver/receiver.py.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable

from flask import Flask

from bus.publisher import Publisher
from core.db import make_engine
from core.publish_marks import PublishMarks
from core.settings import Settings, load_settings_or_exit
from webhook_receiver.receiver import MAX_BODY, Receiver


def create_app(settings: Settings | None = None, *, paypal_clock: Callable | None = None) -> Flask:
    # REDIS_URL even with BROKER_URL set: Redis is the shared store of rate limits and caps.
    settings = settings or load_settings_or_exit("DATABASE_URL", "REDIS_URL")
    from core import logging_setup
    from webhook_receiver import metrics

    logging_setup.configure(settings.LOG_FORMAT)

    app = Flask("payguard")
    # One byte more than allowed: a chunked body (no Content-Length) is cut off silently at
    # this limit by Werkzeug, so raw_body() must be able to see that there was more.
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY + 1
    paypal_verifier = None
    if settings.PAYPAL_WEBHOOK_ID:
        from core.providers.paypal.verify import build_verifier

        paypal_verifier = build_verifier(settings, clock=paypal_clock)
    # A connection that went stale fails one request with 503, which the provider retries.
    engine = make_engine(
        settings.DATABASE_URL or "",
        pool_size=4,
        max_overflow=4,
        prepare_threshold=settings.DATABASE_PREPARE_THRESHOLD,
    )
    receiver = Receiver(
        settings=settings,
        engine=engine,
        publisher=Publisher.from_settings(settings),
        paypal_verifier=paypal_verifier,
        metrics=metrics.ReceiverMetrics(engine),  # counters + database gauges per scrape
        # Published outbox rows are marked in batches off the request path: one commit per
        # webhook. A mark lost in a crash only lets the relay publish again.
        publish_marks=PublishMarks(engine),
    )
    atexit.register(receiver.publish_marks.close)
    app.extensions["payguard"] = receiver

    from webhook_receiver import routes

    app.register_blueprint(routes.blueprint)
    from webhook_receiver import api

    api.install(app, receiver)
    return app
