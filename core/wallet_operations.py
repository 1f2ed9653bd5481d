"""An operator's changes to a wallet (the `payguard wallet adjust|freeze|unfreeze` use cases):
each moves or marks the wallet through core/wallet.py, writes its audit row and re-decides
whether the organization may send (core/sending.py), all in the caller's one transaction,
so a change is never journaled without its audit row or its campaigns' pause or resume.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from core import audit, sending, wallet


@dataclass(frozen=True)
class Adjusted:
    entry: wallet.Entry
    # The wallet now, not entry.balance_after_cents: a repeated reference returns the first
    # entry, whose balance may be long gone.
    wallet: wallet.WalletState


def adjust(
    conn: Connection,
    org_id: str,
    amount_cents: int,
    *,
    reason: str,
    actor: str,
    reference: str | None,
    policy: sending.Policy,
) -> Adjusted:
    """A signed manual adjustment, once per reference; refused below zero."""
    entry = wallet.adjust(
        conn, org_id, amount_cents, reason=reason, actor=actor, reference=reference
    )
    audit.record(
        conn, actor=actor, action="wallet.adjust", org_id=org_id,
        details={"amount_cents": amount_cents, "reason": reason, "reference": entry.reference,
                 "entry_id": entry.id, "duplicate": entry.duplicate},
    )  # fmt: skip
    sending.reconcile(conn, org_id, policy)
    return Adjusted(entry, wallet.show(conn, org_id))


def freeze(
    conn: Connection, org_id: str, reason: str, *, actor: str, policy: sending.Policy
) -> tuple[bool, wallet.WalletState]:
    """Add one freeze reason; whether it was new, and the wallet after."""
    changed = wallet.freeze(conn, org_id, reason, actor=actor)
    return changed, _after_freeze(conn, org_id, reason, actor, "wallet.freeze", changed, policy)


def unfreeze(
    conn: Connection, org_id: str, reason: str, *, actor: str, policy: sending.Policy
) -> tuple[bool, wallet.WalletState]:
    """Lift one freeze reason (others stay); whether it was there, and the wallet after."""
    changed = wallet.unfreeze(conn, org_id, reason, actor=actor)
    return changed, _after_freeze(conn, org_id, reason, actor, "wallet.unfreeze", changed, policy)


def _after_freeze(
    conn: Connection, org_id: str, reason: str, actor: str, action: str, changed: bool,
    policy: sending.Policy,
) -> wallet.WalletState:  # fmt: skip
    audit.record(
        conn, actor=actor, action=action, org_id=org_id,
        details={"reason": reason, "changed": changed},
    )  # fmt: skip
    sending.reconcile(conn, org_id, policy)  # pause or resume campaigns now
    return wallet.show(conn, org_id)
