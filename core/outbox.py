"""The task outbox (`outbox` table): tasks recorded in the same transaction as the change
that wants them, published after the commit (`publish_after_commit`, the one way every
entrypoint does it), and relayed by beat (`relay`) when that publish failed or its work is
still undone. Publishing goes through a `Publisher` (bus/publisher.py is the Celery one). Not to be confused with the inbox of provider webhooks
(core/inbox.py) or the outbox of events to the host (core/outbound.py).

A duplicate publish is harmless: every task checks its row's state under a lock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from sqlalchemy import Connection, Row

from core import sql
from core.statuses import MessageStatus

log = logging.getLogger(__name__)

# Task names the outbox publishes and the relay knows how to judge stuck.
PROCESS_EVENT_TASK = "payguard.process_event"
SEND_MESSAGE_TASK = "payguard.send_message"  # core.messages.SEND_TASK
SEND_BATCH_TASK = "payguard.send_batch"  # core.send_batch.SEND_BATCH_TASK: drains one organization
CAPTURE_TOP_UP_TASK = "payguard.capture_top_up"  # core.topups.CAPTURE_TASK

# A task's positional arguments: JSON values (ids, a carried answer), as the broker carries them.
TaskArgs = list[Any]

_ENQUEUE = sql.statement(
    "outbox.enqueue",
    "INSERT INTO outbox (task, args) VALUES (:task, CAST(:args AS jsonb)) RETURNING id",
)


def enqueue(conn: Connection, task: str, args: TaskArgs) -> int:
    """Queue a task to be published after this transaction commits (by the caller or relay)."""
    outbox_id: int = conn.execute(
        _ENQUEUE,
        {"task": task, "args": json.dumps(args)},
    ).scalar_one()
    return outbox_id


_ENQUEUE_MANY = sql.statement(
    "outbox.enqueue_many",
    """
    INSERT INTO outbox (task, args) SELECT :task, a
    FROM jsonb_array_elements(CAST(:args AS jsonb)) WITH ORDINALITY AS u(a, n)
    ORDER BY n RETURNING id
    """,
)


def enqueue_many(conn: Connection, task: str, args: list[TaskArgs]) -> list[int]:
    """`enqueue` for many tasks in one statement; their outbox ids in the order given."""
    # Ids come from one sequence in insertion order, so sorted they follow `args`.
    return sorted(
        conn.execute(
            _ENQUEUE_MANY,
            {"task": task, "args": json.dumps(args)},
        ).scalars()
    )


# Losing a publish mark in a crash only makes the relay publish again: no WAL flush wait.
_ASYNC_COMMIT = sql.statement("outbox.async_commit", "SET LOCAL synchronous_commit = off")

_MARK_PUBLISHED = sql.statement(
    "outbox.mark_published",
    """
    UPDATE outbox SET published_at = coalesce(to_timestamp(m.at), now()), attempts = attempts + 1
    FROM unnest(CAST(:outbox_ids AS bigint[]), CAST(:published_at AS float8[])) AS m(id, at)
    WHERE outbox.id = m.id
    """,
)


def mark_published(
    conn: Connection,
    outbox_ids: Sequence[int],
    *,
    at: Sequence[float] | None = None,
    durable: bool = True,
) -> None:
    """Record publishes, in one statement: now, or at the times `at` gives (epoch seconds,
    one per id: when core/publish_marks.py saw each go out). `durable=False` skips the WAL
    flush wait: losing the mark in a crash only makes the relay publish again, which
    processing tolerates."""
    if not outbox_ids:
        return
    if not durable:
        conn.execute(_ASYNC_COMMIT)
    conn.execute(
        _MARK_PUBLISHED,
        {
            "outbox_ids": list(outbox_ids),
            "published_at": list(at) if at is not None else [None] * len(outbox_ids),
        },
    )


_MARK_TASK_PUBLISHED = sql.statement(
    "outbox.mark_task_published",
    """
    UPDATE outbox SET published_at = now(), attempts = attempts + 1
    WHERE task = :task AND args = CAST(:args AS jsonb) AND published_at IS NULL
    """,
)


def mark_task_published(conn: Connection, task: str, args: TaskArgs) -> None:
    """Mark the unpublished outbox rows of this task and arguments published."""
    conn.execute(
        _MARK_TASK_PUBLISHED,
        {"task": task, "args": json.dumps(args)},
    )


_CLAIM_FOR_RELAY = sql.statement(
    "outbox.claim_for_relay",
    """
    SELECT o.id, o.task, o.args, m.org_id AS message_org_id, m.status AS message_status
    FROM outbox o
    LEFT JOIN webhook_events e
           -- CASE, not AND: PostgreSQL may evaluate the cast first, and a send task's argument
           -- ('msg_...') is no number.
           ON e.id = CASE WHEN o.task = :process_event_task THEN (o.args->>0)::bigint END
    LEFT JOIN messages m
           ON m.message_id = CASE WHEN o.task = :send_message_task THEN o.args->>0 END
    LEFT JOIN top_ups t
           ON t.top_up_id = CASE WHEN o.task = :capture_top_up_task THEN o.args->>0 END
    WHERE (o.published_at IS NULL AND o.created_at < now() - make_interval(secs => :grace_seconds))
       OR (o.published_at < now() - make_interval(secs => :redeliver_seconds)
           AND (e.status = 'received' OR m.status IN ('queued', 'retrying')
                OR (m.status = 'sending' AND m.send_lease_until < now())
                OR t.status = 'approved'))
    ORDER BY o.id
    LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED
    """,
)


def claim_for_relay(
    conn: Connection, *, limit: int, grace_seconds: float, redeliver_seconds: float
) -> list[Row[Any]]:
    """Outbox rows to publish now, locked so a second relay skips them.

    Unpublished rows older than `grace_seconds` (the receiver publishes right after commit;
    the grace keeps the relay from racing it), and event rows published more than
    `redeliver_seconds` ago whose work is still undone: an event still `received`, a message
    still `queued` or `retrying`, or `sending` past its lease (a worker died holding the task,
    or the broker lost it; the copy settles it as the lease rules say).
    A duplicate delivery is harmless: both tasks check the row's state under a lock."""
    return list(
        conn.execute(
            _CLAIM_FOR_RELAY,
            {
                "process_event_task": PROCESS_EVENT_TASK,
                "send_message_task": SEND_MESSAGE_TASK,
                "capture_top_up_task": CAPTURE_TOP_UP_TASK,
                "grace_seconds": grace_seconds,
                "redeliver_seconds": redeliver_seconds,
                "limit": limit,
            },
        )
    )


_PRUNE_PUBLISHED = sql.statement(
    "outbox.prune_published",
    """
    DELETE FROM outbox WHERE id IN (
        SELECT o.id FROM outbox o
        LEFT JOIN webhook_events e
               ON e.id = CASE WHEN o.task = :process_event_task THEN (o.args->>0)::bigint END
        LEFT JOIN messages m
               ON m.message_id = CASE WHEN o.task = :send_message_task THEN o.args->>0 END
        LEFT JOIN top_ups t
               ON t.top_up_id = CASE WHEN o.task = :capture_top_up_task THEN o.args->>0 END
        WHERE o.published_at < now() - make_interval(secs => :older_than_seconds)
          AND e.status IS DISTINCT FROM 'received'
          AND t.status IS DISTINCT FROM 'approved'
          AND m.status IS DISTINCT FROM 'queued' AND m.status IS DISTINCT FROM 'retrying'
          AND m.status IS DISTINCT FROM 'sending'
        ORDER BY o.id LIMIT :limit
        FOR UPDATE OF o SKIP LOCKED)
    """,
)


def prune_published(conn: Connection, *, older_than_seconds: float, limit: int) -> int:
    """Forget outbox rows published long ago whose work is done, so the relay's scan of
    published rows stays small. Rows whose event or message is still pending stay."""
    return conn.execute(
        _PRUNE_PUBLISHED,
        {
            "process_event_task": PROCESS_EVENT_TASK,
            "send_message_task": SEND_MESSAGE_TASK,
            "capture_top_up_task": CAPTURE_TOP_UP_TASK,
            "older_than_seconds": older_than_seconds,
            "limit": limit,
        },
    ).rowcount


_RECORD_PUBLISH_FAILURE = sql.statement(
    "outbox.record_publish_failure",
    "UPDATE outbox SET attempts = attempts + 1, last_error = :error WHERE id = :outbox_id",
)


def record_publish_failure(conn: Connection, outbox_id: int, error: str) -> None:
    conn.execute(
        _RECORD_PUBLISH_FAILURE,
        {"error": error[:1000], "outbox_id": outbox_id},
    )


# ---------------------------------------------------------------- publishing


class Publisher(Protocol):
    """Sends one task message to the broker; raises on any failure. bus/publisher.py is the
    Celery one; core never imports Celery."""

    def publish(self, task: str, args: TaskArgs, *, task_id: str | None = None) -> None: ...

    def close(self) -> None:
        """Let go of the broker connections; the publisher is not used after."""


@dataclass(frozen=True)
class Pending:
    """A task to publish once the transaction that recorded it has committed.

    `outbox_ids` are the rows this one message covers (one row, or every row of a batch
    fanned out by one task), marked published after it; with none, the rows of this task
    and arguments are marked."""

    task: str
    args: TaskArgs
    outbox_ids: tuple[int, ...] = ()
    task_id: str | None = None

    @classmethod
    def of_row(cls, task: str, args: TaskArgs, outbox_id: int) -> Pending:
        """The message of one outbox row, with the task id the relay would give it."""
        return cls(task, args, (outbox_id,), task_id=task_id_of(outbox_id))


class Marks(Protocol):
    """Where published rows go to be marked later (core/publish_marks.py)."""

    def add(self, outbox_ids: list[int]) -> None: ...


def task_id_of(outbox_id: int) -> str:
    """One task id per outbox row, whoever publishes it: a second publish is the same task."""
    return f"outbox-{outbox_id}"


def publish_after_commit(
    transaction: Callable[[Callable[[Connection], object]], object],
    publisher: Publisher,
    pending: Sequence[Pending],
    marks: Marks | None = None,
) -> int:
    """Publish `pending` in order and mark each published; how many went out.

    With `marks` (a long-lived process: core/publish_marks.py), rows are handed to it and
    marked in a batch off the caller's path, instead of one transaction each here.

    Call it after the commit that recorded the rows. A broker that fails stops the rest
    (logged): the rows stay unpublished and the relay publishes them. A mark that fails is
    ignored: the relay publishes that one again, which every task tolerates. `transaction`
    runs one function in a transaction of its own (core.db.run_in_transaction, bound)."""
    published = 0
    for item in pending:
        try:
            publisher.publish(item.task, item.args, task_id=item.task_id)
        except Exception as exc:
            log.warning(
                "publish deferred to the relay", extra={"task": item.task, "error": str(exc)[:200]}
            )
            break
        published += 1
        if marks is not None and item.outbox_ids:
            marks.add(list(item.outbox_ids))
            continue
        try:
            transaction(partial(_mark, item))
        except Exception as exc:  # the relay publishes it again; every task tolerates that
            log.warning("publish not marked", extra={"task": item.task, "error": str(exc)[:200]})
    return published


def _mark(item: Pending, conn: Connection) -> None:
    if item.outbox_ids:
        mark_published(conn, list(item.outbox_ids), durable=False)
    else:
        mark_task_published(conn, item.task, item.args)


_STILL_TO_SEND = (MessageStatus.QUEUED, MessageStatus.RETRYING)

# Rows a relay run may prune for each row it may publish. Every message and webhook leaves a
# row; the relay's claim reads all the published ones still kept, so they go once their work
# is done and a redeliver window has passed (until 2026-12-01: after a day, 500 a run, which a
# day of 250 rows a second outgrew; 200,000 kept rows cost each claim 72 ms).
PRUNED_PER_ROW = 10

_DRAIN_ALIVE = sql.statement(
    "outbox.drain_alive",
    """
    SELECT EXISTS (
        SELECT 1 FROM messages
        WHERE status = 'sending' AND org_id = :org_id AND send_lease_until > now()
    )
    """,
)


def relay(
    conn: Connection,
    publisher: Publisher,
    *,
    limit: int,
    grace_seconds: float,
    redeliver_seconds: float,
) -> int:
    """Publish the rows nobody published, and again those whose work is still undone (see
    `claim_for_relay`), in the caller's transaction; forget rows whose work is done, once
    published `redeliver_seconds` ago. A broker that fails stops the walk, with the failure
    recorded on its row.

    Messages still to send (`queued` or `retrying`) are not given a single send task each:
    their organization gets one batch drain (core/send_batch.py), and none while a drain of
    it is seen at work (a message `sending` under a live lease). A backlog that outlasts
    `redeliver_seconds` is the batch path's normal work; a single task for each of its
    messages, 500 every run, took the worker processes from it (404 messages/s fell to 15/s
    with a redeliver window of 3 s). A message `sending` past its lease still gets its own
    task, which settles it."""
    rows = claim_for_relay(
        conn, limit=limit, grace_seconds=grace_seconds, redeliver_seconds=redeliver_seconds
    )
    to_send: dict[str, list[int]] = {}  # organization -> its rows of messages still to send
    tasks: list[tuple[str, TaskArgs, str, list[int]]] = []  # task, args, task id, rows
    for row in rows:
        if row.task == SEND_MESSAGE_TASK and row.message_status in _STILL_TO_SEND:
            to_send.setdefault(row.message_org_id, []).append(row.id)
        else:
            tasks.append((row.task, list(row.args), task_id_of(row.id), [row.id]))
    for org_id, ids in to_send.items():
        if conn.execute(_DRAIN_ALIVE, {"org_id": org_id}).scalar_one():
            mark_published(conn, ids)  # asked again after redeliver_seconds
        else:
            tasks.append((SEND_BATCH_TASK, [org_id], f"relay-drain-{ids[0]}", ids))
    published: list[int] = []
    for task, args, task_id, ids in tasks:
        try:
            publisher.publish(task, args, task_id=task_id)
        except Exception as exc:
            record_publish_failure(conn, ids[0], repr(exc))
            log.warning("outbox publish failed", extra={"outbox_id": ids[0], "error": str(exc)})
            break
        published += ids
    mark_published(conn, published)
    prune_published(conn, older_than_seconds=redeliver_seconds, limit=PRUNED_PER_ROW * limit)
    return len(published)
