"""Helpers for tests of the host API (`/v1`): keys, organizations with money, and a client
that speaks JSON with a bearer key, in-process (Flask's test client) or over HTTP."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import text

from core import apikeys
from core.db import run_in_transaction
from core.settings import Settings
from tests.support.factories import new_org

PROBLEM = "application/problem+json"


def api_settings(database_url: str, redis_url: str, **extra: Any) -> Settings:
    return Settings(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        LOG_FORMAT="text",
        BROKER_PUBLISH_TIMEOUT=0.2,
        **extra,
    )


def make_key(engine, scope: str = "admin", org: str | None = None) -> str:
    """A new key's bearer secret."""
    return run_in_transaction(
        engine,
        lambda c: apikeys.create(c, name=f"test {scope}", scope=scope, org_id=org, actor="test"),
    ).secret


def key_id(secret: str) -> str:
    return secret.split(".", 1)[0]


# The organizations API tests start from: prepaid, with a subaccount and a sender, and money
# (when given) credited as a payment. Pass billing="subscription", active=True for the other kind.
api_org = partial(new_org, billing="prepaid", twilio=True, seed_kind="payment")


def count(engine, table: str, where: str = "true", **params: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table} WHERE {where}"), params).scalar()


@dataclass
class Answer:
    status: int
    headers: Any
    body: Any
    content_type: str


class Client:
    """`/v1` through Flask's test client: `api.get("/organizations/acme", key)`."""

    def __init__(self, flask_client) -> None:
        self._c = flask_client

    def call(
        self, method: str, path: str, key: str | None = None, body: Any = None, *,
        raw: bytes | None = None, headers: dict[str, str] | None = None,
    ) -> Answer:  # fmt: skip
        h = dict(headers or {})
        if key is not None:
            h.setdefault("Authorization", f"Bearer {key}")
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        r = self._c.open("/v1" + path, method=method, data=data, headers=h)
        try:
            parsed = json.loads(r.data) if r.data else None
        except ValueError:
            parsed = r.data
        return Answer(r.status_code, r.headers, parsed, r.content_type or "")

    def get(self, path: str, key: str | None = None, **kw: Any) -> Answer:
        return self.call("GET", path, key, **kw)

    def post(self, path: str, key: str | None = None, body: Any = None, **kw: Any) -> Answer:
        return self.call("POST", path, key, body, **kw)

    def patch(self, path: str, key: str | None = None, body: Any = None, **kw: Any) -> Answer:
        return self.call("PATCH", path, key, body, **kw)


def assert_problem(answer: Answer, status: int) -> dict:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.content_type.startswith(PROBLEM), answer.content_type
    body = answer.body
    assert body["status"] == status and body["title"] and body["type"] and "detail" in body
    return body
