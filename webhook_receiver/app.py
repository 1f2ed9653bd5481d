"""The Flask receiver: verify, store durably, enqueue, answer. Nothing else.

200 means the event is committed to the inbox with its outbox row; publishing to the broker
is attempted after the commit and a failure there is left to the outbox relay.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, jsonify, request
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from core import inbox
from core.db import make_engine, run_in_transaction
from core.errors import InvalidInput
from core.settings import Settings, load_settings_or_exit
from worker.publisher import Publisher

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024


@dataclass
class Receiver:
    settings: Settings
    engine: Engine
    publisher: Publisher
    paypal_verifier: Any | None
    metrics: Any


class BadRequest(Exception):
    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


class Unavailable(Exception):
    pass


def create_app(settings: Settings | None = None, *, paypal_clock: Callable | None = None) -> Flask:
    settings = settings or load_settings_or_exit("DATABASE_URL", "REDIS_URL")
    from webhook_receiver import metrics

    app = Flask("payguard")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    paypal_verifier = None
    if settings.PAYPAL_WEBHOOK_ID:
        from core.paypal_verify import build_verifier

        paypal_verifier = build_verifier(settings, clock=paypal_clock)
    receiver = Receiver(
        settings=settings,
        engine=make_engine(settings.DATABASE_URL or "", pool_size=4, max_overflow=4),
        publisher=Publisher(settings.REDIS_URL or "", timeout=settings.BROKER_PUBLISH_TIMEOUT),
        paypal_verifier=paypal_verifier,
        metrics=metrics,
    )
    app.extensions["payguard"] = receiver

    from webhook_receiver import routes

    app.register_blueprint(routes.blueprint)
    return app


def answer(http_status: int, /, **body: Any) -> Response:
    response = jsonify(body)
    response.status_code = http_status
    return response


def raw_body() -> bytes:
    """The exact bytes PayPal or Stripe signed, refused past 1 MiB (Flask answers 413)."""
    return request.get_data(cache=True, as_text=False)


def accept(
    receiver: Receiver,
    provider: str,
    event_id: str,
    event_type: str,
    headers: dict[str, str],
    body: bytes,
) -> Response:
    """Store the verified event with its outbox row, answer, then try to publish."""
    try:
        stored, outbox_id = run_in_transaction(
            receiver.engine,
            lambda conn: inbox.store(conn, provider, event_id, event_type, headers, body),
        )
    except InvalidInput as exc:
        raise BadRequest("payload", str(exc)) from None
    except SQLAlchemyError as exc:
        log.error("inbox unavailable", extra={"provider": provider, "error": str(exc)[:200]})
        raise Unavailable("storage unavailable") from None
    status = "duplicate" if stored.duplicate else "accepted"
    log.info(
        "webhook stored",
        extra={
            "provider": provider,
            "event_id": event_id,
            "event_type": event_type,
            "inbox_id": stored.id,
            "status": status,
        },
    )
    if outbox_id is not None:
        publish_now(receiver, outbox_id, stored.id)
    return answer(200, status=status, event_id=event_id, id=stored.id)


def publish_now(receiver: Receiver, outbox_id: int, inbox_id: int) -> None:
    try:
        receiver.publisher.publish(
            inbox.PROCESS_EVENT_TASK, [inbox_id], task_id=f"outbox-{outbox_id}"
        )
    except Exception as exc:
        log.warning(
            "publish deferred to the relay", extra={"inbox_id": inbox_id, "error": str(exc)[:200]}
        )
        return
    try:
        run_in_transaction(receiver.engine, lambda conn: inbox.mark_published(conn, [outbox_id]))
    except SQLAlchemyError:
        pass  # the relay will publish it again; processing is idempotent


def readiness(receiver: Receiver) -> tuple[bool, dict[str, str]]:
    checks: dict[str, str] = {}
    try:
        with receiver.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        import redis

        client = redis.Redis.from_url(
            receiver.settings.REDIS_URL or "", socket_connect_timeout=1, socket_timeout=1
        )
        client.ping()
        client.close()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    return all(v == "ok" for v in checks.values()), checks


def parse_json_object(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("payload", "body is not JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("payload", "body is not a JSON object")
    return payload
