"""Real Payguard processes for integration tests: worker, beat and web (gunicorn) as
subprocesses of the test, each in its own process group, logs in the test's tmp_path.

    with start_worker(env, tmp_path) as worker: ...
    worker.kill_child()   # SIGKILL one prefork child (the task's process)
    worker.kill()         # SIGKILL the whole worker, children included
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests

T = TypeVar("T")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll until predicate() is truthy; its value, or AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
    )


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        # The child writes to its own copy of the descriptor: ours can close at once, so a
        # process that is killed rather than left through `with` leaks no open file.
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_child(self) -> int:
        """SIGKILL one child process (a prefork pool worker); its pid."""
        kids = wait_for(self.children, 10, what=f"{self.name} children")
        os.kill(kids[0], signal.SIGKILL)
        return kids[0]

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup, no acks, like a lost machine."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(10)  # type: ignore[union-attr]

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_worker(
    env: dict[str, str],
    log_dir: Path,
    *,
    concurrency: int = 1,
    pool: str = "prefork",
    ready_timeout: float = 30.0,
    queues: str = "payguard.events,payguard.send,payguard.twilio,payguard.beat",
) -> Proc:
    name = f"w{uuid.uuid4().hex[:8]}@payguard-test"
    proc = Proc(
        "worker",
        [
            str(BIN / "celery"),
            "-A",
            "worker.celery_app:app",
            "worker",
            "--loglevel=INFO",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            "--prefetch-multiplier=1",
            "-Q",
            queues,
            "--without-gossip",
            "--without-mingle",
            "-n",
            name,
        ],
        env,
        log_dir,
    ).start()
    wait_for(lambda: "ready." in proc.log() or not proc.alive(), ready_timeout, what="worker ready")
    if not proc.alive():
        raise AssertionError(f"worker died at start:\n{proc.log()}")
    return proc


def start_beat(env: dict[str, str], log_dir: Path) -> Proc:
    schedule = log_dir / f"beat-{uuid.uuid4().hex[:6]}"
    return Proc(
        "beat",
        [
            str(BIN / "celery"),
            "-A",
            "worker.celery_app:app",
            "beat",
            "--loglevel=INFO",
            f"--schedule={schedule}",
        ],
        env,
        log_dir,
    ).start()


class Web(Proc):
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_web(
    env: dict[str, str], log_dir: Path, *, workers: int = 1, ready_timeout: float = 30.0
) -> Web:
    port = free_port()
    proc = Web(
        "web",
        [
            str(BIN / "gunicorn"),
            "--workers",
            str(workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--timeout",
            "30",
            "webhook_receiver.app:create_app()",
        ],
        env,
        log_dir,
    )
    proc.port = port
    proc.start()
    try:
        wait_for(
            lambda: not proc.alive() or requests.get(f"{proc.url}/healthz", timeout=1).ok,
            ready_timeout,
            what="web ready",
        )
    except BaseException:  # not ready in time: nobody gets the process to stop it later
        proc.stop()
        raise
    if not proc.alive():
        raise AssertionError(f"web died at start:\n{proc.log()}")
    return proc


def procfile_command(process: str) -> str:
    """The command line of one process type in the repository's Procfile."""
    procfile = Path(__file__).resolve().parents[1] / "Procfile"
    for line in procfile.read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == process:
            return command.strip()
    raise KeyError(f"no {process!r} process in {procfile}")


def start_procfile_web(
    env: dict[str, str], log_dir: Path, *, workers: int = 1, ready_timeout: float = 30.0
) -> Web:
    """The Procfile's own `web` line (its gunicorn config included) on a free port, with
    PORT and WEB_CONCURRENCY=workers in its environment; the shell execs gunicorn, so `pid`
    is the master and `children()` its workers."""
    port = free_port()
    env = {**env, "PORT": str(port), "WEB_CONCURRENCY": str(workers)}
    proc = Web("web", ["/bin/sh", "-c", f"exec {procfile_command('web')}"], env, log_dir)
    proc.port = port
    proc.start()
    try:
        wait_for(
            lambda: not proc.alive() or requests.get(f"{proc.url}/healthz", timeout=1).ok,
            ready_timeout,
            what="web ready",
        )
    except BaseException:  # not ready in time: nobody gets the process to stop it later
        proc.stop()
        raise
    if not proc.alive():
        raise AssertionError(f"web died at start:\n{proc.log()}")
    return proc
