"""Running the plan against the stack, and replaying what was parked for ordering."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg.rows import dict_row

from bench.soak.common import ORDERING_ERRORS, Stats
from bench.soak.database import backlog
from bench.soak.plan import Plan, Timeline
from bus.publisher import Publisher
from core import inbox, outbox
from core.db import run_in_transaction


def run_load(  # noqa: C901 (the load loop: plan, pacing, faults)
    plan: Plan,
    timeline: Timeline,
    pool: ThreadPoolExecutor,
    seconds: float,
    rate: float,
    clients: int,
    stats: Stats,
    t0: float,
    database_url: str,
) -> float:
    """Generate actions at `rate` for `seconds` and run the due jobs; then keep delivering what
    is still scheduled (delayed halves, redeliveries), in its own time so the disorder stays
    as planned. Returns the moment the generation stopped."""
    slots = threading.BoundedSemaphore(clients * 4)
    inflight = [0]
    lock = threading.Lock()

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:
            with stats.lock:
                stats.queue_errors[f"job {type(exc).__name__}: {exc}"[:120]] += 1
        finally:
            with lock:
                inflight[0] -= 1
            slots.release()

    def submit_due(now: float) -> None:
        for job in timeline.due(now):
            waited = time.monotonic()
            while not slots.acquire(timeout=1):
                if time.monotonic() - waited > 60:
                    raise RuntimeError("client threads stuck for 60 s")
            with lock:
                inflight[0] += 1
            pool.submit(run, job)

    end = t0 + seconds
    next_action, next_report = t0, t0 + 10
    while (now := time.monotonic()) < end:
        if next_action < now - 1.0:
            next_action = now - 1.0  # behind: drop the backlog of actions, not the deadline
        while next_action <= now:
            plan.next_action()
            next_action += 1.0 / rate
        submit_due(now)
        if now >= next_report:
            with stats.lock:
                posts, queued = sum(stats.posts.values()), stats.queued
            with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
                left = backlog(conn)
            print(
                f"  t={now - t0:5.1f}s webhooks posted {posts}, messages queued {queued}, "
                f"backlog {left}",
                flush=True,
            )
            next_report += 10
        time.sleep(0.005)
    stopped = time.monotonic()
    flush_deadline = stopped + 90
    while time.monotonic() < flush_deadline:
        with lock:
            busy = inflight[0]
        if not busy and not len(timeline):
            break
        submit_due(time.monotonic())
        time.sleep(0.02)
    pool.shutdown(wait=True)
    return stopped


def replay_parked(database_url: str, engine, publisher: Publisher) -> tuple[Counter, list]:
    """Replay events parked because they arrived before what they refer to; the others stay
    parked (and fail a check). Same function as `payguard events replay ID`."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        parked = conn.execute(
            "SELECT id, provider, event_type, last_error FROM webhook_events "
            "WHERE status = 'parked' ORDER BY id"
        ).fetchall()
    replayed: Counter[str] = Counter()
    others = []
    for inbox_id, provider, event_type, error in parked:
        if not any(pattern in (error or "") for pattern in ORDERING_ERRORS):
            others.append((inbox_id, provider, event_type, error))
            continue
        event, outbox_id = run_in_transaction(
            engine, lambda c, i=inbox_id: inbox.replay(c, i, actor="soak")
        )
        replayed[f"{provider} {event_type}"] += 1
        try:
            publisher.publish(outbox.PROCESS_EVENT_TASK, [event.id], task_id=f"outbox-{outbox_id}")
            run_in_transaction(engine, lambda c, o=outbox_id: outbox.mark_published(c, [o]))
        except Exception:
            pass  # the relay publishes it
    return replayed, others
