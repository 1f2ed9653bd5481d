"""Send benchmark: messages per second through the whole safe send path against the fake
Twilio answering after `--twilio-latency-ms`, with the Procfile's worker (prefork,
WORKER_CONCURRENCY 2), beside the bare Celery round trip of a trivial task in the same run.

    .venv/bin/python bench/send.py [--twilio-latency-ms 200] [--messages 2000]
                                   [--single-messages 40] [--baseline 1000] [--concurrency 2]
                                   [--rounds 3] [--json]

Everything runs on this machine: a scratch database (on BENCH_DATABASE_URL's server, an admin
URL that may CREATE DATABASE, else an embedded PostgreSQL with default durability),
BENCH_REDIS_URL or an embedded Redis, the fake Twilio (tests/fakes/fake_twilio.py, real HTTP on
127.0.0.1, keep-alive) and one worker subprocess (tests.stack.start_worker, prefork,
--concurrency).

Each round queues N messages and times from the first publish to the last one settled:
  batch     payguard.send_batch, one task per 1,000 messages queued (what one
            POST /v1/messages/batch publishes): claims of SEND_BATCH_SIZE messages, each held
            in one statement, sent concurrently, settled in one transaction.
  single    payguard.send_message, one task per message (the CLI's path, and the relay's):
            decide + hold, Messages.create, capture, one message per worker process at a time.
  baseline  N celery.accumulate (Celery's built-in no-op) on the same worker and broker: the
            publish, delivery, ack and prefork hand-off every task pays. Done when the broker
            holds neither a queued nor an unacknowledged message.
CPU per message is the worker's (main process and children, user + system) over the round;
PostgreSQL, Redis and the fake Twilio run beside it on the same CPUs and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import redis  # noqa: E402

from bench.scratch import prepare_database  # noqa: E402
from bus.publisher import Publisher  # noqa: E402
from core import messages, orgs, wallet  # noqa: E402
from core.db import make_engine, run_in_transaction  # noqa: E402
from core.send_batch import SEND_BATCH_TASK  # noqa: E402
from core.sending import Policy  # noqa: E402
from devtools.devstack import start_redis  # noqa: E402
from tests.stack import free_port, start_worker, wait_for  # noqa: E402
from tests.support.fakes.fake_twilio import FakeTwilio, Reply  # noqa: E402

ORG = "bench-org"
PARENT = "AC" + "1" * 32
SUBACCOUNT = "AC" + "2" * 32
QUEUES = ("payguard.events", "payguard.send", "payguard.twilio", "payguard.beat")
SETTLED = ("accepted", "rejected", "unknown", "blocked", "not_sent")
PER_REQUEST = 1000  # messages one POST /v1/messages/batch queues, and publishes one task for


def seed(engine) -> None:
    """The benchmark's organization: a subaccount, a sender and money for every run."""

    def create(conn):
        orgs.create(
            conn,
            ORG,
            twilio_subaccount_sid=SUBACCOUNT,
            sender="+15005550006",
            billing="prepaid",
        )
        wallet.credit(conn, ORG, 10**9, "bench-seed")

    run_in_transaction(engine, create)


def broker_idle(client: redis.Redis) -> bool:
    """No task waiting in a queue and none delivered but unacknowledged."""
    waiting = sum(client.llen(q) for q in QUEUES)
    return waiting == 0 and client.hlen("unacked") == 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def run_baseline(publisher: Publisher, client: redis.Redis, n: int) -> float:
    """Seconds for n trivial tasks, from the first publish to the broker idle again."""
    t0 = time.perf_counter()
    for i in range(n):
        publisher.publish("celery.accumulate", [i])
    wait_for(lambda: broker_idle(client), 600, 0.002, what="baseline tasks done")
    return time.perf_counter() - t0


def run_sends(engine, publisher: Publisher, n: int, policy: Policy, path: str) -> float:
    """Seconds for n sends, from the first publish to every message settled."""

    def queue_all(conn):
        ids = []
        for start in range(0, n, PER_REQUEST):
            items = [
                ("+15005550010", f"bench {i}") for i in range(start, min(n, start + PER_REQUEST))
            ]
            ids += [q.message_id for q in messages.queue_batch(conn, ORG, items, policy)]
        return ids

    ids = run_in_transaction(engine, queue_all)
    with engine.begin() as conn:  # the outbox rows are published right here, not by a relay
        conn.exec_driver_sql("UPDATE outbox SET published_at = now()")
    t0 = time.perf_counter()
    if path == "batch":
        for _ in range(0, n, PER_REQUEST):
            publisher.publish(SEND_BATCH_TASK, [ORG])
    else:
        for mid in ids:
            publisher.publish(messages.SEND_TASK, [mid])

    def settled() -> bool:
        with engine.connect() as conn:
            left = conn.exec_driver_sql(
                "SELECT count(*) FROM messages WHERE message_id = ANY(%(ids)s) "
                "AND status <> ALL(%(done)s)",
                {"ids": ids, "done": list(SETTLED)},
            ).scalar_one()
        return left == 0

    wait_for(settled, 1800, 0.005, what="sends settled")
    elapsed = time.perf_counter() - t0
    with engine.connect() as conn:
        statuses = dict(
            conn.exec_driver_sql(
                "SELECT status, count(*) FROM messages WHERE message_id = ANY(%(ids)s) "
                "GROUP BY status",
                {"ids": ids},
            ).all()
        )
    if statuses != {"accepted": n}:
        raise SystemExit(f"the send path did not accept every message: {statuses}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--twilio-latency-ms", type=float, default=200.0)
    parser.add_argument("--messages", type=int, default=2000, help="batch-path sends per round")
    parser.add_argument(
        "--single-messages", type=int, default=40, help="single-path sends per round (0: skip)"
    )
    parser.add_argument("--baseline", type=int, default=1000, help="trivial tasks per round")
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's pool size")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="payguard-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        database_url, where = prepare_database(os.environ.get("BENCH_DATABASE_URL"), tmp, stack)
        redis_url = os.environ.get("BENCH_REDIS_URL")
        if not redis_url:
            redis_url = stack.enter_context(start_redis(tmp / "redis")).url
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        policy = Policy()

        seed(engine)

        fake = stack.enter_context(FakeTwilio(credentials=(PARENT, "bench-token"), keep_alive=True))
        fake.set_default("messages", Reply(201, delay=args.twilio_latency_ms / 1000))
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PAYPAL_", "TWILIO_", "TASK_", "BROKER_", "DATABASE_", "REDIS_"))
        }
        env.update(
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            TWILIO_ACCOUNT_SID=PARENT,
            TWILIO_AUTH_TOKEN="bench-token",
            TWILIO_API_BASE=fake.base_url,
            PUBLIC_BASE_URL=f"http://127.0.0.1:{free_port()}",
            LOG_FORMAT="json",
            PYTHONPATH=str(REPO),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
        say(f"machine: {os.cpu_count()} CPUs; database: {where}")

        publisher = Publisher(redis_url, timeout=5.0)
        stack.callback(publisher.close)
        client = redis.Redis.from_url(redis_url)
        stack.callback(client.close)
        batch: list[float] = []
        single: list[float] = []
        bare: list[float] = []
        cpu_batch: list[float] = []
        cpu_single: list[float] = []
        expected = 0
        with start_worker(env, tmp / "logs", concurrency=args.concurrency) as worker:
            run_sends(engine, publisher, 200, policy, "batch")  # warm: connections, pools
            run_baseline(publisher, client, 50)
            expected += 200
            for _ in range(args.rounds):
                c0 = cpu_seconds(worker.pid)
                batch.append(
                    args.messages / run_sends(engine, publisher, args.messages, policy, "batch")
                )
                cpu_batch.append((cpu_seconds(worker.pid) - c0) * 1000 / args.messages)
                expected += args.messages
                if args.single_messages:
                    c0 = cpu_seconds(worker.pid)
                    n = args.single_messages
                    single.append(n / run_sends(engine, publisher, n, policy, "single"))
                    cpu_single.append((cpu_seconds(worker.pid) - c0) * 1000 / n)
                    expected += n
                bare.append(args.baseline / run_baseline(publisher, client, args.baseline))
        creates = fake.message_count(SUBACCOUNT)
        if creates != expected:
            raise SystemExit(f"fake Twilio saw {creates} creates, expected {expected}")
        load = os.getloadavg()[0]

    med = statistics.median
    result = {
        "twilio_latency_ms": args.twilio_latency_ms,
        "worker_concurrency": args.concurrency,
        "messages_per_round": args.messages,
        "send_batch_per_s": round(med(batch), 1),
        "send_single_per_s": round(med(single), 1) if single else None,
        "celery_bare_per_s": round(med(bare), 1),
        "cpu_ms_per_message_batch": round(med(cpu_batch), 2),
        "cpu_ms_per_message_single": round(med(cpu_single), 2) if cpu_single else None,
        "ratio_batch_to_single": round(med(batch) / med(single), 1) if single else None,
        "ratio_batch_to_bare_celery": round(med(batch) / med(bare), 2),
        "rounds_batch_per_s": [round(r, 1) for r in batch],
        "load_average_1m": round(load, 1),
    }
    say(
        f"[batch]    {args.messages} messages x {args.rounds}, Twilio {args.twilio_latency_ms:.0f} ms:"
        f" {result['send_batch_per_s']} messages/s, {result['cpu_ms_per_message_batch']} ms CPU"
        " per message (rounds: " + ", ".join(f"{r:.0f}" for r in batch) + ")"
    )
    if single:
        say(
            f"[single]   {args.single_messages} messages x {args.rounds}:"
            f" {result['send_single_per_s']} messages/s,"
            f" {result['cpu_ms_per_message_single']} ms CPU per message"
        )
    say(f"[baseline] celery.accumulate, {args.baseline} tasks x {args.rounds}: {med(bare):.0f}/s")
    say(f"[ratio]    batch/single = {result['ratio_batch_to_single']}, batch/bare = "
        f"{result['ratio_batch_to_bare_celery']}")  # fmt: skip
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
