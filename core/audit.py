"""The operators' audit trail: who did what to which organization, in the same transaction."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, text


def record(
    conn: Connection, *, actor: str, action: str, org_id: str | None, details: dict[str, Any]
) -> None:
    """Record an operator action in the caller's transaction: a refusal leaves no row."""
    conn.execute(
        text(
            "INSERT INTO audit_log (actor, action, org_id, details) "
            "VALUES (:actor, :action, :org, CAST(:details AS jsonb))"
        ),
        {"actor": actor, "action": action, "org": org_id, "details": json.dumps(details)},
    )
