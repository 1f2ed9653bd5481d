"""The safe send path: no message reaches Twilio unless its price is held first.

A message moves queued -> sending (committed, with its hold and a send lease, before Twilio is
called) -> accepted | rejected | unknown, and status callbacks move an accepted one forward
only (sent, delivered, undelivered, failed). A message found `sending` by another run waits
for the lease of the run that owns it; once the lease is over with no SID recorded and no
callback, the owner died during the call: it may have been sent, so it becomes `unknown` and
its hold is captured; the create is never repeated (Twilio takes no idempotency key). A later
answer or callback (which names its message: `?m=`) still settles it to what Twilio did.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, Row

from core import outbound, outbox, sending, sql, wallet
from core.db import run_in_transaction
from core.errors import InvalidInput, NotFound, Refused
from core.providers.ports import SendOutcome, SendResult
from core.sms import count_segments, validate_e164
from core.statuses import CallbackStatus, MessageStatus

log = logging.getLogger(__name__)

SEND_TASK = outbox.SEND_MESSAGE_TASK
CAMPAIGN_PAUSED = "campaign_paused"
NO_SENDER = "no_sender"
MAX_BODY = 1600

# Callback statuses in the order Twilio moves through them; a message never moves back.
_RANK: dict[str, int] = {
    MessageStatus.ACCEPTED: 1,
    CallbackStatus.QUEUED: 1,
    CallbackStatus.SENDING: 2,
    CallbackStatus.SENT: 3,
    CallbackStatus.DELIVERED: 4,
    CallbackStatus.UNDELIVERED: 4,
    CallbackStatus.FAILED: 4,
    CallbackStatus.READ: 5,
}
CALLBACK_STATUSES = frozenset(CallbackStatus)


@dataclass(frozen=True)
class Message:
    message_id: str
    org_id: str
    campaign_id: str | None
    to_number: str
    status: str
    segments: int
    encoding: str
    price_cents: int
    charged_cents: int
    twilio_sid: str | None
    block_reasons: list[str]
    error: str | None
    twilio_price: str | None
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "org_id": self.org_id,
            "campaign_id": self.campaign_id,
            "to": self.to_number,
            "status": self.status,
            "segments": self.segments,
            "encoding": self.encoding,
            "price_cents": self.price_cents,
            "charged_cents": self.charged_cents,
            "twilio_sid": self.twilio_sid,
            "block_reasons": list(self.block_reasons),
            "error": self.error,
            "twilio_price": self.twilio_price,
            "created_at": self.created_at.isoformat(),
        }


_COLUMNS = (
    "message_id, org_id, campaign_id, to_number, status, segments, encoding, "
    "price_cents, charged_cents, twilio_sid, block_reasons, error, twilio_price, "
    "created_at"
)


_GET = sql.statement(
    "messages.get",
    f"SELECT {_COLUMNS} FROM messages WHERE message_id = :message_id",
)


def get(conn: Connection, message_id: str) -> Message:
    row = conn.execute(_GET, {"message_id": message_id}).first()
    if row is None:
        raise NotFound(f"no message {message_id!r}")
    return Message(**row._mapping)


def hold_reference(message_id: str) -> str:
    return f"msg:{message_id}"


def queue(
    conn: Connection,
    org_id: str,
    to: str,
    body: str,
    policy: sending.Policy,
    campaign_id: str | None = None,
) -> Message:
    """Record a message and queue its send task (published after commit); a message that
    sending already refuses now (any reason of `sending.decide`, a paused campaign) is
    recorded `blocked` with its reasons and never queued. Money is held later, by the task."""
    [queued] = queue_batch(conn, org_id, [(to, body)], policy, campaign_id)
    return get(conn, queued.message_id)


@dataclass(frozen=True)
class Queued:
    message_id: str
    status: str  # queued | blocked
    reasons: tuple[str, ...]
    outbox_id: int | None  # the send task to publish after commit (None when blocked)

    def as_dict(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "status": self.status, "reasons": list(self.reasons)}


def validate_message(to: object, body: object) -> tuple[int, str]:
    """(segments, encoding) of a message that may be queued, else InvalidInput."""
    try:
        if not isinstance(to, str):
            raise TypeError(to)
        validate_e164(to)
    except (ValueError, TypeError):
        raise InvalidInput(f"recipient must be an E.164 number, got {to!r}") from None
    if not isinstance(body, str) or not body or len(body) > MAX_BODY:
        raise InvalidInput(f"body must be 1-{MAX_BODY} characters")
    return count_segments(body)


_CAMPAIGN_PAUSED = sql.statement(
    "messages.campaign_paused",
    "SELECT status = 'paused' FROM campaigns WHERE org_id = :org_id AND campaign_id = :campaign_id",
)

_INSERT_BATCH = sql.statement(
    "messages.insert_batch",
    """
    INSERT INTO messages (message_id, org_id, campaign_id, to_number, body, segments,
        encoding, price_cents, status, block_reasons)
    SELECT m, :org_id, :campaign_id, t, b, s, e, s * :price, :status, CAST(:reasons AS jsonb)
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS u(m text, t text, b text,
        s int, e text)
    """,
)


def queue_batch(
    conn: Connection,
    org_id: str,
    items: list[tuple[str, str]],
    policy: sending.Policy,
    campaign_id: str | None = None,
) -> list[Queued]:
    """Queue (to, body) messages as `queue` does, all or none: one decision for all of them,
    one INSERT of the messages and one of their send tasks. Affordability is decided as for a
    single send, message by message when the task holds its price, so a batch larger than
    the wallet stops exactly where the money does."""
    shapes = []
    for n, (to, body) in enumerate(items):
        try:
            shapes.append(validate_message(to, body))
        except InvalidInput as exc:
            raise InvalidInput(f"message {n}: {exc}") from None
    decision = sending.decide(conn, org_id, policy)
    reasons = list(decision.reasons)
    if campaign_id is not None:
        paused = conn.execute(
            _CAMPAIGN_PAUSED,
            {"org_id": org_id, "campaign_id": campaign_id},
        ).first()
        if paused is None:
            raise NotFound(f"no campaign {campaign_id!r} for {org_id!r}")
        if paused[0]:
            reasons.append(CAMPAIGN_PAUSED)
    status = MessageStatus.BLOCKED if reasons else MessageStatus.QUEUED
    ids = [f"msg_{uuid.uuid4().hex}" for _ in items]
    # One JSON parameter rather than arrays: psycopg escapes array elements one by one in
    # Python, which cost more than the rest of a 1,000-message batch together.
    rows = [
        {"m": m, "t": to, "b": body, "s": segments, "e": encoding}
        for m, (to, body), (segments, encoding) in zip(ids, items, shapes, strict=True)
    ]
    conn.execute(
        _INSERT_BATCH,
        {
            "org_id": org_id,
            "campaign_id": campaign_id,
            "price": decision.segment_price_cents,
            "status": status,
            "reasons": json.dumps(reasons),
            "rows": json.dumps(rows),
        },
    )
    outbox_ids: list[int | None] = [None] * len(ids)
    if status == MessageStatus.QUEUED:
        outbox_ids = list(outbox.enqueue_many(conn, SEND_TASK, [[m] for m in ids]))
    return [Queued(m, status, tuple(reasons), o) for m, o in zip(ids, outbox_ids, strict=True)]


@dataclass(frozen=True)
class Plan:
    """What the task needs to call Twilio, decided and held in one transaction."""

    message_id: str
    org_id: str
    subaccount_sid: str | None
    sender: str | None
    to: str
    body: str


@dataclass(frozen=True)
class LeaseHeld:
    """Another run is sending this message and its lease lasts `seconds_left` more: come back
    then (it will have settled the message, or died and left it to be settled)."""

    seconds_left: float


_LOCK_FOR_SENDING = sql.statement(
    "messages.lock_for_sending",
    """
    SELECT m.message_id, m.org_id, m.campaign_id, m.to_number, m.body, m.status,
        m.price_cents, m.segments, m.refunded,
        extract(epoch FROM m.send_lease_until - now()) AS lease_left,
        o.twilio_subaccount_sid, o.sender FROM messages m
    JOIN organizations o ON o.org_id = m.org_id
    WHERE m.message_id = :message_id FOR UPDATE OF m
    """,
)

_BLOCK = sql.statement(
    "messages.block",
    """
    UPDATE messages SET status = 'blocked', block_reasons = CAST(:reasons AS jsonb),
    updated_at = now() WHERE message_id = :message_id
    """,
)

_MARK_SENDING = sql.statement(
    "messages.mark_sending",
    """
    UPDATE messages SET status = 'sending', send_attempt = :send_attempt,
        send_lease_until = now() + make_interval(secs => :lease_seconds),
        twilio_subaccount_sid = :twilio_subaccount_sid, updated_at = now()
    WHERE message_id = :message_id
    """,
)


def prepare(conn: Connection, message_id: str, policy: sending.Policy) -> Plan | LeaseHeld | None:
    """Decide and hold, or block; None when there is nothing to send (any more).

    The run that marks a message `sending` owns it for `policy.send_lease`, longer than any
    Twilio call lasts. Another run (a redelivery, or a copy the outbox relay published with
    the same task id) that finds it `sending` leaves it alone while the lease lasts; after
    that, nobody recorded a SID and no callback named it: it may have gone out, so it
    becomes `unknown`, charged, and is never sent again."""
    row = conn.execute(
        _LOCK_FOR_SENDING,
        {"message_id": message_id},
    ).first()
    if row is None:
        raise NotFound(f"no message {message_id!r}")
    if row.status == MessageStatus.SENDING:
        if row.lease_left is not None and row.lease_left > 0:
            return LeaseHeld(float(row.lease_left))
        # The owning run died during (or right after) the Twilio call: it may have gone out.
        _settle(
            conn,
            row,
            MessageStatus.UNKNOWN,
            capture=True,
            error="worker lost during the Twilio call",
        )
        sending.reconcile(conn, row.org_id, policy)
        return None
    if row.status not in (MessageStatus.QUEUED, MessageStatus.RETRYING):
        return None
    if row.status == MessageStatus.QUEUED:
        reasons = _refusals(conn, row, policy, needed_cents=row.price_cents)
        if not reasons and row.price_cents > 0:
            try:
                wallet.hold(conn, row.org_id, row.price_cents, hold_reference(message_id))
            except Refused:
                # Another send took the last of the balance between decision and hold.
                reasons = _refusals(conn, row, policy, needed_cents=row.price_cents) or [
                    sending.INSUFFICIENT_BALANCE
                ]
    else:
        # A retry: the hold is already ours, but whatever blocked sending since (a lapsed
        # subscription, a suspension, a freeze, a pause) stops it before it reaches Twilio.
        reasons = _refusals(conn, row, policy, needed_cents=0)
        if reasons and row.price_cents > 0:
            wallet.release(conn, row.org_id, hold_reference(message_id))
    if reasons:
        conn.execute(
            _BLOCK,
            {"reasons": json.dumps(reasons), "message_id": message_id},
        )
        outbound.note_message(conn, message_id)
        sending.reconcile(conn, row.org_id, policy)
        return None
    conn.execute(
        _MARK_SENDING,
        {
            "send_attempt": uuid.uuid4().hex,
            "lease_seconds": policy.send_lease.total_seconds(),
            "twilio_subaccount_sid": row.twilio_subaccount_sid,
            "message_id": message_id,
        },
    )
    return Plan(
        message_id, row.org_id, row.twilio_subaccount_sid, row.sender, row.to_number, row.body
    )


def status_callback_url(public_base_url: str, message_id: str) -> str:
    """Where Twilio reports a message's status: the message is named in the URL (which
    Twilio's signature covers), so a callback finds it even if its SID was never recorded."""
    return f"{public_base_url.rstrip('/')}/webhooks/twilio/status?m={message_id}"


def _refusals(
    conn: Connection, row: Row[Any], policy: sending.Policy, *, needed_cents: int
) -> list[str]:
    reasons = list(sending.decide(conn, row.org_id, policy, needed_cents=needed_cents).reasons)
    if row.campaign_id and _campaign_paused(conn, row.org_id, row.campaign_id):
        reasons.append(CAMPAIGN_PAUSED)
    return reasons


def _campaign_paused(conn: Connection, org_id: str, campaign_id: str) -> bool:
    return (
        conn.execute(
            _CAMPAIGN_PAUSED,
            {"org_id": org_id, "campaign_id": campaign_id},
        ).scalar()
        is True
    )


_SETTLE = sql.statement(
    "messages.settle",
    """
    UPDATE messages SET status = :status, error = :error, twilio_sid = coalesce(:twilio_sid,
        twilio_sid), charged_cents = charged_cents + :charged, send_lease_until = NULL,
    updated_at = now() WHERE message_id = :message_id
    """,
)


def _settle(
    conn: Connection,
    row: Row[Any],
    status: str,
    *,
    capture: bool,
    error: str | None = None,
    sid: str | None = None,
) -> None:
    ref = hold_reference(row.message_id)
    charged = 0
    if row.price_cents > 0:
        if capture:
            charged = wallet.capture(conn, row.org_id, ref).captured_cents or 0
        else:
            wallet.release(conn, row.org_id, ref)
    conn.execute(
        _SETTLE,
        {
            "status": status,
            "error": error,
            "twilio_sid": sid,
            "charged": charged,
            "message_id": row.message_id,
        },
    )
    outbound.note_message(conn, row.message_id)


_LOCKED_MESSAGE = """
    SELECT m.message_id, m.org_id, m.price_cents, m.segments, m.status, m.twilio_sid,
           m.charged_cents, m.refunded, m.twilio_num_segments,
           coalesce(m.twilio_subaccount_sid, o.twilio_subaccount_sid) AS subaccount
    FROM messages m JOIN organizations o ON o.org_id = m.org_id
"""
_LOCK_BY_ID = sql.statement(
    "messages.lock_by_id",
    _LOCKED_MESSAGE + "    WHERE m.message_id = :message_id FOR UPDATE OF m\n",
)
_LOCK_BY_SID = sql.statement(
    "messages.lock_by_sid",
    _LOCKED_MESSAGE + "    WHERE m.twilio_sid = :twilio_sid FOR UPDATE OF m\n",
)


def _lock_message(
    conn: Connection, *, message_id: str | None = None, sid: str | None = None
) -> Row[Any] | None:
    if message_id is not None:
        return conn.execute(_LOCK_BY_ID, {"message_id": message_id}).first()
    return conn.execute(_LOCK_BY_SID, {"twilio_sid": sid}).first()


_MARK_RETRYING = sql.statement(
    "messages.mark_retrying",
    """
    UPDATE messages SET status = 'retrying', error = :error, send_lease_until = NULL,
    updated_at = now() WHERE message_id = :message_id
    """,
)


def _relock(conn: Connection, *, message_id: str | None = None, sid: str | None = None) -> Row[Any]:
    """The message row read again after a change to it in this unit (it is locked: there)."""
    row = _lock_message(conn, message_id=message_id, sid=sid)
    if row is None:
        raise NotFound(f"no message {message_id or sid!r}")
    return row


def record_result(
    conn: Connection, message_id: str, result: SendResult, policy: sending.Policy
) -> str:
    """Settle the hold by Twilio's answer: captured if it may have been sent, else released.

    An answer that comes after the message was settled otherwise still says what happened:
    a message given up as `unknown` learns its SID, one a callback settled its billing."""
    row = _lock_message(conn, message_id=message_id)
    if row is None:
        raise NotFound(f"no message {message_id!r}")
    outcome = result.outcome
    if row.status != MessageStatus.SENDING:
        if outcome == SendOutcome.ACCEPTED and result.sid:
            return _late_answer(conn, row, result, result.sid, policy)
        if (
            outcome == SendOutcome.REJECTED
            and row.status == MessageStatus.UNKNOWN
            and not row.twilio_sid
        ):
            return _late_refusal(conn, row, result, policy)
        return str(row.status)
    if outcome == SendOutcome.ACCEPTED:
        if result.sid:
            _lock_sid(conn, result.sid)  # a callback for it waits, or is already kept
        _settle(conn, row, MessageStatus.ACCEPTED, capture=True, sid=result.sid)
        status: str = MessageStatus.ACCEPTED
        _record_billing(conn, row, result.price, result.price_unit, result.num_segments)
        if result.sid:
            status = apply_early_callbacks(conn, result.sid, policy) or status
    elif outcome == SendOutcome.REJECTED:
        _settle(
            conn,
            row,
            MessageStatus.REJECTED,
            capture=False,
            error=f"twilio {result.error_code}: {result.error_message}",
        )
        status = MessageStatus.REJECTED
    elif outcome == SendOutcome.UNKNOWN:
        _settle(
            conn,
            row,
            MessageStatus.UNKNOWN,
            capture=True,
            error=f"may have been sent: {result.error_message or result.http_status}",
        )
        status = MessageStatus.UNKNOWN
    else:  # RETRY_SAFE: nothing reached Twilio; keep the hold and try again
        conn.execute(
            _MARK_RETRYING,
            {"error": result.error_message or "retrying", "message_id": message_id},
        )
        return MessageStatus.RETRYING
    sending.reconcile(conn, row.org_id, policy)
    return status


def _late_answer(
    conn: Connection, row: Row[Any], result: SendResult, sid: str, policy: sending.Policy
) -> str:
    """Twilio's `accepted` (as `sid`) for a message no longer `sending`: it settled without
    the answer."""
    if row.twilio_sid is None and row.status == MessageStatus.UNKNOWN:
        _lock_sid(conn, sid)
        _adopt_sid(conn, row, sid)
        row = _relock(conn, message_id=row.message_id)
        _record_billing(conn, row, result.price, result.price_unit, result.num_segments)
        status = apply_early_callbacks(conn, sid, policy) or MessageStatus.ACCEPTED
        sending.reconcile(conn, row.org_id, policy)
        return status
    if row.twilio_sid == sid:  # a callback named the message first
        _record_billing(conn, row, result.price, result.price_unit, result.num_segments)
    return str(row.status)


_REJECT_LATE = sql.statement(
    "messages.reject_late",
    """
    UPDATE messages SET status = 'rejected', refunded = charged_cents > 0, error = :error,
    updated_at = now() WHERE message_id = :message_id
    """,
)


def _late_refusal(
    conn: Connection, row: Row[Any], result: SendResult, policy: sending.Policy
) -> str:
    """Twilio refused a message given up as `unknown`: it was never sent, so what `unknown`
    charged is given back (once: the refund's reference is the message's)."""
    if row.charged_cents > 0:
        wallet.credit(
            conn, row.org_id, row.charged_cents, f"msg:{row.message_id}:refund",
            kind="message_refund", reason="Twilio refused the message after all",
        )  # fmt: skip
    conn.execute(
        _REJECT_LATE,
        {
            "error": f"twilio {result.error_code}: {result.error_message}",
            "message_id": row.message_id,
        },
    )
    outbound.note_message(conn, row.message_id)
    sending.reconcile(conn, row.org_id, policy)
    return MessageStatus.REJECTED


_ACCEPT_UNKNOWN = sql.statement(
    "messages.accept_unknown",
    """
    UPDATE messages SET status = 'accepted', twilio_sid = :twilio_sid, error = NULL,
    updated_at = now() WHERE message_id = :message_id
    """,
)


def _adopt_sid(conn: Connection, row: Row[Any], sid: str) -> None:
    """Twilio has this message as `sid`: a message still `sending` is captured as accepted;
    one given up as `unknown` (already captured) is accepted after all."""
    if row.status == MessageStatus.SENDING:
        _settle(conn, row, MessageStatus.ACCEPTED, capture=True, sid=sid)
    else:
        conn.execute(
            _ACCEPT_UNKNOWN,
            {"twilio_sid": sid, "message_id": row.message_id},
        )
        outbound.note_message(conn, row.message_id)


_LOCK_TO_GIVE_UP = sql.statement(
    "messages.lock_to_give_up",
    """
    SELECT message_id, org_id, price_cents, status FROM messages
    WHERE message_id = :message_id FOR UPDATE
    """,
)


def give_up(conn: Connection, message_id: str, policy: sending.Policy, error: str) -> None:
    """Retries exhausted before anything reached Twilio: release the hold."""
    row = conn.execute(
        _LOCK_TO_GIVE_UP,
        {"message_id": message_id},
    ).one()
    if row.status == MessageStatus.RETRYING:
        _settle(conn, row, MessageStatus.NOT_SENT, capture=False, error=error)
        sending.reconcile(conn, row.org_id, policy)


class WrongSigner(Exception):
    """A callback signed with one subaccount's token names a message of another subaccount."""


def _signed_by(row: Row[Any], signer: str | None) -> bool:
    # The parent account's token (signer None) vouches for every subaccount's messages.
    return signer is None or signer == row.subaccount


_KEEP_EARLY_CALLBACK = sql.statement(
    "messages.keep_early_callback",
    """
    INSERT INTO early_callbacks (twilio_sid, status, price, price_unit,
        num_segments, signer_account, message_id)
    VALUES (:twilio_sid, :status, :price, :price_unit, :segments, :signer, :message_id)
    """,
)


def apply_status_callback(
    conn: Connection,
    sid: str,
    status: str,
    *,
    price: str | None = None,
    price_unit: str | None = None,
    num_segments: object = None,
    policy: sending.Policy | None = None,
    signer: str | None = None,
    message_id: str | None = None,
) -> str | None:
    """Move a message forward only; `failed` refunds its charge once. Returns the new status.

    `signer` is the subaccount whose token signed the callback (None: the parent account's);
    WrongSigner when that is not the subaccount the message was sent through. `message_id`
    (the callback URL's `?m=`) finds a message whose SID was never recorded: Twilio's
    callback proves it was accepted, so it is settled as such.
    A refund can make sending possible again, so it reconciles campaigns in the same unit."""
    status = status.lower()
    if status not in CALLBACK_STATUSES:
        return None
    policy = policy or sending.Policy()
    segments = _parse_segments(num_segments) if num_segments is not None else None
    named = None
    if message_id is not None:
        # The message row first, then the SID: the order record_result takes them in.
        named = _lock_message(conn, message_id=message_id)
        if named is not None and not _signed_by(named, signer):
            raise WrongSigner(f"{signer} did not send {message_id}")
    _lock_sid(conn, sid)
    row = _lock_message(conn, sid=sid)
    if (
        row is None
        and named is not None
        and named.twilio_sid is None
        and named.status in (MessageStatus.SENDING, MessageStatus.UNKNOWN)
    ):
        _adopt_sid(conn, named, sid)
        row = _lock_message(conn, sid=sid)
    if row is None:
        # The worker has not recorded this SID yet (or never will): keep the callback;
        # record_result applies it when the SID arrives, if its signer may speak for the
        # message then. Twilio does not send it again.
        conn.execute(
            _KEEP_EARLY_CALLBACK,
            {
                "twilio_sid": sid, "status": status, "price": price, "price_unit": price_unit,
                "segments": segments,
                "signer": signer, "message_id": message_id,
            },
        )  # fmt: skip
        return "pending"
    if not _signed_by(row, signer):
        raise WrongSigner(f"{signer} did not send {row.message_id}")
    new = _apply(conn, row, status, policy)
    _record_billing(conn, _relock(conn, sid=sid), price, price_unit, segments)
    if new != row.status:  # after billing, so the event carries what the message cost
        outbound.note_message(conn, row.message_id)
    if (
        named is not None
        and named.status in (MessageStatus.SENDING, MessageStatus.UNKNOWN)
        and named.twilio_sid is None
    ):
        sending.reconcile(conn, row.org_id, policy)
        new = apply_early_callbacks(conn, sid, policy) or new
    return new


_SET_STATUS = sql.statement(
    "messages.set_status",
    "UPDATE messages SET status = :status, updated_at = now() WHERE message_id = :message_id",
)

_CHARGED = sql.statement(
    "messages.charged",
    "SELECT charged_cents FROM messages WHERE message_id = :message_id",
)

_MARK_REFUNDED = sql.statement(
    "messages.mark_refunded",
    "UPDATE messages SET refunded = true WHERE message_id = :message_id",
)


def _apply(conn: Connection, row: Row[Any], status: str, policy: sending.Policy) -> str:
    if _RANK.get(status, 0) <= _RANK.get(row.status, 0):
        return str(row.status)
    conn.execute(
        _SET_STATUS,
        {"status": status, "message_id": row.message_id},
    )
    if status == MessageStatus.FAILED:
        # Re-read: the charge may have grown by extra segments in this very unit.
        charged = conn.execute(
            _CHARGED,
            {"message_id": row.message_id},
        ).scalar_one()
        if charged > 0:
            wallet.credit(
                conn,
                row.org_id,
                charged,
                f"msg:{row.message_id}:refund",
                kind="message_refund",
                reason="Twilio reported the message failed",
            )
            conn.execute(
                _MARK_REFUNDED,
                {"message_id": row.message_id},
            )
            sending.reconcile(conn, row.org_id, policy)
    return status


def segments_reference(message_id: str) -> str:
    return f"msg:{message_id}:segments"


_RECORD_PRICE = sql.statement(
    "messages.record_price",
    """
    UPDATE messages SET twilio_price = :price, twilio_price_unit =
        coalesce(:price_unit, twilio_price_unit) WHERE message_id = :message_id
    """,
)

_RECORD_SEGMENTS = sql.statement(
    "messages.record_segments",
    "UPDATE messages SET twilio_num_segments = :num_segments WHERE message_id = :message_id",
)

_CHARGE_EXTRA = sql.statement(
    "messages.charge_extra",
    "UPDATE messages SET charged_cents = charged_cents + :amount WHERE message_id = :message_id",
)


def _record_billing(
    conn: Connection,
    row: Row[Any],
    price: Decimal | str | None,
    price_unit: str | None,
    num_segments: int | None,
) -> None:
    """Keep what Twilio billed; charge segments it billed beyond those held, once.

    The extra is charged like a refunded payment is taken back: from what is available, the
    rest as debt (which freezes the wallet). A refunded (failed) message is charged nothing
    more; one refunded after the extra was charged gets that back with the rest."""
    if price is not None and str(price) != "":
        conn.execute(
            _RECORD_PRICE,
            {"price": str(price), "price_unit": price_unit, "message_id": row.message_id},
        )
    if num_segments is None or num_segments < 1:
        return
    conn.execute(
        _RECORD_SEGMENTS,
        {"num_segments": num_segments, "message_id": row.message_id},
    )
    extra = num_segments - row.segments
    if extra <= 0 or row.price_cents <= 0 or row.refunded:
        return
    reference = segments_reference(row.message_id)
    if wallet.entry(conn, row.org_id, reference) is not None:
        return  # charged already (the message row is locked: nobody else is charging it)
    amount = extra * (row.price_cents // row.segments)
    wallet.clawback(
        conn, row.org_id, amount, reference, kind="segments_charge",
        reason=f"Twilio billed {num_segments} segments, {row.segments} were held",
    )  # fmt: skip
    conn.execute(
        _CHARGE_EXTRA,
        {"amount": amount, "message_id": row.message_id},
    )


def _parse_segments(value: object) -> int | None:
    try:
        n = int(str(value))
    except ValueError:
        return None
    return n if n > 0 else None


_LOCK_SID = sql.statement(
    "messages.lock_sid",
    "SELECT pg_advisory_xact_lock(hashtext('twilio-sid:' || :twilio_sid))",
)


def _lock_sid(conn: Connection, sid: str) -> None:
    """Serialize a SID's callback with the worker's recording of that SID."""
    conn.execute(_LOCK_SID, {"twilio_sid": sid})


_TAKE_EARLY_CALLBACKS = sql.statement(
    "messages.take_early_callbacks",
    """
    DELETE FROM early_callbacks WHERE twilio_sid = :twilio_sid
    RETURNING status, price, price_unit, num_segments, signer_account, id
    """,
)


def apply_early_callbacks(conn: Connection, sid: str, policy: sending.Policy) -> str | None:
    """Apply, in arrival order, callbacks that came before the SID was recorded; one whose
    signer did not send this message is dropped (it could not have spoken for it then)."""
    early = conn.execute(
        _TAKE_EARLY_CALLBACKS,
        {"twilio_sid": sid},
    ).all()
    status = None
    for cb in sorted(early, key=lambda r: r.id):
        try:
            status = apply_status_callback(
                conn, sid, cb.status, price=cb.price, price_unit=cb.price_unit,
                num_segments=cb.num_segments, policy=policy, signer=cb.signer_account,
            )  # fmt: skip
        except WrongSigner:
            log.warning(
                "early callback dropped: signed by another subaccount",
                extra={"twilio_sid": sid, "signer": cb.signer_account},
            )
    return status


@dataclass(frozen=True)
class SegmentMismatch:
    """A message Twilio billed for another number of segments than its wallet paid for."""

    message_id: str
    org_id: str
    charged_segments: int
    twilio_segments: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "org_id": self.org_id,
            "charged_segments": self.charged_segments,
            "twilio_segments": self.twilio_segments,
        }


_SEGMENT_MISMATCHES = sql.statement(
    "messages.segment_mismatches",
    """
    SELECT m.message_id, m.org_id, m.segments AS charged_segments,
           m.twilio_num_segments AS twilio_segments, count(*) OVER () AS total
    FROM messages m
    LEFT JOIN journal j ON j.org_id = m.org_id AND j.reference = 'msg:' || m.message_id || :suffix
    WHERE m.twilio_num_segments IS NOT NULL AND m.twilio_num_segments <> m.segments
      AND m.price_cents > 0 AND m.charged_cents > 0 AND NOT m.refunded
      AND j.id IS NULL
    ORDER BY m.message_id
    LIMIT :limit
    """,
)


def segment_mismatches(conn: Connection, limit: int = 1000) -> tuple[int, list[SegmentMismatch]]:
    """How many charged, unrefunded messages Twilio billed for other than the segments
    charged, and the first `limit` of them. A message charged its extra segments
    (`msg:<id>:segments`) agrees; one billed fewer than held, or more but not charged, does
    not. Reads only messages whose Twilio count differs from the held one (a partial index)."""
    rows = conn.execute(
        _SEGMENT_MISMATCHES,
        {"limit": limit, "suffix": ":segments"},
    ).all()
    found = [SegmentMismatch(*r[:4]) for r in rows]
    return (int(rows[0].total) if rows else 0), found


_STALE_HOLDS = sql.statement(
    "messages.stale_holds",
    """
    SELECT h.org_id, h.reference, m.message_id, m.status, m.price_cents
    FROM holds h LEFT JOIN messages m ON 'msg:' || m.message_id = h.reference
    WHERE h.status = 'open' AND h.created_at < :cutoff ORDER BY h.created_at
    LIMIT :limit FOR UPDATE OF h SKIP LOCKED
    """,
)

_SETTLE_STALE = sql.statement(
    "messages.settle_stale",
    """
    UPDATE messages SET status = CASE WHEN status = 'sending'
        THEN 'unknown' WHEN status IN ('queued', 'retrying') THEN 'not_sent'
        ELSE status END, charged_cents = CASE WHEN :may_have_been_sent THEN price_cents
        ELSE charged_cents END, updated_at = now() WHERE message_id = :message_id
    """,
)

_PRUNE_EARLY_CALLBACKS = sql.statement(
    "messages.prune_early_callbacks",
    "DELETE FROM early_callbacks WHERE received_at < now() - interval '1 day'",
)


def expire_stale_holds(
    engine: Engine, max_age_seconds: float, limit: int, policy: sending.Policy
) -> int:
    """Settle holds older than max age: captured if the message may have gone out."""
    cutoff = datetime.now(UTC) - timedelta(seconds=max_age_seconds)

    def run(conn: Connection) -> int:
        rows = conn.execute(
            _STALE_HOLDS,
            {"cutoff": cutoff, "limit": limit},
        ).all()
        for r in rows:
            may_have_been_sent = r.status in (
                MessageStatus.SENDING,
                MessageStatus.ACCEPTED,
                MessageStatus.UNKNOWN,
                None,
            )
            if may_have_been_sent:
                wallet.capture(conn, r.org_id, r.reference)
            else:
                wallet.release(conn, r.org_id, r.reference)
            if r.message_id:
                conn.execute(
                    _SETTLE_STALE,
                    {"may_have_been_sent": may_have_been_sent, "message_id": r.message_id},
                )
                outbound.note_message(conn, r.message_id)
            log.info(
                "stale hold settled",
                extra={
                    "org_id": r.org_id,
                    "reference": r.reference,
                    "captured": may_have_been_sent,
                },
            )
        # Callbacks for SIDs no worker ever recorded (not Payguard's messages) go after a day.
        conn.execute(_PRUNE_EARLY_CALLBACKS)
        for org_id in {r.org_id for r in rows}:
            sending.reconcile(conn, org_id, policy)
        return len(rows)

    return run_in_transaction(engine, run)
