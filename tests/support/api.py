"""Helpers for tests of the host API (`/v1`): keys, organizations with money, and a client
that speaks JSON with a bearer key, in-process (Flask's test client) or over HTTP."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from core import apikeys, orgs, subscriptions, wallet
from core.db import run_in_transaction
from core.settings import Settings

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


def new_org(engine, balance: int = 0, *, billing: str = "prepaid", price: int | None = None) -> str:
    """An organization with a sender and `balance` cents; `subscription` billing gets an
    active subscription."""
    org = f"org-{uuid.uuid4().hex[:10]}"

    def create(conn):
        orgs.create(
            conn, org, billing=billing, sender="+15005550006", segment_price_cents=price,
            twilio_subaccount_sid="AC" + uuid.uuid4().hex,
        )  # fmt: skip
        if balance:
            wallet.credit(conn, org, balance, f"test:seed:{org}", kind="payment")
        if billing == "subscription":
            from datetime import UTC, datetime

            subscriptions.apply_status(conn, "paypal", f"I-{org}", org, "active", datetime.now(UTC))

    run_in_transaction(engine, create)
    return org


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
