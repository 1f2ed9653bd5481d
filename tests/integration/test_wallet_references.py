"""References the ledger keeps for itself, and repeats that change the currency."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from core import orgs, wallet
from core.db import run_in_transaction
from core.errors import InvalidInput


@pytest.fixture
def acme(engine) -> str:
    run_in_transaction(engine, lambda c: orgs.create(c, "acme", currency="USD"))
    return "acme"


def _journal_rows(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM journal")).scalar_one()


@pytest.mark.parametrize("operation", ["credit", "clawback"])
def test_a_repeat_in_another_currency_is_refused_not_a_duplicate(engine, acme, operation):
    run_in_transaction(engine, lambda c: wallet.credit(c, acme, 500, "seed", currency="USD"))
    apply = getattr(wallet, operation)
    run_in_transaction(engine, lambda c: apply(c, acme, 100, "ref-1", currency="USD"))

    with pytest.raises(InvalidInput, match="currency"):
        run_in_transaction(engine, lambda c: apply(c, acme, 100, "ref-1", currency="EUR"))
    assert run_in_transaction(engine, lambda c: apply(c, acme, 100, "ref-1")).duplicate


def test_a_capture_reference_cannot_be_taken_by_another_operation(engine, acme):
    run_in_transaction(engine, lambda c: wallet.credit(c, acme, 500, "seed"))
    run_in_transaction(engine, lambda c: wallet.hold(c, acme, 100, "msg:1"))

    with pytest.raises(InvalidInput, match="hold:"):
        run_in_transaction(engine, lambda c: wallet.debit(c, acme, 5, "hold:msg:1"))
    before = _journal_rows(engine)
    captured = run_in_transaction(engine, lambda c: wallet.capture(c, acme, "msg:1"))

    assert captured.status == "captured"
    assert _journal_rows(engine) == before + 1
