"""Debits per second through the core API beside the same SQL run on bare psycopg.

Each cell runs for --seconds: a number of threads debiting either one hot wallet (every debit
queues on the same row lock) or wallets spread over 1,000 organizations. `core` is the
production path, `core.db.run_in_transaction(engine, wallet.debit)`; `raw` executes the very
statement wallet.debit runs (wallet._DEBIT) with psycopg.connect, autocommit off, one
transaction per debit, one connection per thread. The ratio core/raw is the cost of the API.

`batch` is the batched hold path of the send queue on the hot wallet: one organization's
queued messages claimed SEND_BATCH_SIZE at a time by `core.send_batch.claim` (lock, decide,
one guarded statement holding every price, the messages marked `sending`), one transaction per
claim; its rate counts messages held per second, beside raw single debits of the same cell.
The messages are queued before the clock starts (`--batch-messages` per cell); a cell whose
claims hold them all before --seconds is over is timed to its last claim that held any.

The benchmark creates a scratch database on the server of --database-url, migrates it with
migrations.upgrade, and drops it at the end.

    .venv/bin/python bench/debits.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import pstats
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

import migrations  # noqa: E402
from core import messages, orgs, send_batch, wallet  # noqa: E402
from core.db import make_engine, run_in_transaction  # noqa: E402
from core.sql import for_driver  # noqa: E402
from devtools.devstack import database_url as url_for  # noqa: E402

SPREAD = 1_000
BATCH_ORG = "batch-hot"
START_BALANCE = 10**12

# The very text wallet.debit sends, with psycopg's placeholders (core/db.py::one_on_driver).
RAW_DEBIT = for_driver(wallet._DEBIT)


def org_ids(layout: str) -> list[str]:
    return ["hot"] if layout == "hot" else [f"org-{i:04d}" for i in range(SPREAD)]


def queue_for_batches(url: str, n: int) -> None:
    """n queued messages for the batch cells' organization (before the clock)."""
    from core.sending import Policy

    engine = make_engine(url)
    for start in range(0, n, 1000):
        items = [("+15005550010", f"m{i}") for i in range(start, min(n, start + 1000))]
        run_in_transaction(
            engine, lambda c, it=items: messages.queue_batch(c, BATCH_ORG, it, Policy())
        )
    engine.dispose()


def run_batch_cell(url: str, threads: int, seconds: float, size: int) -> float:
    """Messages held per second by claims of `size` on one hot wallet."""
    from core.sending import Policy

    engine = make_engine(url, pool_size=threads, max_overflow=0)
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()
    counts = [0] * threads
    errors: list[BaseException] = []
    ran_out = threading.Event()  # a claim found nothing left to hold
    last = [0.0] * threads  # when each thread's last claim that held something returned
    policy = Policy()

    def work(t: int) -> None:
        try:
            warm = engine.connect()
            barrier.wait(timeout=60)
            warm.close()
            for i in itertools.count():
                if stop.is_set():
                    break
                # A run's own owner, as each send_batch task has (its task id): an owner's
                # earlier claims still `sending` are looked over again by its next claim.
                claim = run_in_transaction(
                    engine,
                    lambda c, o=f"bench-{t}-{i}": send_batch.claim(c, BATCH_ORG, size, policy, o),
                )
                if not claim.plans:  # all held: the cell ends with the last claim that held
                    ran_out.set()
                    stop.set()
                    break
                counts[t] += len(claim.plans)
                last[t] = time.perf_counter()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    barrier.wait(timeout=60)
    started = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for th in pool:
        th.join()
    elapsed = (max(last) if ran_out.is_set() else time.perf_counter()) - started
    engine.dispose()
    if errors:
        raise RuntimeError(f"batch x{threads} failed") from errors[0]
    return sum(counts) / elapsed


def run_cell(mode: str, url: str, layout: str, threads: int, seconds: float) -> float:  # noqa: C901 (one cell: setup, threads, teardown)
    """Debits per second of one (mode, layout, threads) cell."""
    targets = org_ids(layout)
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()
    counts = [0] * threads
    tag = secrets.token_hex(3)
    engine = make_engine(url, pool_size=threads, max_overflow=0) if mode == "core" else None

    def debit_core(t: int) -> None:
        warm = engine.connect()  # one pooled connection per thread, made before the clock
        barrier.wait(timeout=60)
        warm.close()
        for i in itertools.count():
            if stop.is_set():
                break
            org, ref = targets[(t + i * threads) % len(targets)], f"{tag}-{t}-{i}"
            run_in_transaction(engine, lambda c, o=org, r=ref: wallet.debit(c, o, 1, r))
            counts[t] += 1

    def debit_raw(t: int) -> None:
        with psycopg.connect(url, autocommit=False) as conn:
            barrier.wait(timeout=60)
            for i in itertools.count():
                if stop.is_set():
                    break
                org, ref = targets[(t + i * threads) % len(targets)], f"{tag}-{t}-{i}"
                params = {  # wallet.debit's own binds (wallet._params), without its checks
                    "org_id": org,
                    "amount_cents": 1,
                    "reference": ref,
                    "kind": "debit",
                    "actor": "system",
                    "reason": None,
                    "check_freeze": True,
                }
                row = conn.execute(RAW_DEBIT, params).fetchone()
                conn.commit()
                assert row is not None and row[0] == 1, row  # the same guarded success
                counts[t] += 1

    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            (debit_core if mode == "core" else debit_raw)(t)
        except BaseException as exc:  # reported after the cell; a silent thread skews it
            errors.append(exc)
            barrier.abort()

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    barrier.wait(timeout=60)
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - started
    if engine is not None:
        engine.dispose()
    if errors:
        raise RuntimeError(f"{mode} {layout} x{threads} failed") from errors[0]
    return sum(counts) / elapsed


def setup(url: str) -> None:
    migrations.upgrade(url)
    engine = make_engine(url)

    def create(conn):
        for org in org_ids("hot") + org_ids("spread"):
            orgs.create(conn, org)
            wallet.credit(conn, org, START_BALANCE, "seed")
        orgs.create(conn, BATCH_ORG, billing="prepaid")
        wallet.credit(conn, BATCH_ORG, START_BALANCE, "seed")

    run_in_transaction(engine, create)
    engine.dispose()


def profile_core(url: str, seconds: float) -> None:
    """Where one thread's time goes on the core path (cProfile, cumulative)."""
    engine = make_engine(url, pool_size=1, max_overflow=0)
    profiler = cProfile.Profile()
    deadline = time.perf_counter() + seconds
    profiler.enable()
    for i in itertools.count():
        if time.perf_counter() > deadline:
            break
        run_in_transaction(engine, lambda c, r=f"prof-{i}": wallet.debit(c, "hot", 1, r))
    profiler.disable()
    engine.dispose()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or os.environ.get("TEST_DATABASE_URL"),
        help="a server where this role may CREATE DATABASE (default: DATABASE_URL, "
        "else TEST_DATABASE_URL)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per cell (default 5)")
    parser.add_argument("--threads", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--layouts", default="hot,spread", help="hot and/or spread")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each cell's raw and core this many times, alternating, and report the "
        "medians (for a noisy machine; default 1)",
    )
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="on",
        help="for both sides; off takes the WAL flush out of each commit, leaving the "
        "client-side cost the ratio is about (default on, the server's durable setting)",
    )
    parser.add_argument("--profile", action="store_true", help="also cProfile the core path")
    parser.add_argument(
        "--batch-size", type=int, default=100, help="messages per claim (0: no batch cells)"
    )
    parser.add_argument(
        "--batch-messages",
        type=int,
        default=60_000,
        help="messages queued before each batch cell (default 60,000)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or DATABASE_URL / TEST_DATABASE_URL) is required")

    name = f"payguard_bench_{secrets.token_hex(4)}"
    url = bench_url = url_for(args.database_url, name)
    if args.synchronous_commit == "off":
        bench_url += ("&" if "?" in url else "?") + "options=-csynchronous_commit%3Doff"
    with psycopg.connect(args.database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        setup(url)
        header = (
            f"{'layout':<8} {'threads':>7} {'core ops/s':>11} {'raw ops/s':>10} {'core/raw':>9}"
        )
        say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
        say(header)
        say("-" * len(header))
        result: dict[str, float] = {}
        for layout in args.layouts.split(","):
            for threads in (int(n) for n in args.threads.split(",")):
                raws, cores, batches = [], [], []
                for _ in range(args.rounds):
                    raws.append(run_cell("raw", bench_url, layout, threads, args.seconds))
                    cores.append(run_cell("core", bench_url, layout, threads, args.seconds))
                    if layout == "hot" and args.batch_size:
                        queue_for_batches(url, args.batch_messages)
                        batches.append(
                            run_batch_cell(bench_url, threads, args.seconds, args.batch_size)
                        )
                raw, core = statistics.median(raws), statistics.median(cores)
                say(
                    f"{layout:<8} {threads:>7} {core:>11.0f} {raw:>10.0f} {core / raw:>8.2f}x",
                    flush=True,
                )
                cell = f"{layout}_{threads}"
                result[f"core_debits_{cell}_per_s"] = round(core, 1)
                result[f"raw_debits_{cell}_per_s"] = round(raw, 1)
                result[f"ratio_core_to_raw_{cell}"] = round(core / raw, 3)
                if batches:
                    batch = statistics.median(batches)
                    say(
                        f"{'batch':<8} {threads:>7} {batch:>11.0f} {raw:>10.0f} "
                        f"{batch / raw:>8.2f}x  (messages held/s in claims of "
                        f"{args.batch_size}, beside raw single debits)",
                        flush=True,
                    )
                    result[f"batch_held_{cell}_per_s"] = round(batch, 1)
                    result[f"ratio_batch_held_to_raw_{cell}"] = round(batch / raw, 2)
        if args.json:
            print(json.dumps(result))
        if args.profile:
            profile_core(bench_url, args.seconds)
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
