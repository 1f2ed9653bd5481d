"""The Flask receiver: verify, store durably, enqueue, answer. Nothing else.

200 means the event is committed to the inbox with its outbox row; publishing to the broker
is attempted after the commit and a failure there is left to the outbox relay. The row is
marked published off the request path (core/publish_marks.py): one commit per webhook.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from core import inbox
from core.db import make_engine, run_in_transaction
from core.errors import InvalidInput
from core.publish_marks import PublishMarks
from core.settings import Settings, load_settings_or_exit
from worker.publisher import Publisher

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
TOKEN_CACHE_SECONDS = 3600.0
TOKEN_FAILURE_CACHE_SECONDS = 10.0


@dataclass
class Receiver:
    settings: Settings
    engine: Engine
    publisher: Publisher
    paypal_verifier: Any | None
    metrics: Any
    publish_marks: PublishMarks
    _subaccount_tokens: dict[str, tuple[str | None, float]] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def subaccount_token(self, subaccount_sid: str) -> str | None:
        """The auth token of a subaccount of ours (an organization's, or one a message was
        sent through), asked of Twilio once an hour at most; None for a subaccount that is
        not ours (never asked) or whose token Twilio would not give. That failure is
        remembered for seconds only: Twilio does not send a refused callback again, so an
        hour of refusals would lose an hour of them, while remembering it at all keeps a
        flood of forged callbacks from becoming a flood of requests to Twilio."""
        cached = self._subaccount_tokens.get(subaccount_sid)
        if cached is not None and cached[1] > self.clock():
            return cached[0]
        with self.engine.connect() as conn:
            ours = conn.execute(
                text(
                    "SELECT 1 FROM organizations WHERE twilio_subaccount_sid = :s "
                    "UNION ALL SELECT 1 FROM messages WHERE twilio_subaccount_sid = :s LIMIT 1"
                ),
                {"s": subaccount_sid},
            ).first()
        if ours is None or not self.settings.twilio_configured:
            return None
        from core.twilio_gateway import build_gateway

        gateway = build_gateway(self.settings, timeout=(2.0, 5.0))
        try:
            token = gateway.subaccount_auth_token(subaccount_sid)
        finally:
            gateway.close()
        ttl = TOKEN_CACHE_SECONDS if token else TOKEN_FAILURE_CACHE_SECONDS
        self._subaccount_tokens[subaccount_sid] = (token, self.clock() + ttl)
        return token


class BadRequest(Exception):
    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


class Unavailable(Exception):
    pass


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
        from core.paypal_verify import build_verifier

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
        publish_marks=PublishMarks(engine),
    )
    atexit.register(receiver.publish_marks.close)
    app.extensions["payguard"] = receiver

    from webhook_receiver import routes

    app.register_blueprint(routes.blueprint)
    from webhook_receiver import api

    api.install(app, receiver)
    return app


def answer(http_status: int, /, **body: Any) -> Response:
    response = jsonify(body)
    response.status_code = http_status
    return response


def raw_body() -> bytes:
    """The exact bytes PayPal or Stripe signed, refused past 1 MiB (answered 413)."""
    body = request.get_data(cache=True, as_text=False)
    if len(body) > MAX_BODY:
        raise RequestEntityTooLarge()
    return body


def accept(
    receiver: Receiver,
    provider: str,
    event_id: str,
    event_type: str,
    headers: dict[str, str],
    body: bytes,
    transmission_id: str | None = None,
) -> Response:
    """Store the verified event with its outbox row, answer, then try to publish."""
    try:
        stored, outbox_id = run_in_transaction(
            receiver.engine,
            lambda conn: inbox.store(
                conn, provider, event_id, event_type, headers, body, transmission_id
            ),
        )
    except inbox.ReplayedTransmission as exc:
        raise BadRequest("replay", str(exc)) from None
    except InvalidInput as exc:
        raise BadRequest("payload", str(exc)) from None
    except IntegrityError as exc:
        if inbox.is_replayed_transmission(exc):
            raise BadRequest("replay", "transmission already used by another event") from None
        raise Unavailable("storage refused the event") from None
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
    receiver.publish_marks.add([outbox_id])


def readiness(receiver: Receiver) -> tuple[bool, dict[str, str]]:
    checks: dict[str, str] = {}
    try:
        with receiver.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    s = receiver.settings
    checks["redis"] = _check(lambda: _ping_redis(s.REDIS_URL or ""))
    if s.broker_is_rabbitmq:
        checks["broker"] = _check(lambda: _ping_amqp(s.broker_url))
    elif s.broker_url != s.REDIS_URL:
        checks["broker"] = _check(lambda: _ping_redis(s.broker_url))
    else:
        checks["broker"] = checks["redis"]  # one server: the broker and the shared store
    return all(v == "ok" for v in checks.values()), checks


def _check(probe: Callable[[], None]) -> str:
    try:
        probe()
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"


def _ping_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    finally:
        client.close()


def _ping_amqp(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=1, transport_options={"read_timeout": 1}) as conn:
        conn.ensure_connection(max_retries=0, timeout=1)  # one attempt: no retry sleeps


def bearer_token_matches(authorization: str, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time: both sides are hashed
    first, so neither the content nor the length of the expected token leaks by timing."""
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return hmac.compare_digest(
        hashlib.sha256(presented.strip().encode()).digest(),
        hashlib.sha256(token.encode()).digest(),
    )


def parse_json_object(body: bytes) -> dict:
    """The body as one JSON object, else BadRequest. Strict UTF-8, as the providers send it:
    `json.loads(bytes)` would also take UTF-16/32 and encoded surrogates. Nesting deeper than
    the parser's recursion limit is malformed too (RecursionError), not a 500."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BadRequest("payload", "body is not JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("payload", "body is not a JSON object")
    return payload
