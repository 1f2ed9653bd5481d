"""Ingest benchmark: verified PayPal webhooks per second through gunicorn, and how long a
capture takes from POST to a committed wallet credit with one Celery worker.

    .venv/bin/python bench/ingest.py [--seconds 10] [--web-workers 4] [--clients 16]
                                     [--credits 200] [--breakdown 300]
                                     [--servers gunicorn,granian] [--phases ...] [--json]

Everything runs on this machine: its own scratch database (on BENCH_DATABASE_URL's server,
an admin URL that may CREATE DATABASE, else an embedded PostgreSQL with default durability),
BENCH_REDIS_URL or an embedded Redis, BENCH_BROKER_URL (amqp://… to a vhost of its own: tasks
go through RabbitMQ's quorum queues, which the run empties) or Redis as the broker, a local fake PayPal serving the signing certificate,
gunicorn and the worker as subprocesses. Distinct event ids, each signed like PayPal does
(RSA-2048 over id|time|webhook_id|crc32), pre-signed before the clock starts.

Phases, each bounded:
  0. yardstick GET /healthz through gunicorn with sync workers (the Procfile's server), same
               workers and clients: the HTTP stack's own rate, which ingest is measured against
  1. ingest    a thread pool posts signed captures for --seconds: webhooks/s, p50/p99 latency
               (only the web server runs: no Celery worker competes for the CPU), once per
               server in --servers (gunicorn sync workers; granian's WSGI interface, if the
               `bench` extra is installed), alternating with the yardstick --rounds times
  2. credit    with one worker (concurrency 1), captures one at a time: POST start to the
               commit of the journal row (a LISTEN on a trigger added to the scratch database)
  3. breakdown the receiver's stages timed in-process: verify, store+commit, publish, mark
Goals: ingest >= 0.5x the yardstick's rate with p99 < 50 ms at 16 clients; credit p50 < 25 ms
and p99 < 100 ms. --json prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
import requests  # noqa: E402

from bench.scratch import prepare_database  # noqa: E402
from core import orgs  # noqa: E402
from core.db import make_engine, run_in_transaction  # noqa: E402
from devtools.devstack import start_redis  # noqa: E402
from tests.stack import (  # noqa: E402
    Web,
    free_port,
    start_procfile_web,
    start_worker,
    wait_for,
)
from tests.support.fakes.paypal_api import FakePayPal, SigningCert, make_signing_cert  # noqa: E402
from tests.support.payloads import paypal as pp  # noqa: E402

WEBHOOK_ID = "WH-BENCH"
ORG = "bench-org"


# --------------------------------------------------------------------------- figures


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


# --------------------------------------------------------------------------- payloads

_signer: SigningCert | None = None


def _init_signer(signer: SigningCert) -> None:
    global _signer
    _signer = signer


def _sign(job: tuple[str, str, int]) -> tuple[str, bytes, dict[str, str]]:
    cert_url, capture_id, cents = job
    payload = pp.capture_completed(ORG, capture_id, value=f"{cents / 100:.2f}")
    body = json.dumps(payload).encode()
    assert _signer is not None
    return payload["id"], body, _signer.sign(WEBHOOK_ID, body, cert_url)


def presign(signer: SigningCert, cert_url: str, count: int) -> list[tuple[str, bytes, dict]]:
    """`count` distinct signed captures of 0.01, signed on every CPU (RSA signing is slow)."""
    jobs = [(cert_url, pp.new_id(), 1) for _ in range(count)]
    with ProcessPoolExecutor(
        os.cpu_count() or 1, initializer=_init_signer, initargs=(signer,)
    ) as pool:
        return list(pool.map(_sign, jobs, chunksize=64))


def post(
    host: str,
    port: int,
    body: bytes | None,
    headers: dict[str, str],
    path: str = "/webhooks/paypal",
) -> tuple[int, float]:
    """One request on a fresh connection, as a provider's delivery arrives: POST with a body,
    GET without one."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        conn.close()


# --------------------------------------------------------------------------- phases


def ingest(
    web_url: str, signed: Iterable, clients: int, seconds: float, path: str = "/webhooks/paypal"
) -> dict:
    parts = urlsplit(web_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    failures: dict[int, int] = {}
    lock = threading.Lock()
    cursor = iter(signed)
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                job = next(cursor, None)
            if job is None:
                return
            _, body, headers = job
            status, elapsed = post(host, port, body, headers, path)
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    failures[status] = failures.get(status, 0) + 1

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    return {
        "accepted": len(latencies),
        "failures": failures,
        "wall": wall,
        "rate": len(latencies) / wall,
        "p50": pct(latencies, 50),
        "p99": pct(latencies, 99),
        "exhausted": next(cursor, None) is None,
    }


def credit_latency(web_url: str, database_url: str, signed: list, gap: float) -> dict:
    """POST one capture at a time; latency to the NOTIFY sent by the journal row's commit."""
    parts = urlsplit(web_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    arrived: dict[str, float] = {}
    listening = threading.Event()
    done = threading.Event()

    def listen() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("LISTEN bench_credit")
            listening.set()
            while not done.is_set():
                for note in conn.notifies(timeout=0.2):
                    arrived[note.payload] = time.perf_counter()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    listening.wait(10)
    posted: dict[str, float] = {}
    request_latencies = []
    for event_id, body, headers in signed:
        capture_id = json.loads(body)["resource"]["id"]
        reference = f"paypal:payment:{capture_id}"
        started = time.perf_counter()
        status, elapsed = post(host, port, body, headers)
        assert status == 200, status
        posted[reference] = started
        request_latencies.append(elapsed)
        wait_for(lambda r=reference: r in arrived, 30, 0.0005, what=f"credit of {event_id}")
        time.sleep(gap)
    done.set()
    listener.join(5)
    credit = [arrived[ref] - started for ref, started in posted.items()]
    return {
        "count": len(credit),
        "p50": pct(credit, 50),
        "p99": pct(credit, 99),
        "max": max(credit),
        "post_p50": pct(request_latencies, 50),
    }


def yardstick(web_url: str, clients: int, seconds: float) -> dict:
    """GET /healthz as fast as the clients go: the HTTP stack's own rate, nothing verified."""
    return ingest(web_url, itertools.repeat(("", None, {})), clients, seconds, "/healthz")


def breakdown(
    database_url: str, redis_url: str, broker_url: str | None, fake: FakePayPal, signed: list
) -> dict:
    """Where a request's time goes, stage by stage, in this process (no HTTP, no gunicorn)."""
    from core import inbox, outbox
    from core.settings import Settings
    from webhook_receiver.app import create_app

    app = create_app(
        Settings(
            _env_file=None,
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            BROKER_URL=broker_url,
            PAYPAL_WEBHOOK_ID=WEBHOOK_ID,
            PAYPAL_CERT_URL_PREFIXES=fake.cert_prefix,
            LOG_FORMAT="text",
        )
    )
    logging.getLogger("webhook_receiver").setLevel(logging.WARNING)  # one line per request
    receiver = app.extensions["payguard"]
    stages: dict[str, list[float]] = {k: [] for k in ("verify", "store", "publish", "mark")}
    client = app.test_client()
    full: list[float] = []
    try:
        for _, body, headers in signed[: len(signed) // 2]:
            t0 = time.perf_counter()
            assert client.post("/webhooks/paypal", data=body, headers=headers).status_code == 200
            full.append(time.perf_counter() - t0)
        for event_id, body, headers in signed[len(signed) // 2 :]:
            t0 = time.perf_counter()
            receiver.paypal_verifier.verify(headers, body)
            t1 = time.perf_counter()
            stored, outbox_id = run_in_transaction(
                receiver.engine,
                lambda c, e=event_id, b=body, h=headers: inbox.store(
                    c, "paypal", e, "PAYMENT.CAPTURE.COMPLETED", h, b
                ),
            )
            t2 = time.perf_counter()
            receiver.publisher.publish(
                outbox.PROCESS_EVENT_TASK, [stored.id], task_id=f"outbox-{outbox_id}"
            )
            t3 = time.perf_counter()
            run_in_transaction(
                receiver.engine, lambda c, o=outbox_id: outbox.mark_published(c, [o])
            )
            t4 = time.perf_counter()
            for name, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stages[name].append(value)
    finally:
        receiver.close()
    result = {name: statistics.mean(values) for name, values in stages.items()}
    result["whole request (test client)"] = statistics.mean(full)
    return result


# --------------------------------------------------------------------------- servers

SERVERS = ("gunicorn", "granian")
BIN = Path(sys.executable).parent


def start_server(kind: str, env: dict[str, str], logs: Path, workers: int) -> Web:
    """`web` on a free port: gunicorn as the Procfile runs it (its config, sync workers, the
    access log), or granian's WSGI interface with as many workers, one blocking thread each
    (a sync worker's concurrency) and its access log, so the two do the same work."""
    if kind == "gunicorn":
        return start_procfile_web(env, logs, workers=workers)
    port = free_port()
    metrics_dir = Path(tempfile.mkdtemp(prefix="payguard-bench-granian-", dir=logs.parent))
    proc = Web(
        "granian",
        [
            str(BIN / "granian"),
            "--interface", "wsgi", "--factory", "--workers", str(workers),
            "--blocking-threads", "1", "--host", "127.0.0.1", "--port", str(port),
            "--access-log", "--no-ws", "webhook_receiver.app:create_app",
        ],
        {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
        logs,
    )  # fmt: skip
    proc.port = port
    proc.start()
    wait_for(lambda: not proc.alive() or _healthy(proc.url), 60, interval=0.2, what="granian ready")
    if not proc.alive():
        raise RuntimeError(f"granian died at start:\n{proc.log()}")
    return proc


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


def _median_figures(results: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in results) for k in ("rate", "p50", "p99")}


# --------------------------------------------------------------------------- setup


def prepare_instrumented_database(
    admin_url: str | None, tmp: Path, stack: ExitStack
) -> tuple[str, str]:
    """A scratch database that also notifies `bench_credit` at each journal row's commit."""
    url, where = prepare_database(admin_url, tmp, stack)
    with psycopg.connect(url, autocommit=True) as conn:
        # Instrumentation of the scratch database only: a notification at the credit's commit.
        conn.execute("""
CREATE FUNCTION bench_notify_credit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('bench_credit', NEW.reference); RETURN NULL; END $$;
CREATE TRIGGER bench_notify_credit AFTER INSERT ON journal
    FOR EACH ROW EXECUTE FUNCTION bench_notify_credit();
""")
    return url, where


def main() -> int:  # noqa: C901 (the phases in order, each bounded and printed)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="ingest phase length")
    parser.add_argument("--web-workers", type=int, default=2 * (os.cpu_count() or 1))
    parser.add_argument("--clients", type=int, default=16, help="client threads")
    parser.add_argument("--rate-cap", type=int, default=1000, help="pre-signed per second")
    parser.add_argument("--credits", type=int, default=200, help="captures timed to credit")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between them")
    parser.add_argument("--breakdown", type=int, default=300, help="in-process requests")
    parser.add_argument("--drain", type=float, default=5.0, help="seconds of worker timing")
    parser.add_argument(
        "--synchronous-commit", choices=("on", "off"), default="on", help="for the scratch DB"
    )
    parser.add_argument(
        "--servers",
        default="gunicorn",
        help="comma-separated: gunicorn (the Procfile's web line), granian (the bench extra)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternations of every server")
    parser.add_argument(
        "--phases", default="credit,breakdown", help="after ingest: credit, breakdown, or none"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    unknown = set(args.servers.split(",")) - set(SERVERS)
    if unknown:
        parser.error(f"unknown server(s) {', '.join(sorted(unknown))}: choose from {SERVERS}")
    if "granian" in args.servers and shutil.which("granian", path=str(BIN)) is None:
        parser.error("granian is not installed: uv sync --extra bench (or pip install granian)")

    tmp = Path(tempfile.mkdtemp(prefix="payguard-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        database_url, where = prepare_instrumented_database(
            os.environ.get("BENCH_DATABASE_URL"), tmp, stack
        )
        redis_url = os.environ.get("BENCH_REDIS_URL")
        redis_pid = None
        if not redis_url:
            embedded_redis = stack.enter_context(start_redis(tmp / "redis"))
            redis_url, redis_pid = embedded_redis.url, embedded_redis.pid
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        run_in_transaction(engine, lambda c: orgs.create(c, ORG))

        signer = make_signing_cert()
        fake = stack.enter_context(FakePayPal(webhook_id=WEBHOOK_ID))
        cert_url = fake.install_signing_cert(signer)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PAYPAL_", "TASK_", "BROKER_", "DATABASE_", "REDIS_"))
        }
        broker_url = os.environ.get("BENCH_BROKER_URL") or None
        if broker_url:
            env["BROKER_URL"] = broker_url
        env.update(
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            PAYPAL_WEBHOOK_ID=WEBHOOK_ID,
            PAYPAL_CERT_URL_PREFIXES=fake.cert_prefix,
            TWILIO_CONSOLE="1",  # no Twilio here: the worker only processes webhooks
            LOG_FORMAT="json",
            PYTHONPATH=str(REPO),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        if args.synchronous_commit == "off":
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(
                    f'ALTER DATABASE "{urlsplit(database_url).path[1:]}" '
                    "SET synchronous_commit = off"
                )
            where += " (synchronous_commit=off for the scratch database: no WAL flush wait)"
        cpus = os.cpu_count()
        print(f"machine: {cpus} CPUs, load average {os.getloadavg()[0]:.1f}; database: {where}")
        print(f"broker: {'RabbitMQ (BENCH_BROKER_URL)' if broker_url else 'Redis'}")

        sizes = {
            "warm": args.web_workers * 8,
            "ingest": int(args.rate_cap * args.seconds)
            * args.rounds
            * len(args.servers.split(",")),
            "credit": args.credits,
            "breakdown": args.breakdown,
        }
        t0 = time.perf_counter()
        signed = presign(signer, cert_url, sum(sizes.values()))
        print(f"pre-signed {len(signed)} distinct captures in {time.perf_counter() - t0:.1f}s")
        sets, start = {}, 0
        for name, size in sizes.items():
            sets[name], start = signed[start : start + size], start + size
        warm_set, ingest_set = sets["warm"], sets["ingest"]
        credit_set, breakdown_set = sets["credit"], sets["breakdown"]

        logs = tmp / "logs"
        servers = [name.strip() for name in args.servers.split(",") if name.strip()]
        phases = {name.strip() for name in args.phases.split(",")}
        figures: dict[str, object] = {"web_workers": args.web_workers, "clients": args.clients}
        rounds: dict[str, list[dict]] = {name: [] for name in ["healthz", *servers]}
        cpu: dict[str, float] = {}
        per_round = max(1, len(ingest_set) // (args.rounds * len(servers)))
        chunks = iter(range(0, len(ingest_set), per_round))
        for round_no in range(args.rounds):
            for name in ["healthz", *servers]:
                # The yardstick is always gunicorn with sync workers, the Procfile's server.
                with start_server(
                    "gunicorn" if name == "healthz" else name, env, logs, args.web_workers
                ) as web:
                    # Warm every worker's certificate cache and pools before timing.
                    ingest(web.url, warm_set, 4, 30)
                    if name == "healthz":
                        rounds[name].append(yardstick(web.url, args.clients, args.seconds))
                        continue
                    start = next(chunks)
                    chunk = ingest_set[start : start + per_round]
                    before = cpu_seconds(web.pid, database_url, redis_pid)
                    result = ingest(web.url, chunk, args.clients, args.seconds)
                    rounds[name].append(result)
                    if round_no == 0:
                        cpu_per = {
                            k: (v - before[k]) / max(result["accepted"], 1)
                            for k, v in cpu_seconds(web.pid, database_url, redis_pid).items()
                        }
                        cpu[name] = cpu_per["web"]
                        print(
                            f"         CPU per accepted webhook ({name}): "
                            + ", ".join(f"{k} {ms(v).strip()}" for k, v in cpu_per.items())
                            + f" = {ms(sum(cpu_per.values())).strip()}"
                        )
                r = rounds[name][-1]
                print(
                    f"[{name}] round {round_no + 1}: {r['rate']:.0f}/s, p50 {ms(r['p50'])}, "
                    f"p99 {ms(r['p99'])}, failures {r['failures'] or 'none'}"
                    + ("; ran out of pre-signed payloads" if r["exhausted"] else "")
                )
        healthz = _median_figures(rounds["healthz"])
        figures["healthz_per_s"] = healthz["rate"]
        figures["healthz_p99_ms"] = healthz["p99"] * 1000
        print(
            f"\n[yardstick] GET /healthz, gunicorn {args.web_workers} sync workers, "
            f"{args.clients} clients: {healthz['rate']:.0f} req/s, p99 {ms(healthz['p99'])}"
        )
        for name in servers:
            median = _median_figures(rounds[name])
            figures[f"{name}_webhooks_per_s"] = median["rate"]
            figures[f"{name}_p50_ms"] = median["p50"] * 1000
            figures[f"{name}_p99_ms"] = median["p99"] * 1000
            figures[f"{name}_web_cpu_ms"] = cpu[name] * 1000
            figures[f"ratio_{name}_healthz"] = median["rate"] / healthz["rate"]
            print(
                f"[ingest] {name}, {args.web_workers} workers, {args.clients} clients "
                f"(median of {args.rounds}): {median['rate']:.0f} verified webhooks/s "
                f"= {median['rate'] / healthz['rate']:.2f}x the yardstick; "
                f"p50 {ms(median['p50'])}, p99 {ms(median['p99'])}; "
                f"web CPU {ms(cpu[name]).strip()} per webhook"
            )
        print("         goal: >= 0.5x the yardstick, p99 < 50 ms at 16 clients")

        if "credit" in phases:
            with start_server(servers[0], env, logs, args.web_workers) as web:
                ingest(web.url, warm_set, 4, 30)
                with start_worker(env, logs, concurrency=1):
                    # The ingest phase queued thousands of events: time the worker on them for
                    # a few seconds, then drop the rest so the credit phase starts from an
                    # empty queue.
                    before, t0 = _backlog(database_url), time.perf_counter()
                    time.sleep(args.drain)
                    drained = (before - _backlog(database_url)) / (time.perf_counter() - t0)
                    _purge(database_url, redis_url, broker_url)
                    credit = credit_latency(web.url, database_url, credit_set, args.gap)
            figures["worker_captures_per_s"] = drained
            figures["credit_p50_ms"] = credit["p50"] * 1000
            figures["credit_p99_ms"] = credit["p99"] * 1000
            print(f"\n[worker] one worker (concurrency 1) applied {drained:.0f} captures/s")
            print(
                f"[credit] one worker (concurrency 1), {credit['count']} captures one at a "
                f"time: p50 {ms(credit['p50'])}  p99 {ms(credit['p99'])}  max {ms(credit['max'])}"
            )
            print(f"         (their POSTs alone: p50 {ms(credit['post_p50'])})")
            print("         goal: credit p50 < 25 ms, p99 < 100 ms")

        if "breakdown" in phases:
            stages = breakdown(database_url, redis_url, broker_url, fake, breakdown_set)
            print(f"\n[breakdown] receiver stages in-process, mean of {len(breakdown_set) // 2}:")
            for name, value in stages.items():
                print(f"         {name:<28} {ms(value)}")
                figures[f"stage_{name.split()[0]}_ms"] = value * 1000
        load = os.getloadavg()[0]
        figures["load_average"] = load
        print(f"\nload average at the end: {load:.1f} (other processes share the CPUs)")
        if args.json:
            print(json.dumps(figures, sort_keys=True))
    return 0


def cpu_seconds(web_pid: int, database_url: str, redis_pid: int | None) -> dict[str, float]:
    """CPU seconds used so far by the web server (master and workers), this database's PostgreSQL
    backends, the embedded Redis, and this process (the clients)."""
    import psutil

    def used(pids) -> float:
        total = 0.0
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    web = psutil.Process(web_pid)
    with psycopg.connect(database_url, autocommit=True) as conn:
        backends = [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        ]
    figures = {
        "web": used([web_pid, *(c.pid for c in web.children(recursive=True))]),
        "postgres": used(backends),
        "clients": used([os.getpid()]),
    }
    if redis_pid:
        figures["redis"] = used([redis_pid])
    return figures


def _purge(database_url: str, redis_url: str, broker_url: str | None = None) -> None:
    if broker_url:
        from kombu import Connection

        with Connection(broker_url, connect_timeout=10) as conn:
            conn.default_channel.queue_purge("payguard.events")
    else:
        import redis

        client = redis.Redis.from_url(redis_url)
        try:
            client.delete("payguard.events")  # only our queue: BENCH_REDIS_URL may be shared
        finally:
            client.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE webhook_events SET status = 'ignored' WHERE status = 'received'")


def _backlog(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM webhook_events WHERE status = 'received'"
        ).fetchone()[0]


if __name__ == "__main__":
    raise SystemExit(main())
