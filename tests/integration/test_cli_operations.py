"""The operator commands beyond the ledger: status, campaigns, messages, the inbox (with
bulk replay), and progress on a terminal for long work."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from sqlalchemy import text

from core import inbox, orgs, wallet
from core.db import run_in_transaction
from tests.integration.test_cli import run_payguard

_SCRIPT = Path(sys.executable).with_name("payguard")
PAYGUARD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]


def _parked(engine, n: int) -> list[int]:
    def park(conn):
        ids = []
        for i in range(n):
            stored, _ = inbox.store(
                conn, "paypal", f"WH-P{i}", "PAYMENT.CAPTURE.COMPLETED", {}, b"{}"
            )
            inbox.finish(conn, stored.id, "parked", error="unknown organization 'x'")
            ids.append(stored.id)
        return ids

    return run_in_transaction(engine, park)


def test_status_lists_every_reason_and_campaigns_follow(engine, database_url):
    run_in_transaction(engine, lambda c: orgs.create(c, "acme", billing="prepaid"))
    status = run_payguard("status", "acme", "--json", database_url=database_url)
    assert status.status == 0
    assert status.json["can_send"] is False
    assert status.json["reasons"] == ["insufficient_balance"]

    created = run_payguard(
        "campaign", "create", "acme", "spring", "--json", database_url=database_url
    ).json
    assert created["campaigns"] == [
        {
            "campaign_id": "spring",
            "status": "paused",
            "paused_by": "system",
            "pause_reason": "insufficient_balance",
        }
    ]
    refused = run_payguard(
        "campaign", "resume", "acme", "spring", "--json", database_url=database_url
    )
    assert refused.status == 1 and "insufficient_balance" in refused.json["error"]

    run_payguard(
        "wallet",
        "adjust",
        "acme",
        "500",
        "--reason",
        "goodwill",
        "--actor",
        "ops",
        "--json",
        database_url=database_url,
    )
    listed = run_payguard("campaign", "list", "acme", "--json", database_url=database_url).json
    assert listed["campaigns"][0]["status"] == "running"  # resumed in the adjust's transaction


def test_message_send_queues_and_show_reports(engine, database_url):
    run_in_transaction(engine, lambda c: orgs.create(c, "acme", billing="prepaid"))
    run_in_transaction(engine, lambda c: wallet.credit(c, "acme", 100, "seed"))
    sent = run_payguard(
        "message",
        "send",
        "acme",
        "--to",
        "+15005550006",
        "--body",
        "hi",
        "--json",
        database_url=database_url,
    )
    assert sent.status == 0, sent.stderr
    assert sent.json["status"] == "queued"
    shown = run_payguard(
        "message", "show", sent.json["message_id"], "--json", database_url=database_url
    ).json
    assert {"message_id", "status", "twilio_sid", "charged_cents"} <= shown.keys()
    bad = run_payguard(
        "message",
        "send",
        "acme",
        "--to",
        "555",
        "--body",
        "hi",
        "--json",
        database_url=database_url,
    )
    assert bad.status == 1 and "E.164" in bad.json["error"]


def test_events_replay_all_parked_requeues_each_once_with_an_audit_row(engine, database_url):
    ids = _parked(engine, 3)
    listed = run_payguard(
        "events", "list", "--status", "parked", "--json", database_url=database_url
    ).json
    assert sorted(e["id"] for e in listed["events"]) == sorted(ids)

    replayed = run_payguard(
        "events", "replay", "--all", "parked", "--json", database_url=database_url
    )
    assert replayed.status == 0, replayed.stderr
    assert sorted(replayed.json["replayed"]) == sorted(ids)
    with engine.connect() as conn:
        statuses = conn.execute(text("SELECT DISTINCT status FROM webhook_events")).scalars()
        assert list(statuses) == ["received"]
        assert (
            conn.execute(
                text("SELECT count(*) FROM audit_log WHERE action = 'events.replay'")
            ).scalar()
            == 3
        )
    again = run_payguard("events", "replay", str(ids[0]), "--json", database_url=database_url)
    assert again.status == 1  # received now: nothing to replay


def test_events_replay_needs_an_id_or_all(database_url):
    assert run_payguard("events", "replay", "--json", database_url=database_url).status == 2


def test_ledger_verify_shows_progress_on_a_terminal(engine, database_url):
    for i in range(3):
        run_in_transaction(engine, lambda c, i=i: orgs.create(c, f"org-{i}"))
    master, slave = pty.openpty()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "LANG": "C.UTF-8",
        "DATABASE_URL": database_url,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    proc = subprocess.run(
        [*PAYGUARD, "ledger", "verify", "--json"],
        stderr=slave,
        stdout=subprocess.PIPE,
        env=env,
        timeout=60,
    )
    os.close(slave)
    progress = os.read(master, 65536).decode()
    os.close(master)

    assert proc.returncode == 0
    assert json.loads(proc.stdout)["ok"] is True
    assert "verifying wallets" in progress and "3/3 100%" in progress
