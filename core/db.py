"""Database access: an engine per process and a unit of work that commits once or not at all."""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError

from core import sql
from core.errors import RetryableConflict

T = TypeVar("T")

# SQLSTATEs that mean "another transaction got in the way; run it again".
_RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}


def sqlalchemy_url(url: str) -> str:
    """Accept the contract's postgresql:// form and pin the psycopg 3 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    pre_ping: bool = False,
    prepare_threshold: int | None = 5,
    **kw: Any,
) -> Engine:
    """An engine with a bounded pool.

    No pre-ping by default: it costs a round trip on every transaction (a quarter of a
    debit's), while a connection gone stale after a database restart fails one unit of work
    that is retried anyway (Celery retries tasks, providers retry webhooks, beat runs again)
    and SQLAlchemy then discards the pool's dead connections. pool_recycle bounds their age.

    `prepare_threshold` is psycopg's (5 is its default); None never prepares a statement
    server-side, as PgBouncer in transaction mode requires (DATABASE_PREPARE_THRESHOLD)."""
    if "poolclass" not in kw:
        kw.update(
            pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=pre_ping, pool_recycle=300
        )
    return create_engine(
        sqlalchemy_url(url),
        # Timestamps leave as RFC 3339 UTC (the host API's promise) whatever the server's zone.
        connect_args={
            "connect_timeout": 5,
            "application_name": "payguard",
            "prepare_threshold": prepare_threshold,
            "options": "-c timezone=UTC",
        },
        **kw,
    )


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One unit of work: committed when the block ends normally, rolled back otherwise."""
    with engine.begin() as conn:
        yield conn


@contextmanager
def driver_autocommit(engine: Engine) -> Iterator[psycopg.Connection]:
    """A connection of the engine's pool as psycopg's own, in autocommit, for a hot read of
    one statement: no BEGIN and no ROLLBACK round trips around it, and none of SQLAlchemy's
    work around a statement (compiling, result metadata), which costs more CPU than the
    statement itself. It goes back to the pool as it came (autocommit off). One that broke
    (psycopg's OperationalError, e.g. after a database restart) fails its one request and is
    discarded with those opened before it, as SQLAlchemy does with its own connections."""
    pooled = engine.raw_connection()
    driver = pooled.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        driver.autocommit = True
        yield driver
    finally:
        if driver.info.transaction_status == TransactionStatus.IDLE:
            driver.autocommit = False
            pooled.close()
        elif driver.closed:
            # What SQLAlchemy does on a disconnect of its own connections: this one is
            # discarded, and every one opened before it is replaced at its next checkout.
            engine.pool._invalidate(pooled)
        else:  # a statement left running: not fit for another checkout
            pooled.invalidate()


def one_on_driver(conn: Connection, statement: str, params: Mapping[str, Any]) -> Any:
    """The first row (attributes by column name, None if none) of `statement` (psycopg's
    placeholders: sql.for_driver) run in `conn`'s transaction on its psycopg connection
    itself, without SQLAlchemy's execution around the statement: for the money statements,
    that work ran while the wallet's row was locked, and on a hot wallet at 16 threads it cost
    a fifth of the debits per second (0.76x bare psycopg, 0.94x this way). Errors are raised
    as SQLAlchemy raises them (a DBAPIError subclass with the driver's error as `orig`, a
    connection that broke invalidated), so callers and run_in_transaction's retries see the
    same thing either way."""
    if not conn.in_transaction():
        conn.begin()  # as SQLAlchemy's own execute would: its commit then ends this work too
    fairy = conn.connection
    driver = fairy.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        with driver.cursor(row_factory=namedtuple_row) as cursor:
            cursor.execute(statement, params)
            return cursor.fetchone()
    except psycopg.Error as exc:
        broken = conn.dialect.is_disconnect(cast(Any, exc), fairy.dbapi_connection, None)
        if broken:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            statement,
            dict(params),
            exc,
            psycopg.Error,
            connection_invalidated=broken,
            dialect=conn.dialect,
        ) from exc


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, RetryableConflict):
        return True
    if isinstance(exc, DBAPIError):  # SQLAlchemy files deadlocks under OperationalError too
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return sqlstate in _RETRYABLE_SQLSTATES
    return False


def run_in_transaction(engine: Engine, fn: Callable[[Connection], T], *, attempts: int = 8) -> T:
    """Run fn in a fresh transaction, again if a concurrent one won a race (bounded)."""
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                return fn(conn)
        except Exception as exc:
            if attempt == attempts or not _is_retryable(exc):
                raise
            time.sleep(random.uniform(0, 0.002 * attempt))
    raise AssertionError("unreachable")


_PING = sql.statement("db.ping", "SELECT 1")


def ping(conn: Connection) -> None:
    """One round trip to the database; raises when it does not answer."""
    conn.execute(_PING)


_TRY_LOCK = sql.statement("db.try_lock", "SELECT pg_try_advisory_xact_lock(:lock_key)")


def try_lock(conn: Connection, name: str) -> bool:
    """The advisory lock called `name`, held until the end of the transaction; False, and
    nothing held, when another transaction holds it.

    Transaction-scoped only, never a session lock: behind PgBouncer in transaction mode a
    session lock stays on whichever server connection took it, and the unlock can run on
    another one, leaving the lock taken for good."""
    lock_key = zlib.crc32(name.encode())
    return bool(conn.execute(_TRY_LOCK, {"lock_key": lock_key}).scalar())
