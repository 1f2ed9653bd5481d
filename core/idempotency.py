"""Idempotency keys of the host API: the same key with the same request answers the first
answer again; the same key with another request is a Conflict.

Keys are scoped per organization and route. The claim is an `INSERT … ON CONFLICT DO NOTHING`
in the caller's unit of work: a concurrent copy of the same request blocks on the unique index
until the first one commits (then it reads the stored answer) or rolls back (then the key is
its own). So only answers that were committed with their effects are ever replayed, and a
refusal that rolls back (an unknown organization, a dependency down) leaves no key behind.
Requests are compared as parsed JSON: the SHA-256 of a canonical serialization.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from core import sql
from core.errors import Conflict, RetryableConflict

# How long keys are kept at least (the contract says 24 hours); beat prunes older ones.
RETENTION_SECONDS = 86400


@dataclass(frozen=True)
class Stored:
    status_code: int
    response: dict[str, Any]


class KeysConflict(Conflict):
    """Keys reused with other requests; `keys` names them."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"idempotency key reused with another request: {', '.join(keys[:5])}")
        self.keys = keys


def request_digest(request: object) -> bytes:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()


_CLAIM_KEYS = sql.statement(
    "idempotency.claim_keys",
    """
    INSERT INTO idempotency_keys (org_id, route, key, request_sha256, key_id)
    SELECT :org_id, :route, k, decode(h, 'hex'), :key_id FROM jsonb_to_recordset(
        CAST(:rows AS jsonb)) AS t(k text, h text, n int)
    ORDER BY n ON CONFLICT DO NOTHING RETURNING key
    """,
)

_CLAIMED_KEYS = sql.statement(
    "idempotency.claimed_keys",
    """
    SELECT key, request_sha256, status_code, response FROM idempotency_keys
    WHERE org_id = :org_id AND route = :route AND key = ANY(:keys)
    """,
)


def claim_many(
    conn: Connection,
    org_id: str,
    route: str,
    items: Sequence[tuple[str, object]],
    key_id: str,
) -> dict[str, Stored]:
    """Claim every (key, request) pair; the stored answers of keys already used.

    Keys are claimed in sorted order, so two requests sharing keys cannot deadlock each other.
    Raises KeysConflict (nothing is stored: the caller rolls back) if any key was used with
    another request."""
    wanted = {key: request_digest(request) for key, request in items}
    order = sorted(wanted)
    # One JSON parameter rather than arrays: psycopg escapes array elements in Python.
    claims = json.dumps([{"k": k, "h": wanted[k].hex(), "n": n} for n, k in enumerate(order)])
    claimed = set(
        conn.execute(
            _CLAIM_KEYS,
            {"org_id": org_id, "route": route, "rows": claims, "key_id": key_id},
        ).scalars()
    )
    taken = [key for key in order if key not in claimed]
    if not taken:
        return {}
    rows = conn.execute(
        _CLAIMED_KEYS,
        {"org_id": org_id, "route": route, "keys": taken},
    ).all()
    conflicts = sorted(r.key for r in rows if bytes(r.request_sha256) != wanted[r.key])
    if conflicts:
        raise KeysConflict(conflicts)
    if len(rows) != len(taken) or any(r.status_code is None for r in rows):
        raise RetryableConflict("an idempotency key was claimed and released meanwhile")
    return {r.key: Stored(r.status_code, r.response) for r in rows}


def claim(
    conn: Connection, org_id: str, route: str, key: str, request: object, key_id: str
) -> Stored | None:
    """None: the key is this request's now (`complete` it in the same transaction)."""
    return claim_many(conn, org_id, route, [(key, request)], key_id).get(key)


_COMPLETE_MANY = sql.statement(
    "idempotency.complete_many",
    """
    UPDATE idempotency_keys i SET status_code = t.s, response = t.b
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS t(k text, s int, b jsonb)
    WHERE i.org_id = :org_id AND i.route = :route AND i.key = t.k
    """,
)


def complete_many(
    conn: Connection, org_id: str, route: str, answers: dict[str, tuple[int, dict[str, Any]]]
) -> None:
    """Store the answers of keys this transaction claimed."""
    if not answers:
        return
    rows = json.dumps([{"k": k, "s": code, "b": body} for k, (code, body) in answers.items()])
    conn.execute(
        _COMPLETE_MANY,
        {"org_id": org_id, "route": route, "rows": rows},
    )


def complete(
    conn: Connection,
    org_id: str,
    route: str,
    key: str,
    status_code: int,
    response: dict[str, Any],
) -> None:
    complete_many(conn, org_id, route, {key: (status_code, response)})


_PRUNE = sql.statement(
    "idempotency.prune",
    """
    DELETE FROM idempotency_keys WHERE ctid IN (SELECT ctid FROM idempotency_keys
    WHERE created_at < now() - make_interval(secs => :older_than_seconds)
    ORDER BY created_at LIMIT :limit FOR UPDATE SKIP LOCKED)
    """,
)


def prune(conn: Connection, *, older_than_seconds: float, limit: int) -> int:
    """Forget keys older than `older_than_seconds` (at most `limit`); SKIP LOCKED, so two
    beats running at once share the work."""
    return conn.execute(
        _PRUNE,
        {"older_than_seconds": older_than_seconds, "limit": limit},
    ).rowcount
