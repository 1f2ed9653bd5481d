"""Migration hygiene: one head, a schema that builds on an empty database, comes down to
nothing and builds again identically, and a `release` that is safe to run twice, even at once.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import migrations
from core import orgs, statuses, wallet
from core.db import make_engine, run_in_transaction

REPO_ROOT = Path(__file__).resolve().parents[2]

SCHEMA = """
SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' '
       || is_nullable || ' ' || coalesce(column_default, '')
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'trigger', tgrelid::regclass || ' ' || pg_get_triggerdef(oid)
FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'function', p.proname || ' ' || md5(p.prosrc)
FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
ORDER BY 1, 2
"""


def schema(url: str) -> list[tuple[str, str]]:
    """Everything the migrations define, alembic's own bookkeeping left out."""
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(text(SCHEMA)) if "alembic_version" not in r[1]]
    finally:
        engine.dispose()


@pytest.fixture
def empty_database_url(pg_server):
    """A database with nothing in it, not cloned from the migrated template."""
    from psycopg import sql

    name = f"payguard_empty_{secrets.token_hex(6)}"
    with pg_server.admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pg_server.url_for(name)
    finally:
        with pg_server.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_there_is_exactly_one_alembic_head():
    assert len(migrations.heads()) == 1, migrations.heads()


def test_upgrade_builds_an_empty_database_and_is_safe_to_run_twice(empty_database_url):
    [head] = migrations.heads()
    assert migrations.current(empty_database_url) is None
    assert schema(empty_database_url) == []

    assert migrations.upgrade(empty_database_url) == head
    built = schema(empty_database_url)
    assert migrations.upgrade(empty_database_url) == head

    assert built and schema(empty_database_url) == built
    assert ("trigger", "journal") in {(kind, what.split()[0]) for kind, what in built}


def test_downgrade_to_base_removes_everything_and_upgrade_builds_it_again(database_url):
    [head] = migrations.heads()
    assert migrations.current(database_url) == head
    before = schema(database_url)
    engine = make_engine(database_url)
    try:
        # Data in every ledger table must not stop the way down (the journal refuses DELETE).
        def some_money(conn):
            orgs.create(conn, "acme")
            wallet.credit(conn, "acme", 500, "pay-1")
            wallet.hold(conn, "acme", 100, "sms-1")
            wallet.freeze(conn, "acme", "kyc", actor="ann")

        run_in_transaction(engine, some_money)
        engine.dispose()

        migrations.downgrade(database_url, "base")
        assert migrations.current(database_url) in (None, "")
        assert schema(database_url) == []

        assert migrations.upgrade(database_url) == head
        assert schema(database_url) == before

        # The rebuilt schema works, and its journal is append-only again.
        run_in_transaction(engine, some_money)
        assert run_in_transaction(engine, wallet.verify) == []
        with pytest.raises(DBAPIError), engine.begin() as c:
            c.execute(text("DELETE FROM journal"))
    finally:
        engine.dispose()


def test_two_releases_at_once_both_succeed(empty_database_url):
    # The Procfile's `release` may run twice at once (two deploys); the advisory lock in
    # migrations/env.py makes the second wait, then find nothing to do.
    [head] = migrations.heads()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    script = "import sys, migrations; print(migrations.upgrade(sys.argv[1]))"
    releases = [
        subprocess.Popen(
            [sys.executable, "-c", script, empty_database_url],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = [p.communicate(timeout=120) for p in releases]

    assert [p.returncode for p in releases] == [0, 0], outcomes
    assert [out.strip().splitlines()[-1] for out, _ in outcomes] == [head, head]
    assert migrations.current(empty_database_url) == head


def test_organizations_that_never_had_a_subscription_become_prepaid_on_upgrade(
    empty_database_url,
):
    # Before billing modes an organization without a subscription sent on money alone; the
    # deploy that adds them must not pause it. One with a subscription stays subscription-billed.
    migrations.upgrade(empty_database_url, "0003")
    engine = make_engine(empty_database_url)
    try:
        with engine.begin() as c:
            for org in ("prepaid-co", "subscribed-co"):
                c.execute(
                    text("INSERT INTO organizations (org_id, currency) VALUES (:o, 'USD')"),
                    {"o": org},
                )
                c.execute(
                    text("INSERT INTO wallets (org_id, currency) VALUES (:o, 'USD')"), {"o": org}
                )
            c.execute(
                text(
                    "INSERT INTO subscriptions (provider, subscription_id, org_id, status, "
                    "status_since) VALUES ('paypal', 'I-1', 'subscribed-co', 'active', now())"
                )
            )
        migrations.upgrade(empty_database_url, "0004")
        with engine.connect() as c:
            billing = dict(c.execute(text("SELECT org_id, billing FROM organizations")).all())
        assert billing == {"prepaid-co": "prepaid", "subscribed-co": "subscription"}
    finally:
        engine.dispose()


def test_0005_makes_stored_transmissions_vouch_for_their_bodies(empty_database_url):
    # Events stored before 0005 keep their transmission: the forged body of a transmission
    # used just before the upgrade must still be refused after it.
    import hashlib

    migrations.upgrade(empty_database_url, "0003")
    engine = make_engine(empty_database_url)
    try:
        with engine.begin() as c:
            c.execute(
                text(
                    "INSERT INTO webhook_events (provider, event_id, event_type, body, "
                    "transmission_id) VALUES ('paypal', 'WH-1', 'X', :b, 'T-1'), "
                    "('paypal', 'WH-2', 'X', :b, NULL), ('stripe', 'evt_1', 'X', :b, 'T-2')"
                ),
                {"b": b'{"id":"WH-1"}'},
            )
        migrations.upgrade(empty_database_url)
        with engine.connect() as c:
            rows = c.execute(
                text("SELECT transmission_id, body_sha256, event_id FROM paypal_transmissions")
            ).all()
        assert [tuple(r) for r in rows] == [
            ("T-1", hashlib.sha256(b'{"id":"WH-1"}').digest(), "WH-1")
        ]
    finally:
        engine.dispose()


def test_0008_ties_messages_already_sent_to_their_subaccount(empty_database_url):
    # A callback signed with a subaccount's token counts only for messages sent through that
    # subaccount: messages sent before 0008 take their organization's subaccount; messages
    # never sent take none (they will record theirs when they are).
    migrations.upgrade(empty_database_url, "0007")
    engine = make_engine(empty_database_url)
    sub = "AC" + "3" * 32
    try:
        with engine.begin() as c:
            c.execute(
                text(
                    "INSERT INTO organizations (org_id, currency, twilio_subaccount_sid) "
                    "VALUES ('acme', 'USD', :s)"
                ),
                {"s": sub},
            )
            c.execute(
                text(
                    "INSERT INTO messages (message_id, org_id, to_number, body, segments, "
                    "encoding, price_cents, status, twilio_sid) VALUES "
                    "('m-sent', 'acme', '+15005550010', 'hi', 1, 'GSM-7', 1, 'accepted', 'SM1'), "
                    "('m-lost', 'acme', '+15005550010', 'hi', 1, 'GSM-7', 1, 'unknown', NULL), "
                    "('m-queued', 'acme', '+15005550010', 'hi', 1, 'GSM-7', 1, 'queued', NULL)"
                )
            )
        assert migrations.upgrade(empty_database_url, "0008") == "0008"
        with engine.connect() as c:
            tied = dict(
                c.execute(text("SELECT message_id, twilio_subaccount_sid FROM messages")).all()
            )
            check = c.execute(
                text("SELECT column_default FROM information_schema.columns "
                     "WHERE table_name = 'ledger_checks' AND column_name = 'twilio_mismatches'")
            ).scalar_one()  # fmt: skip
        assert tied == {"m-sent": sub, "m-lost": sub, "m-queued": None}
        assert check == "0"
    finally:
        engine.dispose()


def test_0013_checks_statuses_every_message_already_had_and_comes_down_again(empty_database_url):
    # Every status the code writes is one 0013 allows: a database of before keeps its rows.
    migrations.upgrade(empty_database_url, "0012")
    engine = make_engine(empty_database_url)
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO organizations (org_id, currency) VALUES ('acme', 'USD')"))
            for n, status in enumerate(statuses.MessageStatus):
                c.execute(
                    text(
                        "INSERT INTO messages (message_id, org_id, to_number, body, segments, "
                        "encoding, price_cents, status) "
                        "VALUES (:message_id, 'acme', '+15005550010', 'hi', 1, 'GSM-7', 1, :status)"
                    ),
                    {"message_id": f"m{n}", "status": status},
                )
            for status in statuses.CallbackStatus:
                c.execute(
                    text(
                        "INSERT INTO early_callbacks (twilio_sid, status) VALUES ('SM1', :status)"
                    ),
                    {"status": status},
                )
        assert migrations.upgrade(empty_database_url, "0013") == "0013"
        with pytest.raises(DBAPIError, match="messages_status_known"), engine.begin() as c:
            c.execute(text("UPDATE messages SET status = 'lost' WHERE message_id = 'm0'"))
        migrations.downgrade(empty_database_url, "0012")
        with engine.begin() as c:
            c.execute(text("UPDATE messages SET status = 'lost' WHERE message_id = 'm0'"))
    finally:
        engine.dispose()
