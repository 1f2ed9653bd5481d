"""Soak: the whole stack under a disordered mix of webhooks, sends, refunds and disputes while
a worker dies twice and Redis restarts once; then proof that every payment, refund and charge
was applied exactly once.

    .venv/bin/python bench/soak.py [--seconds 60] [--orgs 50] [--seed 1] [--rate 25]
                                   [--clients 6] [--database-url URL] [--keep]

Everything runs on 127.0.0.1: its own PostgreSQL (embedded, fsync off; or a scratch database
on --database-url's server, created, migrated with migrations.upgrade and dropped unless
--keep), its own embedded Redis, a FakePayPal serving a generated signing certificate, a
FakeTwilio, gunicorn (2 workers), two Celery workers (concurrency 2) and beat, all as
subprocesses with retry and redelivery timings shortened from minutes to seconds.

Redis is NOT durable (no AOF, no RDB): its restart loses every queued and unacknowledged task,
so the run proves what the outbox relay and the redelivery paths recover, not what a broker
with an append-only file happens to keep (`--durable-redis` turns AOF on, to compare).

The load is a seeded plan (same --seed, same sequence of actions; thread timing still varies):
PayPal captures, Stripe payments announced twice (checkout.session.completed and
payment_intent.succeeded, the intent sometimes without the organization), duplicates of
earlier deliveries (byte-identical, or re-signed with a new transmission), partial and full
refunds (Stripe's sometimes announced again inside charge.refunded), refunds delivered
BEFORE their payment, disputes opened and closed (sometimes closed first; lost PayPal ones
followed by PAYMENT.CAPTURE.REVERSED), subscription changes delivered out of order, messages
queued through core.messages.queue, and signed Twilio status callbacks (delivered or failed,
duplicated, a stale `sent` after the final status). Every POST not answered 200 is delivered
again a second later, as the providers do.

Faults: kill -9 of worker 1 at 25% (restarted), Redis stopped at 40% for 5 s (same port),
kill -9 of worker 2 at 55% (restarted); beat runs throughout. A process that exits by itself
is restarted, as a platform's process manager would, and reported (a FAIL). After the load:
drain (no event `received`, no message queued/sending/retrying, no unpublished outbox row),
replay the events parked only because they came before what they refer to (core.inbox.replay,
the function behind `payguard events replay`), drain again, then check, and exit 1 on any
FAIL: `payguard ledger verify --json`; every webhook answered 200 in the inbox and applied;
one journal row per payment, refund and lost dispute sent, none other; balance - debt per
organization against what was sent and what was charged; charges against the messages table
and the fake Twilio's creates; status callbacks; subscriptions; freezes; processes.
HOLD_MAX_AGE_SECONDS is 30 here, so a send whose worker vanished settles within the drain.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.soak.checks import run_checks, sample
from bench.soak.common import REPO, STRIPE_SECRET, TWILIO_SID, TWILIO_TOKEN, WEBHOOK_ID, Stats, pct
from bench.soak.database import create_orgs, drain, prepare_database
from bench.soak.faults import Fault, inject_faults
from bench.soak.load import replay_parked, run_load
from bench.soak.plan import Plan, Stack, Timeline
from bench.soak.processes import Processes
from bus.publisher import Publisher
from core import messages, sending
from core.db import make_engine
from devtools.devstack import start_redis
from tests.stack import BIN, free_port
from tests.support.fakes.fake_twilio import (
    FakeTwilio,
    unused_port,
)
from tests.support.fakes.paypal_api import FakePayPal, make_signing_cert


def subprocess_env(
    database_url: str, redis_url: str, paypal: FakePayPal, twilio: FakeTwilio, public_url: str
) -> dict[str, str]:
    prefixes = (
        "PAYPAL_",
        "STRIPE_",
        "TWILIO_",
        "TASK_",
        "BROKER_",
        "DATABASE_",
        "REDIS_",
        "EVENT_",
        "OUTBOX_",
        "RELAY_",
        "HOLD_",
        "SMS_",
        "PUBLIC_",
        "WORKER_",
        "BEAT_",
        "WEB_",
        "SUBSCRIPTION_",
        "PROMETHEUS_",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.pop("PORT", None)
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PAYPAL_WEBHOOK_ID=WEBHOOK_ID,
        PAYPAL_CERT_URL_PREFIXES=paypal.cert_prefix,
        PAYPAL_API_BASE=paypal.base_url,  # never the internet, even if a job wanted to ask
        STRIPE_WEBHOOK_SECRET=STRIPE_SECRET,
        STRIPE_API_BASE=f"http://127.0.0.1:{unused_port()}",
        TWILIO_ACCOUNT_SID=TWILIO_SID,
        TWILIO_AUTH_TOKEN=TWILIO_TOKEN,
        TWILIO_API_BASE=twilio.base_url,
        PUBLIC_BASE_URL=public_url,
        TASK_MAX_RETRIES="3",  # a refund before its capture parks within about a second
        TASK_RETRY_BASE_SECONDS="0.2",
        TASK_RETRY_MAX_SECONDS="2",
        BROKER_VISIBILITY_TIMEOUT="10",
        EVENT_REDELIVER_SECONDS="5",
        OUTBOX_GRACE_SECONDS="1",
        RELAY_INTERVAL_SECONDS="0.5",
        HOLD_MAX_AGE_SECONDS="30",  # a send lost with its worker settles within the drain
        WORKER_METRICS_PORT="0",
        BEAT_METRICS_PORT="0",
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )
    return env


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--orgs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=25.0, help="actions per second")
    parser.add_argument("--clients", type=int, default=6, help="client threads")
    parser.add_argument("--drain-timeout", type=float, default=150.0)
    parser.add_argument(
        "--database-url", default=None, help="a server where we may CREATE DATABASE"
    )
    parser.add_argument("--durable-redis", action="store_true", help="AOF on (default: off)")
    parser.add_argument("--keep", action="store_true", help="keep the database and the logs")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="payguard-soak-"))
    logs = tmp / "logs"
    keep_tmp = args.keep
    stop = threading.Event()
    status = 1
    with ExitStack() as stack:
        stack.callback(lambda: None if keep_tmp else shutil.rmtree(tmp, ignore_errors=True))
        print(
            f"soak: seed {args.seed}, {args.orgs} orgs, {args.seconds:.0f}s at {args.rate}/s, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        database_url, where = prepare_database(args.database_url, tmp, stack, args.keep)
        redis = stack.enter_context(start_redis(tmp / "redis", durable=args.durable_redis))
        signer = make_signing_cert()
        paypal = stack.enter_context(FakePayPal(webhook_id=WEBHOOK_ID))
        cert_url = paypal.install_signing_cert(signer)
        twilio = stack.enter_context(FakeTwilio(credentials=(TWILIO_SID, TWILIO_TOKEN)))
        web_port = free_port()
        public_url = f"http://127.0.0.1:{web_port}"
        env = subprocess_env(database_url, redis.url, paypal, twilio, public_url)
        print(
            f"  database {where}\n  redis {redis.url} "
            f"({'AOF' if args.durable_redis else 'not durable'}); logs {logs}",
            flush=True,
        )

        engine = make_engine(database_url, pool_size=args.clients + 2, max_overflow=4)
        stack.callback(engine.dispose)
        policy = sending.Policy(default_segment_price_cents=1)
        org_ids, hungry, campaigns = create_orgs(engine, rng, args.orgs, policy)

        procs = Processes(env, logs, web_port)
        stack.callback(procs.stop_all)
        for role in ("web", "worker 0", "worker 1", "beat"):
            procs.start(role)
        print(
            f"  web {public_url} (gunicorn 2 workers), 2 workers (concurrency 2), beat; "
            f"{len(org_ids)} orgs ({len(hungry)} hungry)",
            flush=True,
        )

        stats, timeline = Stats(), Timeline()
        driver = Stack(
            web_port=web_port,
            signer=signer,
            cert_url=cert_url,
            engine=engine,
            redis_url=redis.url,
            twilio=twilio,
            public_url=public_url,
            policy=policy,
        )
        plan = Plan(rng, org_ids, hungry, campaigns, driver, timeline, stats, args.seed)
        faults: list[Fault] = []
        watchers: list[threading.Thread] = []
        watch_stop = threading.Event()
        stack.callback(watch_stop.set)
        pool = ThreadPoolExecutor(args.clients, thread_name_prefix="client")
        stack.callback(lambda: pool.shutdown(wait=False, cancel_futures=True))
        stack.callback(stop.set)
        try:
            t0, t0_wall = time.monotonic(), time.time()
            fault_thread = threading.Thread(
                target=inject_faults,
                args=(
                    args.seconds,
                    t0,
                    procs,
                    redis,
                    database_url,
                    faults,
                    stop,
                    watch_stop,
                    watchers,
                ),
                daemon=True,
            )
            fault_thread.start()
            supervisor = threading.Thread(target=procs.supervise, args=(stop, t0), daemon=True)
            supervisor.start()
            print("load:", flush=True)
            stopped = run_load(
                plan, timeline, pool, args.seconds, args.rate, args.clients, stats, t0, database_url
            )
            load_seconds = stopped - t0
            fault_thread.join(timeout=180)
            print("drain:", flush=True)
            drained, left, events_drained = drain(
                database_url, args.drain_timeout, "drain", stopped
            )
            publisher = Publisher(redis.url, timeout=0.5)
            replayed, other_parked = replay_parked(database_url, engine, publisher)
            publisher.close()
            if replayed:
                # What the first drain could not finish will not finish now: a shorter wait.
                limit = args.drain_timeout if drained else 30.0
                drained, left, events_drained = drain(database_url, limit, "replay", stopped)
            drain_seconds = time.monotonic() - stopped
            watch_stop.set()
            for watcher in watchers:
                watcher.join(timeout=5)
            figures = Figures(load_seconds, drain_seconds, events_drained, replayed, drained)
            report(args, plan, stats, faults, figures, database_url)
            if not drained:
                describe_stuck(database_url, t0_wall, faults)
            checks = run_checks(database_url, env, plan, twilio, drained, left, other_parked)
            checks.add(
                "processes: none exited by itself",
                not procs.unexpected,
                "web, beat and workers up but for the kills"
                if not procs.unexpected
                else sample(procs.unexpected),
            )
            checks.print()
            status = 0 if checks.ok else 1
            if status:
                keep_tmp = True
                print(f"\nlogs kept in {logs}")
        except KeyboardInterrupt:
            print("\nsoak: interrupted; stopping every process", file=sys.stderr, flush=True)
            status = 130
    return status


@dataclass
class Figures:
    load_seconds: float
    drain_seconds: float
    events_drained: float | None  # events and outbox alone, after the replay
    replayed: Counter
    drained: bool


def report(args, plan: Plan, stats: Stats, faults: list[Fault], fig: Figures, database_url: str):
    load_seconds, replayed = fig.load_seconds, fig.replayed
    with psycopg.connect(database_url, autocommit=True) as conn:
        to_debt = conn.execute(
            "SELECT count(*) FROM journal WHERE debt_delta_cents > 0"
        ).fetchone()[0]
        retried = conn.execute("SELECT count(*) FROM webhook_events WHERE attempts > 1").fetchone()[
            0
        ]
        replay_ok = conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'events.replay'"
        ).fetchone()[0]
    posts = sum(stats.posts.values())
    first = {k: v for k, v in stats.posts.items() if not k.startswith(("duplicate", "redelivery"))}
    print(f"\nwhat it did ({load_seconds:.1f}s of load, seed {args.seed}):")
    print(
        f"  actions {sum(plan.actions.values())}: "
        + ", ".join(f"{k} {v}" for k, v in plan.actions.most_common())
    )
    print(f"  webhooks posted {posts} ({posts / load_seconds:.1f}/s over the load):")
    for kind, n in sorted(first.items()):
        print(f"    {kind:<44} {n:5d}")
    for kind in ("duplicate (same bytes)", "duplicate (re-signed)", "redelivery"):
        print(f"    {kind:<44} {stats.posts.get(kind, 0):5d}")
    print(f"  answers: {dict(stats.codes)}; 200s: {dict(stats.answers)}")
    print(
        f"  POST latency p50 {pct(stats.latencies, 50) * 1000:.1f} ms, p99 "
        f"{pct(stats.latencies, 99) * 1000:.1f} ms, max {max(stats.latencies, default=0) * 1000:.0f} ms"
        + (f", mean {statistics.mean(stats.latencies) * 1000:.1f} ms" if stats.latencies else "")
    )
    print(
        f"  refunds sent before their payment: {dict(plan.refund_first)}; events retried "
        f"(attempts > 1) {retried}; parked for ordering and replayed {sum(replayed.values())} "
        f"{dict(replayed)} (audit rows {replay_ok})"
    )
    print(f"  clawbacks that went into debt: {to_debt}")
    print(
        f"  messages queued {stats.queued} ({stats.queued / load_seconds:.1f}/s), publish left "
        f"to the relay {stats.publish_deferred}; queue errors {dict(stats.queue_errors) or 'none'}"
    )
    print(f"  Twilio status callbacks: {dict(stats.callbacks)}")
    if stats.gave_up:
        print(f"  webhooks never answered 200: {sample(stats.gave_up)}")
    print(
        f"  drain after the load stopped: everything {fig.drain_seconds:.1f}s"
        + (" (gave up)" if not fig.drained else "")
        + ", events and outbox "
        + (f"{fig.events_drained:.1f}s" if fig.events_drained is not None else "never")
        + " (after the replay of the parked ones)"
    )
    print("  faults (t from load start; caught up = done with every event / message from before")
    print("  the recovery):")
    for f in faults:
        back = f"back t={f.recovered_at:.1f}s" if f.recovered_at is not None else "not back"
        events = "never" if f.events_after is None else f"{f.events_after:.1f}s"
        msgs = "never" if f.messages_after is None else f"{f.messages_after:.1f}s"
        stuck = f" ({f.stuck} messages still pending)" if f.messages_after is None else ""
        print(
            f"    t={f.at:5.1f}s {f.what:<26} {back}; events caught up {events}, "
            f"messages {msgs}{stuck} {f.note}"
        )


def describe_stuck(database_url: str, t0_wall: float, faults: list[Fault]) -> None:
    """What the drain left behind, with times from the load's start (for the report)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            """
SELECT m.message_id, m.status, m.send_attempt, extract(epoch FROM m.created_at),
       extract(epoch FROM m.updated_at), o.id, extract(epoch FROM o.published_at), o.attempts,
       o.last_error
FROM messages m LEFT JOIN outbox o ON o.task = %s AND o.args = jsonb_build_array(m.message_id)
WHERE m.status IN ('queued', 'sending', 'retrying') ORDER BY m.created_at LIMIT 10""",
            (messages.SEND_TASK,),
        ).fetchall()
        events = conn.execute(
            "SELECT id, provider, event_type, attempts, last_error FROM webhook_events "
            "WHERE status = 'received' ORDER BY id LIMIT 10"
        ).fetchall()
    print("\nleft pending by the drain (t from load start):")
    print(
        "  faults: "
        + ", ".join(f"{f.what} t={f.at:.1f}-{f.recovered_at or 0:.1f}s" for f in faults)
    )
    for mid, status, attempt, created, updated, oid, published, attempts, error in rows:
        print(
            f"  message {mid} {status} (task {attempt}): queued t={float(created) - t0_wall:.1f}s, "
            f"last change t={float(updated) - t0_wall:.1f}s; outbox {oid} published "
            + (f"t={float(published) - t0_wall:.1f}s" if published else "never")
            + f" ({attempts} publishes{', ' + error if error else ''})"
        )
    for inbox_id, provider, event_type, attempts, error in events:
        print(f"  event {inbox_id} {provider} {event_type} received, {attempts} attempts: {error}")
