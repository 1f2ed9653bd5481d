"""The soak's database: prepared, seeded with organizations, drained after the load."""

from __future__ import annotations

import random
import secrets
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row

import migrations
from core import orgs, sending
from core.campaigns import create_campaign
from core.db import run_in_transaction
from devtools.devstack import TEST_POSTGRES_SETTINGS, start_postgres
from devtools.devstack import database_url as url_for


def prepare_database(
    admin_url: str | None, tmp: Path, stack: ExitStack, keep: bool
) -> tuple[str, str]:
    """(URL of a fresh migrated scratch database, where it lives)."""
    if admin_url is None:
        server = start_postgres(tmp / "pgdata", database=None, settings=TEST_POSTGRES_SETTINGS)
        stack.callback(server.stop)
        admin_url, where = server.admin_url, "embedded PostgreSQL (fsync off)"
    else:
        parts = urlsplit(admin_url)
        where = f"PostgreSQL at {parts.hostname}:{parts.port}"
    name = f"payguard_soak_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    if not keep:
        stack.callback(drop)
    url = url_for(admin_url, name)
    migrations.upgrade(url)
    return url, f"{where}, database {name}" + (" (kept)" if keep else "")


def create_orgs(engine, rng: random.Random, count: int, policy: sending.Policy):
    """N organizations with a Twilio subaccount and sender each, one in five "hungry" (a high
    price per segment, small payments: it runs dry and its refunds end in debt)."""
    org_ids, hungry, campaigns = [], set(), {}
    for i in range(count):
        org_id = f"soak-{i:03d}"
        is_hungry = i % 5 == 0
        price = rng.randint(40, 120) if is_hungry else rng.choice((None, 1, 2, 3))
        names = [f"c{j}" for j in range(1, rng.randint(1, 3) + 1)]

        def create(conn, org_id=org_id, price=price, names=names, i=i):
            orgs.create(
                conn,
                org_id,
                twilio_subaccount_sid="AC"
                + "".join(rng.choice("0123456789abcdef") for _ in range(32)),
                sender=f"+1415555{i:04d}",
                segment_price_cents=price,
                # Half send on money alone; the other half also need their subscription.
                billing="prepaid" if i % 2 else "subscription",
            )
            for name in names:
                create_campaign(conn, org_id, name, policy)

        run_in_transaction(engine, create)
        org_ids.append(org_id)
        campaigns[org_id] = names
        if is_hungry:
            hungry.add(org_id)
    return org_ids, hungry, campaigns


def backlog(conn) -> dict[str, int]:
    row = conn.execute("""
SELECT (SELECT count(*) FROM webhook_events WHERE status = 'received') AS events_received,
       (SELECT count(*) FROM messages WHERE status IN ('queued', 'sending', 'retrying'))
           AS messages_pending,
       (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS outbox_unpublished
""").fetchone()
    return dict(row)


def drain(
    database_url: str, timeout: float, label: str, origin: float
) -> tuple[bool, dict, float | None]:
    """Wait until nothing is left to do: (drained, last backlog, seconds from `origin` until
    the events and the outbox alone were done)."""
    started = time.monotonic()
    last_print, events_done = started, None
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        while True:
            left = backlog(conn)
            now = time.monotonic()
            if (
                events_done is None
                and not left["events_received"]
                and not left["outbox_unpublished"]
            ):
                events_done = now - origin
            if not any(left.values()):
                return True, left, events_done
            if now - started > timeout:
                return False, left, events_done
            if now - last_print > 10:
                print(f"  [{label}] {now - started:4.0f}s still pending: {left}", flush=True)
                last_print = now
            time.sleep(0.5)
