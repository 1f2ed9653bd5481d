"""The events recorded for the host, as tests read them back."""

from __future__ import annotations

import json

from sqlalchemy import text


def events_of(engine, type_: str | None = None) -> list[dict]:
    """Event bodies in sequence order, all or of one type."""
    with engine.connect() as c:
        rows = c.execute(text("SELECT body FROM outbound_events ORDER BY sequence")).scalars()
        bodies = [json.loads(b) for b in rows]
    return [b for b in bodies if type_ is None or b["type"] == type_]
