"""The database's figures that /metrics reports as gauges, read at scrape time.

Each reader is one statement; the receiver's metrics collector (webhook_receiver/metrics.py)
runs them in one read-only snapshot with a statement timeout (`begin_snapshot`), each in a
savepoint of its own, and turns the figures into Prometheus families. A table's name is never
spliced into a statement: each table counted by status has its own named statement.
"""

from __future__ import annotations

from sqlalchemy import Connection, TextClause

from core import sql

# Per statement: a slow or locked table must not hold the scrape past Prometheus' timeout.
STATEMENT_TIMEOUT = "2s"

_READ_ONLY = sql.statement("gauges.read_only", "SET TRANSACTION READ ONLY")
# SET takes no bind parameter: the timeout is this module's constant, never an input.
_STATEMENT_TIMEOUT = sql.statement(
    "gauges.statement_timeout", f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'"
)


def begin_snapshot(conn: Connection) -> None:
    """Make the transaction `conn` has just begun read-only, with STATEMENT_TIMEOUT on every
    statement that follows in it (its savepoints included)."""
    conn.execute(_READ_ONLY)
    conn.execute(_STATEMENT_TIMEOUT)


_EVENTS_BY_STATUS = sql.statement(
    "gauges.events_by_status", "SELECT status, count(*) FROM webhook_events GROUP BY status"
)
# A scan of the whole table: fine while messages are kept in the millions, not beyond.
_MESSAGES_BY_STATUS = sql.statement(
    "gauges.messages_by_status", "SELECT status, count(*) FROM messages GROUP BY status"
)


def _counts(conn: Connection, statement: TextClause) -> dict[str, int]:
    return {status: count for status, count in conn.execute(statement)}


def events_by_status(conn: Connection) -> dict[str, int]:
    """Webhook events per status (statuses with none are absent)."""
    return _counts(conn, _EVENTS_BY_STATUS)


def messages_by_status(conn: Connection) -> dict[str, int]:
    """Messages per status (statuses with none are absent)."""
    return _counts(conn, _MESSAGES_BY_STATUS)


_OPEN_HOLDS = sql.statement(
    "gauges.open_holds",
    "SELECT count(*), coalesce(sum(amount_cents), 0) FROM holds WHERE status = 'open'",
)


def open_holds(conn: Connection) -> tuple[int, int]:
    """How many holds are open, and the cents they set aside."""
    count, cents = conn.execute(_OPEN_HOLDS).one()
    return int(count), int(cents)


_FROZEN_WALLETS = sql.statement(
    "gauges.frozen_wallets", "SELECT count(*) FROM wallets WHERE active_freezes > 0"
)


def frozen_wallets(conn: Connection) -> int:
    """Wallets with at least one freeze."""
    return int(conn.execute(_FROZEN_WALLETS).scalar() or 0)
