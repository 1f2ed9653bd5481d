"""The prepaid wallet ledger: every rule of money for one organization's balance.

Each operation takes an open `Connection` and does not commit: the caller's unit of work
(core.db.run_in_transaction) commits it together with whatever else the change implies
(campaigns paused, a subscription recorded). Every change to a balance is one guarded
statement that also appends its journal row, so the balance always equals the journal's sum
and no read-then-write race can push it below zero. Idempotency lives in the database: a
journal reference (or hold reference) is UNIQUE per organization, and money moves only when
the journal row was inserted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import Connection, Row, TextClause

from core import db, outbound, sql
from core.errors import Conflict, InvalidInput, NotFound, Refused, RetryableConflict
from core.statuses import HoldStatus

log = logging.getLogger(__name__)

MAX_REFERENCE = 200
DEBT_FREEZE = "debt"
CAPTURE_PREFIX = "hold:"  # journal reference of a captured hold: hold:<hold reference>
# Operators' references live apart from providers' and the ledger's own: no `--reference`
# typed by hand can take the idempotency key of a payment that has yet to arrive.
OPERATOR_PREFIX = "op:"


@dataclass(frozen=True)
class Entry:
    """One journal row. `duplicate` is True when the reference had already been applied."""

    id: int
    org_id: str
    kind: str
    amount_cents: int
    debt_delta_cents: int
    requested_cents: int
    reference: str
    balance_after_cents: int
    debt_after_cents: int
    actor: str
    reason: str | None
    created_at: datetime
    duplicate: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "amount_cents": self.amount_cents,
            "debt_delta_cents": self.debt_delta_cents,
            "requested_cents": self.requested_cents,
            "reference": self.reference,
            "balance_after_cents": self.balance_after_cents,
            "debt_after_cents": self.debt_after_cents,
            "created_at": self.created_at.isoformat(),
            "actor": self.actor,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Hold:
    id: int
    org_id: str
    reference: str
    amount_cents: int
    status: str
    captured_cents: int | None
    created_at: datetime
    duplicate: bool = False


@dataclass(frozen=True)
class WalletState:
    org_id: str
    currency: str
    balance_cents: int
    held_cents: int
    debt_cents: int
    freeze_reasons: tuple[str, ...]

    @property
    def available_cents(self) -> int:
        return self.balance_cents - self.held_cents

    @property
    def frozen(self) -> bool:
        return bool(self.freeze_reasons)

    def as_dict(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "currency": self.currency,
            "balance_cents": self.balance_cents,
            "held_cents": self.held_cents,
            "available_cents": self.available_cents,
            "debt_cents": self.debt_cents,
            "frozen": self.frozen,
            "freeze_reasons": list(self.freeze_reasons),
        }


@dataclass(frozen=True)
class Mismatch:
    org_id: str
    field: str
    stored: int
    expected: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "field": self.field,
            "stored": self.stored,
            "expected": self.expected,
        }


# ---------------------------------------------------------------- validation


def _amount(amount_cents: object) -> int:
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int):
        raise InvalidInput(f"amount must be a whole number of cents, got {amount_cents!r}")
    if amount_cents <= 0:
        raise InvalidInput(f"amount must be positive, got {amount_cents}")
    return amount_cents


def _reference(reference: object) -> str:
    if not isinstance(reference, str) or not reference.strip():
        raise InvalidInput("reference must be a non-empty string")
    if len(reference) > MAX_REFERENCE:
        raise InvalidInput(f"reference is over {MAX_REFERENCE} characters")
    return reference


def _text(name: str, value: object, limit: int = 500) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise InvalidInput(f"{name} is over {limit} characters")
    return value


def _currency(currency: str | None) -> str | None:
    if currency is None:
        return None
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
        raise InvalidInput(f"bad currency {currency!r}")
    return currency.upper()


# ---------------------------------------------------------------- statements

_ENTRY_COLUMNS = (
    "id, org_id, kind, amount_cents, debt_delta_cents, requested_cents, reference, "
    "balance_after_cents, debt_after_cents, actor, reason, created_at"
)

# Whether a money move leaves the wallet's low-balance flag to flip (outbound.note_balance),
# as a column of the money statement itself: each statement's CTE `w` returns the wallet row
# it updated and locked, so the common case, no flip, costs no second statement while the
# row lock is held.
_LOW_BALANCE_FLIPS = """(SELECT w.low_balance_reported
                   IS DISTINCT FROM (w.balance_cents - w.held_cents < o.low_balance_cents)
            FROM w JOIN organizations o ON o.org_id = :org_id
            WHERE o.low_balance_cents IS NOT NULL) AS low_balance_flips"""

_CREDIT = sql.statement(
    "wallet.credit",
    f"""
    WITH prev AS (
        SELECT 1 FROM journal WHERE org_id = :org_id AND reference = :reference
    ), cur AS (
        SELECT org_id, debt_cents FROM wallets
        WHERE org_id = :org_id
          AND (CAST(:currency AS text) IS NULL OR currency = CAST(:currency AS text))
          AND NOT EXISTS (SELECT 1 FROM prev)
        FOR UPDATE
    ), w AS (
        UPDATE wallets SET
            balance_cents = wallets.balance_cents + greatest(:amount_cents - cur.debt_cents, 0),
            debt_cents = greatest(cur.debt_cents - :amount_cents, 0),
            updated_at = now()
        FROM cur WHERE wallets.org_id = cur.org_id
        RETURNING wallets.balance_cents, wallets.debt_cents,
                  least(cur.debt_cents, :amount_cents) AS paid,
                  wallets.held_cents, wallets.low_balance_reported
    ), p AS (
        -- Money given back to a payment (a failed refund) may be taken back again later.
        UPDATE payments SET refunded_cents = greatest(payments.refunded_cents - :amount_cents, 0)
        FROM w WHERE payments.provider = CAST(:payment_provider AS text)
          AND payments.payment_id = CAST(:payment_id AS text) AND payments.org_id = :org_id
        RETURNING 1
    ), j AS (
        INSERT INTO journal (org_id, kind, amount_cents, debt_delta_cents, requested_cents,
                             reference, balance_after_cents, debt_after_cents, actor, reason)
        SELECT :org_id, :kind, :amount_cents - w.paid, -w.paid, :amount_cents, :reference,
               w.balance_cents, w.debt_cents, :actor, :reason
        FROM w
        ON CONFLICT ON CONSTRAINT journal_reference_once DO NOTHING
        RETURNING {_ENTRY_COLUMNS}
    )
    SELECT (SELECT count(*) FROM w) AS updated, j.*,
           {_LOW_BALANCE_FLIPS}
    FROM (SELECT 1) AS one LEFT JOIN j ON true
    """,
)

_DEBIT = sql.statement(
    "wallet.debit",
    f"""
    WITH prev AS (
        SELECT 1 FROM journal WHERE org_id = :org_id AND reference = :reference
    ), w AS (
        UPDATE wallets SET balance_cents = balance_cents - :amount_cents, updated_at = now()
        WHERE org_id = :org_id
          AND (CAST(:check_freeze AS boolean) IS FALSE OR active_freezes = 0)
          AND balance_cents - held_cents >= :amount_cents
          AND NOT EXISTS (SELECT 1 FROM prev)
        RETURNING balance_cents, debt_cents, held_cents, low_balance_reported
    ), j AS (
        INSERT INTO journal (org_id, kind, amount_cents, requested_cents, reference,
                             balance_after_cents, debt_after_cents, actor, reason)
        SELECT :org_id, :kind, -:amount_cents, :amount_cents, :reference, w.balance_cents,
               w.debt_cents, :actor, :reason
        FROM w
        ON CONFLICT ON CONSTRAINT journal_reference_once DO NOTHING
        RETURNING {_ENTRY_COLUMNS}
    )
    SELECT (SELECT count(*) FROM w) AS updated, j.*,
           {_LOW_BALANCE_FLIPS}
    FROM (SELECT 1) AS one LEFT JOIN j ON true
    """,
)

_CLAWBACK = sql.statement(
    "wallet.clawback",
    f"""
    WITH prev AS (
        SELECT 1 FROM journal WHERE org_id = :org_id AND reference = :reference
    ), pay AS (
        -- The payment taken back from, when one is named: what it credited and not yet given
        -- back bounds what this takes (a refund or chargeback takes back at most its payment).
        SELECT greatest(amount_cents - refunded_cents, 0) AS room FROM payments
        WHERE provider = CAST(:payment_provider AS text)
          AND payment_id = CAST(:payment_id AS text) AND org_id = :org_id
        FOR UPDATE
    ), cur AS (
        SELECT org_id, balance_cents - held_cents AS available,
               CASE WHEN CAST(:payment_id AS text) IS NULL THEN CAST(:amount_cents AS bigint)
                    ELSE least(:amount_cents, coalesce((SELECT room FROM pay), 0)) END AS owed
        FROM wallets
        WHERE org_id = :org_id
          AND (CAST(:currency AS text) IS NULL OR currency = CAST(:currency AS text))
          AND NOT EXISTS (SELECT 1 FROM prev)
        FOR UPDATE
    ), w AS (
        UPDATE wallets SET
            balance_cents = wallets.balance_cents - least(cur.owed, cur.available),
            debt_cents = wallets.debt_cents + (cur.owed - least(cur.owed, cur.available)),
            updated_at = now()
        FROM cur WHERE wallets.org_id = cur.org_id
        RETURNING wallets.balance_cents, wallets.debt_cents, least(cur.owed, cur.available) AS taken,
                  cur.owed, wallets.held_cents,
                  wallets.low_balance_reported
    ), p AS (
        UPDATE payments SET refunded_cents = payments.refunded_cents + w.owed
        FROM w WHERE payments.provider = CAST(:payment_provider AS text)
          AND payments.payment_id = CAST(:payment_id AS text) AND payments.org_id = :org_id
        RETURNING 1
    ), j AS (
        INSERT INTO journal (org_id, kind, amount_cents, debt_delta_cents, requested_cents,
                             reference, balance_after_cents, debt_after_cents, actor, reason)
        SELECT :org_id, :kind, -w.taken, w.owed - w.taken, :amount_cents, :reference,
               w.balance_cents, w.debt_cents, :actor, :reason
        FROM w
        ON CONFLICT ON CONSTRAINT journal_reference_once DO NOTHING
        RETURNING {_ENTRY_COLUMNS}
    )
    SELECT (SELECT count(*) FROM w) AS updated, j.*,
           {_LOW_BALANCE_FLIPS}
    FROM (SELECT 1) AS one LEFT JOIN j ON true
    """,
)

_ENTRY_BY_REF = sql.statement(
    "wallet.entry_by_ref",
    f"SELECT {_ENTRY_COLUMNS} FROM journal WHERE org_id = :org_id AND reference = :reference",
)

_HOLD_COLUMNS = "id, org_id, reference, amount_cents, status, captured_cents, created_at"

_HOLD = sql.statement(
    "wallet.hold",
    f"""
    WITH prev AS (
        SELECT 1 FROM holds WHERE org_id = :org_id AND reference = :reference
    ), w AS (
        UPDATE wallets SET held_cents = held_cents + :amount_cents, updated_at = now()
        WHERE org_id = :org_id AND active_freezes = 0
          AND balance_cents - held_cents >= :amount_cents
          AND NOT EXISTS (SELECT 1 FROM prev)
        RETURNING org_id, balance_cents, held_cents, low_balance_reported
    ), h AS (
        INSERT INTO holds (org_id, reference, amount_cents)
        SELECT :org_id, :reference, :amount_cents FROM w
        ON CONFLICT ON CONSTRAINT hold_reference_once DO NOTHING
        RETURNING {_HOLD_COLUMNS}
    )
    SELECT (SELECT count(*) FROM w) AS updated, h.*,
           {_LOW_BALANCE_FLIPS}
    FROM (SELECT 1) AS one LEFT JOIN h ON true
    """,
)

_HOLD_BY_REF = sql.statement(
    "wallet.hold_by_ref",
    f"SELECT {_HOLD_COLUMNS} FROM holds WHERE org_id = :org_id AND reference = :reference",
)

_CAPTURE = sql.statement(
    "wallet.capture",
    f"""
    WITH h AS (
        UPDATE holds SET status = 'captured', settled_at = now(),
            captured_cents = coalesce(CAST(:capture_cents AS bigint), amount_cents)
        WHERE org_id = :org_id AND reference = :reference AND status = 'open'
          AND amount_cents >= coalesce(CAST(:capture_cents AS bigint), amount_cents)
        RETURNING {_HOLD_COLUMNS}
    ), w AS (
        UPDATE wallets SET held_cents = held_cents - h.amount_cents,
            balance_cents = balance_cents - h.captured_cents, updated_at = now()
        FROM h WHERE wallets.org_id = h.org_id
        RETURNING wallets.balance_cents, wallets.debt_cents, wallets.held_cents,
                  wallets.low_balance_reported
    ), j AS (
        INSERT INTO journal (org_id, kind, amount_cents, requested_cents, reference,
                             balance_after_cents, debt_after_cents, actor, reason)
        SELECT h.org_id, 'capture', -h.captured_cents, h.captured_cents, 'hold:' || h.reference,
               w.balance_cents, w.debt_cents, 'system', :reason
        FROM h, w WHERE h.captured_cents > 0
        RETURNING id
    )
    SELECT h.*, (SELECT count(*) FROM j) AS journaled,
           {_LOW_BALANCE_FLIPS}
    FROM h
    """,
)

_RELEASE = sql.statement(
    "wallet.release",
    f"""
    WITH h AS (
        UPDATE holds SET status = 'released', settled_at = now(), captured_cents = 0
        WHERE org_id = :org_id AND reference = :reference AND status = 'open'
        RETURNING {_HOLD_COLUMNS}
    ), w AS (
        UPDATE wallets SET held_cents = held_cents - h.amount_cents, updated_at = now()
        FROM h WHERE wallets.org_id = h.org_id
        RETURNING wallets.org_id, wallets.balance_cents, wallets.held_cents,
                  wallets.low_balance_reported
    )
    SELECT h.*,
           {_LOW_BALANCE_FLIPS}
    FROM h, w
    """,
)

_FREEZE = sql.statement(
    "wallet.freeze",
    """
    WITH f AS (
        INSERT INTO wallet_freezes (org_id, reason, actor, note)
        SELECT :org_id, :reason, :actor, :note
        WHERE EXISTS (SELECT 1 FROM wallets WHERE org_id = :org_id)
        ON CONFLICT (org_id, reason) WHERE lifted_at IS NULL DO NOTHING
        RETURNING id
    )
    UPDATE wallets SET active_freezes = active_freezes + 1, updated_at = now()
    FROM f WHERE wallets.org_id = :org_id
    RETURNING active_freezes
    """,
)

_UNFREEZE = sql.statement(
    "wallet.unfreeze",
    """
    WITH f AS (
        UPDATE wallet_freezes SET lifted_at = now(), lifted_by = :actor, lift_note = :note
        WHERE org_id = :org_id AND reason = :reason AND lifted_at IS NULL
        RETURNING id
    )
    UPDATE wallets SET active_freezes = active_freezes - 1, updated_at = now()
    FROM f WHERE wallets.org_id = :org_id
    RETURNING active_freezes
    """,
)

_SHOW = sql.statement(
    "wallet.show",
    """
    SELECT w.org_id, w.currency, w.balance_cents, w.held_cents, w.debt_cents,
           coalesce(array_agg(f.reason ORDER BY f.created_at, f.id)
                    FILTER (WHERE f.id IS NOT NULL), '{}') AS reasons
    FROM wallets w
    LEFT JOIN wallet_freezes f ON f.org_id = w.org_id AND f.lifted_at IS NULL
    WHERE w.org_id = :org_id
    GROUP BY w.org_id
    """,
)

_VERIFY = sql.statement(
    "wallet.verify",
    """
    WITH scope AS (
        SELECT org_id FROM wallets
        WHERE CAST(:org_ids AS text[]) IS NULL OR org_id = ANY(CAST(:org_ids AS text[]))
    )
    SELECT w.org_id, w.balance_cents, coalesce(j.total, 0) AS journal_balance,
           w.debt_cents, coalesce(j.debt, 0) AS journal_debt,
           w.held_cents, coalesce(h.total, 0) AS open_holds,
           w.active_freezes, coalesce(f.n, 0) AS freezes
    FROM wallets w
    JOIN scope ON scope.org_id = w.org_id
    LEFT JOIN (SELECT org_id, sum(amount_cents) AS total, sum(debt_delta_cents) AS debt
               FROM journal WHERE org_id IN (SELECT org_id FROM scope) GROUP BY org_id) j
           ON j.org_id = w.org_id
    LEFT JOIN (SELECT org_id, sum(amount_cents) AS total FROM holds
               WHERE status = 'open' AND org_id IN (SELECT org_id FROM scope) GROUP BY org_id) h
           ON h.org_id = w.org_id
    LEFT JOIN (SELECT org_id, count(*) AS n FROM wallet_freezes
               WHERE lifted_at IS NULL AND org_id IN (SELECT org_id FROM scope) GROUP BY org_id) f
           ON f.org_id = w.org_id
    WHERE w.balance_cents <> coalesce(j.total, 0) OR w.debt_cents <> coalesce(j.debt, 0)
       OR w.held_cents <> coalesce(h.total, 0) OR w.active_freezes <> coalesce(f.n, 0)
    ORDER BY w.org_id
    """,
)


# ---------------------------------------------------------------- helpers


def _entry(row: Row[Any], duplicate: bool = False) -> Entry:
    return Entry(
        id=row.id,
        org_id=row.org_id,
        kind=row.kind,
        amount_cents=row.amount_cents,
        debt_delta_cents=row.debt_delta_cents,
        requested_cents=row.requested_cents,
        reference=row.reference,
        balance_after_cents=row.balance_after_cents,
        debt_after_cents=row.debt_after_cents,
        actor=row.actor,
        reason=row.reason,
        created_at=row.created_at,
        duplicate=duplicate,
    )


def _hold(row: Row[Any], duplicate: bool = False) -> Hold:
    return Hold(
        id=row.id,
        org_id=row.org_id,
        reference=row.reference,
        amount_cents=row.amount_cents,
        status=row.status,
        captured_cents=row.captured_cents,
        created_at=row.created_at,
        duplicate=duplicate,
    )


_WALLET_ROW = sql.statement(
    "wallet.wallet_row",
    """
    SELECT currency, balance_cents, held_cents, active_freezes FROM wallets
    WHERE org_id = :org_id
    """,
)


def _wallet_row(conn: Connection, org_id: str) -> Row[Any]:
    row = conn.execute(
        _WALLET_ROW,
        {"org_id": org_id},
    ).first()
    if row is None:
        raise NotFound(f"unknown organization {org_id!r}")
    return row


def _existing_entry(
    conn: Connection, org_id: str, ref: str, kinds: tuple[str, ...], amt: int, takes: bool
) -> Entry | None:
    """The first result of an already-applied reference, or a Conflict if it differs.

    `takes` is the direction: a reference first used to add money (a credit, a positive
    adjustment) and then to take the same amount is a different operation, not a repeat."""
    row = conn.execute(_ENTRY_BY_REF, {"org_id": org_id, "reference": ref}).first()
    if row is None:
        return None
    took = row.amount_cents < 0 or row.debt_delta_cents > 0
    if row.amount_cents == 0 and row.debt_delta_cents == 0:
        took = takes  # a take-back its payment had nothing left for: either way, a repeat
    if row.kind not in kinds or row.requested_cents != amt or took != takes:
        log.warning(
            "ledger reference conflict",
            extra={
                "org_id": org_id,
                "reference": ref,
                "kind": row.kind,
                "amount_cents": row.requested_cents,
                "new_amount_cents": amt,
            },
        )
        raise Conflict(
            f"reference {ref!r} was already used for {row.kind} of {row.requested_cents} cents"
        )
    return _entry(row, duplicate=True)


# The money statements as the driver runs them (db.one_on_driver): the same text as registered.
_ON_DRIVER = {stmt: sql.for_driver(stmt) for stmt in (_CREDIT, _DEBIT, _CLAWBACK)}


def _apply(
    conn: Connection,
    stmt: TextClause,
    params: dict[str, Any],
    kinds: tuple[str, ...],
    *,
    takes: bool,
) -> tuple[Entry | None, str | None]:
    """Run a guarded money statement; return (row, None) or (None, why-nothing-moved)."""
    row = db.one_on_driver(conn, _ON_DRIVER[stmt], params)
    if row.id is not None:
        if row.low_balance_flips:
            outbound.note_balance(conn, row.org_id)
        return _entry(row), None
    if row.updated:
        # The wallet moved but the journal insert lost a race with the same reference:
        # undo the whole unit of work and run it again, when the winner will be visible.
        raise RetryableConflict(f"reference {params['reference']!r} applied concurrently")
    existing = _existing_entry(
        conn, params["org_id"], params["reference"], kinds, params["amount_cents"], takes
    )
    return existing, "duplicate" if existing else "refused"


def _params(
    org_id: str,
    amount_cents: int,
    reference: str,
    kind: str,
    actor: str,
    reason: str | None,
    **extra: object,
) -> dict[str, Any]:
    """The validated parameters every guarded money statement takes."""
    if isinstance(reference, str) and reference.startswith(CAPTURE_PREFIX):
        raise InvalidInput(f"references starting {CAPTURE_PREFIX!r} are the ledger's own")
    return {
        "org_id": org_id,
        "amount_cents": _amount(amount_cents),
        "reference": _reference(reference),
        "kind": kind,
        "actor": actor,
        "reason": reason,
        "payment_provider": None,
        "payment_id": None,
        **extra,
    }


def _payment(payment: tuple[str, str] | None) -> dict[str, str]:
    """The (provider, payment id) parameters of a statement that also tracks a payment."""
    if payment is None:
        return {}
    provider, payment_id = payment
    return {"payment_provider": provider, "payment_id": payment_id}


def _currency_matches(conn: Connection, org_id: str, params: dict[str, Any]) -> bool:
    """A repeat names the wallet's currency too (checked only on the rare duplicate path)."""
    return params["currency"] is None or _wallet_row(conn, org_id).currency == params["currency"]


def _refuse_currency(conn: Connection, org_id: str, currency: str | None) -> NoReturn:
    wallet = _wallet_row(conn, org_id)  # NotFound first, if that is why nothing moved
    raise InvalidInput(f"currency {currency} is not the wallet's currency {wallet.currency}")


def _refuse_spending(
    conn: Connection, org_id: str, amount_cents: int, check_freeze: bool
) -> NoReturn:
    """Why a debit or hold moved nothing: unknown organization, frozen, or short."""
    wallet = _wallet_row(conn, org_id)
    if check_freeze and wallet.active_freezes:
        raise Refused(f"wallet of {org_id!r} is frozen")
    raise Refused(
        f"insufficient funds: {wallet.balance_cents - wallet.held_cents} cents available, "
        f"{amount_cents} needed"
    )


# ---------------------------------------------------------------- operations


def credit(
    conn: Connection,
    org_id: str,
    amount_cents: int,
    reference: str,
    *,
    currency: str | None = None,
    kind: str = "credit",
    actor: str = "system",
    reason: str | None = None,
    payment: tuple[str, str] | None = None,
) -> Entry:
    """Add money; debt is paid first. The same reference again returns the first result.

    `payment` (provider, payment id): money given back to that payment, which its later
    refunds may take back again."""
    params = _params(
        org_id, amount_cents, reference, kind, actor, reason,
        currency=_currency(currency), **_payment(payment),
    )  # fmt: skip
    entry, why = _apply(conn, _CREDIT, params, (kind,), takes=False)
    if entry is None or (why == "duplicate" and not _currency_matches(conn, org_id, params)):
        _refuse_currency(conn, org_id, params["currency"])
    if why is None:
        _note_credited(conn, entry)
    if why is None and entry.debt_delta_cents < 0 and entry.debt_after_cents == 0:
        unfreeze(conn, org_id, DEBT_FREEZE, actor="system", note=f"debt repaid by {reference}")
    return entry


def _note_credited(conn: Connection, e: Entry) -> None:
    data = {"org_id": e.org_id, "amount_cents": e.requested_cents,
            "balance_cents": e.balance_after_cents, "reference": e.reference}  # fmt: skip
    outbound.record(conn, "wallet.credited", e.org_id, data)


def debit(
    conn: Connection,
    org_id: str,
    amount_cents: int,
    reference: str,
    *,
    kind: str = "debit",
    actor: str = "system",
    reason: str | None = None,
    check_freeze: bool = True,
) -> Entry:
    """Take money from what is available; refused when frozen or short. Idempotent."""
    params = _params(
        org_id, amount_cents, reference, kind, actor, reason, check_freeze=check_freeze
    )
    entry, _ = _apply(conn, _DEBIT, params, (kind,), takes=True)
    if entry is None:
        _refuse_spending(conn, org_id, amount_cents, check_freeze)
    return entry


def clawback(
    conn: Connection,
    org_id: str,
    amount_cents: int,
    reference: str,
    *,
    currency: str | None = None,
    kind: str = "clawback",
    actor: str = "system",
    reason: str | None = None,
    payment: tuple[str, str] | None = None,
) -> Entry:
    """Take back a refunded or charged-back payment: what is available now, the rest as debt.

    With `payment` (provider, payment id), at most what that payment credited to this wallet
    and has not had taken back yet; a payment of another wallet, or none, gives nothing.
    Any debt freezes the wallet with reason `debt` until credits have paid it."""
    params = _params(
        org_id, amount_cents, reference, kind, actor, reason,
        currency=_currency(currency), **_payment(payment),
    )  # fmt: skip
    entry, why = _apply(conn, _CLAWBACK, params, (kind,), takes=True)
    if entry is None or (why == "duplicate" and not _currency_matches(conn, org_id, params)):
        _refuse_currency(conn, org_id, params["currency"])
    if why is None and entry.debt_delta_cents > 0:
        freeze(conn, org_id, DEBT_FREEZE, actor="system", note=f"debt from {reference}")
    return entry


def adjust(
    conn: Connection,
    org_id: str,
    amount_cents: int,
    *,
    reason: str,
    actor: str,
    reference: str | None = None,
) -> Entry:
    """An operator's signed correction, journaled with who and why; never below zero.

    A positive adjustment is a credit (it pays debt first); a negative one is a debit that
    works on a frozen wallet too, but only from what is available."""
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int) or amount_cents == 0:
        raise InvalidInput("adjustment must be a non-zero whole number of cents")
    _text("reason", reason)
    _text("actor", actor, 200)
    ref = OPERATOR_PREFIX + (
        _reference(reference) if reference is not None else f"adjust:{uuid.uuid4()}"
    )
    if amount_cents > 0:
        return credit(
            conn, org_id, amount_cents, ref, kind="adjustment", actor=actor, reason=reason
        )
    try:
        return debit(
            conn,
            org_id,
            -amount_cents,
            ref,
            kind="adjustment",
            actor=actor,
            reason=reason,
            check_freeze=False,
        )
    except Refused as exc:
        raise Refused(f"adjustment would take the balance below zero ({exc})") from None


def give_back(
    conn: Connection,
    org_id: str,
    taken_reference: str,
    reference: str,
    *,
    payment: tuple[str, str],
    reason: str | None = None,
) -> Entry | None:
    """Undo a take-back that did not happen after all (a refund that failed), once.

    What `taken_reference` took (from the balance and as debt) comes back as a credit that pays
    debt first, so the debt freeze it caused lifts once the debt is gone; its payment may be
    refunded again. None when it took nothing or never happened."""
    taken = entry(conn, org_id, taken_reference)
    if taken is None or -taken.amount_cents + taken.debt_delta_cents <= 0:
        return None
    return credit(
        conn, org_id, -taken.amount_cents + taken.debt_delta_cents, reference,
        kind="refund_reversal", reason=reason, payment=payment,
    )  # fmt: skip


def entry(conn: Connection, org_id: str, reference: str) -> Entry | None:
    """The journal row of a reference, if it was applied."""
    row = conn.execute(_ENTRY_BY_REF, {"org_id": org_id, "reference": reference}).first()
    return None if row is None else _entry(row)


def hold(conn: Connection, org_id: str, amount_cents: int, reference: str) -> Hold:
    """Set money aside for a send; refused when frozen or short. Idempotent by reference."""
    params = {
        "org_id": org_id,
        "amount_cents": _amount(amount_cents),
        "reference": _reference(reference),
    }
    row = conn.execute(_HOLD, params).one()
    if row.id is not None:
        if row.low_balance_flips:
            outbound.note_balance(conn, org_id)
        return _hold(row)
    if row.updated:
        raise RetryableConflict(f"hold {reference!r} placed concurrently")
    existing = conn.execute(_HOLD_BY_REF, params).first()
    if existing is not None:
        if existing.amount_cents != amount_cents:
            raise Conflict(f"hold {reference!r} exists for {existing.amount_cents} cents")
        return _hold(existing, duplicate=True)
    _refuse_spending(conn, org_id, amount_cents, check_freeze=True)


def capture(
    conn: Connection,
    org_id: str,
    reference: str,
    amount_cents: int | None = None,
    *,
    reason: str | None = None,
) -> Hold:
    """Charge a held amount (all of it by default, at most all); the rest is released.

    Captured or released exactly once: a second capture returns the first result."""
    if amount_cents is not None and (
        isinstance(amount_cents, bool) or not isinstance(amount_cents, int) or amount_cents < 0
    ):
        raise InvalidInput("capture amount must be a whole number of cents, zero or more")
    params = {
        "org_id": org_id,
        "reference": _reference(reference),
        "capture_cents": amount_cents,
        "reason": reason,
    }
    row = conn.execute(_CAPTURE, params).first()
    if row is not None:
        if row.low_balance_flips:
            outbound.note_balance(conn, org_id)
        return _hold(row)
    existing = conn.execute(_HOLD_BY_REF, params).first()
    if existing is None:
        raise NotFound(f"no hold {reference!r} for {org_id!r}")
    if existing.status == HoldStatus.CAPTURED:
        return _hold(existing, duplicate=True)
    if existing.status == HoldStatus.RELEASED:
        raise Conflict(f"hold {reference!r} was already released")
    raise InvalidInput(
        f"cannot capture {amount_cents} cents from a hold of {existing.amount_cents}"
    )


def release(conn: Connection, org_id: str, reference: str) -> Hold:
    """Give a hold back to the available balance, once."""
    params = {"org_id": org_id, "reference": _reference(reference)}
    row = conn.execute(_RELEASE, params).first()
    if row is not None:
        if row.low_balance_flips:
            outbound.note_balance(conn, org_id)
        return _hold(row)
    existing = conn.execute(_HOLD_BY_REF, params).first()
    if existing is None:
        raise NotFound(f"no hold {reference!r} for {org_id!r}")
    if existing.status == HoldStatus.RELEASED:
        return _hold(existing, duplicate=True)
    raise Conflict(f"hold {reference!r} was already captured")


def freeze(
    conn: Connection, org_id: str, reason: str, *, actor: str, note: str | None = None
) -> bool:
    """Add one freeze reason; True if it was not already active."""
    _text("reason", reason, 200)
    _text("actor", actor, 200)
    row = conn.execute(
        _FREEZE, {"org_id": org_id, "reason": reason, "actor": actor, "note": note}
    ).first()
    if row is None:
        _wallet_row(conn, org_id)
        return False
    outbound.record(conn, "wallet.frozen", org_id, {"org_id": org_id, "reason": reason})
    return True


_LOCK_DEBT = sql.statement(
    "wallet.lock_debt",
    "SELECT debt_cents FROM wallets WHERE org_id = :org_id FOR UPDATE",
)


def unfreeze(
    conn: Connection, org_id: str, reason: str, *, actor: str, note: str | None = None
) -> bool:
    """Lift one freeze reason; True if it was active. Other reasons stay.

    The `debt` freeze lifts only when the debt is paid: credits lift it themselves."""
    _text("reason", reason, 200)
    _text("actor", actor, 200)
    if reason == DEBT_FREEZE:
        # Locked: a clawback adding debt meanwhile must wait, or its freeze would be lifted.
        debt = conn.execute(_LOCK_DEBT, {"org_id": org_id}).scalar()
        if debt:
            raise Refused(f"the debt freeze stays until the debt of {debt} cents is paid")
    row = conn.execute(
        _UNFREEZE, {"org_id": org_id, "reason": reason, "actor": actor, "note": note}
    ).first()
    if row is None:
        _wallet_row(conn, org_id)
        return False
    outbound.record(conn, "wallet.unfrozen", org_id, {"org_id": org_id, "reason": reason})
    return True


_LOCK = sql.statement("wallet.lock", "SELECT 1 FROM wallets WHERE org_id = :org_id FOR UPDATE")


def lock(conn: Connection, org_id: str) -> None:
    """Hold the wallet row until the transaction ends: decisions that read freeze history
    and then act on it (a dispute's open and close) must not interleave."""
    if conn.execute(_LOCK, {"org_id": org_id}).first() is None:
        raise NotFound(f"unknown organization {org_id!r}")


_EVER_LIFTED = sql.statement(
    "wallet.ever_lifted",
    """
    SELECT 1 FROM wallet_freezes WHERE org_id = :org_id AND reason = :reason
    AND lifted_at IS NOT NULL LIMIT 1
    """,
)


def ever_lifted(conn: Connection, org_id: str, reason: str) -> bool:
    """Whether a freeze with this reason was ever lifted (or closed before it was opened)."""
    return (
        conn.execute(
            _EVER_LIFTED,
            {"org_id": org_id, "reason": reason},
        ).first()
        is not None
    )


_RECORD_LIFTED = sql.statement(
    "wallet.record_lifted",
    """
    INSERT INTO wallet_freezes (org_id, reason, actor, note, lifted_at, lifted_by,
        lift_note) VALUES (:org_id, :reason, :actor, :note, now(), :actor, :note)
    """,
)


def record_lifted(conn: Connection, org_id: str, reason: str, *, actor: str, note: str) -> None:
    """Remember that a reason is already settled, without ever freezing the wallet for it
    (a dispute closed before its opening arrived)."""
    _wallet_row(conn, org_id)
    conn.execute(
        _RECORD_LIFTED,
        {"org_id": org_id, "reason": reason, "actor": actor, "note": note},
    )


def show(conn: Connection, org_id: str) -> WalletState:
    row = conn.execute(_SHOW, {"org_id": org_id}).first()
    if row is None:
        raise NotFound(f"unknown organization {org_id!r}")
    return WalletState(
        org_id=row.org_id,
        currency=row.currency,
        balance_cents=row.balance_cents,
        held_cents=row.held_cents,
        debt_cents=row.debt_cents,
        freeze_reasons=tuple(row.reasons),
    )


_HISTORY = sql.statement(
    "wallet.history",
    f"""
    SELECT {_ENTRY_COLUMNS} FROM journal WHERE org_id = :org_id
    AND (CAST(:before_id AS bigint) IS NULL OR id < :before_id)
    ORDER BY id DESC LIMIT :limit
    """,
)


def history(
    conn: Connection, org_id: str, limit: int = 50, *, before_id: int | None = None
) -> list[Entry]:
    """Journal entries newest first; `before_id` continues a walk after the last entry of a
    previous page (a keyset page: an index range scan, however deep the walk)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise InvalidInput("limit must be between 1 and 10000")
    _wallet_row(conn, org_id)
    rows = conn.execute(
        _HISTORY,
        {"org_id": org_id, "limit": limit, "before_id": before_id},
    )
    return [_entry(r) for r in rows]


def verify(
    conn: Connection, org_id: str | None = None, *, org_ids: list[str] | None = None
) -> list[Mismatch]:
    """Every stored figure against what the journal, holds and freezes say it must be:
    for one organization, a batch of them (`org_ids`), or all."""
    if org_id is not None:
        _wallet_row(conn, org_id)
        org_ids = [org_id]
    mismatches = []
    for r in conn.execute(_VERIFY, {"org_ids": org_ids}):
        pairs = (
            ("balance_cents", r.balance_cents, r.journal_balance),
            ("debt_cents", r.debt_cents, r.journal_debt),
            ("held_cents", r.held_cents, r.open_holds),
            ("active_freezes", r.active_freezes, r.freezes),
        )
        mismatches += [Mismatch(r.org_id, f, int(s), int(e)) for f, s, e in pairs if s != e]
    return mismatches


_COUNT = sql.statement(
    "wallet.count",
    "SELECT count(*) FROM wallets WHERE CAST(:org_id AS text) IS NULL OR org_id = :org_id",
)


def count(conn: Connection, org_id: str | None = None) -> int:
    """How many wallets there are (0 or 1 with `org_id`): the total a long run's progress
    counts towards."""
    return int(conn.execute(_COUNT, {"org_id": org_id}).scalar_one())


_ORG_ID_BATCHES = sql.statement(
    "wallet.org_id_batches",
    "SELECT org_id FROM wallets WHERE org_id > :after ORDER BY org_id LIMIT :size",
)


def org_id_batches(conn: Connection, size: int = 1000) -> Iterator[list[str]]:
    """Every wallet's organization id, in batches (keyset pages), for long runs with progress."""
    after = ""
    while True:
        batch = list(
            conn.execute(
                _ORG_ID_BATCHES,
                {"after": after, "size": size},
            ).scalars()
        )
        if not batch:
            return
        yield batch
        after = batch[-1]


# ---------------------------------------------------------------- verification results

# How long results of verify_ledger are kept: the newest is what /metrics reads; the rest is
# a short history for an operator wondering when a mismatch first appeared.
CHECKS_KEPT = timedelta(days=7)


@dataclass(frozen=True)
class LedgerCheck:
    checked_at: datetime
    wallets_checked: int
    mismatches: int
    twilio_mismatches: int = 0


_RECORD_CHECK = sql.statement(
    "wallet.record_check",
    """
    INSERT INTO ledger_checks (wallets_checked, mismatches, twilio_mismatches)
    SELECT count(*), :mismatches, :twilio_mismatches FROM wallets
    RETURNING checked_at, wallets_checked, mismatches, twilio_mismatches
    """,
)

_PRUNE_CHECKS = sql.statement(
    "wallet.prune_checks",
    "DELETE FROM ledger_checks WHERE checked_at < now() - CAST(:kept AS interval)",
)


def record_check(conn: Connection, mismatches: int, twilio_mismatches: int = 0) -> LedgerCheck:
    """Record that every wallet was just verified and how many figures disagreed (and how
    many messages Twilio billed otherwise than charged), in the caller's transaction (the
    one that verified, so the counts match that snapshot)."""
    row = conn.execute(
        _RECORD_CHECK,
        {"mismatches": mismatches, "twilio_mismatches": twilio_mismatches},
    ).one()
    conn.execute(
        _PRUNE_CHECKS,
        {"kept": CHECKS_KEPT},
    )
    return LedgerCheck(*row)


_LAST_CHECK = sql.statement(
    "wallet.last_check",
    """
    SELECT checked_at, wallets_checked, mismatches, twilio_mismatches FROM ledger_checks
    ORDER BY checked_at DESC, id DESC LIMIT 1
    """,
)


def last_check(conn: Connection) -> LedgerCheck | None:
    """The newest recorded verification; None before the first one."""
    row = conn.execute(_LAST_CHECK).first()
    return LedgerCheck(*row) if row is not None else None
