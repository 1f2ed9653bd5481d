"""Every `payguard` command that changes state names who did it: `--actor NAME`, by default
the operating-system user, in exactly one audit row written in the command's own transaction
(a refused command leaves none)."""

from __future__ import annotations

import os
import subprocess

import pytest
from sqlalchemy import text

from core import campaigns, inbox, messages, orgs, sending, wallet
from core.db import run_in_transaction
from tests.integration.test_cli import PAYGUARD, ROOT, Run

POLICY = sending.Policy()


def payguard_as(os_user: str, database_url: str, *args: str) -> Run:
    """The console in a clean environment whose login name is `os_user` (getpass reads
    LOGNAME first, as login(1) sets it)."""
    env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "LOGNAME": os_user}
    env["DATABASE_URL"] = database_url
    proc = subprocess.run(
        [*PAYGUARD, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def audit_rows(engine) -> list[tuple]:
    with engine.connect() as c:
        return [
            tuple(r)
            for r in c.execute(text("SELECT actor, action, org_id FROM audit_log ORDER BY id"))
        ]


def _prepaid(conn, org_id: str = "acme", balance: int = 1000) -> None:
    orgs.create(conn, org_id, billing="prepaid")
    wallet.credit(conn, org_id, balance, f"seed:{org_id}")


def _with_campaign(conn, *, paused_by_user: bool = False) -> None:
    _prepaid(conn)
    campaigns.create_campaign(conn, "acme", "spring", POLICY)
    if paused_by_user:
        campaigns.pause_campaign(conn, "acme", "spring")


def _parked_event(conn) -> None:
    stored, _ = inbox.store(conn, "paypal", "WH-PARKED", "PAYMENT.CAPTURE.COMPLETED", {}, b"{}")
    inbox.finish(conn, stored.id, "parked", error="unknown organization 'x'")


def _frozen(conn) -> None:
    _prepaid(conn)
    wallet.freeze(conn, "acme", "manual", actor="earlier")


def _event_id(engine) -> str:
    with engine.connect() as c:
        return str(c.execute(text("SELECT id FROM webhook_events")).scalar_one())


# (setup in-process, the command's words, the audit action, its organization)
COMMANDS = {
    "org-create": (None, ["org", "create", "acme", "--billing", "prepaid"], "org.create", "acme"),
    "campaign-create": (
        _prepaid,
        ["campaign", "create", "acme", "spring"],
        "campaign.create",
        "acme",
    ),
    "campaign-pause": (
        _with_campaign,
        ["campaign", "pause", "acme", "spring"],
        "campaign.pause",
        "acme",
    ),
    "campaign-resume": (
        lambda c: _with_campaign(c, paused_by_user=True),
        ["campaign", "resume", "acme", "spring"],
        "campaign.resume",
        "acme",
    ),
    "message-send": (
        _prepaid,
        ["message", "send", "acme", "--to", "+15005550010", "--body", "hi"],
        "message.send",
        "acme",
    ),
    "wallet-adjust": (
        _prepaid,
        ["wallet", "adjust", "acme", "250", "--reason", "goodwill"],
        "wallet.adjust",
        "acme",
    ),
    "wallet-freeze": (
        _prepaid,
        ["wallet", "freeze", "acme", "--reason", "manual"],
        "wallet.freeze",
        "acme",
    ),
    "wallet-unfreeze": (
        _frozen,
        ["wallet", "unfreeze", "acme", "--reason", "manual"],
        "wallet.unfreeze",
        "acme",
    ),
    "events-replay": (_parked_event, ["events", "replay", "{event}"], "events.replay", None),
    "events-replay-all": (
        _parked_event,
        ["events", "replay", "--all", "parked"],
        "events.replay",
        None,
    ),
}


def _prepare(engine, name: str) -> list[str]:
    setup, words, _, _ = COMMANDS[name]
    if setup is not None:
        run_in_transaction(engine, setup)
    event = _event_id(engine) if "{event}" in words else ""
    return [w.replace("{event}", event) for w in words]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_state_changing_command_writes_one_audit_row_naming_the_actor(
    name, engine, database_url
):
    words = _prepare(engine, name)
    before = audit_rows(engine)

    run = payguard_as("someone-else", database_url, *words, "--actor", "night-ops", "--json")

    assert run.status == 0, run.stderr
    assert run.json  # one JSON object, as before
    _, _, action, org_id = COMMANDS[name]
    assert audit_rows(engine)[len(before) :] == [("night-ops", action, org_id)]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_actor_is_the_operating_system_user_by_default(name, engine, database_url):
    words = _prepare(engine, name)
    before = audit_rows(engine)

    run = payguard_as("ana", database_url, *words, "--json")

    assert run.status == 0, run.stderr
    _, _, action, org_id = COMMANDS[name]
    assert audit_rows(engine)[len(before) :] == [("ana", action, org_id)]


def test_a_refused_command_leaves_no_audit_row(engine, database_url):
    run_in_transaction(engine, lambda c: orgs.create(c, "acme", billing="prepaid"))
    run_in_transaction(engine, lambda c: campaigns.create_campaign(c, "acme", "spring", POLICY))
    before = audit_rows(engine)

    run = payguard_as("ana", database_url, "campaign", "resume", "acme", "spring", "--json")

    assert run.status == 1  # no money: the system's pause stays
    assert audit_rows(engine) == before


def test_the_message_audit_row_names_the_message(engine, database_url):
    run_in_transaction(engine, _prepaid)

    run = payguard_as(
        "ana", database_url, "message", "send", "acme", "--to", "+15005550010", "--body", "x",
        "--json",
    )  # fmt: skip

    assert run.status == 0, run.stderr
    assert run_in_transaction(engine, lambda c: messages.get(c, run.json["message_id"]))
    with engine.connect() as c:
        details = c.execute(text("SELECT details FROM audit_log")).scalar_one()
    assert details["message_id"] == run.json["message_id"]


def test_db_upgrade_audits_a_migration_and_nothing_when_already_at_head(engine, database_url):
    import migrations

    migrations.downgrade(database_url, "0004")
    engine.dispose()  # its connections knew the old schema

    upgraded = payguard_as("ana", database_url, "db", "upgrade", "--actor", "release", "--json")
    again = payguard_as("ana", database_url, "db", "upgrade", "--json")

    assert upgraded.status == 0, upgraded.stderr
    assert (upgraded.json["previous_revision"], upgraded.json["changed"]) == ("0004", True)
    assert again.status == 0 and again.json["changed"] is False
    with engine.connect() as c:
        rows = c.execute(text("SELECT actor, action, org_id, details FROM audit_log")).all()
    assert [tuple(r) for r in rows] == [
        ("release", "db.upgrade", None, {"from": "0004", "to": migrations.heads()[0]})
    ]
