"""The faults injected during the load (worker kills, a Redis restart) and their catch-up."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psycopg

from bench.soak.common import FAULTS
from bench.soak.processes import Processes


@dataclass
class Fault:
    what: str
    at: float  # seconds since the load started
    recovered_at: float | None = None  # restarted / back
    # From the recovery until every event stored / message queued before it was done.
    events_after: float | None = None
    messages_after: float | None = None
    stuck: int = 0  # messages from before the recovery still pending when the watch ended
    note: str = ""


def watch_catch_up(database_url: str, fault: Fault, stop: threading.Event, limit: float) -> None:
    """After a fault: how long until every event stored before the recovery is out of
    `received`, and every message queued before it is out of queued/sending/retrying."""
    recovered = time.monotonic()
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            max_id, db_now = conn.execute(
                "SELECT coalesce(max(id), 0), now() FROM webhook_events"
            ).fetchone()
            while time.monotonic() - recovered < limit:
                events, msgs = conn.execute(
                    "SELECT (SELECT count(*) FROM webhook_events WHERE id <= %s "
                    "AND status = 'received'), (SELECT count(*) FROM messages "
                    "WHERE created_at <= %s AND status IN ('queued', 'sending', 'retrying'))",
                    (max_id, db_now),
                ).fetchone()
                now = time.monotonic() - recovered
                if events == 0 and fault.events_after is None:
                    fault.events_after = now
                if msgs == 0 and fault.messages_after is None:
                    fault.messages_after = now
                fault.stuck = msgs
                if (events == 0 and msgs == 0) or stop.wait(0.25):
                    return
    except Exception as exc:
        fault.note = f"watch failed: {exc!r}"


def inject_faults(
    seconds: float,
    t0: float,
    procs: Processes,
    redis,
    database_url: str,
    faults: list[Fault],
    stop: threading.Event,
    watch_stop: threading.Event,
    watchers: list,
) -> None:
    def at(fraction: float) -> bool:
        remaining = t0 + seconds * fraction - time.monotonic()
        return not stop.wait(max(0.0, remaining))

    def recovered(fault: Fault) -> None:
        fault.recovered_at = time.monotonic() - t0
        watcher = threading.Thread(
            target=watch_catch_up,
            args=(database_url, fault, watch_stop, 240),
            daemon=True,
        )
        watcher.start()
        watchers.append(watcher)

    try:
        for fraction, target, what in FAULTS:
            if not at(fraction):
                return
            fault = Fault(what, time.monotonic() - t0)
            faults.append(fault)
            print(f"  [fault] t={fault.at:5.1f}s {what}", flush=True)
            if target == "redis":
                redis.stop()
                stop.wait(5.0)
                redis.start()
            else:
                fault.note = procs.kill_worker(int(target.split()[1]))
            recovered(fault)
            print(f"  [fault] t={fault.recovered_at:5.1f}s recovered from: {what}", flush=True)
    except Exception as exc:
        faults.append(Fault(f"fault injection failed: {exc!r}", time.monotonic() - t0))
