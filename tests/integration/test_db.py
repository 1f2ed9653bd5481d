"""core.db.driver_autocommit: a pooled connection lent as psycopg's own, in autocommit, for
one hot read. It must go back to the pool exactly as it came, and a broken one must not.
core.db.one_on_driver: a statement run on the transaction's psycopg connection itself, whose
errors must reach callers and run_in_transaction exactly as SQLAlchemy's would."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from core import db
from core.db import driver_autocommit
from core.errors import NotFound

pytestmark = pytest.mark.integration


def backend_pid(engine) -> tuple[int, bool]:
    """(backend pid, autocommit) of the connection a unit of work would get now."""
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        return driver.info.backend_pid, driver.autocommit


def test_a_read_needs_no_transaction_and_the_connection_goes_back_as_it_came(engine):
    with driver_autocommit(engine) as conn:
        lent = conn.info.backend_pid
        assert conn.autocommit is True
        assert conn.execute("SELECT now() = statement_timestamp()").fetchone() == (True,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    assert backend_pid(engine) == (lent, False)  # the same connection, autocommit off again
    with engine.begin() as conn:  # and a unit of work on it still commits as one
        assert conn.execute(text("SELECT now() = statement_timestamp()")).scalar() is False


def test_an_error_raised_after_the_read_returns_a_healthy_connection(engine):
    with pytest.raises(NotFound), driver_autocommit(engine) as conn:  # noqa: PT012 (the raise is what is tested)
        lent = conn.info.backend_pid
        conn.execute("SELECT 1").fetchone()
        raise NotFound("unknown organization")

    assert backend_pid(engine) == (lent, False)


def test_after_the_database_dropped_its_connections_one_read_fails_and_none_after(
    engine, database_url
):
    with driver_autocommit(engine) as first, driver_autocommit(engine) as second:
        pooled = {first.info.backend_pid, second.info.backend_pid}
    with psycopg.connect(database_url, autocommit=True) as admin:  # as a database restart would
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )

    with pytest.raises(psycopg.OperationalError), driver_autocommit(engine) as conn:
        conn.execute("SELECT 1")
    # The other dropped connection is not handed out again: the pool discarded both.
    for _ in range(3):
        with driver_autocommit(engine) as conn:
            assert conn.info.backend_pid not in pooled
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pid, autocommit = backend_pid(engine)
        assert pid not in pooled and autocommit is False


def test_a_lock_is_refused_to_another_transaction_until_the_one_holding_it_ends(engine):
    with engine.connect() as first, engine.connect() as second:
        assert db.try_lock(first, "payguard.test.lock") is True
        assert db.try_lock(second, "payguard.test.lock") is False
        assert db.try_lock(second, "payguard.test.other") is True
        first.rollback()
        assert db.try_lock(second, "payguard.test.lock") is True
        second.rollback()


# --- one_on_driver --------------------------------------------------------------------------

_FAIL = """
CREATE FUNCTION pg_temp.fail(code text) RETURNS int LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = code; END $$
"""


def test_a_row_on_the_driver_is_read_by_column_name_inside_the_units_transaction(engine):
    def unit(conn):
        conn.execute(text("CREATE TEMP TABLE t (n int) ON COMMIT DROP"))
        conn.execute(text("INSERT INTO t VALUES (41)"))
        row = db.one_on_driver(conn, "SELECT n + %(one)s AS answer FROM t", {"one": 1})
        none = db.one_on_driver(conn, "SELECT n FROM t WHERE n < 0", {})
        return row.answer, none

    assert db.run_in_transaction(engine, unit) == (42, None)


def test_a_deadlock_on_the_driver_is_retried_as_sqlalchemys_own_would_be(engine):
    attempts = []

    def unit(conn):
        attempts.append(1)
        conn.execute(text(_FAIL))
        code = "40P01" if len(attempts) < 3 else "00000"
        if code == "00000":
            return "done"
        return db.one_on_driver(conn, "SELECT pg_temp.fail(%(code)s)", {"code": code})

    assert db.run_in_transaction(engine, unit) == "done"
    assert len(attempts) == 3


def test_other_errors_on_the_driver_are_sqlalchemys_and_not_retried(engine):
    attempts = []

    def unit(conn):
        attempts.append(1)
        conn.execute(text(_FAIL))
        return db.one_on_driver(conn, "SELECT pg_temp.fail('23505')", {})

    with pytest.raises(sa_exc.IntegrityError) as caught:
        db.run_in_transaction(engine, unit)
    assert caught.value.orig.sqlstate == "23505"
    assert len(attempts) == 1


def test_a_connection_that_broke_on_the_driver_is_not_given_out_again(engine):
    def unit(conn):
        return db.one_on_driver(conn, "SELECT pg_terminate_backend(pg_backend_pid())", {})

    with pytest.raises(sa_exc.OperationalError) as caught:
        db.run_in_transaction(engine, unit, attempts=1)
    assert caught.value.connection_invalidated
    assert (
        db.run_in_transaction(engine, lambda c: db.one_on_driver(c, "SELECT 1 AS one", {})).one == 1
    )


def test_a_debit_on_the_driver_is_committed_by_a_connection_used_without_begin(engine):
    from core import orgs, wallet

    with engine.connect() as conn:  # autobegin, as a caller of core may hold it
        orgs.create(conn, "driver-org", billing="prepaid")
        conn.commit()
        wallet.credit(conn, "driver-org", 250, "driver-credit")
        conn.commit()
        wallet.debit(conn, "driver-org", 50, "driver-debit")  # its one statement, on the driver
        conn.commit()
    with engine.connect() as conn:
        assert wallet.show(conn, "driver-org").balance_cents == 200
