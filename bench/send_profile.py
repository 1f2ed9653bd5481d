"""Where the batch send task's CPU goes: `payguard.send_batch` run in this process, batch after
batch of SEND_BATCH_SIZE messages, against the fake Twilio in a process of its own.

    .venv/bin/python bench/send_profile.py [--batches 5] [--twilio-latency-ms 200]
                                           [--profile] [--top 30]

It prints this process's CPU (user + system, every thread) per message over the measured
batches, which is the worker's cost of the batch path less Celery's delivery of the task;
with `--profile`, the cProfile (CPU time of each thread) of the same batches (the task's own thread and every send
thread, merged), sorted by own time and by cumulative time. Profiling slows what it measures
(more where there are many small calls), so compare profiles with profiles and plain runs
with plain runs. Scratch database and Redis as bench/send.py.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import os
import pstats
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scratch import prepare_database  # noqa: E402
from bench.send import ORG, PARENT, seed  # noqa: E402
from core import messages  # noqa: E402
from core.db import make_engine, run_in_transaction  # noqa: E402
from core.sending import Policy  # noqa: E402
from devtools.devstack import start_redis  # noqa: E402
from tests.stack import free_port  # noqa: E402
from tests.support.fakes.fake_twilio import FakeTwilio, Reply  # noqa: E402


def serve_fake_twilio(latency: float, ready, stop) -> None:
    """The fake Twilio in a child process, so that its CPU is not this process's."""
    with FakeTwilio(credentials=(PARENT, "bench-token"), keep_alive=True) as fake:
        fake.set_default("messages", Reply(201, delay=latency))
        ready.put(fake.base_url)
        stop.wait()


def queue(engine, n: int, policy: Policy) -> None:
    items = [("+15005550010", f"bench {i}") for i in range(n)]
    run_in_transaction(engine, lambda c: messages.queue_batch(c, ORG, items, policy))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=5, help="measured batches")
    parser.add_argument("--twilio-latency-ms", type=float, default=200.0)
    parser.add_argument("--profile", action="store_true", help="cProfile the measured batches")
    parser.add_argument("--top", type=int, default=30, help="rows of each profile table")
    parser.add_argument("--stats-file", help="also save the merged profile here (pstats)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="payguard-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        database_url, where = prepare_database(os.environ.get("BENCH_DATABASE_URL"), tmp, stack)
        redis_url = os.environ.get("BENCH_REDIS_URL")
        if not redis_url:
            redis_url = stack.enter_context(start_redis(tmp / "redis")).url
        fork = multiprocessing.get_context("fork")
        ready, stop = fork.Queue(), fork.Event()
        fake = fork.Process(
            target=serve_fake_twilio, args=(args.twilio_latency_ms / 1000, ready, stop)
        )
        fake.start()
        stack.callback(fake.join, 10)
        stack.callback(stop.set)
        for key in [k for k in os.environ if k.startswith(("TWILIO_", "TASK_", "BROKER_"))]:
            del os.environ[key]
        os.environ.update(
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            TWILIO_ACCOUNT_SID=PARENT,
            TWILIO_AUTH_TOKEN="bench-token",
            TWILIO_API_BASE=ready.get(timeout=30),
            PUBLIC_BASE_URL=f"http://127.0.0.1:{free_port()}",
        )
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        policy = Policy()

        seed(engine)

        from worker import runtime, send_tasks

        size = runtime.settings().SEND_BATCH_SIZE
        print(f"database: {where}; batches of {size}", file=sys.stderr)
        queue(engine, size, policy)
        send_tasks.send_org_batch.apply(args=[ORG]).get()  # warm: connections, pools, imports

        profiles: list[cProfile.Profile] = []
        if args.profile:
            # A pool of threads that each profile themselves, in place of the task's own.
            def profile_thread() -> None:
                p = cProfile.Profile(time.thread_time)
                profiles.append(p)
                p.enable()

            send_tasks._resources()
            send_tasks._state["pool"].shutdown()
            send_tasks._state["pool"] = ThreadPoolExecutor(
                runtime.settings().SEND_BATCH_THREADS, initializer=profile_thread
            )
            profiles.append(cProfile.Profile(time.thread_time))

        cpu = wall = 0.0
        for _ in range(args.batches):
            queue(engine, size, policy)
            t0, c0 = time.perf_counter(), time.process_time()
            if profiles:
                profiles[0].enable()
            send_tasks.send_org_batch.apply(args=[ORG]).get()
            if profiles:
                profiles[0].disable()
            cpu += time.process_time() - c0
            wall += time.perf_counter() - t0
        n = args.batches * size
        print(
            f"{n} messages in {args.batches} batches: {cpu * 1000 / n:.2f} ms CPU per message"
            f" (this process, every thread), {wall / args.batches * 1000:.0f} ms per batch"
        )
        if profiles:
            send_tasks._state["pool"].shutdown()
            stats = pstats.Stats(profiles[0])
            for p in profiles[1:]:
                stats.add(p)
            if args.stats_file:
                stats.dump_stats(args.stats_file)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
