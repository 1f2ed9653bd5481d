"""The durable webhook inbox and the outbox that feeds Celery.

A verified webhook is stored together with an outbox row in one transaction; only then does
the receiver answer 200. Publishing to the broker happens after commit and may fail: the
beat relay republishes whatever was not published (or was published long ago and is still
unprocessed), so a broker outage or a dead worker never loses an acknowledged event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text

from core.errors import InvalidInput, NotFound, ParkEvent, Refused

STATUSES = ("received", "processed", "ignored", "parked", "failed")
REPLAYABLE = ("parked", "failed")
PROCESS_EVENT_TASK = "payguard.process_event"
SEND_MESSAGE_TASK = "payguard.send_message"  # core.messages.SEND_TASK; here to avoid a cycle
CAPTURE_TOP_UP_TASK = "payguard.capture_top_up"  # core.topups.CAPTURE_TASK, likewise

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

    def as_dict(self) -> dict:
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
    SELECT '{PROCESS_EVENT_TASK}', jsonb_build_array(e.id) FROM e
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


def _row(row, duplicate: bool = False) -> StoredEvent:
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


def lock_for_processing(conn: Connection, inbox_id: int):
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
            enqueue(conn, PROCESS_EVENT_TASK, [inbox_id])
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
        enqueue(conn, PROCESS_EVENT_TASK, [inbox_id])
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
    outbox_id = enqueue(conn, PROCESS_EVENT_TASK, [inbox_id])
    conn.execute(
        text(
            "INSERT INTO audit_log (actor, action, org_id, details) "
            "VALUES (:a, 'events.replay', :org, CAST(:d AS jsonb))"
        ),
        {"a": actor, "org": row.org_id, "d": json.dumps({"inbox_id": inbox_id})},
    )
    return _row(row), outbox_id


# ---------------------------------------------------------------- outbox


def enqueue(conn: Connection, task: str, args: list) -> int:
    """Queue a task to be published after this transaction commits (by the caller or relay)."""
    return conn.execute(
        text("INSERT INTO outbox (task, args) VALUES (:t, CAST(:a AS jsonb)) RETURNING id"),
        {"t": task, "a": json.dumps(args)},
    ).scalar_one()


def enqueue_many(conn: Connection, task: str, args: list[list]) -> list[int]:
    """`enqueue` for many tasks in one statement; their outbox ids in the order given."""
    # Ids come from one sequence in insertion order, so sorted they follow `args`.
    return sorted(
        conn.execute(
            text(
                "INSERT INTO outbox (task, args) SELECT :t, a "
                "FROM jsonb_array_elements(CAST(:a AS jsonb)) WITH ORDINALITY AS u(a, n) "
                "ORDER BY n RETURNING id"
            ),
            {"t": task, "a": json.dumps(args)},
        ).scalars()
    )


def mark_published(conn: Connection, outbox_ids: list[int], *, durable: bool = True) -> None:
    """Record a publish. `durable=False` skips the WAL flush wait: losing the mark in a crash
    only makes the relay publish again, which processing tolerates."""
    if not durable:
        conn.execute(text("SET LOCAL synchronous_commit = off"))
    if outbox_ids:
        conn.execute(
            text(
                "UPDATE outbox SET published_at = now(), attempts = attempts + 1 "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": outbox_ids},
        )


def mark_published_at(conn: Connection, marks: list[tuple[int, float]]) -> None:
    """Record publishes that happened at the given times (epoch seconds), in one statement and
    without the WAL flush wait, like `mark_published(durable=False)`."""
    if not marks:
        return
    conn.execute(text("SET LOCAL synchronous_commit = off"))
    conn.execute(
        text(
            "UPDATE outbox SET published_at = to_timestamp(m.at), attempts = attempts + 1 "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:ats AS float8[])) AS m(id, at) "
            "WHERE outbox.id = m.id"
        ),
        {"ids": [i for i, _ in marks], "ats": [at for _, at in marks]},
    )


def mark_task_published(conn: Connection, task: str, args: list) -> None:
    """Mark the unpublished outbox rows of this task and arguments published."""
    conn.execute(
        text(
            "UPDATE outbox SET published_at = now(), attempts = attempts + 1 "
            "WHERE task = :t AND args = CAST(:a AS jsonb) AND published_at IS NULL"
        ),
        {"t": task, "a": json.dumps(args)},
    )


def claim_for_relay(
    conn: Connection, *, limit: int, grace_seconds: float, redeliver_seconds: float
) -> list:
    """Outbox rows to publish now, locked so a second relay skips them.

    Unpublished rows older than `grace_seconds` (the receiver publishes right after commit;
    the grace keeps the relay from racing it), and event rows published more than
    `redeliver_seconds` ago whose work is still undone: an event still `received`, a message
    still `queued` or `retrying`, or `sending` past its lease (a worker died holding the task,
    or the broker lost it; the copy settles it as the lease rules say).
    A duplicate delivery is harmless: both tasks check the row's state under a lock."""
    return list(
        conn.execute(
            text("""
SELECT o.id, o.task, o.args FROM outbox o
LEFT JOIN webhook_events e
       -- CASE, not AND: PostgreSQL may evaluate the cast first, and a send task's argument
       -- ('msg_...') is no number.
       ON e.id = CASE WHEN o.task = :pe THEN (o.args->>0)::bigint END
LEFT JOIN messages m ON m.message_id = CASE WHEN o.task = :send THEN o.args->>0 END
LEFT JOIN top_ups t ON t.top_up_id = CASE WHEN o.task = :capture THEN o.args->>0 END
WHERE (o.published_at IS NULL AND o.created_at < now() - make_interval(secs => :grace))
   OR (o.published_at < now() - make_interval(secs => :redeliver)
       AND (e.status = 'received' OR m.status IN ('queued', 'retrying')
            OR (m.status = 'sending' AND m.send_lease_until < now())
            OR t.status = 'approved'))
ORDER BY o.id
LIMIT :limit
FOR UPDATE OF o SKIP LOCKED
"""),
            {
                "pe": PROCESS_EVENT_TASK,
                "send": SEND_MESSAGE_TASK,
                "capture": CAPTURE_TOP_UP_TASK,
                "grace": grace_seconds,
                "redeliver": redeliver_seconds,
                "limit": limit,
            },
        )
    )


def prune_published(conn: Connection, *, older_than_seconds: float, limit: int) -> int:
    """Forget outbox rows published long ago whose work is done, so the relay's scan of
    published rows stays small. Rows whose event or message is still pending stay."""
    return conn.execute(
        text("""
DELETE FROM outbox WHERE id IN (
    SELECT o.id FROM outbox o
    LEFT JOIN webhook_events e ON e.id = CASE WHEN o.task = :pe THEN (o.args->>0)::bigint END
    LEFT JOIN messages m ON m.message_id = CASE WHEN o.task = :send THEN o.args->>0 END
    LEFT JOIN top_ups t ON t.top_up_id = CASE WHEN o.task = :capture THEN o.args->>0 END
    WHERE o.published_at < now() - make_interval(secs => :age)
      AND e.status IS DISTINCT FROM 'received'
      AND t.status IS DISTINCT FROM 'approved'
      AND m.status IS DISTINCT FROM 'queued' AND m.status IS DISTINCT FROM 'retrying'
      AND m.status IS DISTINCT FROM 'sending'
    ORDER BY o.id LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED)
"""),
        {
            "pe": PROCESS_EVENT_TASK,
            "send": SEND_MESSAGE_TASK,
            "capture": CAPTURE_TOP_UP_TASK,
            "age": older_than_seconds,
            "limit": limit,
        },
    ).rowcount


def record_publish_failure(conn: Connection, outbox_id: int, error: str) -> None:
    conn.execute(
        text("UPDATE outbox SET attempts = attempts + 1, last_error = :e WHERE id = :id"),
        {"e": error[:1000], "id": outbox_id},
    )
