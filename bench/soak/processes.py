"""The stack's processes: gunicorn, Celery workers and beat, restarted as a platform would."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import requests

from tests.stack import BIN, Proc, Web, start_beat, start_worker, wait_for


def start_web_on(env: dict[str, str], logs: Path, port: int, workers: int) -> Web:
    """gunicorn on a port chosen beforehand: PUBLIC_BASE_URL must name it before it starts."""
    argv = [str(BIN / "gunicorn"), "--workers", str(workers), "--bind", f"127.0.0.1:{port}"]
    argv += ["--timeout", "30", "webhook_receiver.app:create_app()"]
    web = Web("web", argv, env, logs)
    web.port = port
    web.start()
    wait_for(
        lambda: not web.alive() or requests.get(f"{web.url}/healthz", timeout=1).ok,
        60,
        what="web ready",
    )
    if not web.alive():
        raise RuntimeError(f"web died at start:\n{web.log()[-3000:]}")
    return web


class Processes:
    """Every subprocess this run started, stopped by pid (process group) at the end, and a
    supervisor that, like a platform's process manager, restarts one that exited by itself
    (and records it: that is a finding, not part of the plan)."""

    def __init__(self, env: dict[str, str], logs: Path, web_port: int) -> None:
        self.env, self.logs, self.web_port = env, logs, web_port
        self.lock = threading.Lock()
        self.all: list[Proc] = []
        self.roles: dict[int, str] = {}  # pid -> web | beat | worker <slot>
        self.workers: list[Proc] = []
        self.ended: set[int] = set()  # pids killed on purpose, or already reported
        self.unexpected: list[str] = []
        self.restarting: set[str] = set()

    def track(self, proc: Proc, role: str) -> Proc:
        with self.lock:
            self.all.append(proc)
            self.roles[proc.pid] = role
        return proc

    def start(self, role: str) -> Proc:
        if role == "web":
            return self.track(start_web_on(self.env, self.logs, self.web_port, 2), role)
        if role == "beat":
            return self.track(start_beat(self.env, self.logs), role)
        slot = int(role.split()[1])
        proc = start_worker(self.env, self.logs, concurrency=2, ready_timeout=90)
        self.track(proc, role)
        with self.lock:
            if slot == len(self.workers):
                self.workers.append(proc)
            else:
                self.workers[slot] = proc
        return proc

    def kill_worker(self, slot: int) -> str:
        """kill -9 the worker's whole process group and start another; a note if it had
        already exited."""
        deadline = time.monotonic() + 90
        while f"worker {slot}" in self.restarting and time.monotonic() < deadline:
            time.sleep(0.2)  # it died by itself and the supervisor is starting another
        with self.lock:
            proc = self.workers[slot]
            self.ended.add(proc.pid)
        note = "" if proc.alive() else f" (it had already exited, status {proc.popen.returncode})"
        proc.kill()
        self.start(f"worker {slot}")
        return note

    def supervise(self, stop: threading.Event, t0: float) -> None:
        while not stop.wait(0.5):
            with self.lock:
                dead = [p for p in self.all if p.pid not in self.ended and not p.alive()]
                self.ended.update(p.pid for p in dead)
            for proc in dead:
                role = self.roles[proc.pid]
                self.unexpected.append(
                    f"t={time.monotonic() - t0:.1f}s {role} pid {proc.pid} exited "
                    f"{proc.popen.returncode}: {last_critical(proc.log())}"
                )
                print(f"  [supervisor] {self.unexpected[-1]}; restarting it", flush=True)
                if not stop.is_set():
                    self.restarting.add(role)
                    try:
                        self.start(role)
                    except Exception as exc:
                        self.unexpected.append(f"{role} could not be restarted: {exc!r}")
                    finally:
                        self.restarting.discard(role)

    def stop_all(self) -> None:
        with self.lock:
            procs = list(reversed(self.all))
            self.ended.update(p.pid for p in procs)
        for proc in procs:
            try:
                proc.stop(timeout=15)
            except Exception as exc:  # keep stopping the others
                print(f"  could not stop {proc.name} pid {proc.pid}: {exc!r}", file=sys.stderr)
            log = getattr(proc, "_log", None)
            if log is not None:
                log.close()


def last_critical(log: str) -> str:
    """The last critical (else error) line of a process's JSON log, shortened."""
    found: dict[str, str] = {}
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") in ("critical", "error"):
            found[record["level"]] = str(record.get("msg"))[:160]
    return found.get("critical") or found.get("error") or "no error logged"
