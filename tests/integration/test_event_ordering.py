"""Events that arrive in the wrong order or carry bytes PostgreSQL cannot store."""

from __future__ import annotations

import json

import pytest

from core import handlers, inbox, orgs, sending, wallet
from core.db import run_in_transaction
from core.errors import InvalidInput
from tests.support.payloads import paypal as pp


def _apply(engine, payload: dict) -> str:
    def store(conn):
        event_id, event_type = payload["id"], payload["event_type"]
        return inbox.store(conn, "paypal", event_id, event_type, {}, json.dumps(payload).encode())

    stored, _ = run_in_transaction(engine, store)
    outcome = run_in_transaction(
        engine, lambda conn: handlers.process(conn, stored.id, sending.Policy())
    )
    return outcome.status


@pytest.fixture
def paid_org(engine) -> str:
    run_in_transaction(engine, lambda c: orgs.create(c, "acme"))
    assert _apply(engine, pp.capture_completed("acme", "CAP-1", "20.00")) == "processed"
    return "acme"


def _freezes(engine, org_id: str) -> tuple[str, ...]:
    return run_in_transaction(engine, lambda c: wallet.show(c, org_id)).freeze_reasons


def test_dispute_resolved_before_it_was_created_never_freezes(engine, paid_org):
    assert (
        _apply(engine, pp.dispute_resolved("PP-D-1", "CAP-1", "RESOLVED_SELLER_FAVOUR"))
        == "processed"
    )
    assert _apply(engine, pp.dispute_created("PP-D-1", "CAP-1")) == "processed"

    assert _freezes(engine, paid_org) == ()
    assert run_in_transaction(engine, lambda c: wallet.verify(c)) == []


def test_dispute_in_order_freezes_then_lifts(engine, paid_org):
    _apply(engine, pp.dispute_created("PP-D-2", "CAP-1"))
    assert _freezes(engine, paid_org) == ("dispute:PP-D-2",)

    _apply(engine, pp.dispute_resolved("PP-D-2", "CAP-1", "RESOLVED_SELLER_FAVOUR"))
    assert _freezes(engine, paid_org) == ()


def test_an_event_id_with_a_nul_is_refused_as_bad_input(engine):
    with pytest.raises(InvalidInput):
        run_in_transaction(engine, lambda c: inbox.store(c, "paypal", "WH-\x00", "X", {}, b"{}"))


def test_nul_in_a_kept_header_is_dropped_not_fatal(engine):
    stored, _ = run_in_transaction(
        engine,
        lambda c: inbox.store(c, "paypal", "WH-1", "X", {"User-Agent": "a\x00b"}, b"{}"),
    )
    assert not stored.duplicate


def test_a_dispute_opened_and_closed_at_the_same_moment_leaves_no_freeze(engine, paid_org):
    """Both parked (payment unknown) and replayed together: two workers apply them at once."""
    import threading

    def store(payload: dict) -> int:
        return run_in_transaction(
            engine,
            lambda c: inbox.store(
                c, "paypal", payload["id"], payload["event_type"], {},
                json.dumps(payload).encode(),
            )[0].id,
        )  # fmt: skip

    for n in range(12):
        dispute = f"PP-D-RACE-{n}"
        ids = [
            store(pp.dispute_resolved(dispute, "CAP-1", "RESOLVED_SELLER_FAVOUR")),
            store(pp.dispute_created(dispute, "CAP-1")),
        ]
        barrier = threading.Barrier(2)

        def apply(inbox_id: int, barrier: threading.Barrier = barrier) -> None:
            def unit(conn):
                conn.exec_driver_sql("SELECT 1")
                barrier.wait(timeout=10)
                return handlers.process(conn, inbox_id, sending.Policy())

            run_in_transaction(engine, unit)

        threads = [threading.Thread(target=apply, args=(i,)) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    assert _freezes(engine, paid_org) == ()
