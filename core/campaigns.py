"""Campaigns: create, pause, resume, list. A new campaign runs, or waits paused by the system
while the organization may not send (core/sending.py decides, and its `reconcile` pauses and
resumes the system's pauses); a user's own pause stays until the user resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from core import outbound, sending, sql
from core.errors import InvalidInput, NotFound, Refused
from core.orgs import ORG_ID_RE
from core.statuses import CampaignStatus, PausedBy


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    status: str
    paused_by: str | None
    pause_reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "status": self.status,
            "paused_by": self.paused_by,
            "pause_reason": self.pause_reason,
        }


def _campaign_id(campaign_id: object) -> str:
    if not isinstance(campaign_id, str) or not ORG_ID_RE.match(campaign_id):
        raise InvalidInput("campaign id must be 1-100 letters, digits, '.', '_', ':' or '-'")
    return campaign_id


def campaign(conn: Connection, org_id: str, campaign_id: str) -> Campaign:
    """One campaign, or NotFound."""
    return _campaign(conn, org_id, _campaign_id(campaign_id))


_CAMPAIGN = sql.statement(
    "campaigns.campaign",
    """
    SELECT campaign_id, status, paused_by, pause_reason FROM campaigns
    WHERE org_id = :org_id AND campaign_id = :campaign_id
    """,
)


def _campaign(conn: Connection, org_id: str, campaign_id: str) -> Campaign:
    row = conn.execute(
        _CAMPAIGN,
        {"org_id": org_id, "campaign_id": campaign_id},
    ).first()
    if row is None:
        raise NotFound(f"no campaign {campaign_id!r} for {org_id!r}")
    return Campaign(**row._mapping)


_CREATE = sql.statement(
    "campaigns.create",
    """
    INSERT INTO campaigns (org_id, campaign_id, status, paused_by, pause_reason)
    VALUES (:org_id, :campaign_id, :status, :paused_by, :pause_reason)
    ON CONFLICT DO NOTHING RETURNING campaign_id
    """,
)


def create_campaign(
    conn: Connection, org_id: str, campaign_id: str, policy: sending.Policy
) -> Campaign:
    """A new campaign runs, or waits paused by the system if the organization may not send."""
    _campaign_id(campaign_id)
    decision = sending.decide(conn, org_id, policy)
    inserted = conn.execute(
        _CREATE,
        {
            "org_id": org_id,
            "campaign_id": campaign_id,
            "status": CampaignStatus.RUNNING if decision.can_send else CampaignStatus.PAUSED,
            "paused_by": None if decision.can_send else PausedBy.SYSTEM,
            "pause_reason": None if decision.can_send else ",".join(decision.reasons),
        },
    ).first()
    if inserted is None:
        raise Refused(f"campaign {campaign_id!r} already exists")
    return _campaign(conn, org_id, campaign_id)


_PAUSE = sql.statement(
    "campaigns.pause",
    """
    UPDATE campaigns SET status = 'paused', paused_by = 'user',
        pause_reason = 'paused by user', updated_at = now()
    WHERE org_id = :org_id AND campaign_id = :campaign_id
    AND paused_by IS DISTINCT FROM 'user' RETURNING campaign_id
    """,
)


def pause_campaign(conn: Connection, org_id: str, campaign_id: str) -> Campaign:
    """The user's own pause: it stays until the user resumes, whatever Payguard decides."""
    _campaign_id(campaign_id)
    changed = conn.execute(
        _PAUSE,
        {"org_id": org_id, "campaign_id": campaign_id},
    ).first()
    if changed is not None:  # pausing a campaign the user paused already tells nobody again
        outbound.note_campaign(conn, org_id, campaign_id, PausedBy.USER, "paused by user")
    return _campaign(conn, org_id, campaign_id)


_RESUME = sql.statement(
    "campaigns.resume",
    """
    UPDATE campaigns SET status = 'running', paused_by = NULL,
        pause_reason = NULL, updated_at = now()
    WHERE org_id = :org_id AND campaign_id = :campaign_id
    """,
)


def resume_campaign(
    conn: Connection, org_id: str, campaign_id: str, policy: sending.Policy
) -> Campaign:
    """The user's resume; refused with the reasons while the organization may not send."""
    _campaign_id(campaign_id)
    current = _campaign(conn, org_id, campaign_id)
    decision = sending.decide(conn, org_id, policy)
    if not decision.can_send:
        raise Refused(f"cannot resume: {', '.join(decision.reasons)}")
    if current.status == CampaignStatus.PAUSED:
        conn.execute(
            _RESUME,
            {"org_id": org_id, "campaign_id": campaign_id},
        )
        outbound.note_campaign(conn, org_id, campaign_id, None, None)
    return _campaign(conn, org_id, campaign_id)


_ORG_EXISTS = sql.statement(
    "campaigns.org_exists",
    "SELECT 1 FROM organizations WHERE org_id = :org_id",
)

_LIST = sql.statement(
    "campaigns.list",
    """
    SELECT campaign_id, status, paused_by, pause_reason FROM campaigns
    WHERE org_id = :org_id ORDER BY campaign_id
    """,
)


def list_campaigns(conn: Connection, org_id: str) -> list[Campaign]:
    if not conn.execute(_ORG_EXISTS, {"org_id": org_id}).first():
        raise NotFound(f"unknown organization {org_id!r}")
    rows = conn.execute(
        _LIST,
        {"org_id": org_id},
    )
    return [Campaign(**r._mapping) for r in rows]
