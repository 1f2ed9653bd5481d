"""Rows a test starts from, made through core's own functions (never raw INSERTs), so a
factory breaks when a rule of the domain changes rather than hiding it.

Each factory takes the connection of a unit of work: `tx(engine, new_org, balance=100)` or,
with the `db` fixture, `db(new_org, balance=100)`; inside a larger unit, `new_org(conn)`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection

from core import campaigns as campaign_rules
from core import orgs, sending, subscriptions, wallet

SENDER = "+15005550006"  # Twilio's magic "valid" test number
# The parent Twilio account a test stack is configured with (tests/integration/conftest.py's
# `twilio_env`): its SID and auth token.
TWILIO_PARENT_SID = "AC" + "1" * 32
TWILIO_PARENT_TOKEN = "parent-auth-token"
POLICY = sending.Policy()


def subaccount_of(org_id: str) -> str:
    """The Twilio subaccount SID `new_org(..., twilio=True)` gives `org_id`: stable, so a test
    can name it without keeping it."""
    return "AC" + hashlib.sha256(org_id.encode()).hexdigest()[:32]


def new_org(
    conn: Connection,
    *,
    org_id: str | None = None,
    balance: int = 0,
    currency: str = "USD",
    billing: str = "subscription",
    twilio: bool = False,
    price: int | None = None,
    active: bool = False,
    campaigns: Iterable[str] = (),
    low: int | None = None,
    seed_kind: str = "credit",
    policy: sending.Policy = POLICY,
) -> str:
    """A new organization (a fresh `org-…` id unless `org_id`); its id.

    balance:   cents credited first (reference `seed:<org>`, journal kind `seed_kind`).
    billing:   `subscription` (orgs.create's default) or `prepaid`.
    twilio:    a subaccount (`subaccount_of(org)`) and the sender SENDER.
    price:     its own segment price in cents (None: the platform's).
    active:    an active PayPal subscription since yesterday.
    campaigns: campaign ids created last, so they start running or paused by the system as
               the organization's state says.
    low:       its low-balance threshold in cents.
    """
    org = org_id or f"org-{uuid.uuid4().hex[:10]}"
    orgs.create(
        conn,
        org,
        currency=currency,
        billing=billing,
        twilio_subaccount_sid=subaccount_of(org) if twilio else None,
        sender=SENDER if twilio else None,
        segment_price_cents=price,
        low_balance_cents=low,
    )
    if balance:
        wallet.credit(conn, org, balance, f"seed:{org}", kind=seed_kind)
    if active:
        yesterday = datetime.now(UTC) - timedelta(days=1)
        subscriptions.apply_status(conn, "paypal", f"I-{org}", org, "active", yesterday)
    for campaign in campaigns:
        campaign_rules.create_campaign(conn, org, campaign, policy)
    return org
