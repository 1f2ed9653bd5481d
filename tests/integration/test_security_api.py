"""The host API's threat model (guarantee 11): an API key reaches only what its scope and
organization allow, and no input answers 5xx.

Attackers considered: someone with no key, a guessed, malformed, revoked or stolen-then-
revoked key; a key of too small a scope (a `read` key of a dashboard trying to send); a key
confined to one organization (a tenant's own integration) probing others by id in paths and
bodies; a host that reuses idempotency keys to read or overwrite another request's answer.
Secrets are never stored, so a database leak does not give keys away. Every write names its
key in the audit trail and every request its key in the log, so misuse can be traced.
Not considered here: transport security (TLS terminates before `web`) and abuse of volume,
which the per-key rate limit covers (test_api_rate_limit.py).
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import requests
from sqlalchemy import text

from core import apikeys
from core.db import run_in_transaction
from tests.stack import start_web
from tests.support.api import api_org, assert_problem, count, key_id, make_key
from tests.support.db import tx

TO = "+15005550010"


def send(api, key, org, idem="k-1", body="hello"):
    return api.post(
        "/messages", key, {"org_id": org, "to": TO, "body": body}, headers={"Idempotency-Key": idem}
    )


# ---------------------------------------------------------------- who you are


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer key_0123456789abcdef.short",
        "Bearer key_0123456789abcdef." + "A" * 43,  # well-formed, unknown
    ],
)
def test_missing_malformed_or_unknown_keys_answer_401(api, engine, authorization):
    org = tx(engine, api_org, balance=100)
    headers = {} if authorization is None else {"Authorization": authorization}

    answer = api.get(f"/organizations/{org}/can-send", headers=headers)

    assert_problem(answer, 401)
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_known_key_id_with_a_wrong_secret_answers_401(api, engine):
    org = tx(engine, api_org, balance=100)
    real = make_key(engine, "admin")
    forged = key_id(real) + "." + "B" * 43

    assert_problem(api.get(f"/organizations/{org}/can-send", forged), 401)
    assert api.get(f"/organizations/{org}/can-send", real).status == 200


def test_secrets_are_stored_only_as_hashes(engine):
    secret = make_key(engine, "admin")
    with engine.connect() as conn:
        dump = json.dumps([list(map(str, r)) for r in conn.execute(text("SELECT * FROM api_keys"))])
    assert secret.split(".", 1)[1] not in dump
    assert len(secret.split(".", 1)[1]) == 43  # 32 random bytes


def test_a_revoked_key_is_refused_and_nothing_is_queued(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    assert send(api, key, org, "before").status == 202
    run_in_transaction(engine, lambda c: apikeys.revoke(c, key_id(key), actor="test"))
    time.sleep(0.6)  # past the key cache

    assert_problem(send(api, key, org, "after"), 401)
    assert count(engine, "messages") == 1


def test_revocation_takes_effect_within_a_second_in_every_web_process(app_env, engine, tmp_path):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "read")
    url = f"/v1/organizations/{org}/can-send"
    headers = {"Authorization": f"Bearer {key}"}
    with start_web(app_env, tmp_path, workers=3) as web:
        session = requests.Session()
        # Warm every process's cache: many requests spread over the three workers.
        for _ in range(30):
            assert session.get(web.url + url, headers=headers, timeout=10).status_code == 200
        run_in_transaction(engine, lambda c: apikeys.revoke(c, key_id(key), actor="test"))
        revoked_at = time.monotonic()
        time.sleep(1.0)
        answers = [
            requests.get(web.url + url, headers=headers, timeout=10).status_code
            for _ in range(30)  # new connections: any worker may take each
        ]
        assert time.monotonic() - revoked_at < 30
    assert set(answers) == {401}


# ---------------------------------------------------------------- what you may do


def test_scopes_nest_read_within_send_within_admin(api, engine):
    org = tx(engine, api_org, balance=100)
    read, send_key, admin = (make_key(engine, s) for s in ("read", "send", "admin"))
    campaign = {"campaign_id": "spring"}

    for key in (read, send_key, admin):
        assert api.get(f"/organizations/{org}/wallet", key).status == 200
    assert_problem(send(api, read, org, "r"), 403)
    assert send(api, send_key, org, "s").status == 202
    assert send(api, admin, org, "a").status == 202
    assert_problem(api.post(f"/organizations/{org}/campaigns", read, campaign), 403)
    assert_problem(api.post(f"/organizations/{org}/campaigns", send_key, campaign), 403)
    assert api.post(f"/organizations/{org}/campaigns", admin, campaign).status == 201
    assert_problem(api.post(f"/organizations/{org}/campaigns/spring/pause", read), 403)
    assert api.post(f"/organizations/{org}/campaigns/spring/pause", send_key).status == 200
    assert_problem(api.patch(f"/organizations/{org}", send_key, {"low_balance_cents": 5}), 403)
    assert_problem(api.post("/organizations", send_key, {"org_id": "new-org"}), 403)
    assert count(engine, "messages") == 2
    assert count(engine, "organizations", "org_id = 'new-org'") == 0


def test_a_confined_key_sees_other_organizations_as_unknown(api, engine):
    mine, theirs = tx(engine, api_org, balance=100), tx(engine, api_org, balance=100)
    key = make_key(engine, "admin", org=mine)
    admin = make_key(engine, "admin")
    api.post(f"/organizations/{theirs}/campaigns", admin, {"campaign_id": "c"})
    [their_message] = api.post(
        "/messages/batch", admin,
        {"org_id": theirs, "messages": [{"to": TO, "body": "x", "idempotency_key": "t"}]},
    ).body["messages"]  # fmt: skip

    for path in ("", "/can-send", "/wallet", "/wallet/entries", "/campaigns"):
        assert api.get(f"/organizations/{mine}{path}", key).status == 200
        assert_problem(api.get(f"/organizations/{theirs}{path}", key), 404)
    assert_problem(api.get(f"/messages/{their_message['message_id']}", key), 404)
    assert_problem(api.patch(f"/organizations/{theirs}", key, {"low_balance_cents": 1}), 404)
    assert_problem(api.post(f"/organizations/{theirs}/campaigns", key, {"campaign_id": "d"}), 404)
    assert_problem(api.post(f"/organizations/{theirs}/campaigns/c/pause", key), 404)
    assert_problem(api.post(f"/organizations/{theirs}/campaigns/c/resume", key), 404)
    assert_problem(send(api, key, theirs), 404)
    batch = {"org_id": theirs, "messages": [{"to": TO, "body": "x", "idempotency_key": "1"}]}
    assert_problem(api.post("/messages/batch", key, batch), 404)
    # The answers are the same as for an organization that does not exist at all.
    assert api.get("/organizations/nobody/wallet", key).body["detail"].startswith("unknown")
    assert count(engine, "messages") == 1
    assert count(engine, "campaigns") == 1


def test_a_confined_key_may_not_use_routes_that_span_organizations(api, engine):
    mine = tx(engine, api_org, balance=100)
    key = make_key(engine, "admin", org=mine)

    assert_problem(api.post("/organizations", key, {"org_id": "another"}), 403)
    assert_problem(api.post("/organizations", key, {"org_id": mine}), 403)
    assert count(engine, "organizations") == 1


def test_every_write_names_its_key_in_the_audit_trail_and_every_request_in_the_log(
    api, engine, caplog
):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "admin")
    caplog.set_level(logging.INFO, logger="webhook_receiver.api.registry")

    api.post(f"/organizations/{org}/campaigns", key, {"campaign_id": "c"})
    api.post(f"/organizations/{org}/campaigns/c/pause", key)
    api.patch(f"/organizations/{org}", key, {"low_balance_cents": 50})
    send(api, key, org)
    api.post(
        "/messages/batch", key,
        {"org_id": org, "messages": [{"to": TO, "body": "x", "idempotency_key": "b"}]},
    )  # fmt: skip
    api.post("/organizations", key, {"org_id": "fresh"})
    api.get(f"/organizations/{org}/wallet", key)

    with engine.connect() as conn:
        rows = conn.execute(text("SELECT actor, action, details FROM audit_log ORDER BY id")).all()
    assert [r.action for r in rows] == [
        "campaign.create", "campaign.pause", "org.update", "message.send", "message.batch",
        "org.create",
    ]  # fmt: skip
    assert {r.actor for r in rows} == {f"api:{key_id(key)}"}
    assert {r.details["key_id"] for r in rows} == {key_id(key)}
    logged = [r for r in caplog.records if r.getMessage() == "api request"]
    assert len(logged) == 7 and {r.key_id for r in logged} == {key_id(key)}


# ---------------------------------------------------------------- idempotency abuse


def test_an_idempotency_key_reused_with_another_body_is_refused_and_queues_nothing(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    first = send(api, key, org, "k", body="first")

    again = send(api, key, org, "k", body="second")

    assert first.status == 202
    body = assert_problem(again, 422)
    assert body["errors"]
    assert count(engine, "messages") == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT body FROM messages")).scalar() == "first"


def test_idempotency_keys_are_scoped_per_organization(api, engine):
    """Another tenant using the same key neither reads nor blocks the first one's answer."""
    a, b = tx(engine, api_org, balance=100), tx(engine, api_org, balance=100)
    key_a, key_b = make_key(engine, "send", org=a), make_key(engine, "send", org=b)

    first = send(api, key_a, a, "shared", body="for a")
    other = send(api, key_b, b, "shared", body="for b")

    assert first.status == other.status == 202
    assert first.body["message_id"] != other.body["message_id"]
    assert "Idempotent-Replayed" not in other.headers
    assert count(engine, "messages") == 2


def test_a_batch_reusing_a_key_with_another_message_queues_nothing(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    items = [{"to": TO, "body": f"m{i}", "idempotency_key": f"k{i}"} for i in range(3)]
    assert api.post("/messages/batch", key, {"org_id": org, "messages": items}).status == 202

    changed = [*items, {"to": TO, "body": "new", "idempotency_key": "k3"}]
    changed[1] = {**items[1], "body": "changed"}
    answer = api.post("/messages/batch", key, {"org_id": org, "messages": changed})

    body = assert_problem(answer, 422)
    assert [e["field"] for e in body["errors"]] == ["/messages/1/idempotency_key"]
    assert count(engine, "messages") == 3  # k3 was not queued either


# ---------------------------------------------------------------- keys from the console


@pytest.fixture
def cli(database_url, monkeypatch, capsys):
    """`payguard … --json` in-process: (exit status, its JSON answer)."""
    from cli.main import main

    monkeypatch.setenv("DATABASE_URL", database_url)

    def run(*args: str) -> tuple[int, dict]:
        capsys.readouterr()
        status = main([*args, "--json"])
        return status, json.loads(capsys.readouterr().out)

    return run


def test_apikey_create_shows_the_secret_once_list_never_and_revoke_is_audited(api, engine, cli):
    org = tx(engine, api_org, balance=100)
    status, created = cli("apikey", "create", "--name", "crm", "--scope", "send", "--org", org,
                          "--actor", "alice")  # fmt: skip
    assert status == 0
    assert {"key_id", "secret", "scope", "org_id"} <= set(created)
    assert (created["scope"], created["org_id"]) == ("send", org)
    assert api.get(f"/organizations/{org}/can-send", created["secret"]).status == 200

    _, listed = cli("apikey", "list")
    [row] = listed["keys"]
    assert {"key_id", "name", "scope", "org_id", "created_at", "revoked_at"} <= set(row)
    assert created["secret"] not in json.dumps(listed)

    assert cli("apikey", "revoke", created["key_id"], "--actor", "bob")[0] == 0
    assert cli("apikey", "revoke", created["key_id"], "--actor", "bob")[0] == 1  # once
    time.sleep(0.6)
    assert_problem(api.get(f"/organizations/{org}/can-send", created["secret"]), 401)
    with engine.connect() as conn:
        trail = conn.execute(
            text("SELECT actor, action, details->>'key_id' FROM audit_log ORDER BY id")
        ).all()
    assert [tuple(r) for r in trail] == [
        ("alice", "apikey.create", created["key_id"]),
        ("bob", "apikey.revoke", created["key_id"]),
    ]


def test_apikey_create_refuses_an_unknown_organization_and_a_bad_scope(cli, engine):
    assert cli("apikey", "create", "--name", "x", "--org", "nobody")[0] == 1
    assert cli("apikey", "create", "--name", "x", "--scope", "root")[0] == 2  # bad usage
    assert count(engine, "api_keys") == 0


def test_the_dev_stack_key_is_admin_and_each_start_revokes_the_previous_one(
    api, engine, database_url
):
    from devtools.devstack import dev_api_key

    first, second = dev_api_key(database_url), dev_api_key(database_url)
    time.sleep(0.6)

    assert_problem(api.post("/organizations", first, {"org_id": "acme"}), 401)
    assert api.post("/organizations", second, {"org_id": "acme"}).status == 201
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT scope, revoked_at IS NULL FROM api_keys")).all()
    assert sorted(tuple(k) for k in keys) == [("admin", False), ("admin", True)]
