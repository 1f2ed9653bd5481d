"""May this organization send? The one decision every send and `payguard status` use, and
the campaign and Twilio-subaccount consequences of its answer.

`reconcile` runs in the same transaction as every change that can flip the answer (a
payment, a subscription change, a freeze, a balance running out): campaigns Payguard paused
resume by themselves, campaigns a user paused stay paused, and a lapsed subscription marks
the Twilio subaccount to be suspended before any call to Twilio is made.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import Connection

from core import outbound, outbox, sql
from core.errors import NotFound
from core.settings import Settings
from core.statuses import AccountStatus, Billing, PausedBy
from core.subscriptions import allows_sending

log = logging.getLogger(__name__)

SUBSCRIPTION_INACTIVE = "subscription_inactive"
TWILIO_SUSPENDED = "twilio_suspended"
WALLET_FROZEN = "wallet_frozen"
INSUFFICIENT_BALANCE = "insufficient_balance"
SYNC_TWILIO_TASK = "payguard.sync_twilio_account"


@dataclass(frozen=True)
class Policy:
    """The knobs of the decision, taken from settings by the entrypoint."""

    default_segment_price_cents: int = 1
    past_due_grace: timedelta = timedelta(hours=72)
    # How long the run that marks a message `sending` owns it (longer than a Twilio call).
    send_lease: timedelta = timedelta(seconds=60)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            default_segment_price_cents=settings.SMS_SEGMENT_PRICE_CENTS,
            past_due_grace=timedelta(hours=settings.STRIPE_PAST_DUE_GRACE_HOURS),
            send_lease=timedelta(seconds=settings.SEND_LEASE_SECONDS),
        )


@dataclass(frozen=True)
class Decision:
    org_id: str
    reasons: tuple[str, ...]
    subscription_status: str
    subscription_allows: bool
    twilio_status: str
    twilio_desired_status: str
    available_cents: int
    segment_price_cents: int
    freeze_reasons: tuple[str, ...] = field(default=())
    billing: str = Billing.SUBSCRIPTION

    @property
    def can_send(self) -> bool:
        return not self.reasons

    @property
    def service_paid_for(self) -> bool:
        """Whether the Twilio subaccount should be active: a prepaid organization's always is
        (its money is held per message), a subscription-billed one's while it is paid up."""
        return self.billing == Billing.PREPAID or self.subscription_allows

    def as_dict(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "can_send": self.can_send,
            "reasons": list(self.reasons),
            "billing": self.billing,
            "subscription_status": self.subscription_status,
            "twilio_status": self.twilio_status,
            "twilio_desired_status": self.twilio_desired_status,
            "available_cents": self.available_cents,
            "segment_price_cents": self.segment_price_cents,
            "freeze_reasons": list(self.freeze_reasons),
        }


# Run with psycopg's placeholders (_STATE_ON_DRIVER): through SQLAlchemy's exec_driver_sql, in
# whatever transaction the caller holds, and on the driver's connection (decide_on_driver); the
# EXPLAIN of the registered statement covers that very text.
_STATE = sql.statement(
    "sending.state",
    """
SELECT o.org_id, o.billing, o.segment_price_cents, o.twilio_desired_status, o.twilio_status,
       w.balance_cents - w.held_cents AS available, w.active_freezes,
       (SELECT coalesce(array_agg(f.reason ORDER BY f.id), '{}') FROM wallet_freezes f
         WHERE f.org_id = o.org_id AND f.lifted_at IS NULL) AS freeze_reasons,
       (SELECT coalesce(json_agg(json_build_object('status', s.status,
                                                   'since', s.status_since)
                                 ORDER BY s.status_since DESC), '[]')
          FROM subscriptions s WHERE s.org_id = o.org_id AND s.status <> 'unknown') AS subs
FROM organizations o JOIN wallets w ON w.org_id = o.org_id
WHERE o.org_id = :org_id
""",
)
_STATE_ON_DRIVER = sql.for_driver(_STATE)


def _parse_ts(value: str) -> datetime:
    ts = datetime.fromisoformat(value)
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def decide(
    conn: Connection,
    org_id: str,
    policy: Policy,
    *,
    needed_cents: int | None = None,
    now: datetime | None = None,
) -> Decision:
    """Every reason that applies; `needed_cents` defaults to the price of one segment."""
    row = conn.exec_driver_sql(_STATE_ON_DRIVER, {"org_id": org_id}).first()
    state = row._mapping if row is not None else None
    return _decision(org_id, state, policy, needed_cents, now)


def decide_on_driver(driver_conn: psycopg.Connection, org_id: str, policy: Policy) -> Decision:
    """`decide` on psycopg's own connection (core.db.driver_autocommit): the same statement and
    the same rules, without SQLAlchemy's work around a statement, which is most of a hot
    read's CPU. For a read alone, e.g. `/v1`'s can-send; a send decides inside its transaction."""
    with driver_conn.cursor(row_factory=dict_row) as cur:
        state = cur.execute(_STATE_ON_DRIVER, {"org_id": org_id}).fetchone()
    return _decision(org_id, state, policy, None, None)


def _decision(
    org_id: str,
    row: Mapping[Any, Any] | None,
    policy: Policy,
    needed_cents: int | None,
    now: datetime | None,
) -> Decision:
    if row is None:
        raise NotFound(f"unknown organization {org_id!r}")
    now = now or datetime.now(UTC)
    price = (
        row["segment_price_cents"]
        if row["segment_price_cents"] is not None
        else policy.default_segment_price_cents
    )
    subs = row["subs"] if isinstance(row["subs"], list) else json.loads(row["subs"])
    if not subs:
        sub_status, sub_allows = "none", False
    else:
        allowing = [
            s
            for s in subs
            if allows_sending(s["status"], _parse_ts(s["since"]), now, policy.past_due_grace)
        ]
        sub_allows = bool(allowing)
        sub_status = (allowing or subs)[0]["status"]
    reasons = []
    # Under subscription billing, never having had a subscription is having none active; a
    # prepaid organization's money alone decides, and its subscriptions are only reported.
    if row["billing"] == Billing.SUBSCRIPTION and not sub_allows:
        reasons.append(SUBSCRIPTION_INACTIVE)
    if AccountStatus.SUSPENDED in (row["twilio_status"], row["twilio_desired_status"]):
        reasons.append(TWILIO_SUSPENDED)
    if row["active_freezes"]:
        reasons.append(WALLET_FROZEN)
    needed = price if needed_cents is None else needed_cents
    if row["available"] < needed:
        reasons.append(INSUFFICIENT_BALANCE)
    return Decision(
        org_id=row["org_id"],
        reasons=tuple(reasons),
        subscription_status=sub_status,
        subscription_allows=sub_allows,
        twilio_status=row["twilio_status"],
        twilio_desired_status=row["twilio_desired_status"],
        available_cents=row["available"],
        segment_price_cents=price,
        freeze_reasons=tuple(row["freeze_reasons"]),
        billing=row["billing"],
    )


@dataclass(frozen=True)
class Reconciled:
    decision: Decision
    paused: tuple[str, ...]
    resumed: tuple[str, ...]
    twilio_desired_changed: bool


_SET_DESIRED_STATUS = sql.statement(
    "sending.set_desired_status",
    """
    UPDATE organizations SET twilio_desired_status = :desired_status
    WHERE org_id = :org_id AND twilio_desired_status <> :desired_status RETURNING org_id
    """,
)

_RESUME_SYSTEM_PAUSED = sql.statement(
    "sending.resume_system_paused",
    """
    UPDATE campaigns SET status = 'running', paused_by = NULL,
        pause_reason = NULL, updated_at = now()
    WHERE org_id = :org_id AND status = 'paused' AND paused_by = 'system'
    RETURNING campaign_id
    """,
)

_PAUSE_RUNNING = sql.statement(
    "sending.pause_running",
    """
    UPDATE campaigns c SET status = 'paused', paused_by = 'system',
        pause_reason = :reason, updated_at = now()
    FROM (SELECT campaign_id, status FROM campaigns WHERE org_id = :org_id
          AND (status = 'running'
               OR (paused_by = 'system' AND pause_reason IS DISTINCT FROM :reason))
          FOR UPDATE) before
    WHERE c.org_id = :org_id AND c.campaign_id = before.campaign_id
    RETURNING c.campaign_id, before.status = 'running' AS newly
    """,
)


def reconcile(conn: Connection, org_id: str, policy: Policy) -> Reconciled:
    """Bring campaigns and the subaccount's desired status in line with the decision."""
    decision = decide(conn, org_id, policy)
    # The subaccount first: its desired status is itself a reason, and campaigns paused below
    # must carry every reason, or the next reconcile would rewrite them all again.
    desired = AccountStatus.ACTIVE if decision.service_paid_for else AccountStatus.SUSPENDED
    changed = (
        conn.execute(
            _SET_DESIRED_STATUS,
            {"org_id": org_id, "desired_status": desired},
        ).first()
        is not None
    )
    if changed:
        outbox.enqueue(conn, SYNC_TWILIO_TASK, [org_id])
        decision = decide(conn, org_id, policy)
    # Before the campaigns: the organization's row is locked first, as above (no deadlock).
    outbound.note_may_send(conn, org_id, decision.can_send, list(decision.reasons))
    if decision.can_send:
        resumed = tuple(
            conn.execute(
                _RESUME_SYSTEM_PAUSED,
                {"org_id": org_id},
            ).scalars()
        )
        paused: tuple[str, ...] = ()
        newly_paused: tuple[str, ...] = ()
    else:
        reason = ",".join(decision.reasons)
        # A system pause whose reasons changed is updated too, but only a campaign that was
        # running is newly paused: the host hears of that one alone.
        rows = conn.execute(
            _PAUSE_RUNNING,
            {"org_id": org_id, "reason": reason},
        ).all()
        paused = tuple(r.campaign_id for r in rows)
        newly_paused = tuple(r.campaign_id for r in rows if r.newly)
        resumed = ()
    _report(conn, org_id, decision, newly_paused, resumed)
    if paused or resumed or changed:
        log.info(
            "sending state reconciled",
            extra={
                "org_id": org_id,
                "paused": list(paused),
                "resumed": list(resumed),
                "twilio_desired_status": desired,
                "reasons": list(decision.reasons),
            },
        )
    return Reconciled(decision, paused, resumed, changed)


def _report(
    conn: Connection, org_id: str, d: Decision, paused: tuple[str, ...], resumed: tuple[str, ...]
) -> None:
    """Events to the host: the campaigns Payguard paused or resumed."""
    for campaign_id in paused:
        outbound.note_campaign(conn, org_id, campaign_id, PausedBy.SYSTEM, ",".join(d.reasons))
    for campaign_id in resumed:
        outbound.note_campaign(conn, org_id, campaign_id, None, None)
