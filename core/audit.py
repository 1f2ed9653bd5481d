"""The operators' audit trail: who did what to which organization, in the same transaction."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection

from core import sql

_RECORD = sql.statement(
    "audit.record",
    """
    INSERT INTO audit_log (actor, action, org_id, details)
    VALUES (:actor, :action, :org_id, CAST(:details AS jsonb))
    """,
)


def record(
    conn: Connection, *, actor: str, action: str, org_id: str | None, details: dict[str, Any]
) -> None:
    """Record an operator action in the caller's transaction: a refusal leaves no row."""
    conn.execute(
        _RECORD,
        {"actor": actor, "action": action, "org_id": org_id, "details": json.dumps(details)},
    )
