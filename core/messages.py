"""The safe send path: no message reaches Twilio unless its price is held first.

A message moves queued -> sending (committed, with its hold, before Twilio is called) ->
accepted | rejected | unknown, and status callbacks move an accepted one forward only
(sent, delivered, undelivered, failed). A message found in `sending` by a redelivered task
means a worker died during the call: it may have been sent, so it becomes `unknown` and its
hold is captured; the create is never repeated (Twilio takes no idempotency key).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, text

from core import inbox, outbound, sending, wallet
from core.db import run_in_transaction
from core.errors import InvalidInput, NotFound, Refused
from core.sms import count_segments, validate_e164

log = logging.getLogger(__name__)

SEND_TASK = inbox.SEND_MESSAGE_TASK
CAMPAIGN_PAUSED = "campaign_paused"
NO_SENDER = "no_sender"
MAX_BODY = 1600

# Callback statuses in the order Twilio moves through them; a message never moves back.
_RANK = {
    "accepted": 1,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "delivered": 4,
    "undelivered": 4,
    "failed": 4,
    "read": 5,
}
CALLBACK_STATUSES = frozenset(_RANK) - {"accepted"}


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
    block_reasons: list
    error: str | None
    twilio_price: str | None
    created_at: datetime

    def as_dict(self) -> dict:
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


def get(conn: Connection, message_id: str) -> Message:
    row = conn.execute(
        text(f"SELECT {_COLUMNS} FROM messages WHERE message_id = :m"), {"m": message_id}
    ).first()
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
    """Record a message and queue its send task (published after commit)."""
    try:
        validate_e164(to)
    except ValueError:
        raise InvalidInput(f"recipient must be an E.164 number, got {to!r}") from None
    if not isinstance(body, str) or not body or len(body) > MAX_BODY:
        raise InvalidInput(f"body must be 1-{MAX_BODY} characters")
    segments, encoding = count_segments(body)
    decision = sending.decide(conn, org_id, policy)
    if (
        campaign_id is not None
        and not conn.execute(
            text("SELECT 1 FROM campaigns WHERE org_id = :o AND campaign_id = :c"),
            {"o": org_id, "c": campaign_id},
        ).first()
    ):
        raise NotFound(f"no campaign {campaign_id!r} for {org_id!r}")
    message_id = f"msg_{uuid.uuid4().hex}"
    conn.execute(
        text(
            "INSERT INTO messages (message_id, org_id, campaign_id, to_number, body, segments, "
            "encoding, price_cents) VALUES (:m, :o, :c, :to, :b, :s, :e, :p)"
        ),
        {
            "m": message_id,
            "o": org_id,
            "c": campaign_id,
            "to": to,
            "b": body,
            "s": segments,
            "e": encoding,
            "p": segments * decision.segment_price_cents,
        },
    )
    inbox.enqueue(conn, SEND_TASK, [message_id])
    return get(conn, message_id)


@dataclass(frozen=True)
class Plan:
    """What the task needs to call Twilio, decided and held in one transaction."""

    message_id: str
    org_id: str
    subaccount_sid: str | None
    sender: str | None
    to: str
    body: str


def prepare(
    conn: Connection, message_id: str, policy: sending.Policy, attempt: str | None = None
) -> Plan | None:
    """Decide and hold, or block; None when there is nothing to send (any more).

    `attempt` is the delivery's task id: a redelivery of the same task that finds the message
    `sending` knows its own earlier run died during the call; a different (duplicate) task
    leaves it to the run that owns it."""
    row = conn.execute(
        text(
            "SELECT m.message_id, m.org_id, m.campaign_id, m.to_number, m.body, m.status, "
            "m.price_cents, m.send_attempt, o.twilio_subaccount_sid, o.sender FROM messages m "
            "JOIN organizations o ON o.org_id = m.org_id "
            "WHERE m.message_id = :m FOR UPDATE OF m"
        ),
        {"m": message_id},
    ).first()
    if row is None:
        raise NotFound(f"no message {message_id!r}")
    if row.status == "sending":
        if attempt is not None and row.send_attempt not in (None, attempt):
            return None  # a duplicate delivery; the owning run settles it
        # A worker died during the Twilio call: it may have gone out. Never send again.
        _settle(conn, row, "unknown", capture=True, error="worker lost during the Twilio call")
        return None
    if row.status not in ("queued", "retrying"):
        return None
    if row.status == "queued":
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
            text(
                "UPDATE messages SET status = 'blocked', block_reasons = CAST(:r AS jsonb), "
                "updated_at = now() WHERE message_id = :m"
            ),
            {"r": json.dumps(reasons), "m": message_id},
        )
        outbound.note_message(conn, message_id)
        sending.reconcile(conn, row.org_id, policy)
        return None
    conn.execute(
        text(
            "UPDATE messages SET status = 'sending', send_attempt = :a, updated_at = now() "
            "WHERE message_id = :m"
        ),
        {"a": attempt, "m": message_id},
    )
    return Plan(
        message_id, row.org_id, row.twilio_subaccount_sid, row.sender, row.to_number, row.body
    )


def _refusals(conn: Connection, row, policy: sending.Policy, *, needed_cents: int) -> list[str]:
    reasons = list(sending.decide(conn, row.org_id, policy, needed_cents=needed_cents).reasons)
    if row.campaign_id and _campaign_paused(conn, row.org_id, row.campaign_id):
        reasons.append(CAMPAIGN_PAUSED)
    return reasons


def _campaign_paused(conn: Connection, org_id: str, campaign_id: str) -> bool:
    return (
        conn.execute(
            text("SELECT status = 'paused' FROM campaigns WHERE org_id = :o AND campaign_id = :c"),
            {"o": org_id, "c": campaign_id},
        ).scalar()
        is True
    )


def _settle(
    conn: Connection,
    row,
    status: str,
    *,
    capture: bool,
    error: str | None = None,
    sid: str | None = None,
    twilio_status: str | None = None,
) -> None:
    ref = hold_reference(row.message_id)
    charged = 0
    if row.price_cents > 0:
        if capture:
            charged = wallet.capture(conn, row.org_id, ref).captured_cents or 0
        else:
            wallet.release(conn, row.org_id, ref)
    conn.execute(
        text(
            "UPDATE messages SET status = :s, error = :e, twilio_sid = coalesce(:sid, "
            "twilio_sid), charged_cents = :c, updated_at = now() WHERE message_id = :m"
        ),
        {"s": twilio_status or status, "e": error, "sid": sid, "c": charged, "m": row.message_id},
    )
    outbound.note_message(conn, row.message_id)


def record_result(conn: Connection, message_id: str, result, policy: sending.Policy) -> str:
    """Settle the hold by Twilio's answer: captured if it may have been sent, else released."""
    from core.twilio_gateway import SendOutcome

    row = conn.execute(
        text(
            "SELECT message_id, org_id, price_cents, status FROM messages "
            "WHERE message_id = :m FOR UPDATE"
        ),
        {"m": message_id},
    ).one()
    if row.status != "sending":
        return row.status
    outcome = result.outcome
    if outcome == SendOutcome.ACCEPTED:
        if result.sid:
            _lock_sid(conn, result.sid)  # a callback for it waits, or is already kept
        _settle(conn, row, "accepted", capture=True, sid=result.sid)
        if result.price is not None:
            conn.execute(
                text(
                    "UPDATE messages SET twilio_price = :p, twilio_price_unit = :u "
                    "WHERE message_id = :m"
                ),
                {"p": str(result.price), "u": result.price_unit, "m": message_id},
            )
        status = "accepted"
        if result.sid:
            status = apply_early_callbacks(conn, result.sid, policy) or status
    elif outcome == SendOutcome.REJECTED:
        _settle(
            conn,
            row,
            "rejected",
            capture=False,
            error=f"twilio {result.error_code}: {result.error_message}",
        )
        status = "rejected"
    elif outcome == SendOutcome.UNKNOWN:
        _settle(
            conn,
            row,
            "unknown",
            capture=True,
            error=f"may have been sent: {result.error_message or result.http_status}",
        )
        status = "unknown"
    else:  # RETRY_SAFE: nothing reached Twilio; keep the hold and try again
        conn.execute(
            text(
                "UPDATE messages SET status = 'retrying', error = :e, "
                "updated_at = now() WHERE message_id = :m"
            ),
            {"e": result.error_message or "retrying", "m": message_id},
        )
        return "retrying"
    sending.reconcile(conn, row.org_id, policy)
    return status


def give_up(conn: Connection, message_id: str, policy: sending.Policy, error: str) -> None:
    """Retries exhausted before anything reached Twilio: release the hold."""
    row = conn.execute(
        text(
            "SELECT message_id, org_id, price_cents, status FROM messages "
            "WHERE message_id = :m FOR UPDATE"
        ),
        {"m": message_id},
    ).one()
    if row.status == "retrying":
        _settle(conn, row, "not_sent", capture=False, error=error)
        sending.reconcile(conn, row.org_id, policy)


def apply_status_callback(
    conn: Connection,
    sid: str,
    status: str,
    *,
    price: str | None = None,
    price_unit: str | None = None,
    policy: sending.Policy | None = None,
) -> str | None:
    """Move a message forward only; `failed` refunds its charge once. Returns the new status.

    A refund can make sending possible again, so it reconciles campaigns in the same unit."""
    status = status.lower()
    if status not in CALLBACK_STATUSES:
        return None
    _lock_sid(conn, sid)
    row = conn.execute(
        text(
            "SELECT message_id, org_id, status, charged_cents FROM messages "
            "WHERE twilio_sid = :sid FOR UPDATE"
        ),
        {"sid": sid},
    ).first()
    if row is None:
        # The worker has not recorded this SID yet (or never will): keep the callback;
        # record_result applies it when the SID arrives. Twilio does not send it again.
        conn.execute(
            text(
                "INSERT INTO early_callbacks (twilio_sid, status, price, price_unit) "
                "VALUES (:sid, :s, :p, :u)"
            ),
            {"sid": sid, "s": status, "p": price, "u": price_unit},
        )
        return "pending"
    if price:
        conn.execute(
            text(
                "UPDATE messages SET twilio_price = :p, twilio_price_unit = "
                "coalesce(:u, twilio_price_unit) WHERE message_id = :m"
            ),
            {"p": price, "u": price_unit, "m": row.message_id},
        )
    if _RANK.get(status, 0) <= _RANK.get(row.status, 0):
        return row.status
    conn.execute(
        text("UPDATE messages SET status = :s, updated_at = now() WHERE message_id = :m"),
        {"s": status, "m": row.message_id},
    )
    outbound.note_message(conn, row.message_id)
    if status == "failed" and row.charged_cents > 0:
        wallet.credit(
            conn,
            row.org_id,
            row.charged_cents,
            f"msg:{row.message_id}:refund",
            kind="message_refund",
            reason="Twilio reported the message failed",
        )
        conn.execute(
            text("UPDATE messages SET refunded = true WHERE message_id = :m"), {"m": row.message_id}
        )
        sending.reconcile(conn, row.org_id, policy or sending.Policy())
    return status


def _lock_sid(conn: Connection, sid: str) -> None:
    """Serialize a SID's callback with the worker's recording of that SID."""
    conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('twilio-sid:' || :sid))"), {"sid": sid}
    )


def apply_early_callbacks(conn: Connection, sid: str, policy: sending.Policy) -> str | None:
    """Apply, in arrival order, callbacks that came before the SID was recorded."""
    early = conn.execute(
        text(
            "DELETE FROM early_callbacks WHERE twilio_sid = :sid "
            "RETURNING status, price, price_unit, id"
        ),
        {"sid": sid},
    ).all()
    status = None
    for cb in sorted(early, key=lambda r: r.id):
        status = apply_status_callback(
            conn, sid, cb.status, price=cb.price, price_unit=cb.price_unit, policy=policy
        )
    return status


def expire_stale_holds(
    engine: Engine, max_age_seconds: float, limit: int, policy: sending.Policy
) -> int:
    """Settle holds older than max age: captured if the message may have gone out."""
    cutoff = datetime.now(UTC) - timedelta(seconds=max_age_seconds)

    def run(conn: Connection) -> int:
        rows = conn.execute(
            text(
                "SELECT h.org_id, h.reference, m.message_id, m.status, m.price_cents "
                "FROM holds h LEFT JOIN messages m ON 'msg:' || m.message_id = h.reference "
                "WHERE h.status = 'open' AND h.created_at < :cut ORDER BY h.created_at "
                "LIMIT :l FOR UPDATE OF h SKIP LOCKED"
            ),
            {"cut": cutoff, "l": limit},
        ).all()
        for r in rows:
            may_have_been_sent = r.status in ("sending", "accepted", "unknown", None)
            if may_have_been_sent:
                wallet.capture(conn, r.org_id, r.reference)
            else:
                wallet.release(conn, r.org_id, r.reference)
            if r.message_id:
                conn.execute(
                    text(
                        "UPDATE messages SET status = CASE WHEN status = 'sending' "
                        "THEN 'unknown' WHEN status IN ('queued', 'retrying') THEN 'not_sent' "
                        "ELSE status END, charged_cents = CASE WHEN :cap THEN price_cents "
                        "ELSE charged_cents END, updated_at = now() WHERE message_id = :m"
                    ),
                    {"cap": may_have_been_sent, "m": r.message_id},
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
        conn.execute(
            text("DELETE FROM early_callbacks WHERE received_at < now() - interval '1 day'")
        )
        for org_id in {r.org_id for r in rows}:
            sending.reconcile(conn, org_id, policy)
        return len(rows)

    return run_in_transaction(engine, run)
