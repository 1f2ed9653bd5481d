"""Top-ups through the host API: `POST /v1/organizations/{org_id}/top-ups` makes a PayPal
order or a Stripe Checkout Session at a local fake, the buyer's approval and the provider's
webhooks complete it, and the wallet is credited once whatever arrives twice or first.

Webhooks are stored in the inbox and applied with core.handlers.process as the worker does
(tests/support/topups.py); the capture task's work (core.top_up_capture.capture) is called directly.
Security properties are in test_security_topups.py.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from core import outbox, top_up_capture, topups
from core.db import run_in_transaction
from core.errors import TransientError
from tests.support.api import Client, api_org, assert_problem, count, make_key
from tests.support.db import tx
from tests.support.events import events_of
from tests.support.payloads import stripe as sp
from tests.support.topups import (
    RETURN,
    balance,
    capture,
    capture_completed,
    captures_queued,
    create,
    deliver,
    journal,
    order_approved,
    paypal_api,
)


def nothing_made(engine) -> None:
    assert count(engine, "top_ups") == 0
    assert count(engine, "idempotency_keys") == 0


# --------------------------------------------------------------------------- PayPal


def test_paypal_top_up_creates_a_capture_order_for_the_organization(
    topup_api, engine, topup_paypal
):
    key, org = make_key(engine), tx(engine, api_org)
    answer = create(topup_api, key, org, amount=1500)
    assert answer.status == 201, answer.body
    top_up = answer.body
    assert top_up["provider"] == "paypal" and top_up["status"] == "created"
    assert top_up["amount_cents"] == 1500 and top_up["currency"] == "USD"
    order = topup_paypal.orders[top_up["provider_reference"]]
    assert order["request"]["intent"] == "CAPTURE"
    assert order["custom_id"] == org
    assert order["amount"] == {"currency_code": "USD", "value": "15.00"}
    assert order["request"]["application_context"]["return_url"] == RETURN["return_url"]
    assert top_up["approval_url"].endswith(f"token={top_up['provider_reference']}")
    read = make_key(engine, "read")
    shown = topup_api.get(f"/organizations/{org}/top-ups/{top_up['top_up_id']}", read)
    assert shown.status == 200 and shown.body["status"] == "created"


def host_events(engine, prefix: str) -> list[tuple[str, dict]]:
    """(type, data) of the events recorded for the host whose type starts with `prefix`."""
    return [(e["type"], e["data"]) for e in events_of(engine) if e["type"].startswith(prefix)]


ORDERS = {
    "capture answer first": ("approve", "approve", "capture", "webhook", "capture"),
    "webhook before the answer is recorded": ("approve", "raw", "webhook", "approve", "answer"),
    "webhook twice, approvals around it": ("approve", "raw", "webhook", "webhook", "approve",
                                           "capture", "answer"),
}  # fmt: skip


@pytest.mark.parametrize("steps", ORDERS.values(), ids=ORDERS.keys())
def test_top_up_is_credited_once_whatever_arrives_twice_or_first(
    topup_app, topup_api, engine, topup_paypal, steps
):
    key, org = make_key(engine), tx(engine, api_org)
    top_up = create(topup_api, key, org, amount=1500).body
    order_id, top_up_id = top_up["provider_reference"], top_up["top_up_id"]
    topup_paypal.approve(order_id)
    api = paypal_api(topup_app)
    answer = None
    for step in steps:
        if step == "approve":
            assert deliver(engine, "paypal", order_approved(order_id, org)).status == "processed"
        elif step == "capture":
            capture(topup_app, engine, top_up_id)
        elif step == "raw":  # PayPal captured; its answer is not recorded yet
            answer = api.capture_order(order_id, top_up_capture.capture_request_id(order_id))
        elif step == "answer":
            run_in_transaction(
                engine, lambda c, a=answer: top_up_capture.record_capture(c, top_up_id, a)
            )
        elif step == "webhook":
            cap = topup_paypal.orders[order_id]["capture"]
            assert deliver(engine, "paypal", capture_completed(order_id, cap)).status == "processed"
    assert topup_paypal.captures_made == 1
    assert balance(engine, org) == 1500
    [entry] = journal(engine, org)
    assert entry.reference == f"paypal:payment:{topup_paypal.orders[order_id]['capture']['id']}"
    shown = topup_api.get(f"/organizations/{org}/top-ups/{top_up_id}", key).body
    assert (shown["status"], shown["credited_cents"]) == ("completed", 1500)
    assert captures_queued(engine, top_up_id) >= 1
    assert host_events(engine, "top_up.") == [  # told to the host once
        ("top_up.completed", {"org_id": org, "top_up_id": top_up_id, "amount_cents": 1500,
                              "status": "completed"}),
    ]  # fmt: skip


def test_a_capture_that_times_out_is_retried_and_captures_once(
    topup_app, topup_api, engine, topup_paypal
):
    key, org = make_key(engine), tx(engine, api_org)
    top_up = create(topup_api, key, org, amount=2000).body
    topup_paypal.approve(top_up["provider_reference"])
    deliver(engine, "paypal", order_approved(top_up["provider_reference"], org))
    topup_paypal.capture_delays = [2.5]  # PayPal captures, then answers after the 1 s timeout
    with pytest.raises(TransientError):
        capture(topup_app, engine, top_up["top_up_id"])
    assert balance(engine, org) == 0
    assert capture(topup_app, engine, top_up["top_up_id"]) == "completed"
    assert (topup_paypal.capture_requests, topup_paypal.captures_made) == (2, 1)
    assert balance(engine, org) == 2000


def test_a_refused_capture_fails_the_top_up(topup_app, topup_api, engine, topup_paypal):
    key, org = make_key(engine), tx(engine, api_org)
    top_up = create(topup_api, key, org).body
    deliver(engine, "paypal", order_approved(top_up["provider_reference"], org))
    topup_paypal.fail_capture = (422, {"name": "UNPROCESSABLE_ENTITY",
                                       "details": [{"issue": "INSTRUMENT_DECLINED"}]})  # fmt: skip
    assert capture(topup_app, engine, top_up["top_up_id"]) == "failed"
    shown = topup_api.get(f"/organizations/{org}/top-ups/{top_up['top_up_id']}", key).body
    assert shown["status"] == "failed" and "INSTRUMENT_DECLINED" in shown["failure_reason"]
    assert balance(engine, org) == 0


# --------------------------------------------------------------------------- idempotency


def test_twenty_concurrent_copies_make_one_order(topup_app, engine, topup_paypal):
    key, org = make_key(engine), tx(engine, api_org)
    topup_paypal.create_delay = 0.3  # the copies overlap the provider call
    answers: list = []
    barrier = threading.Barrier(20)

    def one() -> None:
        client = Client(topup_app.test_client())
        barrier.wait()
        answers.append(create(client, key, org, idem="same-key", amount=1500))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [a.status for a in answers] == [201] * 20, [a.body for a in answers]
    assert len({a.body["top_up_id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 19
    assert (topup_paypal.create_requests, len(topup_paypal.orders)) == (1, 1)
    assert count(engine, "top_ups") == 1


def test_the_same_key_with_another_body_is_refused(topup_api, engine, topup_paypal):
    key, org = make_key(engine), tx(engine, api_org)
    assert create(topup_api, key, org, idem="k1", amount=1500).status == 201
    assert_problem(create(topup_api, key, org, idem="k1", amount=1600), 422)
    assert len(topup_paypal.orders) == 1


def test_an_idempotency_key_is_required(topup_api, engine, topup_paypal):
    key, org = make_key(engine), tx(engine, api_org)
    from tests.support.topups import body

    assert_problem(topup_api.post(f"/organizations/{org}/top-ups", key, body()), 400)
    assert topup_paypal.create_requests == 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change",
    [
        {"amount_cents": 499},
        {"amount_cents": 100001},
        {"amount_cents": 0},
        {"amount_cents": -500},
        {"amount_cents": 15.5},
        {"amount_cents": "1500"},
        {"amount_cents": True},
        {"amount_cents": 10**30},
        {"provider": "bitcoin"},
        {"return_url": "javascript:alert(1)"},
        {"cancel_url": "ftp://host.example/"},
        {"return_url": ""},
        {"return_url": None},
        {"extra": 1},
    ],
    ids=repr,
)
def test_bad_input_is_422_and_nothing_is_made(topup_api, engine, topup_paypal, change):
    from tests.support.topups import body

    key, org = make_key(engine), tx(engine, api_org)
    sent = {**body(), **change}
    answer = topup_api.post(
        f"/organizations/{org}/top-ups", key, sent, headers={"Idempotency-Key": "k"}
    )
    assert_problem(answer, 422)
    assert answer.body["errors"]
    assert topup_paypal.create_requests == 0
    nothing_made(engine)


def test_a_missing_url_is_422(topup_api, engine, topup_paypal):
    from tests.support.topups import body

    key, org = make_key(engine), tx(engine, api_org)
    sent = body()
    del sent["cancel_url"]
    answer = topup_api.post(
        f"/organizations/{org}/top-ups", key, sent, headers={"Idempotency-Key": "k"}
    )
    assert assert_problem(answer, 422)["errors"][0]["field"] == "/cancel_url"
    nothing_made(engine)


# --------------------------------------------------------------------------- provider failures


def test_a_provider_refusal_is_422_with_its_reason_and_nothing_is_left(
    topup_api, engine, topup_paypal
):
    key, org = make_key(engine), tx(engine, api_org)
    topup_paypal.fail_create = (422, {
        "name": "UNPROCESSABLE_ENTITY", "message": "The requested action could not be performed",
        "details": [{"issue": "CURRENCY_NOT_SUPPORTED"}],
    })  # fmt: skip
    problem = assert_problem(create(topup_api, key, org, idem="k"), 422)
    assert "CURRENCY_NOT_SUPPORTED" in problem["detail"]
    nothing_made(engine)
    topup_paypal.fail_create = None  # the key was not used up by the refusal
    assert create(topup_api, key, org, idem="k").status == 201


@pytest.mark.parametrize("how", ["timeout", "5xx", "down"])
def test_a_provider_down_is_503_with_retry_after_and_nothing_is_left(
    topup_app, topup_api, engine, topup_paypal, how
):
    key, org = make_key(engine), tx(engine, api_org)
    if how == "timeout":
        topup_paypal.create_delay = 2.5
    elif how == "5xx":
        topup_paypal.fail_create = (503, {"name": "SERVICE_UNAVAILABLE"})
    else:
        paypal_api(topup_app).api_base = "http://127.0.0.1:9"  # nothing listens there
    answer = create(topup_api, key, org, idem="k")
    assert_problem(answer, 503)
    assert int(answer.headers["Retry-After"]) > 0
    nothing_made(engine)


# --------------------------------------------------------------------------- expiry


def _age(engine, top_up_id: str, hours: float) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE top_ups SET created_at = :t WHERE top_up_id = :id"),
            {"t": datetime.now(UTC) - timedelta(hours=hours), "id": top_up_id},
        )


def test_unapproved_top_ups_expire_after_the_providers_window(topup_app, topup_api, engine):
    from core.settings import Settings

    s = Settings(_env_file=None)
    key, org = make_key(engine), tx(engine, api_org)
    old = create(topup_api, key, org).body["top_up_id"]
    young = create(topup_api, key, org).body["top_up_id"]
    stripe_old = create(topup_api, key, org, provider="stripe").body["top_up_id"]
    approved = create(topup_api, key, org).body
    deliver(engine, "paypal", order_approved(approved["provider_reference"], org))
    _age(engine, approved["top_up_id"], 3.5)  # approved in time: its capture decides
    _age(engine, old, 3.5)
    _age(engine, young, 2)
    _age(engine, stripe_old, 3.5)  # Stripe's sessions live 24 hours

    def expire(conn):
        return topups.expire_stale(conn, "paypal", s.TOP_UP_PAYPAL_EXPIRE_SECONDS, 100) + (
            topups.expire_stale(conn, "stripe", s.TOP_UP_STRIPE_EXPIRE_SECONDS, 100)
        )

    assert run_in_transaction(engine, expire) == 1
    assert run_in_transaction(engine, expire) == 0

    def status(top_up_id: str) -> str:
        return topup_api.get(f"/organizations/{org}/top-ups/{top_up_id}", key).body["status"]

    assert [status(old), status(young), status(stripe_old), status(approved["top_up_id"])] == [
        "expired", "created", "created", "approved",
    ]  # fmt: skip
    assert host_events(engine, "top_up.") == [
        ("top_up.failed", {"org_id": org, "top_up_id": old, "amount_cents": 1500,
                           "status": "expired"}),
    ]  # fmt: skip


def test_a_late_approval_of_an_expired_top_up_still_captures_and_credits(
    topup_app, topup_api, engine, topup_paypal
):
    key, org = make_key(engine), tx(engine, api_org)
    top_up = create(topup_api, key, org, amount=700).body
    _age(engine, top_up["top_up_id"], 4)
    run_in_transaction(engine, lambda c: topups.expire_stale(c, "paypal", 3 * 3600, 100))
    topup_paypal.approve(top_up["provider_reference"])
    deliver(engine, "paypal", order_approved(top_up["provider_reference"], org))
    assert capture(topup_app, engine, top_up["top_up_id"]) == "completed"
    assert balance(engine, org) == 700


def test_the_expiry_job_is_scheduled():
    from core.settings import Settings
    from worker.schedule import beat_schedule

    tasks = {job["task"] for job in beat_schedule(Settings(_env_file=None)).values()}
    assert "payguard.beat.expire_top_ups" in tasks


# --------------------------------------------------------------------------- Stripe


def test_stripe_top_up_is_a_checkout_session_credited_once_and_completed(
    topup_api, engine, topup_stripe
):
    key, org = make_key(engine), tx(engine, api_org)
    answer = create(topup_api, key, org, provider="stripe", amount=2500)
    assert answer.status == 201, answer.body
    top_up = answer.body
    session = topup_stripe.sessions[top_up["provider_reference"]]
    assert (session["mode"], session["client_reference_id"]) == ("payment", org)
    assert (session["amount_total"], session["currency"]) == (2500, "usd")
    assert session["form"]["line_items[0][quantity]"] == "1"
    assert (session["success_url"], session["cancel_url"]) == (
        RETURN["return_url"], RETURN["cancel_url"],
    )  # fmt: skip
    assert top_up["approval_url"] == session["url"]
    intent = sp.new_id("pi")
    paid = sp.checkout_session_completed(
        session_id=top_up["provider_reference"], org_id=org, amount=2500,
        payment_intent_id=intent,
    )  # fmt: skip
    assert deliver(engine, "stripe", paid).status == "processed"
    assert deliver(engine, "stripe", {**paid, "id": sp.new_id("evt")}).status == "processed"
    assert balance(engine, org) == 2500
    assert [e.reference for e in journal(engine, org)] == [f"stripe:payment:{intent}"]
    shown = topup_api.get(f"/organizations/{org}/top-ups/{top_up['top_up_id']}", key).body
    assert (shown["status"], shown["credited_cents"]) == ("completed", 2500)


def test_stripe_refusal_is_422_and_idempotent_create_makes_one_session(
    topup_api, engine, topup_stripe
):
    key, org = make_key(engine), tx(engine, api_org)
    topup_stripe.fail_create = (400, {"error": {
        "type": "invalid_request_error", "message": "Amount must be no more than $999,999.99",
    }})  # fmt: skip
    problem = assert_problem(create(topup_api, key, org, provider="stripe", idem="s"), 422)
    assert "no more than" in problem["detail"]
    nothing_made(engine)
    topup_stripe.fail_create = None
    first = create(topup_api, key, org, provider="stripe", idem="s")
    again = create(topup_api, key, org, provider="stripe", idem="s")
    assert (first.status, again.status) == (201, 201)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert first.body == again.body and len(topup_stripe.sessions) == 1


def test_stripe_down_is_503(topup_api, engine, topup_stripe):
    key, org = make_key(engine), tx(engine, api_org)
    topup_stripe.create_delay = 2.5
    answer = create(topup_api, key, org, provider="stripe")
    assert_problem(answer, 503)
    assert answer.headers["Retry-After"]
    nothing_made(engine)


def test_unknown_top_up_is_404(topup_api, engine):
    key, org = make_key(engine), tx(engine, api_org)
    assert_problem(topup_api.get(f"/organizations/{org}/top-ups/tu_{'0' * 32}", key), 404)
    assert_problem(topup_api.get(f"/organizations/{org}/top-ups/nope", key), 404)


def test_the_relay_publishes_the_capture_again_while_the_top_up_stays_approved(
    topup_api, engine, topup_paypal
):

    key, org = make_key(engine), tx(engine, api_org)
    top_up = create(topup_api, key, org).body
    deliver(engine, "paypal", order_approved(top_up["provider_reference"], org))

    def relay(conn):
        return [
            r.task
            for r in outbox.claim_for_relay(conn, limit=100, grace_seconds=0, redeliver_seconds=0)
        ]

    def relayed() -> list[str]:
        tasks = run_in_transaction(engine, relay)
        with engine.begin() as conn:
            conn.execute(text("UPDATE outbox SET published_at = now() - interval '1 hour'"))
        return tasks

    assert topups.CAPTURE_TASK in relayed()
    assert topups.CAPTURE_TASK in relayed()  # lost by the broker? published again
    run_in_transaction(
        engine, lambda c: topups.finish(c, top_up["top_up_id"], "failed", reason="test")
    )
    assert topups.CAPTURE_TASK not in relayed()


def test_the_worker_task_captures_and_the_beat_job_expires(
    monkeypatch, database_url, redis_clean, topup_api, engine, topup_paypal
):
    """payguard.capture_top_up and payguard.beat.expire_top_ups as the worker runs them,
    configured by environment variables alone."""
    from worker import runtime, tasks
    from worker.beat_jobs import expire_top_ups

    for name, value in {
        "DATABASE_URL": database_url, "REDIS_URL": redis_clean,
        "PAYPAL_API_BASE": topup_paypal.base_url, "PAYPAL_CLIENT_ID": topup_paypal.client_id,
        "PAYPAL_CLIENT_SECRET": topup_paypal.client_secret,
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime, "_state", {})
    try:
        key, org = make_key(engine), tx(engine, api_org)
        paid = create(topup_api, key, org, amount=900).body
        stale = create(topup_api, key, org).body
        topup_paypal.approve(paid["provider_reference"])
        deliver(engine, "paypal", order_approved(paid["provider_reference"], org))
        assert tasks.capture_top_up.run(paid["top_up_id"]) == "completed"
        assert tasks.capture_top_up.run(paid["top_up_id"]) == "completed"
        assert balance(engine, org) == 900 and topup_paypal.captures_made == 1
        _age(engine, stale["top_up_id"], 4)
        assert expire_top_ups.run() == 1
    finally:
        eng = runtime._state.get("engine")
        if eng is not None:
            eng.dispose()


def test_an_unknown_organization_is_404_and_no_order_is_made(topup_api, engine, topup_paypal):
    key = make_key(engine)
    assert_problem(create(topup_api, key, "no-such-org"), 404)
    assert topup_paypal.create_requests == 0
    nothing_made(engine)


def test_a_stripe_payment_intent_arriving_before_its_session_credits_once_and_completes(
    topup_api, engine, topup_stripe
):
    key, org = make_key(engine), tx(engine, api_org)
    top_up = create(topup_api, key, org, provider="stripe", amount=1200).body
    session = topup_stripe.sessions[top_up["provider_reference"]]
    assert session["form"]["payment_intent_data[metadata][org_id]"] == org
    intent = sp.new_id("pi")
    first = sp.payment_intent_succeeded(org_id=org, payment_intent_id=intent, amount=1200)
    assert deliver(engine, "stripe", first).status == "processed"
    shown = topup_api.get(f"/organizations/{org}/top-ups/{top_up['top_up_id']}", key).body
    assert shown["status"] == "created"  # the intent does not name its session
    paid = sp.checkout_session_completed(
        session_id=top_up["provider_reference"], org_id=org, amount=1200,
        payment_intent_id=intent,
    )  # fmt: skip
    assert deliver(engine, "stripe", paid).status == "processed"
    assert balance(engine, org) == 1200 and len(journal(engine, org)) == 1
    shown = topup_api.get(f"/organizations/{org}/top-ups/{top_up['top_up_id']}", key).body
    assert (shown["status"], shown["credited_cents"]) == ("completed", 1200)
