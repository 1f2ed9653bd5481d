"""Prometheus metrics of the receiver: request counters, and gauges read from PostgreSQL.

Counters count in the process that served the request. With several gunicorn workers,
PROMETHEUS_MULTIPROC_DIR makes prometheus_client keep them in per-process files that any
worker's /metrics adds up (webhook_receiver/gunicorn_conf.py sets the directory up before the
first fork: prometheus_client picks files or memory when it is first imported).

The gauges (events by status, open holds, frozen wallets, messages) are the database's state,
read at scrape time by DatabaseCollector through core/gauges.py; the ledger's figure is the
last result beat's verify_ledger recorded (ledger_checks), so no scrape scans the journal.
They are the same whichever worker answers, so the collector is registered in the registry
built for each scrape, never in the multiprocess files. A query that fails or runs past its
statement timeout drops its gauges and sets payguard_metrics_scrape_error to 1; the scrape
itself still answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine

from core import gauges, wallet
from core.statuses import EventStatus, MessageStatus

log = logging.getLogger(__name__)

WEBHOOKS = Counter(
    "payguard_webhooks_received_total",
    "Webhook requests by provider and answer",
    ["provider", "answer"],
)
VERIFY_FAILURES = Counter(
    "payguard_webhook_verification_failures_total",
    "Webhook verification failures by cause",
    ["provider", "cause"],
)

EVENT_STATUSES = tuple(EventStatus)
MESSAGE_STATUSES = tuple(MessageStatus)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _by_status(
    name: str, documentation: str, counts: dict[str, int], known: Iterable[str]
) -> GaugeMetricFamily:
    """One sample per status; known statuses at 0 when absent, so `> 0` alerts have a series."""
    family = GaugeMetricFamily(name, documentation, labels=["status"])
    for status in sorted({*known, *counts}):
        family.add_metric([status], counts.get(status, 0))
    return family


def _events(conn: Connection) -> list[Metric]:
    counts = gauges.events_by_status(conn)
    return [_by_status("payguard_events", "Webhook events by status", counts, EVENT_STATUSES)]


def _holds(conn: Connection) -> list[Metric]:
    count, cents = gauges.open_holds(conn)
    return [
        _gauge("payguard_open_holds", "Holds not yet captured or released", count),
        _gauge("payguard_open_holds_cents", "Money set aside by open holds, in cents", cents),
    ]


def _frozen(conn: Connection) -> list[Metric]:
    count = gauges.frozen_wallets(conn)
    return [_gauge("payguard_frozen_wallets", "Wallets with at least one freeze", count)]


def _messages(conn: Connection) -> list[Metric]:
    counts = gauges.messages_by_status(conn)
    return [
        _by_status("payguard_messages", "Messages by status", counts, MESSAGE_STATUSES),
        _gauge(
            "payguard_blocked_messages",
            "Messages refused before sending (no money, frozen, inactive, suspended)",
            counts.get("blocked", 0),
        ),
    ]


def _ledger(conn: Connection) -> list[Metric]:
    # The last result of beat's verify_ledger, never a verification of its own: that one
    # aggregates the whole journal, whose cost grows without bound.
    check = wallet.last_check(conn)
    families: list[Metric] = [
        _gauge(
            "payguard_ledger_checked_timestamp_seconds",
            "When beat last verified every wallet against its journal (Unix time; 0: never)",
            check.checked_at.timestamp() if check else 0,
        )
    ]
    if check is not None:  # no figure before the first verification: unknown is not zero
        families.append(
            _gauge(
                "payguard_ledger_mismatches",
                "Wallet figures that disagreed with their journal, holds or freezes at the "
                "last verification",
                check.mismatches,
            )
        )
        families.append(
            _gauge(
                "payguard_twilio_segment_mismatches",
                "Charged messages Twilio billed for other segments than were charged, at the "
                "last verification",
                check.twilio_mismatches,
            )
        )
    return families


READERS: tuple[Callable[[Connection], list[Metric]], ...] = (
    _events,
    _holds,
    _frozen,
    _messages,
    _ledger,
)


class DatabaseCollector(Collector):
    """The database's state as gauges, queried on every scrape in one read-only transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        families, failed = self._read()
        yield from families
        yield _gauge(
            "payguard_metrics_scrape_error",
            "1 when a database query of this scrape failed; the gauges it feeds are missing",
            int(failed),
        )

    def _read(self) -> tuple[list[Metric], bool]:
        families: list[Metric] = []
        failed = False
        try:
            with self.engine.connect() as conn, conn.begin():
                gauges.begin_snapshot(conn)  # read-only, with a statement timeout
                for read in READERS:
                    try:
                        # A savepoint each: one timed-out query costs only its own gauges.
                        with conn.begin_nested():
                            families += read(conn)
                    except Exception as exc:
                        failed = True
                        log.warning(
                            "metrics query failed",
                            extra={"query": read.__name__, "error": str(exc)[:200]},
                        )
        except Exception as exc:  # no connection at all: the database is down or saturated
            failed = True
            log.warning("metrics database unavailable", extra={"error": str(exc)[:200]})
        return families, failed


class _ThisProcess(Collector):
    """The counters of this process (no multiprocess directory: one process answers)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class ReceiverMetrics:
    """What the routes count with, and /metrics' body: the counters plus the database gauges."""

    WEBHOOKS = WEBHOOKS
    VERIFY_FAILURES = VERIFY_FAILURES

    def __init__(self, engine: Engine) -> None:
        self.database = DatabaseCollector(engine)

    def render(self) -> tuple[bytes, str]:
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(registry)
        else:
            registry.register(_ThisProcess())
        registry.register(self.database)
        return generate_latest(registry), CONTENT_TYPE_LATEST
