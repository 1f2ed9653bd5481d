"""`/v1/webhook-endpoints` and `/v1/events`: the host registers where events go (the secret
shown once), rotates and deletes, and catches up on what it missed. Endpoint routes span
organizations (a confined key: 403); `/v1/events` shows a confined key its organization's
events only. A URL that is not allowed or an unknown event type is 422 with nothing stored."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from core import wallet
from core.db import run_in_transaction
from tests.support.api import Client, api_org, api_settings, assert_problem, count, make_key
from tests.support.db import tx
from webhook_receiver.app import create_app

HOOK = "http://127.0.0.1:9/hook"


def _client(database_url: str, redis_url: str, **extra):
    app = create_app(api_settings(database_url, redis_url, **extra))
    return app, Client(app.test_client())


@pytest.fixture
def events_api(database_url, redis_clean):
    app, client = _client(
        database_url, redis_clean,
        PAYGUARD_SECRET_KEY=Fernet.generate_key().decode(), OUTBOUND_ALLOW_PRIVATE=True,
    )  # fmt: skip
    yield client
    app.extensions["payguard"].close()


def test_an_endpoint_is_made_listed_rotated_and_deleted(events_api, engine):
    key = make_key(engine, "admin")

    made = events_api.post("/webhook-endpoints", key, {"url": HOOK,
                                                       "events": ["wallet.credited"]})  # fmt: skip
    assert made.status == 201, made.body
    ep = made.body
    assert ep["secret"].startswith("whsec_") and ep["events"] == ["wallet.credited"]
    everything = events_api.post("/webhook-endpoints", key, {"url": HOOK}).body
    assert "top_up.completed" in everything["events"]  # all types when omitted

    listed = events_api.get("/webhook-endpoints", key).body["endpoints"]
    assert [e["endpoint_id"] for e in listed] == [ep["endpoint_id"], everything["endpoint_id"]]
    assert all("secret" not in e for e in listed)

    rotated = events_api.post(f"/webhook-endpoints/{ep['endpoint_id']}/rotate-secret", key)
    assert rotated.status == 200
    assert rotated.body["secret"].startswith("whsec_") and rotated.body["secret"] != ep["secret"]

    gone = events_api.call("DELETE", f"/webhook-endpoints/{ep['endpoint_id']}", key)
    assert gone.status == 204 and gone.body is None
    assert_problem(events_api.call("DELETE", f"/webhook-endpoints/{ep['endpoint_id']}", key), 404)
    assert_problem(events_api.post(f"/webhook-endpoints/{ep['endpoint_id']}/rotate-secret", key),
                   404)  # fmt: skip
    assert [e["endpoint_id"] for e in events_api.get("/webhook-endpoints", key).body["endpoints"]
            ] == [everything["endpoint_id"]]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": HOOK, "events": ["wallet.emptied"]}, "/events/0"),
        ({"url": HOOK, "events": []}, "/events"),
        ({"url": "ftp://127.0.0.1/hook"}, "/url"),
        ({"url": "not a url"}, "/url"),
        ({"url": HOOK, "secret": "mine"}, "/secret"),
    ],
)
def test_a_bad_endpoint_is_422_and_nothing_is_stored(events_api, engine, body, field):
    key = make_key(engine, "admin")

    problem = assert_problem(events_api.post("/webhook-endpoints", key, body), 422)

    assert field in [e["field"] for e in problem["errors"]]
    assert count(engine, "outbound_endpoints") == 0


def test_a_private_address_is_refused_unless_allowed(database_url, redis_clean, engine):
    app, strict = _client(database_url, redis_clean,
                          PAYGUARD_SECRET_KEY=Fernet.generate_key().decode())  # fmt: skip
    key = make_key(engine, "admin")
    try:
        for url in (HOOK, "https://127.0.0.1/hook", "https://10.1.2.3/hook"):
            problem = assert_problem(strict.post("/webhook-endpoints", key, {"url": url}), 422)
            assert problem["errors"][0]["field"] == "/url"
    finally:
        app.extensions["payguard"].close()
    assert count(engine, "outbound_endpoints") == 0


def test_without_a_secret_key_an_endpoint_cannot_be_made_503(database_url, redis_clean, engine):
    app, keyless = _client(database_url, redis_clean, OUTBOUND_ALLOW_PRIVATE=True)
    key = make_key(engine, "admin")
    try:
        assert_problem(keyless.post("/webhook-endpoints", key, {"url": HOOK}), 503)
    finally:
        app.extensions["payguard"].close()
    assert count(engine, "outbound_endpoints") == 0


def test_endpoint_routes_span_organizations_so_a_confined_key_gets_403(events_api, engine):
    org = tx(engine, api_org)
    confined = make_key(engine, "admin", org=org)
    made = events_api.post("/webhook-endpoints", make_key(engine, "admin"), {"url": HOOK}).body

    assert_problem(events_api.post("/webhook-endpoints", confined, {"url": HOOK}), 403)
    assert_problem(events_api.get("/webhook-endpoints", confined), 403)
    assert_problem(
        events_api.call("DELETE", f"/webhook-endpoints/{made['endpoint_id']}", confined), 403
    )
    assert_problem(
        events_api.post(f"/webhook-endpoints/{made['endpoint_id']}/rotate-secret", confined), 403
    )
    assert_problem(events_api.get("/webhook-endpoints", make_key(engine, "send")), 403)
    assert count(engine, "outbound_endpoints") == 1


def test_events_catch_up_after_a_sequence_and_a_confined_key_sees_its_own(events_api, engine):
    a, b = tx(engine, api_org), tx(engine, api_org)
    for org, cents in ((a, 100), (b, 200), (a, 300)):
        run_in_transaction(engine, lambda c, o=org, n=cents: wallet.credit(c, o, n, f"t:{o}:{n}"))
    everyone = make_key(engine, "read")

    credits = [e for e in events_api.get("/events", everyone).body["events"]
               if e["type"] == "wallet.credited"]  # fmt: skip
    assert [(e["data"]["org_id"], e["data"]["amount_cents"]) for e in credits] == [
        (a, 100), (b, 200), (a, 300),
    ]  # fmt: skip
    sequences = [e["sequence"] for e in credits]
    assert sequences == sorted(sequences)
    after = events_api.get(f"/events?after={sequences[0]}", everyone).body["events"]
    assert all(e["sequence"] > sequences[0] for e in after)
    assert (b, 200) in [(e["data"].get("org_id"), e["data"].get("amount_cents")) for e in after]

    mine = events_api.get("/events", make_key(engine, "read", org=a)).body["events"]
    assert mine and {e["data"]["org_id"] for e in mine} == {a}
    one = events_api.get("/events?limit=1", everyone).body["events"]
    assert len(one) == 1


@pytest.mark.parametrize("query", ["after=-1", "after=x", "limit=0", "limit=1001", "since=3"])
def test_a_bad_events_query_is_422(events_api, engine, query):
    assert_problem(events_api.get(f"/events?{query}", make_key(engine, "read")), 422)


def test_the_verifier_in_the_integration_guide_accepts_our_signatures_and_only_ours():
    """docs/host-integration.md shows hosts a ten-line verifier: it must verify what Payguard
    sends, both signatures of a rotation, and refuse a changed body or a stale timestamp."""
    import re
    import time
    from pathlib import Path

    from core.webhook_signing import new_secret, signature_header

    guide = (Path(__file__).resolve().parents[2] / "docs" / "host-integration.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if "def verify" in b]
    scope: dict = {}
    exec(code, scope)  # the guide's own code
    verify = scope["verify"]
    old, new = new_secret(), new_secret()
    body, now = b'{"type":"wallet.credited"}', int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
               "webhook-signature": signature_header([new, old], "msg_1", now, body)}  # fmt: skip

    assert verify(new, headers, body) and verify(old, headers, body)
    assert not verify(new_secret(), headers, body)
    assert not verify(new, headers, body + b" ")
    stale = dict(headers, **{"webhook-timestamp": str(now - 3600)})
    stale["webhook-signature"] = signature_header([new], "msg_1", now - 3600, body)
    assert not verify(new, stale, body)
