"""Send benchmark: messages per second through the whole safe send path with one Celery worker
against the fake Twilio, beside the bare Celery round trip of a trivial task in the same run.

    .venv/bin/python bench/send.py [--messages 500] [--baseline 1000] [--concurrency 1]
                                   [--rounds 3]

Everything runs on this machine: a scratch database (on BENCH_DATABASE_URL's server, an admin
URL that may CREATE DATABASE, else an embedded PostgreSQL with default durability),
BENCH_REDIS_URL or an embedded Redis, the fake Twilio (tests/support/fakes/fake_twilio.py, real HTTP on
127.0.0.1) and one worker subprocess (tests.stack.start_worker, prefork, --concurrency).

Each round publishes N tasks at once and times from the first publish to the last one done:
  send      N queued messages, one payguard.send_message each: decide + hold (one
            transaction), Messages.create over HTTP, capture (a second transaction). Done when
            every message is settled in the database.
  baseline  N celery.accumulate (Celery's built-in no-op) on the same worker and broker: the
            publish, delivery, ack and prefork hand-off every task pays. Done when the broker
            holds neither a queued nor an unacknowledged message.
The ratio baseline/send says how many bare task round trips one message costs.
"""

from __future__ import annotations

import argparse
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

import redis  # noqa: E402

from bench.scratch import prepare_database  # noqa: E402
from bus.publisher import Publisher  # noqa: E402
from core import messages, orgs, wallet  # noqa: E402
from core.db import make_engine, run_in_transaction  # noqa: E402
from core.sending import Policy  # noqa: E402
from devtools.devstack import start_redis  # noqa: E402
from tests.stack import free_port, start_worker, wait_for  # noqa: E402
from tests.support.fakes.fake_twilio import FakeTwilio  # noqa: E402

ORG = "bench-org"
PARENT = "AC" + "1" * 32
SUBACCOUNT = "AC" + "2" * 32
QUEUES = ("payguard.events", "payguard.send", "payguard.twilio", "payguard.beat")
SETTLED = ("accepted", "rejected", "unknown", "blocked", "not_sent")


def broker_idle(client: redis.Redis) -> bool:
    """No task waiting in a queue and none delivered but unacknowledged."""
    waiting = sum(client.llen(q) for q in QUEUES)
    return waiting == 0 and client.hlen("unacked") == 0


def run_baseline(publisher: Publisher, client: redis.Redis, n: int) -> float:
    """Seconds for n trivial tasks, from the first publish to the broker idle again."""
    t0 = time.perf_counter()
    for i in range(n):
        publisher.publish("celery.accumulate", [i])
    wait_for(lambda: broker_idle(client), 600, 0.002, what="baseline tasks done")
    return time.perf_counter() - t0


def run_sends(engine, publisher: Publisher, n: int, policy: Policy) -> float:
    """Seconds for n sends, from the first publish to every message settled."""

    def queue_all(conn):
        return [
            messages.queue(conn, ORG, "+15005550010", f"bench {i}", policy).message_id
            for i in range(n)
        ]

    ids = run_in_transaction(engine, queue_all)
    with engine.begin() as conn:  # the outbox rows are published right here, not by a relay
        conn.exec_driver_sql("UPDATE outbox SET published_at = now()")
    t0 = time.perf_counter()
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

    wait_for(settled, 600, 0.005, what="sends settled")
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
    parser.add_argument("--messages", type=int, default=500, help="sends per round")
    parser.add_argument("--baseline", type=int, default=1000, help="trivial tasks per round")
    parser.add_argument("--concurrency", type=int, default=1, help="the worker's pool size")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians")
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

        fake = stack.enter_context(FakeTwilio(credentials=(PARENT, "bench-token")))
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
        print(f"machine: {os.cpu_count()} CPUs; database: {where}")

        publisher = Publisher(redis_url, timeout=5.0)
        stack.callback(publisher.close)
        client = redis.Redis.from_url(redis_url)
        stack.callback(client.close)
        sends: list[float] = []
        bare: list[float] = []
        with start_worker(env, tmp / "logs", concurrency=args.concurrency):
            run_sends(engine, publisher, 50, policy)  # warm: connections, gateway, imports
            run_baseline(publisher, client, 50)
            for _ in range(args.rounds):
                sends.append(args.messages / run_sends(engine, publisher, args.messages, policy))
                bare.append(args.baseline / run_baseline(publisher, client, args.baseline))
        creates = fake.message_count(SUBACCOUNT)
        expected = 50 + args.rounds * args.messages
        if creates != expected:
            raise SystemExit(f"fake Twilio saw {creates} creates, expected {expected}")

    send_rate, bare_rate = statistics.median(sends), statistics.median(bare)
    print(
        f"[send]     one worker (concurrency {args.concurrency}), {args.messages} messages x "
        f"{args.rounds}: {send_rate:.0f} messages/s (rounds: "
        + ", ".join(f"{r:.0f}" for r in sends)
        + ")"
    )
    print(
        f"[baseline] celery.accumulate, {args.baseline} tasks x {args.rounds}: "
        f"{bare_rate:.0f} tasks/s (rounds: " + ", ".join(f"{r:.0f}" for r in bare) + ")"
    )
    print(f"[ratio]    baseline/send = {bare_rate / send_rate:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
