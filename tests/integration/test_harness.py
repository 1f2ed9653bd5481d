"""The test harness itself: isolated databases per test, a migrated template, a Redis that can
go down and come back, and an environment that subprocesses can use."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest
import redis
from sqlalchemy import text

import migrations

_seen_databases: set[str] = set()


def _claim_database(url: str) -> None:
    """Fail if another test already used this database or left a table in it."""
    with psycopg.connect(url, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        leftover = conn.execute("SELECT to_regclass('harness_marker')").fetchone()[0]
        conn.execute("CREATE TABLE harness_marker (test text)")
    assert name not in _seen_databases
    assert leftover is None
    _seen_databases.add(name)


def test_each_test_gets_a_database_of_its_own(database_url):
    _claim_database(database_url)


def test_a_second_test_does_not_see_the_first_tests_tables(database_url):
    _claim_database(database_url)


def test_the_database_is_migrated_to_head(database_url, engine):
    heads = migrations.heads()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is not None
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version == (heads[0] if heads else None)


def test_the_template_is_a_template_that_refuses_connections(pg_server, migrated_template):
    with pg_server.admin() as conn:
        row = conn.execute(
            "SELECT datistemplate, datallowconn FROM pg_database WHERE datname = %s",
            (migrated_template,),
        ).fetchone()
    assert row == (True, False)


def test_a_subprocess_sees_data_the_test_committed(app_env, engine):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE harness_note (body text)"))
        conn.execute(text("INSERT INTO harness_note VALUES ('committed')"))
    script = (
        "import os, psycopg\n"
        "with psycopg.connect(os.environ['DATABASE_URL']) as c:\n"
        "    print(c.execute('SELECT body FROM harness_note').fetchone()[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=app_env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "committed"
    assert app_env["PAYPAL_WEBHOOK_ID"] == "WH-TEST"


@pytest.mark.parametrize("run", ["first", "second"])
def test_redis_clean_starts_empty(redis_clean, run):
    client = redis.Redis.from_url(redis_clean)
    try:
        assert client.dbsize() == 0
        client.set("harness:left-behind", "1")  # the other run must not see it
    finally:
        client.close()


def test_own_redis_stops_and_comes_back_on_the_same_port(own_redis):
    url = own_redis.url
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.set("k", "v")
        own_redis.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()

        own_redis.start()
        assert own_redis.url == url
        assert client.ping()
        assert client.get("k") is None  # not durable: an outage loses what was queued

        own_redis.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        own_redis.start()
        assert client.ping()
    finally:
        client.close()
