"""The host API's routes (contract: Host API): what each answers, the same answers as the
CLI for the same use case, and a clear 4xx problem document for every kind of bad input,
with nothing stored and nothing queued."""

from __future__ import annotations

import json

import pytest

from cli.main import main as payguard
from core import messages, sending, wallet
from core.db import run_in_transaction
from core.sending import Policy
from tests.support.api import PROBLEM, api_org, assert_problem, count, make_key
from tests.support.db import tx

TO = "+15005550010"


@pytest.fixture
def cli(database_url, monkeypatch, capsys):
    """`payguard … --json` in-process on this test's database: its JSON answer."""
    monkeypatch.setenv("DATABASE_URL", database_url)

    def run(*args: str) -> dict:
        capsys.readouterr()
        status = payguard([*args, "--json"])
        out = capsys.readouterr().out
        assert status == 0, out
        return json.loads(out)

    return run


# ---------------------------------------------------------------- one use case, two entrypoints


def test_can_send_wallet_and_campaigns_answer_as_the_cli_does(api, engine, cli):
    ok = tx(engine, api_org, balance=100)
    blocked = tx(engine, api_org, balance=0, billing="subscription", active=True)
    key = make_key(engine, "admin")
    for org in (ok, blocked):
        assert api.post(f"/organizations/{org}/campaigns", key, {"campaign_id": "c1"}).status == 201
        cli("campaign", "create", org, "c2")
        run_in_transaction(engine, lambda c, o=org: wallet.freeze(c, o, "review", actor="t"))

    for org in (ok, blocked):
        can = api.get(f"/organizations/{org}/can-send", key).body
        assert can == cli("status", org)
        assert {"can_send", "reasons"} <= set(can)
        assert api.get(f"/organizations/{org}/wallet", key).body == cli("wallet", "show", org)
        assert api.get(f"/organizations/{org}/campaigns", key).body == cli("campaign", "list", org)
        shown = api.get(f"/organizations/{org}", key).body
        assert shown == cli("org", "show", org)
    assert api.get(f"/organizations/{blocked}/can-send", key).body["reasons"] == [
        "wallet_frozen", "insufficient_balance",
    ]  # fmt: skip


def test_can_send_on_a_connection_the_database_dropped_answers_503_then_recovers(
    api_app, api, engine, database_url
):
    import psycopg

    from webhook_receiver.api.access import KeyCache

    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "read")
    # The key stays cached, so the dropped connection meets can-send's own read, not the key's.
    api_app.extensions["payguard_api"].keys = KeyCache(api_app.extensions["payguard"].engine, 3600)
    assert api.get(f"/organizations/{org}/can-send", key).status == 200
    with psycopg.connect(database_url, autocommit=True) as admin:  # as a database restart would
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )

    dropped = api.get(f"/organizations/{org}/can-send", key)

    assert_problem(dropped, 503)
    assert dropped.headers["Retry-After"] == "1"
    assert api.get(f"/organizations/{org}/can-send", key).body["can_send"] is True


# ---------------------------------------------------------------- organizations


def test_creating_an_organization_twice_with_the_same_body_answers_200_and_another_409(api, engine):
    key = make_key(engine, "admin")
    body = {"org_id": "acme", "billing": "prepaid", "low_balance_cents": 500, "currency": "eur"}

    first = api.post("/organizations", key, body)
    again = api.post("/organizations", key, body)
    other = api.post("/organizations", key, {**body, "low_balance_cents": 1})

    assert first.status == 201 and again.status == 200
    assert first.body == again.body
    assert first.body["currency"] == "EUR" and first.body["low_balance_cents"] == 500
    assert first.body["wallet"]["balance_cents"] == 0
    assert_problem(other, 409)
    assert count(engine, "organizations") == 1


def test_patch_changes_only_the_fields_given_and_null_clears(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "admin")

    changed = api.patch(f"/organizations/{org}", key, {"segment_price_cents": 3,
                                                        "low_balance_cents": 200})  # fmt: skip
    cleared = api.patch(f"/organizations/{org}", key, {"sender": None})

    assert changed.status == 200
    assert changed.body["segment_price_cents"] == 3 and changed.body["sender"] == "+15005550006"
    assert cleared.body["sender"] is None and cleared.body["low_balance_cents"] == 200
    assert api.get(f"/organizations/{org}/can-send", key).body["segment_price_cents"] == 3


def test_a_new_subaccount_of_an_organization_that_should_be_suspended_is_suspended_too(api, engine):
    import uuid

    from sqlalchemy import text

    from core import orgs
    from core.providers.twilio import accounts as twilio_accounts

    policy = Policy()
    names = [f"org-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    for name in names:  # subscription billing and no subscription: its subaccount is suspended
        run_in_transaction(engine, lambda c, n=name: (
            orgs.create(c, n, sender="+15005550006", twilio_subaccount_sid="AC" + uuid.uuid4().hex),
            sending.reconcile(c, n, policy),
        ))  # fmt: skip
    with engine.begin() as c:  # and Twilio confirmed it
        c.execute(text("UPDATE organizations SET twilio_status = 'suspended'"))
    org, other = names
    key = make_key(engine, "admin")

    fresh = "AC" + "9" * 32
    assert api.patch(f"/organizations/{org}", key, {"twilio_subaccount_sid": fresh}).status == 200
    same = api.get(f"/organizations/{other}", key).body["twilio_subaccount_sid"]
    assert api.patch(f"/organizations/{other}", key, {"twilio_subaccount_sid": same}).status == 200

    with engine.connect() as c:
        assert twilio_accounts.out_of_sync(c, 100) == [org]  # the converge job suspends it


def test_a_subaccount_of_another_organization_is_a_conflict(api, engine):
    a, b = tx(engine, api_org), tx(engine, api_org)
    key = make_key(engine, "admin")
    sid = api.get(f"/organizations/{a}", key).body["twilio_subaccount_sid"]

    assert_problem(api.patch(f"/organizations/{b}", key, {"twilio_subaccount_sid": sid}), 409)


# ---------------------------------------------------------------- wallet entries


def test_wallet_entries_walk_newest_first_by_cursor_to_the_end(api, engine):
    org = tx(engine, api_org, balance=0)
    key = make_key(engine, "read")
    for n in range(7):
        run_in_transaction(engine, lambda c, n=n: wallet.credit(c, org, 10 + n, f"t:{n}"))

    seen, cursor, pages = [], None, 0
    while True:
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = api.get(f"/organizations/{org}/wallet/entries{query}", key).body
        seen += [e["reference"] for e in page["entries"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == [f"t:{n}" for n in reversed(range(7))]
    assert pages == 3
    expected = [e.reference for e in run_in_transaction(engine, lambda c: wallet.history(c, org))]
    assert seen == expected


@pytest.mark.parametrize(
    "query",
    ["?limit=0", "?limit=1001", "?limit=ten", "?cursor=", "?cursor=%%%", "?cursor=bm9wZQ",
     "?cursor=ZTE6LTE", "?unknown=1"],
)  # fmt: skip
def test_bad_cursors_and_limits_answer_422(api, engine, query):
    org = tx(engine, api_org, balance=10)
    key = make_key(engine, "read")

    body = assert_problem(api.get(f"/organizations/{org}/wallet/entries{query}", key), 422)
    assert body["errors"]


# ---------------------------------------------------------------- campaigns


def test_campaigns_pause_and_resume_and_a_blocked_resume_says_why(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "admin")
    created = api.post(f"/organizations/{org}/campaigns", key, {"campaign_id": "spring"})
    paused = api.post(f"/organizations/{org}/campaigns/spring/pause", key)
    resumed = api.post(f"/organizations/{org}/campaigns/spring/resume", key)
    api.post(f"/organizations/{org}/campaigns/spring/pause", key)
    run_in_transaction(engine, lambda c: wallet.freeze(c, org, "chargeback", actor="t"))
    refused = api.post(f"/organizations/{org}/campaigns/spring/resume", key)

    assert created.status == 201 and created.body["status"] == "running"
    assert paused.body == {"campaign_id": "spring", "status": "paused", "paused_by": "user",
                           "pause_reason": "paused by user"}  # fmt: skip
    assert resumed.body["status"] == "running"
    assert assert_problem(refused, 409)["reasons"] == ["wallet_frozen"]
    assert_problem(api.post(f"/organizations/{org}/campaigns/nope/resume", key), 404)
    assert_problem(api.post(f"/organizations/{org}/campaigns", key, {"campaign_id": "spring"}), 409)


# ---------------------------------------------------------------- messages


def test_a_message_is_queued_or_blocked_with_reasons_at_queue_time(api, engine):
    ok, broke = tx(engine, api_org, balance=100), tx(engine, api_org, balance=0)
    key = make_key(engine, "send")

    queued = api.post("/messages", key, {"org_id": ok, "to": TO, "body": "hi"},
                      headers={"Idempotency-Key": "1"})  # fmt: skip
    blocked = api.post("/messages", key, {"org_id": broke, "to": TO, "body": "hi"},
                       headers={"Idempotency-Key": "1"})  # fmt: skip
    shown = api.get(f"/messages/{queued.body['message_id']}", key)

    assert queued.status == 202 and queued.body["status"] == "queued"
    assert blocked.status == 202 and blocked.body["status"] == "blocked"
    assert blocked.body["reasons"] == ["insufficient_balance"]
    assert {"message_id", "org_id", "status", "twilio_sid", "charged_cents", "segments",
            "created_at"} <= set(shown.body)  # fmt: skip
    assert shown.body["org_id"] == ok and shown.body["created_at"].endswith("+00:00")
    # Only the queued one has a send task.
    assert count(engine, "outbox", "task = 'payguard.send_message'") == 1


def test_a_batch_is_queued_in_request_order_and_stops_exactly_at_the_money(api, engine):
    org = tx(engine, api_org, balance=30)  # 30 one-segment messages' worth
    key = make_key(engine, "send")
    items = [{"to": TO, "body": f"m{i}", "idempotency_key": f"k{i}"} for i in range(100)]

    answer = api.post("/messages/batch", key, {"org_id": org, "messages": items})

    assert answer.status == 202
    ids = [m["message_id"] for m in answer.body["messages"]]
    assert len(set(ids)) == 100 and {m["status"] for m in answer.body["messages"]} == {"queued"}
    policy = Policy()
    plans = [run_in_transaction(engine, lambda c, m=m: messages.prepare(c, m, policy)) for m in ids]
    assert sum(p is not None for p in plans) == 30
    found = [run_in_transaction(engine, lambda c, m=m: messages.get(c, m)) for m in ids]
    assert [m.status for m in found] == ["sending"] * 30 + ["blocked"] * 70
    assert all(m.block_reasons == ["insufficient_balance"] for m in found[30:])
    state = run_in_transaction(engine, lambda c: wallet.show(c, org))
    assert state.held_cents == 30 and state.available_cents == 0


def test_a_batch_with_one_bad_item_queues_nothing_and_points_at_it(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    items = [{"to": TO, "body": "ok", "idempotency_key": f"k{i}"} for i in range(5)]
    items[3] = {"to": "5551234", "body": "ok", "idempotency_key": "k3"}

    body = assert_problem(api.post("/messages/batch", key, {"org_id": org, "messages": items}), 422)

    assert [e["field"] for e in body["errors"]] == ["/messages/3/to"]
    assert count(engine, "messages") == 0 and count(engine, "idempotency_keys") == 0


# ---------------------------------------------------------------- bad input


def _message(org: str, **over) -> dict:
    return {"org_id": org, "to": TO, "body": "hello", **over}


BAD_MESSAGES = {
    "wrong type": lambda org: _message(org, body=5),
    "number as text": lambda org: {**_message(org), "to": 15005550010},
    "unknown field": lambda org: _message(org, priority="high"),
    "missing field": lambda org: {"org_id": org, "to": TO},
    "not an object": lambda org: [_message(org)],
    "NUL in text": lambda org: _message(org, body="a\u0000b"),
    "lone surrogate": lambda org: _message(org, body="\ud800"),
    "body too long": lambda org: _message(org, body="x" * 1601),
    "bad recipient": lambda org: _message(org, to="+0123"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_invalid_message_bodies_answer_422_with_a_pointer_and_queue_nothing(api, engine, case):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")

    answer = api.post("/messages", key, BAD_MESSAGES[case](org), headers={"Idempotency-Key": "i"})

    body = assert_problem(answer, 422)
    assert body["errors"] and all("field" in e and "message" in e for e in body["errors"])
    assert count(engine, "messages") == 0 and count(engine, "idempotency_keys") == 0


@pytest.mark.parametrize(
    "raw", [b"{", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b"", b"NaN-ish"]
)
def test_malformed_json_answers_400(api, engine, raw):
    key = make_key(engine, "admin")

    assert_problem(api.post("/organizations", key, raw=raw), 400)
    assert count(engine, "organizations") == 0


def test_bodies_over_1_mib_answer_413_and_batches_get_8_mib(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    big = json.dumps(_message(org, body="x" * (1024 * 1024))).encode()
    over_8 = (
        b'{"org_id": "' + org.encode() + b'", "messages": [], "pad": "' + b"x" * (8 << 20) + b'"}'
    )

    assert_problem(api.post("/messages", key, raw=big, headers={"Idempotency-Key": "b"}), 413)
    assert_problem(api.post("/messages/batch", key, raw=over_8), 413)
    # A 2 MiB batch is within its own cap: validated (here: too long bodies), not refused as big.
    items = [{"to": TO, "body": "y" * 1600, "idempotency_key": f"k{i}"} for i in range(1000)]
    two_mib = api.post("/messages/batch", key, {"org_id": org, "messages": items})
    assert two_mib.status == 202
    assert count(engine, "messages") == 1000


def test_batches_of_none_or_over_1000_messages_answer_422(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    items = [{"to": TO, "body": "x", "idempotency_key": f"k{i}"} for i in range(1001)]

    assert_problem(api.post("/messages/batch", key, {"org_id": org, "messages": items}), 422)
    assert_problem(api.post("/messages/batch", key, {"org_id": org, "messages": []}), 422)
    dup = [items[0], items[0]]
    body = assert_problem(api.post("/messages/batch", key, {"org_id": org, "messages": dup}), 422)
    assert body["errors"][0]["field"] == "/messages/1/idempotency_key"
    assert count(engine, "messages") == 0


def test_unknown_organizations_campaigns_and_messages_answer_404(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "admin")

    assert_problem(api.get("/organizations/nobody", key), 404)
    assert_problem(api.get("/organizations/nobody/can-send", key), 404)
    assert_problem(api.get("/organizations/nobody/wallet/entries", key), 404)
    assert_problem(api.patch("/organizations/nobody", key, {"low_balance_cents": 1}), 404)
    assert_problem(api.post("/messages", key, _message("nobody"), headers={"Idempotency-Key": "x"}),
                   404)  # fmt: skip
    assert_problem(api.post("/messages", key, _message(org, campaign_id="none"),
                            headers={"Idempotency-Key": "y"}), 404)  # fmt: skip
    assert_problem(api.get("/messages/msg_" + "0" * 32, key), 404)
    assert_problem(api.get("/messages/not-a-message-id", key), 404)
    assert count(engine, "messages") == 0 and count(engine, "idempotency_keys") == 0


def test_a_missing_or_malformed_idempotency_key_answers_400(api, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")

    assert_problem(api.post("/messages", key, _message(org)), 400)
    assert_problem(api.post("/messages", key, _message(org), headers={"Idempotency-Key": ""}), 400)
    long = {"Idempotency-Key": "k" * 201}
    assert_problem(api.post("/messages", key, _message(org), headers=long), 400)
    assert count(engine, "messages") == 0


def test_unknown_routes_and_methods_answer_problem_documents(api, engine):
    key = make_key(engine, "admin")

    assert api.get("/nowhere", key).content_type.startswith(PROBLEM)
    assert_problem(api.get("/nowhere", key), 404)
    not_allowed = api.call("DELETE", "/organizations/acme", key)
    assert_problem(not_allowed, 405)
    assert "PATCH" in not_allowed.headers["Allow"]
    # The webhooks keep their own answers.
    assert api._c.get("/healthz").status_code == 200


@pytest.mark.slow
def test_a_batch_reaches_the_worker_and_every_message_is_sent(api, engine, app_env, tmp_path):
    from tests.stack import start_worker, wait_for

    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "send")
    items = [{"to": TO, "body": f"m{i}", "idempotency_key": f"k{i}"} for i in range(5)]
    answer = api.post("/messages/batch", key, {"org_id": org, "messages": items})
    ids = [m["message_id"] for m in answer.body["messages"]]

    with start_worker(app_env, tmp_path):
        wait_for(
            lambda: all(
                run_in_transaction(engine, lambda c, m=m: messages.get(c, m)).status == "accepted"
                for m in ids
            ),
            60,
            0.2,
            what="every message of the batch sent",
        )
    assert count(engine, "outbox", "published_at IS NULL") == 0


def test_a_price_beyond_its_column_answers_422_not_500(api, engine):
    """Found by schemathesis: segment_price_cents is an integer column."""
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "admin")

    body = assert_problem(
        api.patch(f"/organizations/{org}", key, {"segment_price_cents": 422114655318}), 422
    )
    created = api.post("/organizations", key, {"org_id": "big", "segment_price_cents": 2**31})

    assert body["errors"][0]["field"] == "/segment_price_cents"
    assert_problem(created, 422)
    assert api.patch(f"/organizations/{org}", key, {"segment_price_cents": 10**6}).status == 200
