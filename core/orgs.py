"""Organizations: the customers whose wallets, subscriptions, campaigns and Twilio subaccounts
Payguard keeps. Creating one creates its wallet in the same transaction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from core import sql
from core.errors import InvalidInput, NotFound, Refused
from core.statuses import Billing

ORG_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
SUBACCOUNT_RE = re.compile(r"^AC[0-9a-fA-F]{32}$")
E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
MESSAGING_SERVICE_RE = re.compile(r"^MG[0-9a-fA-F]{32}$")

# `subscription`: may send only while a subscription is active (none at all is none active);
# `prepaid`: money alone decides.
BILLING_MODES = tuple(b.value for b in Billing)  # plain strings: the CLI offers them
# Amounts an organization's settings may name: far above any real figure, and within their
# columns (segment_price_cents is an integer, low_balance_cents a bigint).
MAX_SEGMENT_PRICE_CENTS = 1_000_000
MAX_CENTS = 10**12


@dataclass(frozen=True)
class Organization:
    org_id: str
    currency: str
    segment_price_cents: int | None
    twilio_subaccount_sid: str | None
    sender: str | None
    twilio_desired_status: str
    twilio_status: str
    created_at: datetime
    billing: str = Billing.SUBSCRIPTION
    low_balance_cents: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "billing": self.billing,
            "currency": self.currency,
            "segment_price_cents": self.segment_price_cents,
            "twilio_subaccount_sid": self.twilio_subaccount_sid,
            "sender": self.sender,
            "twilio_desired_status": self.twilio_desired_status,
            "twilio_status": self.twilio_status,
            "low_balance_cents": self.low_balance_cents,
            "created_at": self.created_at.isoformat(),
        }


def validate_org_id(org_id: object) -> str:
    if not isinstance(org_id, str) or not ORG_ID_RE.match(org_id):
        raise InvalidInput(
            "organization id must be 1-100 characters of letters, digits, '.', '_', ':' or '-'"
        )
    return org_id


_INSERT_ORG = sql.statement(
    "orgs.insert_org",
    """
    INSERT INTO organizations (org_id, currency, segment_price_cents,
        twilio_subaccount_sid, sender, billing, low_balance_cents)
    VALUES (:org_id, :currency, :segment_price_cents, :twilio_subaccount_sid, :sender, :billing,
            :low_balance_cents)
    """,
)

_INSERT_WALLET = sql.statement(
    "orgs.insert_wallet",
    "INSERT INTO wallets (org_id, currency) VALUES (:org_id, :currency)",
)


def create(
    conn: Connection,
    org_id: str,
    *,
    currency: str = "USD",
    twilio_subaccount_sid: str | None = None,
    sender: str | None = None,
    segment_price_cents: int | None = None,
    billing: str = Billing.SUBSCRIPTION,
    low_balance_cents: int | None = None,
) -> Organization:
    validate_org_id(org_id)
    _threshold(low_balance_cents)
    if billing not in BILLING_MODES:
        raise InvalidInput(f"billing must be one of {', '.join(BILLING_MODES)}, got {billing!r}")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
        raise InvalidInput(f"currency must be a three-letter ISO code, got {currency!r}")
    currency = currency.upper()
    _validate_settings(twilio_subaccount_sid, sender, segment_price_cents, low_balance_cents)
    try:
        with conn.begin_nested():
            conn.execute(
                _INSERT_ORG,
                {
                    "org_id": org_id,
                    "currency": currency,
                    "segment_price_cents": segment_price_cents,
                    "twilio_subaccount_sid": twilio_subaccount_sid,
                    "sender": sender,
                    "billing": billing,
                    "low_balance_cents": low_balance_cents,
                },
            )
            conn.execute(
                _INSERT_WALLET,
                {"org_id": org_id, "currency": currency},
            )
    except IntegrityError as exc:
        if "twilio_subaccount_sid" in str(exc.orig):
            raise Refused("that Twilio subaccount belongs to another organization") from None
        raise Refused(f"organization {org_id!r} already exists") from None
    return get(conn, org_id)


def _whole_cents(name: str, value: object, limit: int = MAX_CENTS) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit
    ):
        raise InvalidInput(f"{name} must be a whole number of cents, from 0 to {limit}")


def _validate_settings(
    twilio_subaccount_sid: object, sender: object, segment_price_cents: object, low_balance: object
) -> None:
    if twilio_subaccount_sid is not None and not (
        isinstance(twilio_subaccount_sid, str) and SUBACCOUNT_RE.match(twilio_subaccount_sid)
    ):
        raise InvalidInput("Twilio subaccount SID must look like AC followed by 32 hex digits")
    if sender is not None and not (
        isinstance(sender, str) and (E164_RE.match(sender) or MESSAGING_SERVICE_RE.match(sender))
    ):
        raise InvalidInput(
            "sender must be an E.164 number (+15551234567) or a Messaging Service SID"
        )
    _whole_cents("segment price", segment_price_cents, MAX_SEGMENT_PRICE_CENTS)
    _whole_cents("low balance threshold", low_balance)


# The settings `update` may change; any left out stay as they are, None clears one.
UPDATABLE = ("sender", "segment_price_cents", "low_balance_cents", "twilio_subaccount_sid")


# One statement for any of UPDATABLE: a setting not being changed is set to what it is.
_UPDATE = sql.statement(
    "orgs.update",
    """
    UPDATE organizations SET
        sender = CASE WHEN :change_sender THEN :sender ELSE sender END,
        segment_price_cents = CASE WHEN :change_segment_price_cents
                                   THEN :segment_price_cents ELSE segment_price_cents END,
        low_balance_cents = CASE WHEN :change_low_balance_cents
                                 THEN :low_balance_cents ELSE low_balance_cents END,
        twilio_subaccount_sid = CASE WHEN :change_twilio_subaccount_sid
                                     THEN :twilio_subaccount_sid ELSE twilio_subaccount_sid END,
        -- A new subaccount's status at Twilio is unknown: while the organization's should be
        -- suspended, count it as active so the converge job suspends it too (else Twilio
        -- would go on billing a customer who stopped paying).
        twilio_status = CASE WHEN :change_twilio_subaccount_sid
                              AND twilio_subaccount_sid IS DISTINCT FROM :twilio_subaccount_sid
                              AND twilio_desired_status = 'suspended'
                             THEN 'active' ELSE twilio_status END
    WHERE org_id = :org_id RETURNING 1
    """,
)


def update(conn: Connection, org_id: str, changes: dict[str, object]) -> Organization:
    """Change some of an organization's settings (UPDATABLE) in one statement."""
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise InvalidInput(f"cannot change {', '.join(sorted(unknown))}")
    _validate_settings(
        changes.get("twilio_subaccount_sid"),
        changes.get("sender"),
        changes.get("segment_price_cents"),
        changes.get("low_balance_cents"),
    )
    if changes:
        params: dict[str, object] = {"org_id": org_id}
        for name in UPDATABLE:
            params[name] = changes.get(name)
            params[f"change_{name}"] = name in changes
        try:
            with conn.begin_nested():
                found = conn.execute(_UPDATE, params).first()
        except IntegrityError:
            raise Refused("that Twilio subaccount belongs to another organization") from None
        if found is None:
            raise NotFound(f"unknown organization {org_id!r}")
    return get(conn, org_id)


_GET = sql.statement(
    "orgs.get",
    """
    SELECT org_id, currency, segment_price_cents, twilio_subaccount_sid, sender,
        twilio_desired_status, twilio_status, created_at, billing, low_balance_cents
    FROM organizations
    WHERE org_id = :org_id
    """,
)


def get(conn: Connection, org_id: str) -> Organization:
    row = conn.execute(
        _GET,
        {"org_id": org_id},
    ).first()
    if row is None:
        raise NotFound(f"unknown organization {org_id!r}")
    return Organization(**row._mapping)


def _threshold(cents: object) -> int | None:
    if cents is None:
        return None
    if isinstance(cents, bool) or not isinstance(cents, int) or cents < 0:
        raise InvalidInput("low balance threshold must be a whole number of cents, zero or more")
    return cents


_SET_LOW_BALANCE = sql.statement(
    "orgs.set_low_balance",
    """
    UPDATE organizations SET low_balance_cents = :low_balance_cents
    WHERE org_id = :org_id RETURNING 1
    """,
)


def set_low_balance(conn: Connection, org_id: str, cents: int | None) -> Organization:
    """Set (or clear, with None) the available balance below which wallet.low_balance fires.
    Whether the wallet is below the new threshold is reported by the next money move."""
    _threshold(cents)
    row = conn.execute(
        _SET_LOW_BALANCE,
        {"org_id": org_id, "low_balance_cents": cents},
    ).first()
    if row is None:
        raise NotFound(f"unknown organization {org_id!r}")
    return get(conn, org_id)


_EXISTS = sql.statement("orgs.exists", "SELECT 1 FROM organizations WHERE org_id = :org_id")


def exists(conn: Connection, org_id: str) -> bool:
    return conn.execute(_EXISTS, {"org_id": org_id}).first() is not None


_SUBACCOUNT_SID = sql.statement(
    "orgs.subaccount_sid",
    "SELECT twilio_subaccount_sid FROM organizations WHERE org_id = :org_id",
)


def subaccount_sid(conn: Connection, org_id: str) -> str | None:
    """The organization's Twilio subaccount; None without one, or for an unknown organization."""
    sid: str | None = conn.execute(_SUBACCOUNT_SID, {"org_id": org_id}).scalar()
    return sid


_IDS_AFTER = sql.statement(
    "orgs.ids_after",
    "SELECT org_id FROM organizations WHERE org_id > :after ORDER BY org_id LIMIT :limit",
)


def ids_after(conn: Connection, after: str, limit: int) -> list[str]:
    """The next `limit` organization ids after `after` in id order: a keyset page, so a walk
    over every organization costs one index range scan per page however many there are."""
    return list(
        conn.execute(
            _IDS_AFTER,
            {"after": after, "limit": limit},
        ).scalars()
    )
