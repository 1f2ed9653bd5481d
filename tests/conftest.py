"""Fixtures shared by every test: real PostgreSQL and Redis for integration tests.

Servers start lazily, the first time a test asks for them, so tests in tests/unit (which must
not ask) run without any. By default they are embedded servers from pip wheels
(devtools/devstack.py) in temporary directories, stopped when the session ends. Set
TEST_DATABASE_URL (a superuser, or a role with CREATEDB, on a disposable server; the database
in the URL is only used for administration) and/or TEST_REDIS_URL (a disposable database: it is
FLUSHDBed) to use servers of your own instead.

Each test that needs the database gets a database of its own, cloned from a migrated template,
holding committed data that subprocesses (web, worker) can see; it is dropped afterwards.

Tests under tests/integration are marked `integration` automatically.
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
INTEGRATION_DIR = REPO_ROOT / "tests" / "integration"

# `from tests.support… import …` needs the repository root importable, however pytest started.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devtools.devstack import (  # noqa: E402
    TEST_POSTGRES_SETTINGS,
    EmbeddedPostgres,
    EmbeddedRedis,
    start_postgres,
    start_redis,
)
from devtools.devstack import database_url as _database_url  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # A cancelled CI job or `kill` sends SIGTERM, which would end pytest without fixture
    # teardown and leave the embedded servers running; unwind like Ctrl-C instead.
    main_pid = os.getpid()

    def _on_sigterm(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:  # a forked child inherited this handler: die as usual
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt("SIGTERM")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(item.path).is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class PgServer:
    """The PostgreSQL server of this test session.

    `admin_url` connects to its maintenance database as a role that may create databases;
    `url_for(name)` is the same server, database `name`; `embedded` is the EmbeddedPostgres
    when the session started one (None with TEST_DATABASE_URL)."""

    admin_url: str
    embedded: EmbeddedPostgres | None = None

    def url_for(self, database: str) -> str:
        return _database_url(self.admin_url, database)

    def admin(self):  # -> psycopg.Connection
        """A fresh autocommit connection to the maintenance database (close it: `with`)."""
        import psycopg

        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10)


def _create_database(pg: PgServer, name: str, template: str | None = None) -> None:
    from psycopg import errors, sql

    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    for attempt in range(20):
        try:
            with pg.admin() as conn:
                conn.execute(statement)
            return
        except errors.ObjectInUse:
            # "source database is being accessed by other users": another session is cloning
            # the template at this instant (parallel runs); it is over in milliseconds.
            if attempt == 19:
                raise
            time.sleep(0.05)


def _drop_database(pg: PgServer, name: str) -> None:
    from psycopg import sql

    with pg.admin() as conn:
        # Worker or web subprocesses of the test may still hold sessions.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL: TEST_DATABASE_URL's server if set, else an embedded
    PostgreSQL in a temporary directory (fsync off, 200 connections), stopped and deleted at
    the end of the session. Yields a PgServer (`admin_url`, `url_for(name)`, `admin()`)."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield PgServer(admin_url=url)
        return
    tmp = Path(tempfile.mkdtemp(prefix="payguard-test-pg-"))
    try:
        server = start_postgres(tmp / "pgdata", database=None, settings=TEST_POSTGRES_SETTINGS)
        try:
            yield PgServer(admin_url=server.admin_url, embedded=server)
        finally:
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_template(pg_server: PgServer) -> Iterator[str]:
    """Name of a database `payguard_tpl_<random>` migrated to head once per session with
    migrations.upgrade, then marked a template that refuses connections (a session left open
    on it would make every clone fail). Dropped at the end of the session."""
    from psycopg import sql

    name = f"payguard_tpl_{secrets.token_hex(4)}"
    _create_database(pg_server, name)
    try:
        import migrations

        migrations.upgrade(pg_server.url_for(name))
        with pg_server.admin() as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                    sql.Identifier(name)
                )
            )
        yield name
    finally:
        with pg_server.admin() as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name))
            )
        _drop_database(pg_server, name)


@pytest.fixture
def database_url(pg_server: PgServer, migrated_template: str) -> Iterator[str]:
    """A postgresql:// URL to a fresh, migrated database of this test alone
    (`CREATE DATABASE … TEMPLATE`, a few tens of milliseconds). Data is committed for real, so
    subprocesses see it. Dropped after the test, its leftover connections terminated first."""
    name = f"payguard_test_{secrets.token_hex(6)}"
    _create_database(pg_server, name, template=migrated_template)
    try:
        yield pg_server.url_for(name)
    finally:
        # A connection this test left open is collected here, so its ResourceWarning (an
        # error: pyproject's filterwarnings) fails this test rather than whichever test the
        # garbage collector happens to run in later.
        gc.collect()
        _drop_database(pg_server, name)


@pytest.fixture
def engine(database_url: str):  # -> sqlalchemy.Engine
    """core.db.make_engine(database_url), disposed after the test."""
    from core.db import make_engine

    eng = make_engine(database_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def make_app():  # -> Callable[[Settings], flask.Flask]
    """webhook_receiver.app.create_app(settings); every app made is closed after the test (its
    engine disposed, its publisher closed), so no pooled connection outlives the test."""
    from webhook_receiver.app import create_app

    apps = []

    def make(settings):
        app = create_app(settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["payguard"].close()


@pytest.fixture
def db(engine):  # -> tests.support.db.Db
    """Runs a core function as one committed unit of work on this test's database:
    `db(new_org, balance=100)` (tests/support/db.py)."""
    from tests.support.db import Db

    return Db(engine)


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The session's Redis URL: TEST_REDIS_URL if set, else an embedded redis-server on a free
    127.0.0.1 port (no persistence), stopped at the end of the session. Shared by all tests:
    ask for `redis_clean` to start from an empty one."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    tmp = Path(tempfile.mkdtemp(prefix="payguard-test-redis-"))
    try:
        with start_redis(tmp) as server:
            yield server.url
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def redis_clean(redis_url: str) -> str:
    """The session's Redis URL, after FLUSHDB (that database only: the server's others, which
    another run may be using, are left alone)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server for this test alone (no persistence), always embedded. The test may
    `stop()` (SIGTERM), `kill()` (SIGKILL) and `start()` it again: it comes back on the same
    port, so `own_redis.url` stays valid. Stopped after the test. For a broker whose queue
    survives a restart use `devtools.devstack.start_redis(tmp_path, durable=True)`."""
    with start_redis(tmp_path / "own-redis") as server:
        yield server


# --------------------------------------------------------------------------- RabbitMQ

DEFAULT_TEST_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


@dataclass(frozen=True)
class RabbitVhost:
    """A virtual host of the session's RabbitMQ, made for this session and deleted after it.
    `url` is amqp://user:password@host:port/vhost; `url_via(port)` the same through another
    port on 127.0.0.1 (a TcpProxy)."""

    user: str
    password: str
    host: str
    port: int
    vhost: str

    @property
    def url(self) -> str:
        return self.url_via(self.host, self.port)

    def url_via(self, host: str, port: int) -> str:
        from urllib.parse import quote

        return f"amqp://{self.user}:{self.password}@{host}:{port}/{quote(self.vhost, safe='')}"


def _rabbitmqctl(*args: str) -> None:
    import subprocess

    subprocess.run(
        ["rabbitmqctl", "--quiet", *args], check=True, capture_output=True, text=True, timeout=60
    )


def _rabbitmq_reachable(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitVhost]:
    """A fresh virtual host `payguard-test-<random>` on TEST_RABBITMQ_URL's server (default
    amqp://guest:guest@127.0.0.1:5672//), made with `rabbitmqctl add_vhost` +
    `set_permissions` and deleted at the end of the session. The server itself is never
    stopped or reconfigured (cut a TcpProxy for an outage). Skips the test, saying why, where
    no RabbitMQ answers (a laptop without one) or rabbitmqctl cannot make a vhost."""
    import shutil as _shutil
    import subprocess
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(os.environ.get("TEST_RABBITMQ_URL", DEFAULT_TEST_RABBITMQ_URL))
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    if not _rabbitmq_reachable(host, port):
        pytest.skip(f"no RabbitMQ answers at {host}:{port} (set TEST_RABBITMQ_URL)")
    if _shutil.which("rabbitmqctl") is None:
        pytest.skip("RabbitMQ answers, but rabbitmqctl (to make a test vhost) is not on PATH")
    vhost = f"payguard-test-{secrets.token_hex(4)}"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"RabbitMQ answers, but rabbitmqctl could not make a vhost: {detail}")
    try:
        yield RabbitVhost(user, password, host, port, vhost)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def rabbitmq_clean(rabbitmq: RabbitVhost) -> RabbitVhost:
    """The session's vhost without the queues and exchanges of earlier tests (Payguard's own and
    Celery's delayed-delivery ones): nothing a previous test left is delivered to this one."""
    from kombu import Connection

    from bus.broker import QUEUES

    delayed = [f"celery_delayed_{level}" for level in range(28)]
    with Connection(rabbitmq.url, connect_timeout=10) as conn:
        for name in (*QUEUES, *delayed):
            channel = conn.channel()
            try:
                channel.queue_delete(name)
                channel.exchange_delete(name)
            finally:
                channel.close()
        channel = conn.channel()
        try:
            channel.exchange_delete("celery_delayed_delivery")
        finally:
            channel.close()
    return rabbitmq


# --------------------------------------------------------------------------- subprocesses


def _contract_variables() -> set[str]:
    from core.settings import Settings

    return set(Settings.model_fields)


@pytest.fixture
def app_env(database_url: str, redis_clean: str) -> dict[str, str]:
    """Environment for subprocesses (web, worker, beat, CLI) of this test: a copy of
    os.environ without any Payguard variable from the developer's shell, plus DATABASE_URL
    (this test's database), REDIS_URL (the session Redis, flushed), PAYPAL_WEBHOOK_ID=WH-TEST,
    TWILIO_CONSOLE=1 (a worker without a Twilio account may start), LOG_FORMAT=text,
    PYTHONUNBUFFERED=1, PYTHONPATH=<repo root> and this venv's bin first on
    PATH (for `celery`, `gunicorn`, `payguard`). Add or override keys freely; it is a new dict
    per test. With own_redis, set env["REDIS_URL"] = own_redis.url."""
    env = {k: v for k, v in os.environ.items() if k not in _contract_variables()}
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_clean,
        PAYPAL_WEBHOOK_ID="WH-TEST",
        # Workers of tests that configure no Twilio account run on the console backend on
        # purpose (a test with a fake Twilio sets TWILIO_ACCOUNT_SID, which then wins).
        TWILIO_CONSOLE="1",
        # Several workers at once in one test run: no fixed metrics ports to fight over.
        WORKER_METRICS_PORT="0",
        BEAT_METRICS_PORT="0",
        LOG_FORMAT="text",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(pythonpath),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    return env
