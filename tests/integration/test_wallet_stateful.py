"""Random sequences of every wallet operation on two wallets, checked against a pure Python
model of the rules of money after every step.

The journal is append-only even against DELETE, so each example works on wallets of its own
(fresh organization ids) in the one database of the test.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

from core import orgs, wallet
from core.db import run_in_transaction
from core.errors import Conflict, InvalidInput, PayguardError, Refused

pytestmark = pytest.mark.slow

REASONS = ("fraud", "kyc", wallet.DEBT_FREEZE)
WALLETS = st.sampled_from([0, 1])
SEED = 3_000  # each wallet starts with money, so holds and debits are not all refused


@dataclass
class Op:
    """An accepted journal operation, enough to deliver it again."""

    fn: str  # credit | debit | clawback | adjust
    amount: int  # signed for adjust


@dataclass
class Model:
    balance: int = 0
    held: int = 0
    debt: int = 0
    reasons: set[str] = field(default_factory=set)
    holds: dict[str, list] = field(default_factory=dict)  # ref -> [amount, status, captured]
    ops: dict[str, Op] = field(default_factory=dict)  # journal reference -> what it was

    @property
    def available(self) -> int:
        return self.balance - self.held

    def credit(self, amount: int) -> None:
        paid = min(self.debt, amount)
        self.balance += amount - paid
        self.debt -= paid
        if paid and not self.debt:
            self.reasons.discard(wallet.DEBT_FREEZE)

    def take(self, amount: int, check_freeze: bool = True) -> bool:
        if (check_freeze and self.reasons) or amount > self.available:
            return False
        self.balance -= amount
        return True

    def clawback(self, amount: int) -> None:
        taken = min(amount, self.available)
        self.balance -= taken
        self.debt += amount - taken
        if amount > taken:
            self.reasons.add(wallet.DEBT_FREEZE)


def call(org: str, op: Op, ref: str):
    """The wallet call that delivers op under ref, as a unit of work's body."""
    if op.fn == "adjust":
        return lambda c: wallet.adjust(
            c, org, op.amount, reason="test", actor="prop", reference=ref
        )
    return lambda c: getattr(wallet, op.fn)(c, org, op.amount, ref)


class WalletMachine(RuleBasedStateMachine):
    engine = None  # bound by the test

    def __init__(self) -> None:
        super().__init__()
        run = uuid.uuid4().hex[:10]
        self.orgs = [f"sm-{run}-a", f"sm-{run}-b"]
        self.models = [Model(), Model()]
        self.n = 0

        def create(conn):
            for org, m in zip(self.orgs, self.models, strict=True):
                orgs.create(conn, org)
                wallet.credit(conn, org, SEED, "seed")
                m.credit(SEED)
                m.ops["seed"] = Op("credit", SEED)

        self.tx(create)

    # -- plumbing

    def tx(self, fn):
        return run_in_transaction(self.engine, fn)

    def outcome(self, fn):
        """Run fn as a unit of work; return its result, or the refusal it raised."""
        try:
            return self.tx(fn)
        except PayguardError as exc:
            return exc

    def new_ref(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def journal_op(self, w: int, op: Op) -> None:
        """Deliver a new journal operation and check the database agrees with the model."""
        m, org, ref = self.models[w], self.orgs[w], self.new_ref()
        got = self.outcome(call(org, op, ref))
        if op.fn == "credit" or (op.fn == "adjust" and op.amount > 0):
            m.credit(abs(op.amount))
            accepted = True
        elif op.fn == "clawback":
            m.clawback(op.amount)
            accepted = True
        else:
            accepted = m.take(abs(op.amount), check_freeze=op.fn == "debit")
        if not accepted:
            assert isinstance(got, Refused), got
            return
        assert isinstance(got, wallet.Entry) and not got.duplicate, got
        assert (got.balance_after_cents, got.debt_after_cents) == (m.balance, m.debt)
        m.ops[ref] = op

    # -- rules

    @rule(w=WALLETS, amount=st.integers(1, 2_000))
    def credit(self, w, amount):
        self.journal_op(w, Op("credit", amount))

    @rule(w=WALLETS, amount=st.integers(1, 800))
    def debit(self, w, amount):
        self.journal_op(w, Op("debit", amount))

    @rule(w=WALLETS, amount=st.integers(1, 1_000))
    def clawback(self, w, amount):
        self.journal_op(w, Op("clawback", amount))

    @rule(w=WALLETS, amount=st.integers(-800, 800).filter(bool))
    def adjust(self, w, amount):
        self.journal_op(w, Op("adjust", amount))

    @rule(w=WALLETS, amount=st.integers(1, 800))
    def hold(self, w, amount):
        m, ref = self.models[w], self.new_ref()
        got = self.outcome(lambda c: wallet.hold(c, self.orgs[w], amount, ref))
        if m.reasons or amount > m.available:
            assert isinstance(got, Refused), got
            return
        assert isinstance(got, wallet.Hold) and got.status == "open", got
        m.held += amount
        m.holds[ref] = [amount, "open", None]

    @precondition(lambda self: any(m.holds for m in self.models))
    @rule(data=st.data())
    def capture(self, data):
        w, m, ref = self.pick_hold(data)
        amount, status, captured = m.holds[ref]
        cap = data.draw(st.none() | st.integers(0, amount + 50), label="capture")
        got = self.outcome(lambda c: wallet.capture(c, self.orgs[w], ref, cap))
        if status == "released":
            assert isinstance(got, Conflict), got
        elif status == "captured":
            assert got.duplicate and (got.status, got.captured_cents) == (status, captured)
        elif cap is not None and cap > amount:
            assert isinstance(got, InvalidInput), got
        else:
            cap = amount if cap is None else cap
            assert (got.status, got.captured_cents, got.duplicate) == ("captured", cap, False)
            m.holds[ref] = [amount, "captured", cap]
            m.held -= amount
            m.balance -= cap

    @precondition(lambda self: any(m.holds for m in self.models))
    @rule(data=st.data())
    def release(self, data):
        w, m, ref = self.pick_hold(data)
        amount, status, _ = m.holds[ref]
        got = self.outcome(lambda c: wallet.release(c, self.orgs[w], ref))
        if status == "captured":
            assert isinstance(got, Conflict), got
        else:
            assert (got.status, got.duplicate) == ("released", status == "released"), got
            if status == "open":
                m.holds[ref] = [amount, "released", 0]
                m.held -= amount

    @rule(w=WALLETS, reason=st.sampled_from(REASONS))
    def freeze(self, w, reason):
        m = self.models[w]
        got = self.tx(lambda c: wallet.freeze(c, self.orgs[w], reason, actor="prop"))
        assert got == (reason not in m.reasons)
        m.reasons.add(reason)

    @rule(w=WALLETS, data=st.data())
    def unfreeze(self, w, data):
        m = self.models[w]
        # Mostly a reason that is on, so wallets do not stay frozen for whole examples.
        reason = data.draw(st.sampled_from(sorted(m.reasons) or REASONS) | st.sampled_from(REASONS))
        got = self.outcome(lambda c: wallet.unfreeze(c, self.orgs[w], reason, actor="prop"))
        if reason == wallet.DEBT_FREEZE and m.debt:
            assert isinstance(got, Refused), got  # only paying the debt lifts it
            return
        assert got == (reason in m.reasons)
        m.reasons.discard(reason)

    @precondition(lambda self: any(m.ops for m in self.models))
    @rule(data=st.data())
    def deliver_again(self, data):
        """An accepted reference delivered again: the same request changes nothing; another
        amount or another operation under it is a Conflict, and changes nothing either."""
        w = data.draw(st.sampled_from([i for i, m in enumerate(self.models) if m.ops]))
        m, org = self.models[w], self.orgs[w]
        ref = data.draw(st.sampled_from(sorted(m.ops)), label="reference")
        op = m.ops[ref]
        sign = -1 if op.amount < 0 else 1
        variant = data.draw(
            st.sampled_from(["same", "other amount", "other sign", "credit", "debit", "clawback"]),
            label="variant",
        )
        if variant == "same":
            again = op
        elif variant == "other amount":
            again = Op(op.fn, op.amount + sign)
        elif variant == "other sign":
            if op.fn != "adjust":
                return
            again = Op(op.fn, -op.amount)
        elif variant == op.fn:
            return
        elif op.fn == "adjust":
            # The operator's reference is stored as op:<ref>: the same text given to another
            # operation is another reference altogether (test_security_money covers it).
            return
        else:
            again = Op(variant, abs(op.amount))
        got = self.outcome(call(org, again, ref))
        if again is op:
            assert isinstance(got, wallet.Entry) and got.duplicate, got
        else:
            assert isinstance(got, Conflict), got

    @precondition(lambda self: any(m.holds for m in self.models))
    @rule(data=st.data())
    def hold_again(self, data):
        w, m, ref = self.pick_hold(data)
        amount = m.holds[ref][0]
        other = data.draw(st.booleans(), label="other amount")
        got = self.outcome(lambda c: wallet.hold(c, self.orgs[w], amount + other, ref))
        if other:
            assert isinstance(got, Conflict), got
        else:
            assert isinstance(got, wallet.Hold) and got.duplicate, got

    def pick_hold(self, data):
        w = data.draw(st.sampled_from([i for i, m in enumerate(self.models) if m.holds]))
        m = self.models[w]
        return w, m, data.draw(st.sampled_from(sorted(m.holds)), label="hold")

    # -- invariants, after every step

    @invariant()
    def database_agrees_with_the_model_and_the_rules(self):
        with self.engine.connect() as c:
            for org, m in zip(self.orgs, self.models, strict=True):
                w = c.execute(text("SELECT * FROM wallets WHERE org_id = :o"), {"o": org}).one()
                j = c.execute(
                    text(
                        "SELECT coalesce(sum(amount_cents), 0) AS balance, "
                        "coalesce(sum(debt_delta_cents), 0) AS debt, "
                        "array_agg(reference) FILTER (WHERE kind <> 'capture') AS refs "
                        "FROM journal WHERE org_id = :o"
                    ),
                    {"o": org},
                ).one()
                holds = {
                    r.reference: [r.amount_cents, r.status, r.captured_cents]
                    for r in c.execute(text("SELECT * FROM holds WHERE org_id = :o"), {"o": org})
                }
                state = wallet.show(c, org)
                # The rules, from the database alone.
                assert w.balance_cents >= 0 and state.available_cents >= 0
                assert w.held_cents == sum(a for a, s, _ in holds.values() if s == "open")
                assert (w.balance_cents, w.debt_cents) == (j.balance, j.debt)
                assert state.frozen == (w.active_freezes > 0) == bool(state.freeze_reasons)
                # The model.
                assert (w.balance_cents, w.held_cents, w.debt_cents) == (m.balance, m.held, m.debt)
                assert set(state.freeze_reasons) == m.reasons
                assert holds == m.holds
                assert set(j.refs or ()) == {
                    wallet.OPERATOR_PREFIX + ref if op.fn == "adjust" else ref
                    for ref, op in m.ops.items()
                }
            assert wallet.verify(c) == []


def test_random_wallet_operations_keep_the_ledger_consistent(engine):
    machine = type("WalletMachineOnTestDatabase", (WalletMachine,), {"engine": engine})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=50, stateful_step_count=30, deadline=None),
    )
