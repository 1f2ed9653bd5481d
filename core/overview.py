"""Use cases that read or change an organization as a whole, shared by `payguard org …` and
`/v1/organizations`: one answer, whichever entrypoint asks."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from core import orgs, sending, wallet
from core.errors import Conflict, Refused


def organization(conn: Connection, org_id: str, policy: sending.Policy) -> dict[str, Any]:
    """Everything about one organization: its settings, whether it may send and why not,
    and its wallet (as `wallet show`)."""
    org = orgs.get(conn, org_id)
    decision = sending.decide(conn, org_id, policy)
    return {
        **org.as_dict(),
        "subscription_status": decision.subscription_status,
        "can_send": decision.can_send,
        "reasons": list(decision.reasons),
        "wallet": wallet.show(conn, org_id).as_dict(),
    }


def register(
    conn: Connection, org_id: str, settings: dict[str, Any], policy: sending.Policy
) -> tuple[dict[str, Any], bool]:
    """Create an organization, or find it already created with these very settings:
    (the organization, whether it was created now). Conflict if it exists otherwise.

    `settings` are `orgs.create`'s keywords; those left out count as their defaults, so
    the same request twice is the same organization, and a request that differs is refused
    rather than silently ignored."""
    if not orgs.exists(conn, org_id):
        try:
            orgs.create(conn, org_id, **settings)
            return organization(conn, org_id, policy), True
        except Refused:
            if not orgs.exists(conn, org_id):  # the subaccount is another organization's
                raise
    existing = orgs.get(conn, org_id)
    wanted = {
        "currency": str(settings.get("currency", "USD")).upper(),
        "billing": settings.get("billing", "subscription"),
        "twilio_subaccount_sid": settings.get("twilio_subaccount_sid"),
        "sender": settings.get("sender"),
        "segment_price_cents": settings.get("segment_price_cents"),
        "low_balance_cents": settings.get("low_balance_cents"),
    }
    differs = sorted(k for k, v in wanted.items() if getattr(existing, k) != v)
    if differs:
        raise Conflict(f"organization {org_id!r} exists with other {', '.join(differs)}")
    return organization(conn, org_id, policy), False


def change(
    conn: Connection, org_id: str, changes: dict[str, object], policy: sending.Policy
) -> dict[str, Any]:
    """Change settings (orgs.UPDATABLE); a new price can flip may-send, so campaigns are
    reconciled in the same unit of work."""
    orgs.update(conn, org_id, changes)
    sending.reconcile(conn, org_id, policy)
    return organization(conn, org_id, policy)
