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

from sqlalchemy import Connection, Row, text

from core import outbox
from core.errors import InvalidInput, NotFound, ParkEvent, Refused

STATUSES = ("received", "processed", "ignored", "parked", "failed")
REPLAYABLE = ("parked", "failed")

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

_STORE = text(f"""
WITH e AS (
    INSERT INTO webhook_events (provider, event_id, event_type, headers, body, transmission_id)
    VALUES (:provider, :event_id, :event_type, CAST(:headers AS jsonb), :body, :transmission)
    ON CONFLICT ON CONSTRAINT webhook_event_once DO NOTHING
    RETURNING {_COLUMNS}
), o AS (
    INSERT INTO outbox (task, args)
    SELECT '{outbox.PROCESS_EVENT_TASK}', jsonb_build_array(e.id) FROM e
    RETURNING id
)
SELECT e.*, (SELECT id FROM o) AS outbox_id FROM e
""")


# Every verified PayPal transmission vouches for one body: the first body it is seen with wins
# the row, the same body again passes, any other body finds no row returned.
_VOUCH = text("""
INSERT INTO paypal_transmissions (transmission_id, body_sha256, event_id)
VALUES (:transmission, :sha, :event_id)
ON CONFLICT (transmission_id) DO UPDATE SET transmission_id = EXCLUDED.transmission_id
    WHERE paypal_transmissions.body_sha256 = EXCLUDED.body_sha256
RETURNING transmission_id
""")


class ReplayedTransmission(Exception):
    """A transmission id already vouched for another body: a forgery, answered 400."""


def _row(row: Row[Any], duplicate: bool = False) -> StoredEvent:
    m = row._mapping
    return StoredEvent(**{k: m[k] for k in _COLUMNS.split(", ")}, duplicate=duplicate)


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
                "transmission": transmission_id,
                "sha": hashlib.sha256(body).digest(),
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
            "transmission": transmission_id,
        },
    ).first()
    if row is not None:
        return _row(row), row.outbox_id
    existing = conn.execute(
        text(f"SELECT {_COLUMNS} FROM webhook_events WHERE provider = :p AND event_id = :e"),
        {"p": provider, "e": event_id},
    ).one()
    return _row(existing, duplicate=True), None


def is_replayed_transmission(exc: BaseException) -> bool:
    """The store failed because the transmission id was already used by another event."""
    return "webhook_events_transmission_once" in str(getattr(exc, "orig", exc))


def get(conn: Connection, inbox_id: int) -> StoredEvent:
    row = conn.execute(
        text(f"SELECT {_COLUMNS} FROM webhook_events WHERE id = :id"), {"id": inbox_id}
    ).first()
    if row is None:
        raise NotFound(f"no event with id {inbox_id}")
    return _row(row)


def lock_for_processing(conn: Connection, inbox_id: int) -> Row[Any] | None:
    """The event row, locked, with its body and headers; None if it is not `received`."""
    return conn.execute(
        text(
            "SELECT id, provider, event_id, event_type, status, headers, body, received_at "
            "FROM webhook_events WHERE id = :id AND status = 'received' FOR UPDATE"
        ),
        {"id": inbox_id},
    ).first()


def finish(
    conn: Connection,
    inbox_id: int,
    status: str,
    *,
    error: str | None = None,
    org_id: str | None = None,
) -> None:
    """Move an event out of `received` (processed, ignored, parked or failed)."""
    assert status in STATUSES and status != "received"
    conn.execute(
        text(
            "UPDATE webhook_events SET status = :s, last_error = :err, "
            "org_id = coalesce(:org, org_id), attempts = attempts + 1, "
            "processed_at = CASE WHEN :s IN ('processed', 'ignored') THEN now() "
            "ELSE processed_at END "
            "WHERE id = :id AND status = 'received'"
        ),
        {"s": status, "err": error, "org": org_id, "id": inbox_id},
    )


def awaited_payment(provider: str, payment_id: str) -> str:
    """The `awaiting` key of events parked until this payment is credited or recorded."""
    return f"{provider}:{payment_id}"


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
            text(
                "SELECT 1 FROM payments WHERE provider = split_part(:a, ':', 1) "
                "AND payment_id = substr(:a, length(split_part(:a, ':', 1)) + 2)"
            ),
            {"a": awaiting},
        ).first()
        if arrived is not None:
            record_attempt(conn, inbox_id, f"{exc}; its payment has arrived: queued again")
            outbox.enqueue(conn, outbox.PROCESS_EVENT_TASK, [inbox_id])
            return False
        conn.execute(
            text("UPDATE webhook_events SET awaiting = :a WHERE id = :id AND status = 'received'"),
            {"a": awaiting, "id": inbox_id},
        )
    finish(conn, inbox_id, "parked", error=str(exc)[:2000])
    return True


def _lock_awaiting(conn: Connection, awaiting: str) -> None:
    """Parking for a payment and that payment's re-drive take turns (until commit), so that
    one of them always sees the other."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:a))"), {"a": f"awaiting:{awaiting}"})


def redrive_awaiting(conn: Connection, awaiting: str) -> list[int]:
    """Put the events parked waiting for `awaiting` back to `received`, each with an outbox
    row, in the caller's transaction: they are applied once the payment they need commits."""
    _lock_awaiting(conn, awaiting)
    ids = list(
        conn.execute(
            text(
                "UPDATE webhook_events SET status = 'received', last_error = NULL, "
                "awaiting = NULL WHERE awaiting = :a AND status = 'parked' RETURNING id"
            ),
            {"a": awaiting},
        ).scalars()
    )
    for inbox_id in sorted(ids):
        outbox.enqueue(conn, outbox.PROCESS_EVENT_TASK, [inbox_id])
    return ids


def record_attempt(conn: Connection, inbox_id: int, error: str) -> None:
    conn.execute(
        text("UPDATE webhook_events SET attempts = attempts + 1, last_error = :err WHERE id = :id"),
        {"err": error[:2000], "id": inbox_id},
    )


def list_events(
    conn: Connection, *, status: str | None = None, provider: str | None = None, limit: int = 100
) -> list[StoredEvent]:
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")
    rows = conn.execute(
        text(
            f"SELECT {_COLUMNS} FROM webhook_events "
            "WHERE (CAST(:s AS text) IS NULL OR status = CAST(:s AS text)) "
            "AND (CAST(:p AS text) IS NULL OR provider = CAST(:p AS text)) "
            "ORDER BY id DESC LIMIT :limit"
        ),
        {"s": status, "p": provider, "limit": limit},
    )
    return [_row(r) for r in rows]


def replay(conn: Connection, inbox_id: int, *, actor: str) -> tuple[StoredEvent, int]:
    """Put a parked or failed event back to `received` and queue it again."""
    row = conn.execute(
        text(
            f"UPDATE webhook_events SET status = 'received', last_error = NULL, awaiting = NULL "
            f"WHERE id = :id AND status IN ('parked', 'failed') RETURNING {_COLUMNS}"
        ),
        {"id": inbox_id},
    ).first()
    if row is None:
        current = get(conn, inbox_id)
        raise Refused(
            f"event {inbox_id} is {current.status}; only parked or failed events can be replayed"
        )
    outbox_id = outbox.enqueue(conn, outbox.PROCESS_EVENT_TASK, [inbox_id])
    conn.execute(
        text(
            "INSERT INTO audit_log (actor, action, org_id, details) "
            "VALUES (:a, 'events.replay', :org, CAST(:d AS jsonb))"
        ),
        {"a": actor, "org": row.org_id, "d": json.dumps({"inbox_id": inbox_id})},
    )
    return _row(row), outbox_id
