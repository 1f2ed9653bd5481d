"""What every route of the receiver shares: the `Receiver` (settings, engine, publisher,
verifier, metrics), the errors routes raise, and the steps of a webhook: read the raw body,
store it durably with its task-outbox row, answer, publish after the commit.

200 means the event is committed to the inbox with its outbox row; publishing to the broker
is attempted after the commit and a failure there is left to the outbox relay.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Response, jsonify, request
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from core import db, inbox, outbox
from core.db import run_in_transaction
from core.errors import InvalidInput
from core.publish_marks import PublishMarks
from core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY = 1024 * 1024


@dataclass
class Receiver:
    settings: Settings
    engine: Engine
    publisher: outbox.Publisher
    paypal_verifier: Any | None
    metrics: Any
    publish_marks: PublishMarks
    # subaccount SID → (its token or None, until when that answer holds)
    _subaccount_tokens: dict[str, tuple[str | None, float]] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def transaction(self, fn: Callable[[Connection], T]) -> T:
        return run_in_transaction(self.engine, fn)

    def close(self) -> None:
        """Mark what was published, then let go of the database and the broker. The marks
        go first: their thread may hold a pooled connection, which a disposed engine would
        leave unclosed."""
        self.publish_marks.close()
        self.engine.dispose()
        self.publisher.close()

    def subaccount_token(self, subaccount_sid: str) -> str | None:
        """A subaccount's auth token, cached per process (core/providers/twilio/callbacks.py)."""
        from core.providers.twilio import callbacks  # imports Twilio's SDK: only when needed

        return callbacks.subaccount_token(
            self.engine, self.settings, self._subaccount_tokens, subaccount_sid, self.clock
        )


class BadRequest(Exception):
    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


class Unavailable(Exception):
    pass


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
        outbox.publish_after_commit(
            receiver.transaction,
            receiver.publisher,
            [outbox.Pending.of_row(outbox.PROCESS_EVENT_TASK, [stored.id], outbox_id)],
            receiver.publish_marks,
        )
    return answer(200, status=status, event_id=event_id, id=stored.id)


def readiness(receiver: Receiver) -> tuple[bool, dict[str, str]]:
    checks: dict[str, str] = {}
    try:
        with receiver.engine.connect() as conn:
            db.ping(conn)
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
