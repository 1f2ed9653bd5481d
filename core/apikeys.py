"""API keys of the host application's API (`/v1`): created, listed and revoked by operators,
checked on every request.

A key's bearer secret is `key_<16 hex>.<43 characters>`: the part before the dot is the key
id, by which the row is found; the rest is 32 random bytes, of which only the SHA-256 is
stored (a secret that random needs no slow hash) and compared in constant time. Scopes nest
(`read` ⊂ `send` ⊂ `admin`); a key with an `org_id` is confined to that organization.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from core import sql
from core.errors import InvalidInput, NotFound, Refused

SCOPES = ("read", "send", "admin")
_RANK = {scope: rank for rank, scope in enumerate(SCOPES)}
KEY_ID_RE = re.compile(r"^key_[0-9a-f]{16}$")
_SECRET_RE = re.compile(r"^(key_[0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    scope: str
    org_id: str | None
    secret_sha256: bytes
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    revoked_by: str | None

    def allows(self, scope: str) -> bool:
        """Scopes nest: an `admin` key may do what a `send` or `read` key may."""
        return _RANK[self.scope] >= _RANK[scope]

    def reaches(self, org_id: str) -> bool:
        return self.org_id is None or self.org_id == org_id

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(secret), self.secret_sha256)

    def as_dict(self) -> dict[str, Any]:
        """Everything but the secret's hash, which never leaves the database."""
        return {
            "key_id": self.key_id,
            "name": self.name,
            "scope": self.scope,
            "org_id": self.org_id,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "revoked_by": self.revoked_by,
        }


@dataclass(frozen=True)
class Created:
    key: ApiKey
    secret: str  # shown once, never stored


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_secret(bearer: str) -> tuple[str, str] | None:
    """(key id, secret part) of a well-formed bearer secret, else None."""
    match = _SECRET_RE.match(bearer)
    return (match.group(1), match.group(2)) if match else None


_COLUMNS = (
    "key_id, name, scope, org_id, secret_sha256, created_at, created_by, revoked_at, revoked_by"
)


_ORG_EXISTS = sql.statement(
    "apikeys.org_exists",
    "SELECT 1 FROM organizations WHERE org_id = :org_id",
)

_INSERT_KEY = sql.statement(
    "apikeys.insert_key",
    f"""
    INSERT INTO api_keys (key_id, name, scope, org_id, secret_sha256, created_by)
    VALUES (:key_id, :name, :scope, :org_id, :secret_sha256, :actor) RETURNING {_COLUMNS}
    """,
)


def create(conn: Connection, *, name: str, scope: str, org_id: str | None, actor: str) -> Created:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidInput("name must be 1-200 characters")
    if scope not in SCOPES:
        raise InvalidInput(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if org_id is not None and not conn.execute(_ORG_EXISTS, {"org_id": org_id}).first():
        raise NotFound(f"unknown organization {org_id!r}")
    key_id = f"key_{secrets.token_hex(8)}"
    secret_part = secrets.token_urlsafe(32)  # 32 bytes: 43 URL-safe characters
    row = conn.execute(
        _INSERT_KEY,
        {
            "key_id": key_id,
            "name": name,
            "scope": scope,
            "org_id": org_id,
            "secret_sha256": _digest(secret_part),
            "actor": actor,
        },
    ).one()
    return Created(ApiKey(**row._mapping), f"{key_id}.{secret_part}")


_GET = sql.statement("apikeys.get", f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = :key_id")


def get(conn: Connection, key_id: str) -> ApiKey | None:
    row = conn.execute(_GET, {"key_id": key_id}).first()
    return ApiKey(**row._mapping) if row else None


_LIST = sql.statement(
    "apikeys.list",
    f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, key_id",
)


def list_keys(conn: Connection) -> list[ApiKey]:
    rows = conn.execute(_LIST)
    return [ApiKey(**r._mapping) for r in rows]


_REVOKE = sql.statement(
    "apikeys.revoke",
    f"""
    UPDATE api_keys SET revoked_at = now(), revoked_by = :actor
    WHERE key_id = :key_id AND revoked_at IS NULL RETURNING {_COLUMNS}
    """,
)


def revoke(conn: Connection, key_id: str, *, actor: str) -> ApiKey:
    """Revoke once; revoking a revoked key is refused, so the audit trail has one revocation."""
    if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
        raise NotFound(f"no API key {key_id!r}")
    row = conn.execute(
        _REVOKE,
        {"key_id": key_id, "actor": actor},
    ).first()
    if row is None:
        if get(conn, key_id) is None:
            raise NotFound(f"no API key {key_id!r}")
        raise Refused(f"API key {key_id} is already revoked")
    return ApiKey(**row._mapping)
