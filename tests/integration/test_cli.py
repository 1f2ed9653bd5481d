"""The `payguard` console as operators and the host application run it: the real console
script in a subprocess against a fresh database, checking the contract's JSON keys, exit
statuses (0 done, 1 refused, 2 bad usage) and that a refusal writes nothing.

State is set up in-process through `core` so that each test spends its subprocesses only on
what it checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from core import wallet
from core.db import run_in_transaction
from tests.support.db import tx
from tests.support.factories import new_org

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("payguard")
PAYGUARD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]

WALLET_KEYS = {
    "balance_cents", "held_cents", "available_cents", "debt_cents", "frozen",
    "freeze_reasons", "currency",
}  # fmt: skip
ENTRY_KEYS = {
    "id", "kind", "amount_cents", "reference", "balance_after_cents", "created_at",
    "actor", "reason",
}  # fmt: skip

# ---------------------------------------------------------------- helpers


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        lines = self.stdout.splitlines()
        assert len(lines) == 1, f"expected one JSON line on stdout, got {self.stdout!r}"
        payload = json.loads(lines[0])
        assert isinstance(payload, dict)
        return payload


def run_payguard(*args: str, database_url: str | None) -> Run:
    # A clean environment: the console must need nothing but DATABASE_URL.
    env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    proc = subprocess.run(
        [*PAYGUARD, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def payguard(database_url):
    return lambda *args: run_payguard(*args, database_url=database_url)


def count(engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


# ---------------------------------------------------------------- success and keys


def test_db_upgrade_reports_the_head_revision_and_is_safe_twice(payguard):
    import migrations

    run = payguard("db", "upgrade", "--json")

    assert run.status == 0, run.stderr
    assert run.json["revision"] == migrations.heads()[0]
    assert run.json["changed"] is False


def test_org_create_then_show_has_the_contract_keys(payguard):
    created = payguard(
        "org", "create", "acme", "--currency", "eur", "--sender", "+15551234567",
        "--segment-price-cents", "2", "--json",
    )  # fmt: skip
    shown = payguard("--json", "org", "show", "acme")  # --json before the subcommand too

    assert created.status == 0, created.stderr
    assert created.json["org_id"] == "acme"
    assert created.json["currency"] == "EUR"
    assert shown.status == 0, shown.stderr
    assert shown.json["org_id"] == "acme"
    assert shown.json["subscription_status"] == "none"
    assert shown.json["twilio_status"] == "active"
    assert shown.json["segment_price_cents"] == 2
    assert set(shown.json["wallet"]) >= WALLET_KEYS


def test_adjust_both_ways_with_a_negative_positional_then_show_and_history(engine, payguard):
    org = tx(engine, new_org, org_id="acme")

    up = payguard("wallet", "adjust", org, "1000", "--reason", "top-up", "--actor", "ana",
                  "--json")  # fmt: skip
    down = payguard("wallet", "adjust", org, "-300", "--reason", "refund", "--actor", "ana",
                    "--reference", "ticket-7", "--json")  # fmt: skip
    again = payguard("wallet", "adjust", org, "-300", "--reason", "refund", "--actor", "ana",
                     "--reference", "ticket-7", "--json")  # fmt: skip
    shown = payguard("wallet", "show", org, "--json")
    history = payguard("wallet", "history", org, "--limit", "1", "--json")

    assert (up.status, up.json["balance_cents"]) == (0, 1000), up.stderr
    assert (down.status, down.json["balance_cents"]) == (0, 700), down.stderr
    assert isinstance(down.json["entry_id"], int)
    assert again.json["entry_id"] == down.json["entry_id"]
    assert again.json["duplicate"] is True
    assert again.json["balance_cents"] == 700
    assert set(shown.json) >= WALLET_KEYS
    assert shown.json["balance_cents"] == shown.json["available_cents"] == 700
    assert history.status == 0
    [newest] = history.json["entries"]
    assert set(newest) >= ENTRY_KEYS
    # An operator's reference is kept in its own namespace, apart from every provider's.
    assert (newest["amount_cents"], newest["reference"], newest["actor"]) == (
        -300, "op:ticket-7", "ana",
    )  # fmt: skip
    with engine.connect() as conn:
        audited = conn.execute(
            text("SELECT actor, action, details->>'amount_cents' FROM audit_log ORDER BY id")
        ).all()
    assert [tuple(r) for r in audited] == [
        ("ana", "wallet.adjust", "1000"),
        ("ana", "wallet.adjust", "-300"),
        ("ana", "wallet.adjust", "-300"),
    ]


def test_freeze_and_unfreeze_one_reason(engine, payguard):
    org = tx(engine, new_org, org_id="acme")

    frozen = payguard("wallet", "freeze", org, "--reason", "manual", "--actor", "ana", "--json")
    lifted = payguard("wallet", "unfreeze", org, "--reason", "manual", "--actor", "bo", "--json")

    assert frozen.status == 0, frozen.stderr
    assert (frozen.json["frozen"], frozen.json["freeze_reasons"]) == (True, ["manual"])
    assert frozen.json["changed"] is True
    assert lifted.status == 0, lifted.stderr
    assert (lifted.json["frozen"], lifted.json["freeze_reasons"]) == (False, [])
    assert count(engine, "audit_log") == 2


def test_ledger_verify_passes_then_fails_after_a_balance_is_tampered_with(engine, payguard):
    org = tx(engine, new_org, balance=500, org_id="acme")
    clean = payguard("ledger", "verify", "--json")
    with engine.begin() as conn:
        conn.execute(text("UPDATE wallets SET balance_cents = balance_cents + 7"))

    tampered = payguard("ledger", "verify", "--json")

    assert clean.status == 0, clean.stderr
    assert clean.json == {"ok": True, "wallets_checked": 1, "mismatches": []}
    assert tampered.status == 1
    assert tampered.json["ok"] is False
    assert tampered.json["mismatches"] == [
        {"org_id": org, "field": "balance_cents", "stored": 507, "expected": 500}
    ]


def test_without_json_the_output_is_for_people(engine, payguard):
    org = tx(engine, new_org, balance=250, org_id="acme")

    run = payguard("wallet", "show", org)

    assert run.status == 0, run.stderr
    assert "balance_cents:" in run.stdout and "250" in run.stdout
    assert not run.stdout.lstrip().startswith("{")


# ---------------------------------------------------------------- refusals: exit 1


def test_adjust_below_zero_is_refused_and_writes_nothing(engine, payguard):
    org = tx(engine, new_org, balance=100, org_id="acme")
    before = (count(engine, "journal"), count(engine, "audit_log"))

    run = payguard("wallet", "adjust", org, "-101", "--reason", "fix", "--actor", "ana", "--json")

    assert run.status == 1
    assert "below zero" in run.json["error"]
    assert (count(engine, "journal"), count(engine, "audit_log")) == before
    assert run_in_transaction(engine, lambda c: wallet.show(c, org)).balance_cents == 100


def test_unknown_org_and_duplicate_org_are_refused(engine, payguard):
    tx(engine, new_org, org_id="acme")

    unknown = payguard("wallet", "show", "nobody", "--json")
    duplicate = payguard("org", "create", "acme", "--json")

    assert unknown.status == 1 and "nobody" in unknown.json["error"]
    assert duplicate.status == 1 and "already exists" in duplicate.json["error"]
    assert count(engine, "organizations") == 1


def test_a_value_core_rejects_is_a_refusal_not_bad_usage(payguard):
    run = payguard("org", "create", "acme", "--currency", "DOLLARS", "--json")

    assert run.status == 1
    assert "currency" in run.json["error"]


def test_database_unreachable_is_one_line_without_traceback():
    run = run_payguard(
        "wallet", "show", "acme", "--json", database_url="postgresql://nobody@127.0.0.1:1/none"
    )

    assert run.status == 1
    assert run.json["error"].startswith("database unavailable: ")
    assert len(run.stderr.strip().splitlines()) == 1
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------- bad usage: exit 2


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["wallet", "adjust", "acme", "--reason", "r", "--actor", "a"], id="no-amount"),
        pytest.param(
            ["wallet", "adjust", "acme", "12.5", "--reason", "r", "--actor", "a"],
            id="non-integer-amount",
        ),
        pytest.param(["wallet"], id="no-subcommand"),
    ],
)
def test_bad_usage_exits_2_with_a_json_error(args, payguard):
    run = payguard(*args, "--json")

    assert run.status == 2
    assert run.json["error"]
    assert "usage:" in run.stderr


def test_missing_database_url_is_one_line_naming_it():
    run = run_payguard("wallet", "show", "acme", "--json", database_url=None)

    assert run.status == 2
    assert "DATABASE_URL" in run.json["error"]
    [line] = run.stderr.strip().splitlines()
    assert "DATABASE_URL" in line


# ---------------------------------------------------------------- the dev stack


def test_dev_runs_the_dev_stack_without_database_url(monkeypatch):
    from cli.main import main

    calls = []
    fake = types.ModuleType("devtools.devstack")
    fake.run_dev = lambda procfile, data_dir: calls.append((procfile, data_dir)) or 0
    monkeypatch.setitem(sys.modules, "devtools.devstack", fake)
    monkeypatch.delenv("DATABASE_URL", raising=False)

    assert main(["dev"]) == 0
    assert calls == [(Path("Procfile"), Path("var/dev"))]


def test_dev_outside_a_checkout_says_the_harness_is_not_installed(monkeypatch, tmp_path, capsys):
    """An installed wheel has no devtools/: `payguard dev` says so instead of a traceback."""
    import cli.main
    from cli.main import main

    monkeypatch.setattr(cli.main, "_checkouts", lambda: [tmp_path])
    monkeypatch.delenv("DATABASE_URL", raising=False)

    assert main(["dev", "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert "devtools/" in error and "checkout" in error
