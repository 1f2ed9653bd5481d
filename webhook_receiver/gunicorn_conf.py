"""Gunicorn settings of `web` (Procfile: `gunicorn -c python:webhook_receiver.gunicorn_conf`).

Several workers answer /metrics as one: prometheus_client's multiprocess mode keeps each
worker's counters in files of PROMETHEUS_MULTIPROC_DIR and any worker adds them all up.

Ordering matters. prometheus_client chooses between in-process values and those files once,
when a process first imports it; a worker is a fork of the master and inherits whatever the
master had imported. So the master puts the directory in its environment in `on_starting`,
before the first fork, and neither this module nor the master imports prometheus_client or the
app before that: the app (webhook_receiver.metrics) is imported by each worker after its fork.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_created: list[str] = []


def on_starting(server: Any) -> None:
    """Master, before any worker: an operator's directory, else a fresh one of our own."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        return
    path = tempfile.mkdtemp(prefix="payguard-web-metrics-")
    os.environ[MULTIPROC_ENV] = path
    _created.append(path)


def child_exit(server: Any, worker: Any) -> None:
    """Master, when a worker has exited: drop its live gauges (its counters still count)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    # After a USR2 upgrade the new master (reexec_pid) inherited the directory and still uses it.
    if getattr(server, "reexec_pid", 0):
        return
    for path in _created:
        shutil.rmtree(path, ignore_errors=True)
