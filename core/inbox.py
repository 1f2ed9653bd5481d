"""The durable inbox of provider webhooks (`webhook_events`): store once, process, park, replay.

A verified webhook is stored together with its task-outbox row (core/outbox.py) in one
statement and one transaction; only then does the receiver answer 200. Publishing to the broker happens after commit and may fail: the
beat relay republishes whatever was not published (or was published long ago and is still
unprocessed), so a broker outage or a dead worker never loses an acknowledged event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row

from core import outbox, sql
from core.errors import InvalidInput, NotFound, ParkEvent, Refused
from core.statuses import EventStatus

# Plain strings: argparse shows choices (cli) by their repr.
STATUSES = tuple(s.value for s in EventStatus)
REPLAYABLE = (EventStatus.PARKED.value, EventStatus.FAILED.value)

# Headers worth keeping with the raw body (for audit and postback re-verification).
_KEPT_HEADERS = {
    "content-type",
    "user-agent",
    "paypal-transmission-id",
    "paypal-transmission-time",
    "paypal-transmission-sig",
    "paypal-cert-url",
    "paypal-auth-algo",
    "paypal-auth-version",
    "stripe-signature",
}


@dataclass(frozen=True)
class StoredEvent:
    id: int
    provider: str
    event_id: str
    event_type: str
    status: str
    attempts: int
    last_error: str | None
    org_id: str | None
    received_at: datetime
    processed_at: datetime | None
    duplicate: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "provider": self.provider,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "org_id": self.org_id,
            "received_at": self.received_at.isoformat(),
            "processed_at": self.processed_at.isoformat() if self.processed_at else None,
        }


_COLUMNS = (
    "id, provider, event_id, event_type, status, attempts, last_error, org_id, "
    "received_at, processed_at"
)

_STORE = sql.statement(
    "inbox.store",
    f"""
    WITH e AS (
        INSERT INTO webhook_events (provider, event_id, event_type, headers, body, transmission_id)
        VALUES (:provider, :event_id, :event_type, CAST(:headers AS jsonb), :body, :transmission_id)
        ON CONFLICT ON CONSTRAINT webhook_event_once DO NOTHING
        RETURNING {_COLUMNS}
    ), o AS (
        INSERT INTO outbox (task, args)
        SELECT '{outbox.PROCESS_EVENT_TASK}', jsonb_build_array(e.id) FROM e
        RETURNING id
    )
    SELECT e.*, (SELECT id FROM o) AS outbox_id FROM e
    """,
)


# Every verified PayPal transmission vouches for one body: the first body it is seen with wins
# the row, the same body again passes, any other body finds no row returned.
_VOUCH = sql.statement(
    "inbox.vouch",
    """
    INSERT INTO paypal_transmissions (transmission_id, body_sha256, event_id)
    VALUES (:transmission_id, :body_sha256, :event_id)
    ON CONFLICT (transmission_id) DO UPDATE SET transmission_id = EXCLUDED.transmission_id
        WHERE paypal_transmissions.body_sha256 = EXCLUDED.body_sha256
    RETURNING transmission_id
    """,
)


class ReplayedTransmission(Exception):
    """A transmission id already vouched for another body: a forgery, answered 400."""


def _row(row: Row[Any], duplicate: bool = False) -> StoredEvent:
    m = row._mapping
    return StoredEvent(**{k: m[k] for k in _COLUMNS.split(", ")}, duplicate=duplicate)


_BY_EVENT_ID = sql.statement(
    "inbox.by_event_id",
    f"SELECT {_COLUMNS} FROM webhook_events WHERE provider = :provider AND event_id = :event_id",
)


def store(
    conn: Connection,
    provider: str,
    event_id: str,
    event_type: str,
    headers: Mapping[str, str],
    body: bytes,
    transmission_id: str | None = None,
) -> tuple[StoredEvent, int | None]:
    """Store a verified event and its outbox row; (event, outbox id) or (first event, None).

    A `transmission_id` (PayPal's) is recorded with the SHA-256 of `body` whatever the answer,
    duplicate included: PayPal retries with fresh transmission ids, and each of them must
    vouch for this body alone. One already recorded with another body raises
    `ReplayedTransmission`, and the caller's transaction stores nothing. (A transmission id
    used by another event also makes the event INSERT fail with an IntegrityError that
    `is_replayed_transmission` recognizes.)"""
    for name, value in (("event id", event_id), ("event type", event_type)):
        if not value or len(value) > 255 or not value.isprintable():
            raise InvalidInput(f"{name} must be 1-255 printable characters")
    if transmission_id is not None:
        vouched = conn.execute(
            _VOUCH,
            {
                "transmission_id": transmission_id,
                "body_sha256": hashlib.sha256(body).digest(),
                "event_id": event_id,
            },
        ).first()
        if vouched is None:
            raise ReplayedTransmission("transmission already vouched for another body")
    # PostgreSQL text and jsonb cannot hold NUL; nothing legitimate in a header has one.
    kept = {
        k.lower(): v.replace("\x00", "") for k, v in headers.items() if k.lower() in _KEPT_HEADERS
    }
    row = conn.execute(
        _STORE,
        {
            "provider": provider,
            "event_id": event_id,
            "event_type": event_type,
            "headers": json.dumps(kept),
            "body": body,
            "transmission_id": transmission_id,
        },
    ).first()
    if row is not None:
        return _row(row), row.outbox_id
    existing = conn.execute(
        _BY_EVENT_ID,
        {"provider": provider, "event_id": event_id},
    ).one()
    return _row(existing, duplicate=True), None


def is_replayed_transmission(exc: BaseException) -> bool:
    """The store failed because the transmission id was already used by another event."""
    return "webhook_events_transmission_once" in str(getattr(exc, "orig", exc))


_GET = sql.statement("inbox.get", f"SELECT {_COLUMNS} FROM webhook_events WHERE id = :inbox_id")


def get(conn: Connection, inbox_id: int) -> StoredEvent:
    row = conn.execute(_GET, {"inbox_id": inbox_id}).first()
    if row is None:
        raise NotFound(f"no event with id {inbox_id}")
    return _row(row)


_LOCK_FOR_PROCESSING = sql.statement(
    "inbox.lock_for_processing",
    """
    SELECT id, provider, event_id, event_type, status, headers, body, received_at
    FROM webhook_events WHERE id = :inbox_id AND status = 'received' FOR UPDATE
    """,
)


def lock_for_processing(conn: Connection, inbox_id: int) -> Row[Any] | None:
    """The event row, locked, with its body and headers; None if it is not `received`."""
    return conn.execute(
        _LOCK_FOR_PROCESSING,
        {"inbox_id": inbox_id},
    ).first()


_FINISH = sql.statement(
    "inbox.finish",
    """
    UPDATE webhook_events SET status = :status, last_error = :error,
        org_id = coalesce(:org_id, org_id), attempts = attempts + 1,
        processed_at = CASE WHEN :status IN ('processed', 'ignored') THEN now()
        ELSE processed_at END
    WHERE id = :inbox_id AND status = 'received'
    """,
)


def finish(
    conn: Connection,
    inbox_id: int,
    status: str,
    *,
    error: str | None = None,
    org_id: str | None = None,
) -> None:
    """Move an event out of `received` (processed, ignored, parked or failed)."""
    assert status in STATUSES and status != EventStatus.RECEIVED
    conn.execute(
        _FINISH,
        {"status": status, "error": error, "org_id": org_id, "inbox_id": inbox_id},
    )


def awaited_payment(provider: str, payment_id: str) -> str:
    """The `awaiting` key of events parked until this payment is credited or recorded."""
    return f"{provider}:{payment_id}"


_PAYMENT_CREDITED = sql.statement(
    "inbox.payment_credited",
    """
    SELECT 1 FROM payments WHERE provider = split_part(:awaiting, ':', 1)
    AND payment_id = substr(:awaiting, length(split_part(:awaiting, ':', 1)) + 2)
    """,
)

_PARK = sql.statement(
    "inbox.park",
    "UPDATE webhook_events SET awaiting = :awaiting WHERE id = :inbox_id AND status = 'received'",
)


def park(conn: Connection, inbox_id: int, exc: ParkEvent) -> bool:
    """Settle an event that cannot be applied yet `parked`, remembering the payment it waits
    for (if it names one) so that the payment's arrival re-drives it.

    The worker parks in a transaction of its own, after the failed attempt: if the payment
    committed in between, its re-drive found nothing parked, so the event is queued again.
    True when parked, False when queued again."""
    awaiting = getattr(exc, "awaiting", None)
    if awaiting is not None:
        _lock_awaiting(conn, awaiting)
        arrived = conn.execute(
            _PAYMENT_CREDITED,
            {"awaiting": awaiting},
        ).first()
        if arrived is not None:
            record_attempt(conn, inbox_id, f"{exc}; its payment has arrived: queued again")
            outbox.enqueue(conn, outbox.PROCESS_EVENT_TASK, [inbox_id])
            return False
        conn.execute(
            _PARK,
            {"awaiting": awaiting, "inbox_id": inbox_id},
        )
    finish(conn, inbox_id, EventStatus.PARKED, error=str(exc)[:2000])
    return True


_LOCK_AWAITING = sql.statement(
    "inbox.lock_awaiting", "SELECT pg_advisory_xact_lock(hashtext(:lock_key))"
)


def _lock_awaiting(conn: Connection, awaiting: str) -> None:
    """Parking for a payment and that payment's re-drive take turns (until commit), so that
    one of them always sees the other."""
    conn.execute(_LOCK_AWAITING, {"lock_key": f"awaiting:{awaiting}"})


_REDRIVE_AWAITING = sql.statement(
    "inbox.redrive_awaiting",
    """
    UPDATE webhook_events SET status = 'received', last_error = NULL,
        awaiting = NULL WHERE awaiting = :awaiting AND status = 'parked' RETURNING id
    """,
)


def redrive_awaiting(conn: Connection, awaiting: str) -> list[int]:
    """Put the events parked waiting for `awaiting` back to `received`, each with an outbox
    row, in the caller's transaction: they are applied once the payment they need commits."""
    _lock_awaiting(conn, awaiting)
    ids = list(
        conn.execute(
            _REDRIVE_AWAITING,
            {"awaiting": awaiting},
        ).scalars()
    )
    for inbox_id in sorted(ids):
        outbox.enqueue(conn, outbox.PROCESS_EVENT_TASK, [inbox_id])
    return ids


_RECORD_ATTEMPT = sql.statement(
    "inbox.record_attempt",
    "UPDATE webhook_events SET attempts = attempts + 1, last_error = :error WHERE id = :inbox_id",
)


def record_attempt(conn: Connection, inbox_id: int, error: str) -> None:
    conn.execute(
        _RECORD_ATTEMPT,
        {"error": error[:2000], "inbox_id": inbox_id},
    )


_LIST_EVENTS = sql.statement(
    "inbox.list_events",
    f"""
    SELECT {_COLUMNS} FROM webhook_events
    WHERE (CAST(:status AS text) IS NULL OR status = CAST(:status AS text))
    AND (CAST(:provider AS text) IS NULL OR provider = CAST(:provider AS text))
    ORDER BY id DESC LIMIT :limit
    """,
)


def list_events(
    conn: Connection, *, status: str | None = None, provider: str | None = None, limit: int = 100
) -> list[StoredEvent]:
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")
    rows = conn.execute(
        _LIST_EVENTS,
        {"status": status, "provider": provider, "limit": limit},
    )
    return [_row(r) for r in rows]


_REPLAY = sql.statement(
    "inbox.replay",
    f"""
    UPDATE webhook_events SET status = 'received', last_error = NULL, awaiting = NULL
    WHERE id = :inbox_id AND status IN ('parked', 'failed') RETURNING {_COLUMNS}
    """,
)

_AUDIT_REPLAY = sql.statement(
    "inbox.audit_replay",
    """
    INSERT INTO audit_log (actor, action, org_id, details)
    VALUES (:actor, 'events.replay', :org_id, CAST(:details AS jsonb))
    """,
)


def replay(conn: Connection, inbox_id: int, *, actor: str) -> tuple[StoredEvent, int]:
    """Put a parked or failed event back to `received` and queue it again."""
    row = conn.execute(
        _REPLAY,
        {"inbox_id": inbox_id},
    ).first()
    if row is None:
        current = get(conn, inbox_id)
        raise Refused(
            f"event {inbox_id} is {current.status}; only parked or failed events can be replayed"
        )
    outbox_id = outbox.enqueue(conn, outbox.PROCESS_EVENT_TASK, [inbox_id])
    conn.execute(
        _AUDIT_REPLAY,
        {"actor": actor, "org_id": row.org_id, "details": json.dumps({"inbox_id": inbox_id})},
    )
    return _row(row), outbox_id
