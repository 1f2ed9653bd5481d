"""The wallet ledger on real PostgreSQL: idempotency, refusals, holds, freezes, debt, manual
adjustments, verification and the database's own refusal to rewrite the journal.

Refusals are checked inside a unit of work that commits anyway (as a caller that catches the
refusal and records something else would), so a refusal that wrote anything would show.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from core import wallet
from core.errors import Conflict, InvalidInput, NotFound, PayguardError, Refused
from tests.support.db import tx
from tests.support.factories import new_org

# --- helpers ------------------------------------------------------------------------------


def show(engine, org: str) -> wallet.WalletState:
    return tx(engine, lambda c: wallet.show(c, org))


def journal(engine, org: str, reference: str | None = None) -> list:
    sql = "SELECT * FROM journal WHERE org_id = :o"
    if reference is not None:
        sql += " AND reference = :r"
    with engine.connect() as c:
        return list(c.execute(text(sql + " ORDER BY id"), {"o": org, "r": reference}))


def everything(engine) -> tuple:
    """Every row a wallet operation could touch, updated_at included."""
    with engine.connect() as c:
        return tuple(
            tuple(tuple(r) for r in c.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2")))
            for t in ("wallets", "journal", "holds", "wallet_freezes")
        )


def refused_and_nothing_written(engine, error: type[PayguardError], op) -> PayguardError:
    """Run op in a unit of work that catches the refusal and commits; nothing may change."""
    before = everything(engine)
    caught: list[PayguardError] = []

    def attempt(conn):
        caught.clear()
        try:
            op(conn)
        except PayguardError as exc:
            caught.append(exc)

    tx(engine, attempt)
    assert len(caught) == 1, "the operation was not refused"
    assert type(caught[0]) is error, f"expected {error.__name__}, got {caught[0]!r}"
    assert everything(engine) == before, "a refused operation wrote something"
    return caught[0]


# --- idempotency --------------------------------------------------------------------------


def test_credit_delivered_twice_credits_once_and_returns_the_first_entry(engine):
    org = tx(engine, new_org)
    first = tx(engine, lambda c: wallet.credit(c, org, 500, "paypal:CAP-1"))
    again = tx(engine, lambda c: wallet.credit(c, org, 500, "paypal:CAP-1"))

    assert not first.duplicate and again.duplicate
    assert (again.id, again.amount_cents, again.balance_after_cents) == (first.id, 500, 500)
    assert len(journal(engine, org, "paypal:CAP-1")) == 1
    assert show(engine, org).balance_cents == 500


def test_credit_reference_reused_with_another_amount_is_a_conflict(engine):
    org = tx(engine, new_org)
    tx(engine, lambda c: wallet.credit(c, org, 500, "paypal:CAP-1"))

    refused_and_nothing_written(
        engine, Conflict, lambda c: wallet.credit(c, org, 501, "paypal:CAP-1")
    )
    assert show(engine, org).balance_cents == 500


def test_reference_reused_by_another_kind_of_operation_is_a_conflict(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.credit(c, org, 500, "ref-1"))

    refused_and_nothing_written(engine, Conflict, lambda c: wallet.debit(c, org, 500, "ref-1"))


def test_debit_delivered_twice_charges_once(engine):
    org = tx(engine, new_org, balance=1000)
    first = tx(engine, lambda c: wallet.debit(c, org, 300, "msg:1"))
    again = tx(engine, lambda c: wallet.debit(c, org, 300, "msg:1"))

    assert again.duplicate and again.id == first.id
    assert show(engine, org).balance_cents == 700
    assert len(journal(engine, org, "msg:1")) == 1


def test_adjustment_reference_reused_with_the_opposite_sign_is_a_conflict(engine):
    # +500 and -500 under one reference are different requests; replaying the second must
    # not be answered with the first as if the money had moved.
    org = tx(engine, new_org, balance=1000)
    tx(
        engine,
        lambda c: wallet.adjust(c, org, 500, reason="goodwill", actor="ann", reference="ticket-9"),
    )

    refused_and_nothing_written(
        engine,
        Conflict,
        lambda c: wallet.adjust(c, org, -500, reason="undo", actor="ann", reference="ticket-9"),
    )


# --- debits -------------------------------------------------------------------------------


def test_debit_of_exactly_the_available_amount_succeeds(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 400, "h1"))

    entry = tx(engine, lambda c: wallet.debit(c, org, 600, "d1"))

    assert (entry.amount_cents, entry.balance_after_cents) == (-600, 400)
    state = show(engine, org)
    assert (state.balance_cents, state.held_cents, state.available_cents) == (400, 400, 0)


def test_debit_refused_when_short_writes_nothing(engine):
    org = tx(engine, new_org, balance=1000)

    err = refused_and_nothing_written(engine, Refused, lambda c: wallet.debit(c, org, 1001, "d1"))
    assert "insufficient" in str(err)
    assert journal(engine, org, "d1") == []


def test_debit_refused_when_held_money_makes_it_short(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 600, "h1"))

    refused_and_nothing_written(engine, Refused, lambda c: wallet.debit(c, org, 401, "d1"))


def test_debit_refused_when_frozen_writes_nothing(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.freeze(c, org, "fraud-review", actor="ops"))

    err = refused_and_nothing_written(engine, Refused, lambda c: wallet.debit(c, org, 1, "d1"))
    assert "frozen" in str(err)
    assert journal(engine, org, "d1") == []


# --- holds --------------------------------------------------------------------------------


def test_partial_capture_charges_that_part_and_releases_the_rest(engine):
    org = tx(engine, new_org, balance=1000)
    held = tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))
    assert (held.status, held.amount_cents) == ("open", 300)
    assert show(engine, org).available_cents == 700

    captured = tx(engine, lambda c: wallet.capture(c, org, "sms-1", 120))

    assert (captured.status, captured.captured_cents) == ("captured", 120)
    state = show(engine, org)
    assert (state.balance_cents, state.held_cents, state.available_cents) == (880, 0, 880)
    [row] = journal(engine, org, "hold:sms-1")
    assert (row.kind, row.amount_cents, row.balance_after_cents) == ("capture", -120, 880)


def test_capture_twice_returns_the_first_capture_and_charges_once(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))
    first = tx(engine, lambda c: wallet.capture(c, org, "sms-1"))
    before = everything(engine)

    again = tx(engine, lambda c: wallet.capture(c, org, "sms-1"))

    assert again.duplicate and (again.id, again.captured_cents) == (first.id, 300)
    assert everything(engine) == before
    assert show(engine, org).balance_cents == 700


def test_release_gives_the_hold_back_once(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))

    released = tx(engine, lambda c: wallet.release(c, org, "sms-1"))
    assert released.status == "released" and not released.duplicate
    state = show(engine, org)
    assert (state.balance_cents, state.held_cents, state.available_cents) == (1000, 0, 1000)

    before = everything(engine)
    assert tx(engine, lambda c: wallet.release(c, org, "sms-1")).duplicate
    assert everything(engine) == before
    assert journal(engine, org, "hold:sms-1") == []


def test_capture_after_release_is_a_conflict(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))
    tx(engine, lambda c: wallet.release(c, org, "sms-1"))

    refused_and_nothing_written(engine, Conflict, lambda c: wallet.capture(c, org, "sms-1"))
    assert show(engine, org).balance_cents == 1000


def test_release_after_capture_is_a_conflict(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))
    tx(engine, lambda c: wallet.capture(c, org, "sms-1"))

    refused_and_nothing_written(engine, Conflict, lambda c: wallet.release(c, org, "sms-1"))


def test_capture_of_more_than_was_held_is_refused(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))

    refused_and_nothing_written(
        engine, InvalidInput, lambda c: wallet.capture(c, org, "sms-1", 301)
    )


def test_hold_refused_when_short_or_frozen(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 700, "sms-1"))
    refused_and_nothing_written(engine, Refused, lambda c: wallet.hold(c, org, 301, "sms-2"))

    tx(engine, lambda c: wallet.freeze(c, org, "ops", actor="ops"))
    refused_and_nothing_written(engine, Refused, lambda c: wallet.hold(c, org, 1, "sms-3"))


def test_hold_placed_twice_holds_once(engine):
    org = tx(engine, new_org, balance=1000)
    first = tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))
    again = tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))

    assert again.duplicate and again.id == first.id
    assert show(engine, org).held_cents == 300
    refused_and_nothing_written(engine, Conflict, lambda c: wallet.hold(c, org, 299, "sms-1"))


# --- freezes ------------------------------------------------------------------------------


def test_freeze_reasons_stack_and_lift_one_at_a_time(engine):
    org = tx(engine, new_org, balance=1000)
    assert tx(engine, lambda c: wallet.freeze(c, org, "fraud", actor="ann"))
    assert tx(engine, lambda c: wallet.freeze(c, org, "kyc", actor="bob"))
    assert not tx(engine, lambda c: wallet.freeze(c, org, "kyc", actor="bob"))  # already on
    assert show(engine, org).freeze_reasons == ("fraud", "kyc")

    assert tx(engine, lambda c: wallet.unfreeze(c, org, "fraud", actor="ann"))

    state = show(engine, org)
    assert state.frozen and state.freeze_reasons == ("kyc",)
    refused_and_nothing_written(engine, Refused, lambda c: wallet.debit(c, org, 1, "d1"))

    assert not tx(engine, lambda c: wallet.unfreeze(c, org, "fraud", actor="ann"))
    assert tx(engine, lambda c: wallet.unfreeze(c, org, "kyc", actor="bob"))
    assert not show(engine, org).frozen
    tx(engine, lambda c: wallet.debit(c, org, 1, "d1"))
    assert tx(engine, wallet.verify) == []


# --- clawback and debt --------------------------------------------------------------------


def test_clawback_takes_what_is_available_and_records_the_rest_as_debt(engine):
    org = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 200, "sms-1"))

    entry = tx(engine, lambda c: wallet.clawback(c, org, 1500, "refund-1"))

    assert (entry.amount_cents, entry.debt_delta_cents, entry.requested_cents) == (-800, 700, 1500)
    state = show(engine, org)
    assert (state.balance_cents, state.held_cents, state.debt_cents) == (200, 200, 700)
    assert state.freeze_reasons == ("debt",)
    assert tx(engine, lambda c: wallet.clawback(c, org, 1500, "refund-1")).duplicate
    assert show(engine, org).debt_cents == 700


def test_credit_pays_debt_first_and_lifts_only_the_debt_freeze(engine):
    org = tx(engine, new_org, balance=100)
    tx(engine, lambda c: wallet.clawback(c, org, 800, "chargeback-1"))  # debt 700
    tx(engine, lambda c: wallet.freeze(c, org, "fraud", actor="ann"))

    partial = tx(engine, lambda c: wallet.credit(c, org, 500, "pay-2"))
    assert (partial.amount_cents, partial.debt_delta_cents) == (0, -500)
    state = show(engine, org)
    assert (state.balance_cents, state.debt_cents) == (0, 200)
    assert set(state.freeze_reasons) == {"debt", "fraud"}

    paid = tx(engine, lambda c: wallet.credit(c, org, 300, "pay-3"))

    assert (paid.amount_cents, paid.debt_delta_cents, paid.debt_after_cents) == (100, -200, 0)
    state = show(engine, org)
    assert (state.balance_cents, state.debt_cents) == (100, 0)
    assert state.freeze_reasons == ("fraud",)
    assert tx(engine, wallet.verify) == []


def test_credit_that_clears_debt_unfreezes_the_wallet(engine):
    org = tx(engine, new_org)
    tx(engine, lambda c: wallet.clawback(c, org, 250, "chargeback-1"))
    assert show(engine, org).frozen

    tx(engine, lambda c: wallet.credit(c, org, 250, "pay-2"))

    state = show(engine, org)
    assert (state.balance_cents, state.debt_cents, state.frozen) == (0, 0, False)
    tx(engine, lambda c: wallet.credit(c, org, 50, "pay-3"))
    tx(engine, lambda c: wallet.debit(c, org, 50, "d1"))


def test_debt_freeze_cannot_be_lifted_by_hand_while_debt_is_owed(engine):
    org = tx(engine, new_org, balance=100)
    tx(engine, lambda c: wallet.clawback(c, org, 300, "chargeback-1"))

    refused_and_nothing_written(
        engine, Refused, lambda c: wallet.unfreeze(c, org, wallet.DEBT_FREEZE, actor="ann")
    )
    assert show(engine, org).freeze_reasons == ("debt",)


# --- manual adjustments -------------------------------------------------------------------


def test_adjustment_is_journaled_with_actor_and_reason(engine):
    org = tx(engine, new_org, balance=1000)

    up = tx(engine, lambda c: wallet.adjust(c, org, 250, reason="goodwill", actor="ann"))
    down = tx(engine, lambda c: wallet.adjust(c, org, -150, reason="double credit", actor="bob"))

    rows = journal(engine, org)[1:]
    assert [(r.id, r.kind, r.amount_cents, r.actor, r.reason) for r in rows] == [
        (up.id, "adjustment", 250, "ann", "goodwill"),
        (down.id, "adjustment", -150, "bob", "double credit"),
    ]
    assert show(engine, org).balance_cents == 1100


def test_adjustment_below_zero_is_refused(engine):
    org = tx(engine, new_org, balance=300)
    tx(engine, lambda c: wallet.hold(c, org, 100, "sms-1"))

    refused_and_nothing_written(
        engine, Refused, lambda c: wallet.adjust(c, org, -201, reason="fix", actor="ann")
    )
    tx(engine, lambda c: wallet.adjust(c, org, -200, reason="fix", actor="ann"))
    assert show(engine, org).available_cents == 0


def test_negative_adjustment_works_on_a_frozen_wallet(engine):
    org = tx(engine, new_org, balance=300)
    tx(engine, lambda c: wallet.freeze(c, org, "fraud", actor="ann"))

    tx(engine, lambda c: wallet.adjust(c, org, -300, reason="reversal", actor="ann"))

    assert show(engine, org).balance_cents == 0


@pytest.mark.parametrize(("reason", "actor"), [("", "ann"), ("why", ""), (None, "ann")])
def test_adjustment_without_reason_or_actor_is_refused(engine, reason, actor):
    org = tx(engine, new_org, balance=300)
    refused_and_nothing_written(
        engine, InvalidInput, lambda c: wallet.adjust(c, org, 100, reason=reason, actor=actor)
    )


# --- bad input ----------------------------------------------------------------------------

BAD_AMOUNTS = [0, -5, 1.5, 100.0, True, "100", None]
OPS_WITH_AMOUNT = {
    "credit": lambda c, org, amt: wallet.credit(c, org, amt, "r1"),
    "debit": lambda c, org, amt: wallet.debit(c, org, amt, "r1"),
    "hold": lambda c, org, amt: wallet.hold(c, org, amt, "r1"),
    "clawback": lambda c, org, amt: wallet.clawback(c, org, amt, "r1"),
    "adjust": lambda c, org, amt: wallet.adjust(c, org, amt, reason="x", actor="ann"),
}


# Every operation with every bad amount, but for a negative adjustment: that is a valid debit.
BAD_AMOUNT_CASES = [
    pytest.param(op, amount, id=f"{amount!r}-{op}")
    for op in OPS_WITH_AMOUNT
    for amount in BAD_AMOUNTS
    if not (op == "adjust" and amount == -5)
]


@pytest.mark.parametrize(("op", "amount"), BAD_AMOUNT_CASES)
def test_bad_amount_is_refused_and_writes_nothing(engine, op, amount):
    org = tx(engine, new_org, balance=1000)
    refused_and_nothing_written(engine, InvalidInput, lambda c: OPS_WITH_AMOUNT[op](c, org, amount))


@pytest.mark.parametrize(
    "op",
    [
        lambda c: wallet.credit(c, "ghost", 100, "r1"),
        lambda c: wallet.debit(c, "ghost", 100, "r1"),
        lambda c: wallet.hold(c, "ghost", 100, "r1"),
        lambda c: wallet.clawback(c, "ghost", 100, "r1"),
        lambda c: wallet.adjust(c, "ghost", 100, reason="x", actor="ann"),
        lambda c: wallet.adjust(c, "ghost", -100, reason="x", actor="ann"),
        lambda c: wallet.freeze(c, "ghost", "fraud", actor="ann"),
        lambda c: wallet.unfreeze(c, "ghost", "fraud", actor="ann"),
        lambda c: wallet.capture(c, "ghost", "r1"),
        lambda c: wallet.release(c, "ghost", "r1"),
        lambda c: wallet.show(c, "ghost"),
        lambda c: wallet.verify(c, "ghost"),
    ],
    ids=[
        "credit",
        "debit",
        "hold",
        "clawback",
        "adjust+",
        "adjust-",
        "freeze",
        "unfreeze",
        "capture",
        "release",
        "show",
        "verify",
    ],
)
def test_unknown_organization_is_not_found_and_writes_nothing(engine, op):
    tx(engine, new_org, balance=1000)
    refused_and_nothing_written(engine, NotFound, op)


@pytest.mark.parametrize("op", ["credit", "clawback"])
def test_currency_other_than_the_wallets_is_refused(engine, op):
    org = tx(engine, new_org, balance=1000, currency="USD")
    fn = getattr(wallet, op)
    refused_and_nothing_written(
        engine, InvalidInput, lambda c: fn(c, org, 100, "r1", currency="EUR")
    )
    # the right currency, in any case, is accepted
    tx(engine, lambda c: fn(c, org, 100, "r1", currency="usd"))


@pytest.mark.parametrize("op", ["credit", "debit", "hold", "clawback"])
@pytest.mark.parametrize("reference", ["x" * 201, "", "   ", None, 42])
def test_bad_reference_is_refused_and_writes_nothing(engine, op, reference):
    org = tx(engine, new_org, balance=1000)
    fn = getattr(wallet, op)
    refused_and_nothing_written(engine, InvalidInput, lambda c: fn(c, org, 100, reference))


def test_reference_of_exactly_200_characters_is_accepted(engine):
    org = tx(engine, new_org)
    tx(engine, lambda c: wallet.credit(c, org, 100, "x" * 200))
    assert len(journal(engine, org, "x" * 200)) == 1


# --- verification -------------------------------------------------------------------------


def test_verify_finds_nothing_on_a_consistent_ledger(engine):
    org = tx(engine, new_org, balance=1000)
    other = tx(engine, new_org, balance=50)
    tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))
    tx(engine, lambda c: wallet.capture(c, org, "sms-1", 100))
    tx(engine, lambda c: wallet.clawback(c, other, 80, "cb-1"))
    tx(engine, lambda c: wallet.freeze(c, org, "kyc", actor="ann"))

    assert tx(engine, wallet.verify) == []
    assert tx(engine, lambda c: wallet.verify(c, org)) == []


@pytest.mark.parametrize(
    ("field", "tamper"),
    [
        ("balance_cents", "balance_cents = balance_cents + 7"),
        ("held_cents", "held_cents = held_cents + 7"),
        ("debt_cents", "debt_cents = debt_cents + 7"),
        ("active_freezes", "active_freezes = active_freezes + 1"),
    ],
)
def test_verify_reports_a_wallet_tampered_with_by_sql(engine, field, tamper):
    org = tx(engine, new_org, balance=1000)
    honest = tx(engine, new_org, balance=1000)
    tx(engine, lambda c: wallet.hold(c, org, 300, "sms-1"))
    stored_before = getattr(
        tx(
            engine,
            lambda c: c.execute(text("SELECT * FROM wallets WHERE org_id = :o"), {"o": org}).one(),
        ),
        field,
    )

    with engine.begin() as c:
        c.execute(text(f"UPDATE wallets SET {tamper} WHERE org_id = :o"), {"o": org})

    stored = stored_before + 7 if field != "active_freezes" else stored_before + 1
    expected = [wallet.Mismatch(org, field, stored, stored_before)]
    assert tx(engine, wallet.verify) == expected
    assert tx(engine, lambda c: wallet.verify(c, org)) == expected
    assert tx(engine, lambda c: wallet.verify(c, honest)) == []


# --- the journal is append-only in the database itself -------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE journal SET amount_cents = amount_cents + 1 WHERE org_id = :o",
        "UPDATE journal SET reason = 'edited' WHERE org_id = :o",
        "DELETE FROM journal WHERE org_id = :o",
        "TRUNCATE journal",
        "TRUNCATE journal CASCADE",
    ],
)
def test_database_refuses_to_rewrite_the_journal(engine, statement):
    org = tx(engine, new_org, balance=1000)
    before = journal(engine, org)

    with pytest.raises(DBAPIError) as raised, engine.begin() as c:
        c.execute(text(statement), {"o": org})

    assert raised.value.orig.sqlstate == "23001"  # restrict_violation from the trigger
    assert "never updated or deleted" in str(raised.value.orig)
    assert journal(engine, org) == before
