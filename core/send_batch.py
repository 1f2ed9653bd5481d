"""The safe send path in batches: one organization's queued messages claimed, held, sent and
settled together, each by the same rules as a single send (core/messages.py).

A batch moves through two transactions around the Twilio calls, as a single send does:

* `claim` takes up to N messages still to send (`queued`, or `retrying` with their hold),
  oldest first, skipping rows another batch has locked. It decides once for the organization
  and holds, in one guarded statement, the price of every message the money covers, in order
  (greedily: exactly the messages that single sends run one after another would have held).
  The rest are `blocked` with the reasons a single send gives. The held ones become `sending`
  with a lease owned by the claiming run (`owner`, the task id, which a redelivered copy of
  the task shares), committed before any call.
* `record` settles the answers: the holds of messages that may have gone out are captured in
  one statement, those Twilio refused released in one, and each message takes its status. A
  message not in the plain case (a callback overtook the answer, early callbacks wait for its
  SID, Twilio billed more segments than were held, nothing reached Twilio) is settled by
  `messages.record_result`, message by message, in the same transaction.

A run that dies between the two leaves its messages `sending`: `claim` by a later run of the
same task (same owner) calls them `unknown` and captures them once their lease is over, and
the outbox relay's copy of each message's own send task does the same for any other run. The
create is never repeated.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypedDict

from sqlalchemy import Connection, Row

from core import messages, outbound, outbox, sending, sql
from core.errors import RetryableConflict
from core.messages import CAMPAIGN_PAUSED, Plan, hold_reference
from core.providers.ports import SendOutcome, SendResult
from core.sending import INSUFFICIENT_BALANCE
from core.statuses import MessageStatus

SEND_BATCH_TASK = outbox.SEND_BATCH_TASK  # its one argument: the organization to drain


@dataclass(frozen=True)
class Claim:
    """What one claim decided: the messages to send now, what it blocked, and how long the
    owner's earlier run still holds messages it left `sending` (0: none)."""

    plans: list[Plan] = field(default_factory=list)
    blocked: int = 0
    settled_unknown: int = 0
    owner_lease_left: float = 0.0
    send_tries: dict[str, int] = field(default_factory=dict)


# The rows of the JSON parameters of _HOLD_MANY, _MARK and _SETTLE (jsonb_to_recordset's
# columns): short keys, since a batch sends a thousand of them.
class _HoldRow(TypedDict):
    r: str  # hold reference
    a: int  # amount, cents


class _MarkRow(TypedDict):
    m: str  # message id
    s: str  # status: sending | blocked
    r: list[str] | None  # block reasons
    a: str | None  # send attempt: the owner
    t: int  # send tries added


class _SettleRow(TypedDict):
    m: str  # message id
    s: str  # status
    e: str | None  # error
    sid: str | None
    c: int  # cents captured
    p: str | None  # Twilio's price
    pu: str | None  # its unit
    n: int | None  # segments Twilio billed


_TO_SEND = sql.statement(
    "send_batch.to_send",
    """
    SELECT m.message_id, m.org_id, m.campaign_id, m.to_number, m.body, m.status, m.price_cents,
           m.send_tries
    FROM messages m
    WHERE m.org_id = :org_id AND m.status IN ('queued', 'retrying')
    ORDER BY m.created_at, m.queue_seq
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """,
)

# The backlog's order comes from the messages_to_send index whatever the statistics say. With
# too few rows estimated (an organization's first big batch before ANALYZE, or any organization
# outside the statistics' most common values), PostgreSQL read and sorted the whole backlog for
# every claim, on disk past work_mem: 106 ms for a backlog of 200,000, against 0.1 ms for the
# 100 index entries. Sorting off for that one statement leaves the index scan its only plan.
_SORT_OFF = sql.statement("send_batch.sort_off", "SELECT set_config('enable_sort', 'off', true)")
_SORT_AS_CONFIGURED = sql.statement(
    "send_batch.sort_as_configured",
    "SELECT set_config(name, reset_val, true) FROM pg_settings WHERE name = 'enable_sort'",
)


def _to_send(conn: Connection, org_id: str, limit: int) -> list[Row[Any]]:
    if limit <= 0:
        return []
    with index_order(conn):
        return list(conn.execute(_TO_SEND, {"org_id": org_id, "limit": limit}))


@contextmanager
def index_order(conn: Connection) -> Iterator[None]:
    """Plan the statements run inside without sorting (see _SORT_OFF), then as configured."""
    conn.execute(_SORT_OFF)
    try:
        yield
    finally:
        conn.execute(_SORT_AS_CONFIGURED)


_OWNED_SENDING = sql.statement(
    "send_batch.owned_sending",
    """
    SELECT message_id, org_id, price_cents, status,
           extract(epoch FROM send_lease_until - now()) AS lease_left
    FROM messages
    WHERE org_id = :org_id AND status = 'sending' AND send_attempt = :send_attempt
    ORDER BY message_id
    FOR UPDATE SKIP LOCKED
    """,
)

_HOLD_MANY = sql.statement(
    "send_batch.hold_many",
    """
    WITH w AS (
        UPDATE wallets SET held_cents = held_cents + :total_cents, updated_at = now()
        WHERE org_id = :org_id AND active_freezes = 0 AND balance_cents - held_cents >= :total_cents
        RETURNING org_id
    ), h AS (
        INSERT INTO holds (org_id, reference, amount_cents)
        SELECT w.org_id, u.r, u.a FROM w, jsonb_to_recordset(CAST(:rows AS jsonb)) AS u(r text, a bigint)
        ON CONFLICT ON CONSTRAINT hold_reference_once DO NOTHING
        RETURNING reference
    )
    SELECT (SELECT count(*) FROM w) AS updated, (SELECT count(*) FROM h) AS held
    """,
)

_RELEASE_MANY = sql.statement(
    "send_batch.release_many",
    """
    WITH h AS (
        UPDATE holds SET status = 'released', settled_at = now(), captured_cents = 0
        WHERE org_id = :org_id AND reference = ANY(CAST(:references AS text[])) AND status = 'open'
        RETURNING amount_cents
    )
    UPDATE wallets SET held_cents = held_cents - (SELECT coalesce(sum(amount_cents), 0) FROM h),
        updated_at = now()
    WHERE org_id = :org_id
    RETURNING (SELECT count(*) FROM h) AS released
    """,
)

# Every hold captured whole, each with its journal row; balance_after follows the rows' order.
_CAPTURE_MANY = sql.statement(
    "send_batch.capture_many",
    """
    WITH h AS (
        UPDATE holds SET status = 'captured', settled_at = now(), captured_cents = amount_cents
        WHERE org_id = :org_id AND reference = ANY(CAST(:references AS text[])) AND status = 'open'
        RETURNING reference, amount_cents
    ), total AS (
        SELECT coalesce(sum(amount_cents), 0) AS s FROM h
    ), w AS (
        UPDATE wallets SET held_cents = held_cents - total.s,
            balance_cents = balance_cents - total.s, updated_at = now()
        FROM total WHERE wallets.org_id = :org_id
        RETURNING wallets.balance_cents, wallets.debt_cents, total.s
    ), j AS (
        INSERT INTO journal (org_id, kind, amount_cents, requested_cents, reference,
                             balance_after_cents, debt_after_cents, actor, reason)
        SELECT :org_id, 'capture', -h.amount_cents, h.amount_cents, 'hold:' || h.reference,
               w.balance_cents + w.s - sum(h.amount_cents) OVER (ORDER BY h.reference),
               w.debt_cents, 'system', NULL
        FROM h, w WHERE h.amount_cents > 0
        ORDER BY h.reference
        RETURNING id
    )
    SELECT h.reference, h.amount_cents, (SELECT count(*) FROM j) AS journaled FROM h
    """,
)

_MARK = sql.statement(
    "send_batch.mark",
    """
    UPDATE messages m SET status = u.s, block_reasons = coalesce(u.r, m.block_reasons),
        send_attempt = coalesce(u.a, m.send_attempt),
        send_tries = m.send_tries + u.t,
        send_lease_until = CASE WHEN u.s = 'sending'
                                THEN now() + make_interval(secs => :lease_seconds) END,
        twilio_subaccount_sid = CASE WHEN u.s = 'sending' THEN :twilio_subaccount_sid
                                     ELSE m.twilio_subaccount_sid END,
        updated_at = now()
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS u(m text, s text, r jsonb, a text, t int)
    WHERE m.message_id = u.m
    """,
)

_SETTLE = sql.statement(
    "send_batch.settle",
    """
    UPDATE messages m SET status = u.s, error = u.e, twilio_sid = coalesce(u.sid, m.twilio_sid),
        charged_cents = m.charged_cents + u.c, send_lease_until = NULL,
        twilio_price = coalesce(u.p, m.twilio_price),
        twilio_price_unit = CASE WHEN u.p IS NULL THEN m.twilio_price_unit
                                 ELSE coalesce(u.pu, m.twilio_price_unit) END,
        twilio_num_segments = coalesce(u.n, m.twilio_num_segments),
        updated_at = now()
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
         AS u(m text, s text, e text, sid text, c bigint, p text, pu text, n int)
    WHERE m.message_id = u.m
    """,
)


_WALLET_AVAILABLE = sql.statement(
    "send_batch.wallet_available",
    "SELECT balance_cents - held_cents FROM wallets WHERE org_id = :org_id FOR UPDATE",
)

_ORG_SENDER = sql.statement(
    "send_batch.org_sender",
    "SELECT twilio_subaccount_sid, sender FROM organizations WHERE org_id = :org_id",
)


def claim(conn: Connection, org_id: str, limit: int, policy: sending.Policy, owner: str) -> Claim:
    """Claim, decide and hold up to `limit` of the organization's messages (see the module)."""
    settled_unknown, lease_left = _settle_orphans(conn, org_id, owner, policy)
    rows = _to_send(conn, org_id, limit)
    if not rows:
        if settled_unknown:
            sending.reconcile(conn, org_id, policy)
        return Claim(settled_unknown=settled_unknown, owner_lease_left=lease_left)
    # The wallet row first: the decision below and the holds read one available balance.
    available = conn.execute(
        _WALLET_AVAILABLE,
        {"org_id": org_id},
    ).scalar_one()
    org_reasons = [
        r
        for r in sending.decide(conn, org_id, policy, needed_cents=0).reasons
        if r != INSUFFICIENT_BALANCE
    ]
    paused = _paused_campaigns(conn, org_id, {r.campaign_id for r in rows if r.campaign_id})
    to_hold: list[_HoldRow] = []
    to_release: list[str] = []
    marks: list[_MarkRow] = []
    send: list[Row[Any]] = []
    for row in rows:
        reasons = list(org_reasons)
        if row.status == MessageStatus.QUEUED and available < row.price_cents:
            reasons.append(INSUFFICIENT_BALANCE)
        if row.campaign_id in paused:
            reasons.append(CAMPAIGN_PAUSED)
        if reasons:
            if row.status == MessageStatus.RETRYING and row.price_cents > 0:
                to_release.append(hold_reference(row.message_id))
            marks.append({"m": row.message_id, "s": "blocked", "r": reasons, "a": None, "t": 0})
            continue
        if row.status == MessageStatus.QUEUED and row.price_cents > 0:
            available -= row.price_cents
            to_hold.append({"r": hold_reference(row.message_id), "a": row.price_cents})
        marks.append({"m": row.message_id, "s": "sending", "r": None, "a": owner, "t": 1})
        send.append(row)
    _hold_many(conn, org_id, to_hold)
    if to_release:
        conn.execute(_RELEASE_MANY, {"org_id": org_id, "references": to_release})
    org = conn.execute(
        _ORG_SENDER,
        {"org_id": org_id},
    ).one()
    conn.execute(
        _MARK,
        {
            "rows": json.dumps(marks),
            "lease_seconds": policy.send_lease.total_seconds(),
            "twilio_subaccount_sid": org.twilio_subaccount_sid,
        },
    )
    blocked = [m["m"] for m in marks if m["s"] == "blocked"]
    outbound.note_messages(conn, blocked)
    if to_hold or to_release:
        outbound.note_balance(conn, org_id)
    if blocked or settled_unknown:
        sending.reconcile(conn, org_id, policy)
    plans = [
        Plan(r.message_id, org_id, org.twilio_subaccount_sid, org.sender, r.to_number, r.body)
        for r in send
    ]
    return Claim(
        plans=plans,
        blocked=len(blocked),
        settled_unknown=settled_unknown,
        owner_lease_left=lease_left,
        send_tries={r.message_id: r.send_tries + 1 for r in send},
    )


def _hold_many(conn: Connection, org_id: str, holds: list[_HoldRow]) -> None:
    if not holds:
        return
    total = sum(h["a"] for h in holds)
    row = conn.execute(
        _HOLD_MANY, {"org_id": org_id, "total_cents": total, "rows": json.dumps(holds)}
    ).one()
    if not row.updated or row.held != len(holds):
        # The wallet row is locked and was read in this transaction, and queued messages hold
        # nothing yet: only a concurrent writer breaking those rules gets here. Start over.
        raise RetryableConflict(f"batch hold of {total} cents for {org_id!r} did not apply")


_PAUSED_CAMPAIGNS = sql.statement(
    "send_batch.paused_campaigns",
    """
    SELECT campaign_id FROM campaigns WHERE org_id = :org_id AND status = 'paused'
    AND campaign_id = ANY(CAST(:campaign_ids AS text[]))
    """,
)


def _paused_campaigns(conn: Connection, org_id: str, campaign_ids: set[str]) -> set[str]:
    if not campaign_ids:
        return set()
    return set(
        conn.execute(
            _PAUSED_CAMPAIGNS,
            {"org_id": org_id, "campaign_ids": sorted(campaign_ids)},
        ).scalars()
    )


def _settle_orphans(
    conn: Connection, org_id: str, owner: str, policy: sending.Policy
) -> tuple[int, float]:
    """Messages an earlier run of this very task left `sending`: that run died, during or
    right after its Twilio calls. Once the lease is over each may have gone out, so it is
    `unknown` and captured; while it lasts, (0, seconds left) tells the task to come back."""
    rows = conn.execute(_OWNED_SENDING, {"org_id": org_id, "send_attempt": owner}).all()
    over = [r for r in rows if r.lease_left is None or r.lease_left <= 0]
    left = max((float(r.lease_left) for r in rows if r not in over), default=0.0)
    for row in over:
        messages._settle(
            conn, row, "unknown", capture=True, error="worker lost during the Twilio call"
        )
    return len(over), left


@dataclass(frozen=True)
class Answer:
    """Twilio's answer to one message of a batch."""

    message_id: str
    result: SendResult


_LOCK_ANSWERED = sql.statement(
    "send_batch.lock_answered",
    """
    SELECT message_id, status, price_cents, segments FROM messages
    WHERE message_id = ANY(CAST(:message_ids AS text[])) ORDER BY message_id FOR UPDATE
    """,
)

_LOCK_SIDS = sql.statement(
    "send_batch.lock_sids",
    """
    SELECT pg_advisory_xact_lock(hashtext('twilio-sid:' || s))
    FROM unnest(CAST(:twilio_sids AS text[])) AS s ORDER BY s
    """,
)

_SIDS_WITH_EARLY_CALLBACKS = sql.statement(
    "send_batch.sids_with_early_callbacks",
    "SELECT DISTINCT twilio_sid FROM early_callbacks WHERE twilio_sid = ANY(:twilio_sids)",
)


def record(
    conn: Connection, org_id: str, answers: list[Answer], policy: sending.Policy
) -> dict[str, str]:
    """Settle a batch by Twilio's answers (see the module); each message's new status."""
    if not answers:
        return {}
    by_id = {a.message_id: a.result for a in answers}
    rows = {
        r.message_id: r
        for r in conn.execute(
            _LOCK_ANSWERED,
            {"message_ids": sorted(by_id)},
        )
    }
    sids = sorted(r.sid for r in by_id.values() if r.outcome == SendOutcome.ACCEPTED and r.sid)
    if sids:
        # The order record_result takes them in: message rows, then SIDs (a callback for one
        # of these SIDs waits for this commit, or has been kept as an early callback).
        conn.execute(
            _LOCK_SIDS,
            {"twilio_sids": sids},
        )
    waiting = set(
        conn.execute(
            _SIDS_WITH_EARLY_CALLBACKS,
            {"twilio_sids": sids},
        ).scalars()
        if sids
        else ()
    )
    plain: list[tuple[str, SendResult]] = []
    statuses: dict[str, str] = {}
    for message_id, result in by_id.items():
        row = rows.get(message_id)
        outcome = result.outcome
        segments = result.num_segments
        if (
            row is not None
            and row.status == "sending"
            and outcome in (SendOutcome.ACCEPTED, SendOutcome.REJECTED, SendOutcome.UNKNOWN)
            and result.sid not in waiting
            and (segments is None or segments <= row.segments)
        ):
            plain.append((message_id, result))
        else:
            statuses[message_id] = messages.record_result(conn, message_id, result, policy)
    if plain:
        statuses.update(_settle_plain(conn, org_id, plain, rows))
        sending.reconcile(conn, org_id, policy)
    return statuses


def _settle_plain(
    conn: Connection,
    org_id: str,
    plain: list[tuple[str, SendResult]],
    rows: dict[str, Row[Any]],
) -> dict[str, str]:
    capture = [
        hold_reference(m)
        for m, r in plain
        if r.outcome in (SendOutcome.ACCEPTED, SendOutcome.UNKNOWN) and rows[m].price_cents > 0
    ]
    release = [
        hold_reference(m)
        for m, r in plain
        if r.outcome == SendOutcome.REJECTED and rows[m].price_cents > 0
    ]
    captured: dict[str, int] = {}
    if capture:
        for c in conn.execute(_CAPTURE_MANY, {"org_id": org_id, "references": capture}):
            captured[c.reference] = c.amount_cents
    if release:
        conn.execute(_RELEASE_MANY, {"org_id": org_id, "references": release})
    if capture or release:
        outbound.note_balance(conn, org_id)
    settle: list[_SettleRow] = []
    for message_id, r in plain:
        outcome = str(r.outcome)  # the status, as the message row and the answer carry it
        error = None
        if outcome == SendOutcome.REJECTED:
            error = f"twilio {r.error_code}: {r.error_message}"
        elif outcome == SendOutcome.UNKNOWN:
            error = f"may have been sent: {r.error_message or r.http_status}"
        settle.append(
            {
                "m": message_id,
                "s": outcome,
                "e": error,
                "sid": r.sid if outcome == SendOutcome.ACCEPTED else None,
                "c": captured.get(hold_reference(message_id), 0),
                "p": None if r.price is None or str(r.price) == "" else str(r.price),
                "pu": r.price_unit,
                "n": r.num_segments if r.num_segments and r.num_segments > 0 else None,
            }
        )
    conn.execute(_SETTLE, {"rows": json.dumps(settle)})
    outbound.note_messages(conn, [message_id for message_id, _ in plain])
    return {m["m"]: m["s"] for m in settle}
