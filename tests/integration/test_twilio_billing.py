"""What Twilio billed, against what the wallet paid.

Payguard holds `segments × price` before a send, counting segments itself. Twilio's answer
and its status callbacks say how many segments it billed (`num_segments` / `NumSegments`) and
at what price; both are recorded on the message. When Twilio billed more segments than were
held, the difference is charged as its own journal entry (`msg:<id>:segments`), once, and
what the wallet cannot pay becomes debt as any other charge would. Whatever still disagrees
is reported by `payguard ledger verify --twilio` and the `payguard_twilio_segment_mismatches`
gauge.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from decimal import Decimal
from functools import partial
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from core import messages, wallet
from core.providers.ports import SendOutcome, SendResult
from core.sending import Policy
from core.settings import Settings
from tests.support.db import tx
from tests.support.factories import new_org
from tests.support.fakes.fake_twilio import signed_status_callback, status_callback_params
from webhook_receiver.app import create_app

PARENT = "AC" + "1" * 32
TOKEN = "parent-auth-token"
PUBLIC = "https://payguard.example.com"
PATH = "/webhooks/twilio/status"
METRICS_TOKEN = "metrics-token-0123456789"
POLICY = Policy()
_SCRIPT = Path(sys.executable).with_name("payguard")
PAYGUARD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]


@pytest.fixture
def client(database_url):
    settings = Settings(
        DATABASE_URL=database_url, REDIS_URL="redis://127.0.0.1:1/0",
        TWILIO_ACCOUNT_SID=PARENT, TWILIO_AUTH_TOKEN=TOKEN, PUBLIC_BASE_URL=PUBLIC,
        LOG_FORMAT="text", METRICS_TOKEN=METRICS_TOKEN,
    )  # fmt: skip
    app = create_app(settings)
    yield app.test_client()
    app.extensions["payguard"].close()


sending_org = partial(new_org, price=2, twilio=True, active=True)


def sent(engine, org: str, result: SendResult) -> str:
    """One one-segment message sent and Twilio's answer recorded: its id."""
    mid = tx(engine, lambda c: messages.queue(c, org, "+15005550010", "hello", POLICY)).message_id
    assert isinstance(tx(engine, lambda c: messages.prepare(c, mid, POLICY)), messages.Plan)
    tx(engine, lambda c: messages.record_result(c, mid, result, POLICY))
    return mid


def accepted(sid: str | None = None, **billing) -> SendResult:
    return SendResult(SendOutcome.ACCEPTED, sid=sid or "SM" + uuid.uuid4().hex, **billing)


def callback(client, sid: str, status: str, **extra: str):
    params = status_callback_params(sid, status, "AC" + "2" * 32)
    params.update(extra)
    params, signature = signed_status_callback(TOKEN, f"{PUBLIC}{PATH}", params)
    return client.post(PATH, data=params, headers={"X-Twilio-Signature": signature})


def segment_charges(engine, org: str) -> list[tuple[str, int, int]]:
    with engine.connect() as c:
        return [
            tuple(r)
            for r in c.execute(
                text(
                    "SELECT reference, amount_cents, debt_delta_cents FROM journal "
                    "WHERE org_id = :o AND kind = 'segments_charge'"
                ),
                {"o": org},
            )
        ]


def billing_of(engine, mid: str) -> tuple:
    with engine.connect() as c:
        return tuple(
            c.execute(
                text(
                    "SELECT twilio_price, twilio_num_segments, charged_cents FROM messages "
                    "WHERE message_id = :m"
                ),
                {"m": mid},
            ).one()
        )


def test_twilios_price_and_segments_from_its_answer_are_recorded(engine):
    org = tx(engine, sending_org, balance=10)

    mid = sent(engine, org, accepted(price=Decimal("-0.0079"), price_unit="USD", num_segments=1))

    assert billing_of(engine, mid) == ("-0.0079", 1, 2)
    assert segment_charges(engine, org) == []


def test_segments_billed_beyond_the_hold_are_charged_once(client, engine):
    org = tx(engine, sending_org, balance=10, price=2)
    sid = "SM" + uuid.uuid4().hex

    mid = sent(engine, org, accepted(sid, num_segments=3))
    for status in ("sent", "delivered", "delivered"):
        assert callback(client, sid, status, NumSegments="3").status_code == 200

    assert segment_charges(engine, org) == [(f"msg:{mid}:segments", -4, 0)]
    assert billing_of(engine, mid)[1:] == (3, 6)
    assert tx(engine, lambda c: wallet.show(c, org)).balance_cents == 4
    assert tx(engine, lambda c: wallet.verify(c, org)) == []


def test_segments_reported_only_by_a_callback_are_charged(client, engine):
    org = tx(engine, sending_org, balance=10, price=2)
    sid = "SM" + uuid.uuid4().hex
    mid = sent(engine, org, accepted(sid))

    assert callback(client, sid, "sent", NumSegments="2", Price="-0.0158").status_code == 200

    assert segment_charges(engine, org) == [(f"msg:{mid}:segments", -2, 0)]
    assert billing_of(engine, mid) == ("-0.0158", 2, 4)


def test_extra_segments_a_short_wallet_cannot_pay_become_debt(engine):
    org = tx(engine, sending_org, balance=2, price=2)  # exactly the one segment held

    mid = sent(engine, org, accepted(num_segments=2))

    assert segment_charges(engine, org) == [(f"msg:{mid}:segments", 0, 2)]
    state = tx(engine, lambda c: wallet.show(c, org))
    assert (state.balance_cents, state.debt_cents, state.frozen) == (0, 2, True)
    assert billing_of(engine, mid)[2] == 4


def test_a_failed_message_is_refunded_its_extra_segments_too(client, engine):
    org = tx(engine, sending_org, balance=10, price=2)
    sid = "SM" + uuid.uuid4().hex
    sent(engine, org, accepted(sid, num_segments=2))

    assert callback(client, sid, "failed", NumSegments="2").status_code == 200

    assert tx(engine, lambda c: wallet.show(c, org)).balance_cents == 10


def _mismatched(engine) -> str:
    """A message Twilio billed 3 segments for while 1 was charged (as before this check)."""
    org = tx(engine, sending_org, balance=10, price=2)
    mid = sent(engine, org, accepted())
    with engine.begin() as c:
        c.execute(
            text("UPDATE messages SET twilio_num_segments = 3 WHERE message_id = :m"), {"m": mid}
        )
    return mid


def test_ledger_verify_twilio_reports_segment_mismatches(engine, database_url):
    mid = _mismatched(engine)
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": database_url, "LOG_FORMAT": "text"}

    run = subprocess.run(
        [*PAYGUARD, "ledger", "verify", "--twilio", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert run.returncode == 1, run.stderr
    out = json.loads(run.stdout)
    assert out["twilio_mismatches"] == 1
    [found] = out["twilio_mismatched_messages"]
    assert (found["message_id"], found["charged_segments"], found["twilio_segments"]) == (
        mid,
        1,
        3,
    )
    plain = subprocess.run(
        [*PAYGUARD, "ledger", "verify", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert "twilio_mismatches" not in json.loads(plain.stdout)


def test_the_segment_mismatch_gauge_shows_beats_last_count(
    client, engine, database_url, monkeypatch
):
    from worker import beat_jobs, runtime

    _mismatched(engine)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(runtime, "_state", {})
    try:
        beat_jobs.verify_ledger.run()
    finally:
        if (e := runtime._state.get("engine")) is not None:
            e.dispose()

    answer = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert answer.status_code == 200
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(answer.get_data(as_text=True))
        for s in family.samples
    }
    assert samples["payguard_twilio_segment_mismatches"] == 1
    assert samples["payguard_ledger_mismatches"] == 0
