"""The wallet under real concurrency: threads, each with its own connection, racing one wallet.

What must hold however the races fall: no balance below zero, the balance equal to its
journal, a reference applied once, holds never beyond the balance, a hold settled once.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
from sqlalchemy import text

from core import wallet
from core.db import make_engine, run_in_transaction
from core.errors import Conflict, Refused
from tests.support.db import tx
from tests.support.factories import new_org

pytestmark = pytest.mark.slow

# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def pool(database_url):
    """An engine with a connection for every thread these tests start."""
    eng = make_engine(database_url, pool_size=40, max_overflow=10)
    yield eng
    eng.dispose()


def race(pool, n: int, op) -> tuple[list, int]:
    """Run op(conn, i) as a unit of work on n threads; return each result or exception, and
    how many units were run again after losing a race (RetryableConflict).

    Every thread checks out its connection and begins its transaction before a barrier
    releases them together, so the statements really overlap (connecting alone takes long
    enough for the first thread to finish before the last one starts)."""
    barrier = threading.Barrier(n)
    retries = Counter()

    def run(i: int):
        first_attempt = [True]

        def unit(conn):
            conn.execute(text("SELECT 1"))
            if first_attempt[0]:  # retries of a lost race go straight on
                first_attempt[0] = False
                barrier.wait(timeout=60)
            else:
                retries[i] += 1
            return op(conn, i)

        return run_in_transaction(pool, unit)

    results = on_threads(n, run)
    return results, sum(retries.values())


def on_threads(n: int, work) -> list:
    """Run work(i) on n threads started together; return each result or exception."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait(timeout=60)
        try:
            results[i] = work(i)
        except Exception as exc:  # collected and judged by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return results


def journal(engine, org: str) -> list:
    with engine.connect() as c:
        return list(
            c.execute(text("SELECT * FROM journal WHERE org_id = :o ORDER BY id"), {"o": org})
        )


def show(engine, org: str) -> wallet.WalletState:
    return run_in_transaction(engine, lambda c: wallet.show(c, org))


def assert_consistent(engine, org: str) -> None:
    state = show(engine, org)
    rows = journal(engine, org)
    assert state.balance_cents >= 0 and state.available_cents >= 0
    assert state.balance_cents == sum(r.amount_cents for r in rows)
    assert run_in_transaction(engine, wallet.verify) == []


# --- tests --------------------------------------------------------------------------------

THREADS, DEBITS_EACH, START = 32, 200, 1_500_000


def test_concurrent_debits_never_overdraw_and_refuse_only_what_did_not_fit(pool):
    org = tx(pool, new_org, balance=START)
    rng = random.Random(20261126)
    plans = [
        [(f"t{t}-d{i}", rng.randint(1, 1000)) for i in range(DEBITS_EACH)] for t in range(THREADS)
    ]

    def debit_all(t: int) -> list:
        outcomes = []
        for ref, amount in plans[t]:
            try:
                run_in_transaction(pool, lambda c, r=ref, a=amount: wallet.debit(c, org, a, r))
                outcomes.append((ref, amount, "ok"))
            except Refused:
                outcomes.append((ref, amount, "refused"))
        return outcomes

    results = on_threads(THREADS, debit_all)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    outcomes = [o for per_thread in results for o in per_thread]
    accepted = {ref: amount for ref, amount, how in outcomes if how == "ok"}
    refused = [amount for _, amount, how in outcomes if how == "refused"]
    final = show(pool, org).balance_cents

    # The scenario really ran out of money (else refusals went untested).
    assert accepted and refused
    assert len(accepted) + len(refused) == THREADS * DEBITS_EACH
    # Money: nothing lost, nothing invented, never below zero.
    assert final == START - sum(accepted.values()) >= 0
    # The journal holds exactly the accepted debits, each with its own amount, once.
    rows = journal(pool, org)
    debits = {r.reference: -r.amount_cents for r in rows if r.kind == "debit"}
    assert len(debits) == len(rows) - 1 == len(accepted)
    assert debits == accepted
    # Applied one at a time: each row's balance_after follows from the one before it.
    balance = 0
    for r in rows:
        balance += r.amount_cents
        assert r.balance_after_cents == balance >= 0
    # Balances only went down, so a debit refused for want of money asked for more than even
    # the final balance: any refused amount that would fit now was refused wrongly.
    assert min(refused) > final
    assert_consistent(pool, org)


def test_credit_delivered_50_times_at_once_credits_once(pool):
    # The overlap is real but its timing is not: race again (fresh wallet) until a thread
    # lost it, so the assertions below judge a race and not a sequence.
    for _ in range(5):
        org = tx(pool, new_org, balance=1000)
        results, retries = race(
            pool, 50, lambda c, i, org=org: wallet.credit(c, org, 700, "paypal:CAPTURE-1")
        )
        if retries:
            break
    assert retries, "no thread lost the race in 5 rounds: the test did not race"
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({r.id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert [r.reference for r in journal(pool, org)] == [f"seed:{org}", "paypal:CAPTURE-1"]
    assert show(pool, org).balance_cents == 1700
    assert_consistent(pool, org)


def test_charge_delivered_50_times_at_once_charges_once(pool):
    # The overlap is real but its timing is not: race again (fresh wallet) until a thread
    # lost it, so the assertions below judge a race and not a sequence.
    for _ in range(5):
        org = tx(pool, new_org, balance=1000)
        results, retries = race(pool, 50, lambda c, i, org=org: wallet.debit(c, org, 300, "msg:42"))
        if retries:
            break
    assert retries, "no thread lost the race in 5 rounds: the test did not race"
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({r.id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert show(pool, org).balance_cents == 700
    assert_consistent(pool, org)


def test_clawback_delivered_50_times_at_once_takes_back_once(pool):
    # The overlap is real but its timing is not: race again (fresh wallet) until a thread
    # lost it, so the assertions below judge a race and not a sequence.
    for _ in range(5):
        org = tx(pool, new_org, balance=1000)
        results, retries = race(
            pool, 50, lambda c, i, org=org: wallet.clawback(c, org, 1300, "dispute-1")
        )
        if retries:
            break
    assert retries, "no thread lost the race in 5 rounds: the test did not race"
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({r.id for r in results}) == 1
    state = show(pool, org)
    assert (state.balance_cents, state.debt_cents, state.freeze_reasons) == (0, 300, ("debt",))
    assert_consistent(pool, org)


def test_concurrent_equal_holds_fit_exactly_as_many_as_the_balance_allows(pool):
    org = tx(pool, new_org, balance=10_000)

    results, _ = race(pool, 40, lambda c, i: wallet.hold(c, org, 700, f"sms-{i}"))

    placed = [r for r in results if isinstance(r, wallet.Hold)]
    refused = [r for r in results if isinstance(r, Refused)]
    assert len(placed) + len(refused) == 40, results
    assert len(placed) == 10_000 // 700
    state = show(pool, org)
    assert state.held_cents == len(placed) * 700 <= state.balance_cents == 10_000
    assert_consistent(pool, org)


def test_concurrent_holds_of_random_amounts_never_exceed_the_balance(pool):
    org = tx(pool, new_org, balance=20_000)
    rng = random.Random(7)
    amounts = [rng.randint(1, 2_000) for _ in range(40)]

    results, _ = race(pool, 40, lambda c, i: wallet.hold(c, org, amounts[i], f"sms-{i}"))

    placed = [amounts[i] for i, r in enumerate(results) if isinstance(r, wallet.Hold)]
    refused = [amounts[i] for i, r in enumerate(results) if isinstance(r, Refused)]
    assert len(placed) + len(refused) == 40, results
    assert refused, "the scenario must run out of money"
    state = show(pool, org)
    assert state.held_cents == sum(placed) <= state.balance_cents
    # Availability only shrank, so every refused hold would not fit even now.
    assert min(refused) > state.available_cents
    assert_consistent(pool, org)


def test_concurrent_capture_and_release_of_one_hold_settle_it_once(pool):
    org = tx(pool, new_org, balance=100_000)
    captured_total = 0
    for n in range(20):
        ref = f"sms-{n}"
        run_in_transaction(pool, lambda c, r=ref: wallet.hold(c, org, 500, r))

        def settle(conn, i: int, r=ref):
            if i % 2:
                return wallet.capture(conn, org, r, 200)
            return wallet.release(conn, org, r)

        results, _ = race(pool, 16, settle)

        holds = [r for r in results if isinstance(r, wallet.Hold)]
        conflicts = [r for r in results if isinstance(r, Conflict)]
        assert len(holds) + len(conflicts) == 16, results
        assert len({(h.status, h.captured_cents) for h in holds}) == 1
        assert sum(not h.duplicate for h in holds) == 1
        status = holds[0].status
        # The losing side all got Conflict; the winning side all got the same hold.
        assert len(holds) == 8 and len(conflicts) == 8
        captures = [r for r in journal(pool, org) if r.reference == f"hold:{ref}"]
        if status == "captured":
            captured_total += 200
            assert [r.amount_cents for r in captures] == [-200]
        else:
            assert captures == []
        state = show(pool, org)
        assert (state.balance_cents, state.held_cents) == (100_000 - captured_total, 0)
    assert_consistent(pool, org)


def test_concurrent_freezes_of_one_reason_count_once(pool):
    org = tx(pool, new_org, balance=1000)

    results, _ = race(pool, 30, lambda c, i: wallet.freeze(c, org, "fraud", actor=f"op{i}"))

    assert Counter(results) == Counter({True: 1, False: 29}), results
    run_in_transaction(pool, lambda c: wallet.unfreeze(c, org, "fraud", actor="ann"))
    assert not show(pool, org).frozen
    assert_consistent(pool, org)


def test_unit_of_work_that_loses_a_deadlock_is_run_again(pool):
    # Two units of work debit the same two wallets in opposite orders, so PostgreSQL aborts
    # one of them as a deadlock (SQLSTATE 40P01), which run_in_transaction promises to run
    # again. Both must land, each debit once.
    a, b = tx(pool, new_org, balance=1000), tx(pool, new_org, balance=1000)
    orders = [(a, b), (b, a)]
    both_hold_one = threading.Barrier(2)
    attempts = Counter()

    def debit_both(conn, i):
        attempts[i] += 1
        first, second = orders[i]
        wallet.debit(conn, first, 10, f"batch-{i}-first")
        if attempts[i] == 1:
            both_hold_one.wait(timeout=30)  # each holds one wallet and now wants the other
        wallet.debit(conn, second, 10, f"batch-{i}-second")
        return attempts[i]

    results, retries = race(pool, 2, debit_both)

    assert not [r for r in results if isinstance(r, Exception)], results
    assert retries == 1  # exactly one unit lost the deadlock and ran again
    for org in (a, b):
        assert show(pool, org).balance_cents == 980
        assert_consistent(pool, org)


def test_debt_freeze_is_not_lifted_by_hand_while_a_clawback_brings_debt(pool):
    # An operator lifts a `debt` freeze (set by hand, nothing owed yet) while a clawback that
    # leaves debt is committing. If unfreeze reads the debt without waiting for the wallet's
    # row lock it sees 0, then lifts the freeze once the clawback has committed: a wallet in
    # debt that is not frozen.
    org = tx(pool, new_org, balance=100)
    run_in_transaction(pool, lambda c: wallet.freeze(c, org, wallet.DEBT_FREEZE, actor="ann"))
    outcome: list = []

    def lift() -> None:
        try:
            outcome.append(
                run_in_transaction(
                    pool, lambda c: wallet.unfreeze(c, org, wallet.DEBT_FREEZE, actor="ann")
                )
            )
        except Exception as exc:  # judged below
            outcome.append(exc)

    with pool.connect() as clawback:
        wallet.clawback(clawback, org, 300, "chargeback-1")  # holds the wallet row; debt 200
        lifting = threading.Thread(target=lift)
        lifting.start()
        lifting.join(timeout=1)  # now waiting on the wallet row, or (wrongly) past its check
        clawback.commit()
    lifting.join(timeout=30)

    state = show(pool, org)
    assert state.debt_cents == 200
    assert state.freeze_reasons == ("debt",), (state, outcome)
    assert len(outcome) == 1 and isinstance(outcome[0], Refused), outcome
    assert_consistent(pool, org)
