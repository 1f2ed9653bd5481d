"""Prometheus metrics of the Celery worker and of beat, from Celery's signals.

Named as danihodovic/celery-exporter names them, so its dashboards and alerts work as they are:
celery_task_{sent,received,started,succeeded,failed,retried,rejected,revoked}_total
{name, hostname} (failed also {exception}), the celery_task_runtime histogram of succeeded
tasks, celery_worker_up{hostname}; hostname is the host part of the node name, as there.
Payguard's own: payguard_twilio_calls_total{operation, outcome},
payguard_event_outcomes_total{outcome}, payguard_beat_up.

Where each number lives:

* worker: the main process receives tasks, the prefork children run them. Every one of them
  writes its counts to prometheus_client's multiprocess files in one directory
  (PROMETHEUS_MULTIPROC_DIR, else a fresh temporary one the main process creates before the
  pool forks), and the main process serves their sum on WORKER_METRICS_HOST:WORKER_METRICS_PORT
  (127.0.0.1 unless told otherwise: the endpoint has no token). A child that
  exits keeps its counts (they happened); mark_process_dead drops only its live gauges.
* beat: one process, in-process values, served on BEAT_METRICS_HOST:BEAT_METRICS_PORT (also
  127.0.0.1 by default): the jobs it sent.

Nothing is recorded anywhere else (CLI, web, tests that run tasks in-process): every handler
does nothing until the worker's or beat's start-up signal enabled it. prometheus_client itself
is imported only then, because it chooses between memory and files when first imported.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from celery import signals

from worker import runtime

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PROCESS_EVENT = "payguard.process_event"


class _Metrics:
    """The metric objects, built once prometheus_client's storage is settled."""

    def __init__(self, hostname: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.hostname = hostname
        # Our own registry: nothing leaks into prometheus_client's global one. In the worker
        # it is not what is served (the multiprocess files are); in beat it is.
        self.registry = CollectorRegistry()
        task = ["name", "hostname"]

        def counter(name: str, documentation: str, labels: list[str] = task) -> Any:
            return Counter(name, documentation, labels, registry=self.registry)

        self.sent = counter("celery_task_sent", "Sent when a task message is published.")
        self.received = counter("celery_task_received", "Sent when the worker receives a task.")
        self.started = counter(
            "celery_task_started", "Sent just before the worker executes the task."
        )
        self.succeeded = counter("celery_task_succeeded", "Sent if the task executed successfully.")
        self.failed = counter(
            "celery_task_failed",
            "Sent if the execution of the task failed.",
            ["name", "hostname", "exception"],
        )
        self.retried = counter(
            "celery_task_retried", "Sent if the task failed, but will be retried in the future."
        )
        self.rejected = counter(
            "celery_task_rejected",
            "The task was rejected by the worker, possibly to be re-queued or moved to a dead "
            "letter queue.",
        )
        self.revoked = counter("celery_task_revoked", "Sent if the task has been revoked.")
        self.runtime = Histogram(
            "celery_task_runtime",
            "Histogram of task runtime measurements.",
            task,
            registry=self.registry,
        )
        self.twilio_calls = counter(
            "payguard_twilio_calls",
            "Twilio API calls by operation (send, account) and outcome",
            ["operation", "outcome"],
        )
        self.event_outcomes = counter(
            "payguard_event_outcomes",
            "payguard.process_event runs by outcome (processed, ignored, skipped, parked, "
            "failed, retry, error)",
            ["outcome"],
        )

    def every_counter_of(self, name: str) -> None:
        """Show a task's counters at 0 from its first receipt, as celery-exporter does, so
        rate() and `> 0` alerts have a series before the first failure."""
        for counter in (
            self.received,
            self.started,
            self.succeeded,
            self.retried,
            self.rejected,
            self.revoked,
        ):
            counter.labels(name, self.hostname)
        self.failed.labels(name, self.hostname, "")


_metrics: _Metrics | None = None  # None: this process records nothing
_state: dict[str, Any] = {}  # the worker's directory and HTTP server
_started_at: dict[str, float] = {}  # task id -> monotonic start, in the child running it


def _host(nodename: object) -> str:
    """'worker1@host-a' -> 'host-a' (one series per machine, not per node name or pid)."""
    return str(nodename or "").rpartition("@")[2] or socket.gethostname()


def _safely(record: Any) -> None:
    """Metrics never break a task: a failure to count is logged and forgotten."""
    if _metrics is None:
        return
    try:
        record(_metrics)
    except Exception:
        log.warning("could not record a metric", exc_info=True)


def _serve(host: str, port: int, registry: Any) -> None:
    """Serve `registry` on host:port. The endpoint has no authentication: the host defaults to
    127.0.0.1 (WORKER_METRICS_HOST, BEAT_METRICS_HOST) so only this machine can scrape it."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # another copy on this machine has the port: run without it
        log.error(
            "metrics endpoint not started", extra={"host": host, "port": port, "error": str(exc)}
        )
        return
    _state["server"], _state["server_pid"] = server, os.getpid()
    log.info("metrics endpoint started", extra={"host": host, "port": port})


class _Up:
    """`<name>{labels} 1` while the process answering the scrape is up."""

    def __init__(self, name: str, documentation: str, labels: dict[str, str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), 1)
        yield family


# ------------------------------------------------------------------ worker: main process


@signals.celeryd_init.connect
def _worker_starting(sender: object = None, **_: object) -> None:
    """Before the pool forks: settle the directory, then build the metrics on files."""
    global _metrics
    if not runtime.settings().WORKER_METRICS_PORT:
        return
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="payguard-worker-metrics-")
        os.environ[MULTIPROC_ENV] = path
        _state["created_dir"] = path
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        # Something imported prometheus_client before the directory was set; no metric
        # exists yet, so choosing the storage again is still safe.
        log.warning("prometheus_client was imported before %s was set", MULTIPROC_ENV)
        values.ValueClass = values.get_value_class()
    _metrics = _Metrics(_host(sender))


@signals.celeryd_after_setup.connect
def _serve_worker(sender: object = None, **_: object) -> None:
    if _metrics is None:
        return
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # reads every process' files per scrape
    registry.register(
        _Up(
            "celery_worker_up",
            "Indicates if a worker has recently sent a heartbeat.",
            {"hostname": _metrics.hostname},
        )
    )
    s = runtime.settings()
    _serve(s.WORKER_METRICS_HOST, s.WORKER_METRICS_PORT, registry)


@signals.worker_shutdown.connect
def _worker_stopped(**_: object) -> None:
    server = _state.pop("server", None)
    if server is not None:
        server.shutdown()
        server.server_close()
    if "created_dir" in _state:
        shutil.rmtree(_state.pop("created_dir"), ignore_errors=True)


# ------------------------------------------------------------------ worker: pool children


@signals.worker_process_init.connect
def _child_started(**_: object) -> None:
    if "server" in _state and _state["server_pid"] != os.getpid():
        _state.pop("server").socket.close()  # the parent's listening socket, inherited


@signals.worker_process_shutdown.connect
def _child_stopping(**_: object) -> None:
    if _metrics is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


# ------------------------------------------------------------------ beat


@signals.beat_init.connect
def _beat_starting(**_: object) -> None:
    global _metrics
    s = runtime.settings()
    port = s.BEAT_METRICS_PORT
    if not port:
        return
    # One process: values in memory. A directory meant for web or the worker must not
    # receive beat's files (they would be added to that process' numbers).
    os.environ.pop(MULTIPROC_ENV, None)
    _metrics = _Metrics(socket.gethostname())
    _metrics.registry.register(
        _Up("payguard_beat_up", "1 while beat is running", {"hostname": _metrics.hostname})
    )
    _serve(s.BEAT_METRICS_HOST, port, _metrics.registry)


# ------------------------------------------------------------------ task events


@signals.after_task_publish.connect
def _sent(sender: object = None, **_: object) -> None:
    _safely(lambda m: m.sent.labels(str(sender), m.hostname).inc())


@signals.task_received.connect
def _received(request: Any = None, **_: object) -> None:
    name = str(getattr(request, "name", None) or "unknown")

    def record(m: _Metrics) -> None:
        m.every_counter_of(name)
        m.received.labels(name, m.hostname).inc()

    _safely(record)


@signals.task_prerun.connect
def _prerun(sender: Any = None, task_id: str | None = None, **_: object) -> None:
    if _metrics is not None and task_id:
        _started_at[task_id] = time.monotonic()
    _safely(lambda m: m.started.labels(sender.name, m.hostname).inc())


@signals.task_postrun.connect
def _postrun(
    sender: Any = None, task_id: str | None = None, state: str | None = None, **_: object
) -> None:
    began = _started_at.pop(task_id or "", None)
    if began is None or state != "SUCCESS":  # the exporter times succeeded runs only
        return
    _safely(lambda m: m.runtime.labels(sender.name, m.hostname).observe(time.monotonic() - began))


@signals.task_success.connect
def _succeeded(sender: Any = None, result: object = None, **_: object) -> None:
    def record(m: _Metrics) -> None:
        m.succeeded.labels(sender.name, m.hostname).inc()
        if sender.name == PROCESS_EVENT:  # it returns its outcome: processed, parked, ...
            m.event_outcomes.labels(str(result)).inc()

    _safely(record)


@signals.task_failure.connect
def _failed(sender: Any = None, exception: BaseException | None = None, **_: object) -> None:
    def record(m: _Metrics) -> None:
        m.failed.labels(sender.name, m.hostname, type(exception).__name__).inc()
        if sender.name == PROCESS_EVENT:  # it settles every error itself; this one escaped
            m.event_outcomes.labels("error").inc()

    _safely(record)


@signals.task_retry.connect
def _retried(sender: Any = None, **_: object) -> None:
    def record(m: _Metrics) -> None:
        m.retried.labels(sender.name, m.hostname).inc()
        if sender.name == PROCESS_EVENT:
            m.event_outcomes.labels("retry").inc()

    _safely(record)


@signals.task_rejected.connect
def _rejected(message: Any = None, **_: object) -> None:
    headers = getattr(message, "headers", None) or {}
    _safely(lambda m: m.rejected.labels(str(headers.get("task", "unknown")), m.hostname).inc())


@signals.task_revoked.connect
def _revoked(sender: Any = None, request: Any = None, **_: object) -> None:
    name = getattr(sender, "name", None) or getattr(request, "task", None) or "unknown"
    _safely(lambda m: m.revoked.labels(str(name), m.hostname).inc())


# ------------------------------------------------------------------ called from worker.tasks


def count_twilio_send(outcome: object) -> None:
    """A send_message call came back: accepted, rejected, retry_safe or unknown."""
    _safely(lambda m: m.twilio_calls.labels("send", str(outcome)).inc())


def count_twilio_account_sync(result: str) -> None:
    """sync_twilio_account's converge result: changed, retry or failed. `in_sync` asked
    Twilio nothing and is not counted."""
    if result != "in_sync":
        _safely(lambda m: m.twilio_calls.labels("account", result).inc())
