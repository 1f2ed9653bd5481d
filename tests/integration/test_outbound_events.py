"""Events to the host: recorded in the transaction of the change they report, delivered at
least once to each endpoint that wants them, signed as the Standard Webhooks spec says, and
retried from a schedule kept in PostgreSQL; a dead endpoint delays nothing else.

Deliveries go to a real local HTTP endpoint (tests/support/fakes/hook_endpoint.py) that fails on
command, through real Celery workers (the `events` process type) and beat.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from core import campaigns, messages, outbound, sending, wallet
from core.errors import InvalidInput
from core.webhook_signing import sign, verify
from tests.stack import start_beat, start_worker, wait_for
from tests.support.db import tx
from tests.support.events import events_of
from tests.support.factories import new_org
from tests.support.fakes.fake_twilio import unused_port
from tests.support.fakes.hook_endpoint import HookEndpoint

KEY = Fernet.generate_key().decode()
POLICY = outbound.OutboundPolicy(secret_key=KEY, allow_private=True, retry_scale=0.01)
OUTBOUND_Q = "payguard.outbound"
MAIN_QS = "payguard.events,payguard.send,payguard.twilio,payguard.beat"


def add_endpoint(engine, url, events=None, org=None, policy=POLICY):
    return tx(
        engine, lambda c: outbound.create_endpoint(c, url, events, org, "test", policy=policy)
    )


def delivery_rows(engine, endpoint_id: str):
    with engine.connect() as c:
        return c.execute(
            text("SELECT * FROM outbound_deliveries WHERE endpoint_id = :e ORDER BY id"),
            {"e": endpoint_id},
        ).all()


@pytest.fixture
def env(stack_env):
    env = dict(stack_env)
    env.update(
        PAYGUARD_SECRET_KEY=KEY,
        OUTBOUND_ALLOW_PRIVATE="1",
        OUTBOUND_RETRY_SCALE="0.01",
        OUTBOUND_DISPATCH_INTERVAL_SECONDS="0.3",
        OUTBOUND_CIRCUIT_THRESHOLD="50",
    )
    return env


# ---------------------------------------------------------------- signing


def test_signature_matches_the_standard_webhooks_test_vector():
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected
    assert verify(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, expected)
    assert not verify(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, expected)


# ---------------------------------------------------------------- recording


def test_event_is_recorded_with_the_change_and_never_for_a_rolled_back_one(engine):
    org = tx(engine, new_org, billing="prepaid")

    def credit_then_fail(c):
        wallet.credit(c, org, 500, "rolled-back")
        raise RuntimeError("the unit of work fails after the credit")

    with pytest.raises(RuntimeError, match="fails after the credit"):
        tx(engine, credit_then_fail)
    assert events_of(engine, "wallet.credited") == []
    tx(engine, lambda c: wallet.credit(c, org, 700, "kept"))
    [credited] = events_of(engine, "wallet.credited")
    assert credited["data"] == {
        "org_id": org, "amount_cents": 700, "balance_cents": 700, "reference": "kept",
    }  # fmt: skip
    tx(engine, lambda c: wallet.credit(c, org, 700, "kept"))  # a duplicate moves nothing
    assert len(events_of(engine, "wallet.credited")) == 1


def test_sequence_grows_and_events_after_lists_what_came_later_per_organization(engine):
    a, b = tx(engine, new_org, billing="prepaid"), tx(engine, new_org, billing="prepaid")
    for n in range(3):
        tx(engine, lambda c, n=n: wallet.credit(c, a, 100, f"a{n}"))
        tx(engine, lambda c, n=n: wallet.credit(c, b, 100, f"b{n}"))
    with engine.connect() as c:
        everything = outbound.events_after(c, 0, 100)
        seqs = [e["sequence"] for e in everything]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        later = outbound.events_after(c, seqs[2], 100, org_ids=[a])
    assert later and all(e["data"]["org_id"] == a and e["sequence"] > seqs[2] for e in later)


def test_catch_up_never_skips_an_event_whose_transaction_commits_later(engine):
    """A transaction that took sequence n and commits after one that took n+1: a host that
    read n+1 and asks for events after it would never see n. So n+1 waits for n."""
    org = tx(engine, new_org, billing="prepaid")
    slow = engine.connect()
    slow_tx = slow.begin()
    try:
        early = outbound.record(slow, "wallet.frozen", org, {"org_id": org, "reason": "a"})
        late = tx(engine, lambda c: outbound.record(c, "wallet.frozen", org, {"reason": "b"}))
        assert late > early
        with engine.connect() as c:
            assert [e["sequence"] for e in outbound.events_after(c, 0, 100)] == []
        slow_tx.commit()
    finally:
        slow.close()
    with engine.connect() as c:
        assert [e["sequence"] for e in outbound.events_after(c, 0, 100)] == [early, late]
    with engine.connect() as c, c.begin():  # the next transaction on a connection locks again
        again = outbound.record(c, "wallet.frozen", org, {"reason": "c"})
        c.execute(text("SELECT 1"))
        with engine.connect() as other:
            assert again not in [e["sequence"] for e in outbound.events_after(other, 0, 100)]


def test_events_in_flight_in_another_database_of_the_server_hold_nothing_back(engine, pg_server):
    """Advisory locks are per database, but pg_locks lists every database's: an event in
    flight in another Payguard database (sequence 1 there) must not hide this one's."""
    org = tx(engine, new_org, billing="prepaid")
    seq = tx(engine, lambda c: outbound.record(c, "wallet.frozen", org, {"reason": "a"}))
    with pg_server.admin() as other:
        other.execute("SELECT pg_advisory_lock(%s, 1)", (outbound._INFLIGHT_LOCKS,))
        with engine.connect() as c:
            assert [e["sequence"] for e in outbound.events_after(c, 0, 100)] == [seq]


def test_endpoints_get_only_the_event_types_and_organizations_they_asked_for(engine):
    a, b = tx(engine, new_org, billing="prepaid"), tx(engine, new_org, billing="prepaid")
    credited_only, _ = add_endpoint(engine, "http://127.0.0.1:9/a", ["wallet.credited"])
    everything, _ = add_endpoint(engine, "http://127.0.0.1:9/b")
    only_b, _ = add_endpoint(engine, "http://127.0.0.1:9/c", None, b)
    tx(engine, lambda c: wallet.credit(c, a, 100, "x"))
    tx(engine, lambda c: wallet.freeze(c, a, "manual", actor="ops"))
    tx(engine, lambda c: wallet.credit(c, b, 100, "y"))

    def types(ep):
        with engine.connect() as c:
            return sorted(
                c.execute(
                    text(
                        "SELECT ev.type || ':' || ev.org_id FROM outbound_deliveries d "
                        "JOIN outbound_events ev USING (sequence) WHERE d.endpoint_id = :e"
                    ),
                    {"e": ep.endpoint_id},
                ).scalars()
            )

    assert types(credited_only) == sorted([f"wallet.credited:{a}", f"wallet.credited:{b}"])
    assert f"wallet.frozen:{a}" in types(everything) and len(types(everything)) == 3
    assert types(only_b) == [f"wallet.credited:{b}"]


def test_events_recorded_together_are_recorded_as_one_at_a_time_in_their_order(engine):
    a, b = tx(engine, new_org, billing="prepaid"), tx(engine, new_org, billing="prepaid")
    credited_only, _ = add_endpoint(engine, "http://127.0.0.1:9/a", ["wallet.credited"])
    only_b, _ = add_endpoint(engine, "http://127.0.0.1:9/b", None, b)
    alone = tx(engine, lambda c: outbound.record(c, "wallet.frozen", a, {"n": 0}))
    together = [
        ("wallet.credited", a, {"n": 1}),
        ("wallet.frozen", b, {"n": 2}),
        ("wallet.credited", b, {"n": 3}),
    ]
    seqs = tx(engine, lambda c: outbound.record_many(c, together))

    assert seqs == sorted(seqs) and seqs[0] > alone
    with engine.connect() as c:
        listed = outbound.events_after(c, alone, 100)
    assert [(e["sequence"], e["type"], e["data"]) for e in listed] == [
        (s, t, d) for s, (t, _, d) in zip(seqs, together, strict=True)
    ]
    assert [r.sequence for r in delivery_rows(engine, credited_only.endpoint_id)] == [
        seqs[0],
        seqs[2],
    ]
    assert [r.sequence for r in delivery_rows(engine, only_b.endpoint_id)] == seqs[1:]
    with pytest.raises(InvalidInput):
        tx(engine, lambda c: outbound.record_many(c, [("wallet.nonsense", a, {})]))


def test_a_deleted_endpoint_gets_nothing_more(engine):
    org = tx(engine, new_org, billing="prepaid")
    ep, _ = add_endpoint(engine, "http://127.0.0.1:9/gone")
    tx(engine, lambda c: wallet.credit(c, org, 100, "before"))
    [claimed] = tx(engine, lambda c: outbound.claim_due(c, 10, POLICY))
    tx(engine, lambda c: outbound.delete_endpoint(c, ep.endpoint_id, "ops"))
    tx(engine, lambda c: wallet.credit(c, org, 100, "after"))
    # the claim taken before the delete no longer sends, and nothing new is due for it
    assert tx(engine, lambda c: outbound.start_delivery(c, claimed.delivery_id, claimed.token,
                                                        POLICY)) is None  # fmt: skip
    assert tx(engine, lambda c: outbound.claim_due(c, 10, POLICY)) == []
    assert [r.status for r in delivery_rows(engine, ep.endpoint_id)] == ["cancelled"]


def test_only_a_live_endpoint_counts_as_one(engine):
    with engine.connect() as c:  # never committed: other tests' endpoints stay as they are
        c.execute(text("UPDATE outbound_endpoints SET deleted_at = now() WHERE deleted_at IS NULL"))
        assert outbound.has_endpoints(c) is False
        ep, _ = outbound.create_endpoint(c, "http://127.0.0.1:9/x", None, None, "t", policy=POLICY)
        assert outbound.has_endpoints(c) is True
        outbound.delete_endpoint(c, ep.endpoint_id, "ops")
        assert outbound.has_endpoints(c) is False
        c.rollback()


def test_low_balance_fires_once_per_crossing(engine):
    org = tx(engine, new_org, balance=1000, low=500, billing="prepaid")
    tx(engine, lambda c: wallet.debit(c, org, 600, "d1"))  # 400: below
    tx(engine, lambda c: wallet.debit(c, org, 100, "d2"))  # 300: still below, no new event
    tx(engine, lambda c: wallet.hold(c, org, 100, "h1"))  # 200 available: still below
    tx(engine, lambda c: wallet.release(c, org, "h1"))
    tx(engine, lambda c: wallet.credit(c, org, 200, "c1"))  # 500: at the threshold again
    tx(engine, lambda c: wallet.hold(c, org, 1, "h2"))  # 499: below again
    lows = events_of(engine, "wallet.low_balance")
    assert [e["data"] for e in lows] == [
        {"org_id": org, "available_cents": 400, "threshold_cents": 500},
        {"org_id": org, "available_cents": 499, "threshold_cents": 500},
    ]


def test_a_release_or_a_capture_that_lifts_the_balance_rearms_the_low_balance_event(engine):
    org = tx(engine, new_org, balance=500, low=500, billing="prepaid")
    tx(engine, lambda c: wallet.hold(c, org, 1, "h1"))  # 499 available: below
    tx(engine, lambda c: wallet.release(c, org, "h1"))  # 500: at the threshold again
    tx(engine, lambda c: wallet.hold(c, org, 1, "h2"))  # 499: below again
    tx(engine, lambda c: wallet.capture(c, org, "h2", 0))  # nothing charged: 500 again
    tx(engine, lambda c: wallet.hold(c, org, 1, "h3"))  # 499: below again
    tx(engine, lambda c: wallet.capture(c, org, "h3"))  # charged: still 499, no new event
    lows = events_of(engine, "wallet.low_balance")
    assert [e["data"]["available_cents"] for e in lows] == [499, 499, 499]


def test_may_send_events_fire_only_when_the_answer_flips(engine):
    org = tx(engine, new_org, billing="prepaid")
    policy = sending.Policy()
    tx(engine, lambda c: wallet.credit(c, org, 100, "c"))
    tx(engine, lambda c: sending.reconcile(c, org, policy))
    tx(engine, lambda c: wallet.freeze(c, org, "manual", actor="ops"))
    tx(engine, lambda c: sending.reconcile(c, org, policy))
    tx(engine, lambda c: wallet.debit(c, org, 100, "d", check_freeze=False))
    tx(engine, lambda c: sending.reconcile(c, org, policy))  # more reasons, still blocked
    kinds = [e["type"] for e in events_of(engine) if e["type"].startswith("organization.")]
    assert kinds == ["organization.sending_allowed", "organization.sending_blocked"]


def test_campaign_pause_and_resume_are_reported(engine):
    org = tx(engine, new_org, balance=100, billing="prepaid")
    policy = sending.Policy()
    tx(engine, lambda c: campaigns.create_campaign(c, org, "spring", policy))
    tx(engine, lambda c: campaigns.pause_campaign(c, org, "spring"))
    tx(engine, lambda c: campaigns.resume_campaign(c, org, "spring", policy))
    got = [(e["type"], e["data"]["paused_by"]) for e in events_of(engine)
           if e["type"].startswith("campaign.")]  # fmt: skip
    assert got == [("campaign.paused", "user"), ("campaign.resumed", None)]


def test_a_campaign_paused_already_is_not_reported_paused_again(engine):
    """The host hears `campaign.paused` when a campaign stops running, not again when the
    system's reasons change or the user pauses what they paused already."""
    org = tx(engine, new_org, balance=1, billing="prepaid")
    policy = sending.Policy()
    tx(engine, lambda c: campaigns.create_campaign(c, org, "spring", policy))
    tx(engine, lambda c: campaigns.create_campaign(c, org, "summer", policy))
    tx(engine, lambda c: campaigns.pause_campaign(c, org, "summer"))
    tx(engine, lambda c: campaigns.pause_campaign(c, org, "summer"))  # again: nothing new
    tx(engine, lambda c: (wallet.freeze(c, org, "review", actor="t"),  # system pause: spring
                          sending.reconcile(c, org, policy)))  # fmt: skip
    tx(engine, lambda c: (wallet.adjust(c, org, -1, reason="t", actor="t"),  # more reasons
                          sending.reconcile(c, org, policy)))  # fmt: skip
    got = [(e["type"], e["data"]["campaign_id"], e["data"]["paused_by"]) for e in events_of(engine)
           if e["type"].startswith("campaign.")]  # fmt: skip
    assert got == [("campaign.paused", "summer", "user"), ("campaign.paused", "spring", "system")]
    with engine.connect() as c:
        reason = c.execute(text("SELECT pause_reason FROM campaigns WHERE campaign_id = 'spring' "
                                "AND org_id = :o"), {"o": org}).scalar_one()  # fmt: skip
    assert "insufficient_balance" in reason  # the stored reason still follows the decision


# ---------------------------------------------------------------- delivery (real processes)


@pytest.mark.slow
def test_retries_after_500s_keep_the_id_and_body_and_sign_each_try_afresh(engine, env, tmp_path):
    org = tx(engine, new_org, billing="prepaid")
    with HookEndpoint() as hook:
        ep, secret = add_endpoint(engine, hook.url, ["wallet.credited"])
        hook.script([500, 500])
        tx(engine, lambda c: wallet.credit(c, org, 250, "paid"))
        with (
            start_worker(env, tmp_path, queues=OUTBOUND_Q, concurrency=2),
            start_worker(env, tmp_path, queues=MAIN_QS),
            start_beat(env, tmp_path),
        ):
            wait_for(lambda: len(hook.received()) >= 3, 90, what="three tries")
            wait_for(
                lambda: delivery_rows(engine, ep.endpoint_id)[0].status == "delivered",
                30, what="delivered",
            )  # fmt: skip
        tries = hook.received()
    assert [t.answered for t in tries[:3]] == [500, 500, 200]
    assert len({t.headers["webhook-id"] for t in tries}) == 1
    assert len({t.body for t in tries}) == 1
    body = json.loads(tries[0].body)
    assert body["type"] == "wallet.credited" and body["data"]["amount_cents"] == 250
    assert set(body) == {"type", "timestamp", "sequence", "data"}
    stamps = [int(t.headers["webhook-timestamp"]) for t in tries]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]  # the last try waited 3 s
    for t in tries:
        assert verify(secret, t.headers["webhook-id"], int(t.headers["webhook-timestamp"]),
                      t.body, t.headers["webhook-signature"])  # fmt: skip
    with engine.connect() as c:
        attempts = c.execute(text("SELECT count(*) FROM outbound_attempts")).scalar_one()
    assert attempts == 3


@pytest.mark.slow
def test_a_worker_killed_mid_delivery_delivers_again(engine, env, tmp_path):
    env = {**env, "OUTBOUND_LEASE_SECONDS": "8"}
    org = tx(engine, new_org, billing="prepaid")
    with HookEndpoint() as hook:
        ep, _secret = add_endpoint(engine, hook.url)
        hook.script(["hang"])
        tx(engine, lambda c: wallet.credit(c, org, 250, "paid"))
        with start_worker(env, tmp_path, queues=MAIN_QS), start_beat(env, tmp_path):
            events_worker = start_worker(env, tmp_path, queues=OUTBOUND_Q)
            wait_for(lambda: len(hook.received()) >= 1, 60, what="the first try")
            events_worker.kill()
            hook.release()
            with start_worker(env, tmp_path, queues=OUTBOUND_Q):
                wait_for(lambda: len(hook.received()) >= 2, 90, what="the try again")
                wait_for(
                    lambda: delivery_rows(engine, ep.endpoint_id)[0].status == "delivered",
                    30, what="delivered",
                )  # fmt: skip
        tries = hook.received()
    assert tries[0].headers["webhook-id"] == tries[1].headers["webhook-id"]
    assert tries[0].body == tries[1].body


@pytest.mark.slow
def test_many_events_to_a_dead_endpoint_delay_neither_sends_nor_other_endpoints(
    engine, env, tmp_path
):
    busy = tx(engine, new_org, balance=10_000, billing="prepaid")
    dead, _ = add_endpoint(engine, f"http://127.0.0.1:{unused_port()}/dead", None, busy)

    def thousand(c):
        for n in range(1000):
            outbound.record(c, "wallet.credited", busy, {"org_id": busy, "n": n})

    tx(engine, thousand)
    with (
        HookEndpoint() as hook,
        start_worker(env, tmp_path, queues=OUTBOUND_Q, concurrency=2),
        start_worker(env, tmp_path, queues=MAIN_QS),
        start_beat(env, tmp_path),
    ):
        wait_for(lambda: any(r.attempts for r in delivery_rows(engine, dead.endpoint_id)),
                 60, what="the dead endpoint tried")  # fmt: skip
        other = tx(engine, new_org, balance=100, billing="prepaid")
        _live, _ = add_endpoint(engine, hook.url, ["wallet.credited"], other)
        tx(engine, lambda c: wallet.credit(c, other, 5, "after-the-flood"))
        msg = tx(engine, lambda c: messages.queue(c, busy, "+15005550010", "hi",
                                                  sending.Policy()))  # fmt: skip
        wait_for(lambda: hook.received(), 60, what="the live endpoint's event")
        wait_for(
            lambda: tx(engine, lambda c: messages.get(c, msg.message_id)).status
            not in ("queued", "sending"),
            60, what="the send settled",
        )  # fmt: skip
        pending = [r for r in delivery_rows(engine, dead.endpoint_id) if r.status == "pending"]
    assert len(pending) > 900  # the flood is still waiting; the others did not wait for it
    assert json.loads(hook.received()[0].body)["data"]["reference"] == "after-the-flood"


# ---------------------------------------------------------------- operators' console


def _payguard(env, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args, "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return proc.returncode, json.loads(proc.stdout or "{}")


@pytest.mark.slow
def test_cli_manages_endpoints_and_redelivers_a_failed_delivery(engine, env):
    org = tx(engine, new_org, billing="prepaid")
    code, created = _payguard(env, "endpoint", "create", "http://127.0.0.1:9/x",
                              "--events", "wallet.credited", "--actor", "ops")  # fmt: skip
    assert code == 0 and created["secret"].startswith("whsec_")
    assert created["events"] == ["wallet.credited"]
    code, bad = _payguard(env, "endpoint", "create", "http://127.0.0.1:9/x", "--events", "nope")
    assert code == 1 and "unknown event type" in bad["error"]
    code, listed = _payguard(env, "endpoint", "list")
    assert [e["endpoint_id"] for e in listed["endpoints"]] == [created["endpoint_id"]]
    assert "secret" not in json.dumps(listed)
    tx(engine, lambda c: wallet.credit(c, org, 100, "x"))
    with engine.begin() as c:
        c.execute(text("UPDATE outbound_deliveries SET status = 'failed', attempts = 8"))
    code, failed = _payguard(env, "events", "outbound", "--status", "failed")
    [row] = failed["deliveries"]
    code, again = _payguard(env, "events", "redeliver", str(row["id"]), "--actor", "ops")
    assert code == 0 and again["status"] == "pending"
    code, rotated = _payguard(env, "endpoint", "rotate-secret", created["endpoint_id"])
    assert code == 0 and rotated["secret"] != created["secret"]
    code, _ = _payguard(env, "endpoint", "delete", created["endpoint_id"], "--actor", "ops")
    assert code == 0
    with engine.connect() as c:
        actions = c.execute(text("SELECT actor, action FROM audit_log ORDER BY id")).all()
    assert ("ops", "endpoint.create") in actions and ("ops", "events.redeliver") in actions
    assert ("ops", "endpoint.delete") in actions
    code, made = _payguard(env, "org", "create", "thrifty", "--low-balance-cents", "300")
    assert code == 0 and made["low_balance_cents"] == 300


# ---------------------------------------------------------------- schedule, circuit, pruning


def _fail(engine, claim, policy=POLICY):
    from core.outbound_net import Answer

    return tx(engine, lambda c: outbound.record_answer(c, claim.delivery_id, claim.token,
                                                       1, Answer(500, "non-2xx", 1), policy))  # fmt: skip


def test_retries_follow_a_growing_schedule_kept_in_postgresql_for_over_a_day(engine):
    org = tx(engine, new_org, billing="prepaid")
    ep, _ = add_endpoint(engine, "http://127.0.0.1:9/x")
    tx(engine, lambda c: outbound.record(c, "wallet.frozen", org, {"org_id": org}))
    real = outbound.OutboundPolicy(secret_key=KEY, allow_private=True, circuit_threshold=100)
    gaps = []
    for _ in range(len(outbound.RETRY_SCHEDULE) + 1):
        with engine.begin() as c:  # due now, whatever the schedule said
            c.execute(text("UPDATE outbound_deliveries SET next_attempt_at = now()"))
        [claim] = tx(engine, lambda c: outbound.claim_due(c, 10, real))
        result = _fail(engine, claim, real)
        [row] = delivery_rows(engine, ep.endpoint_id)
        gaps.append((row.next_attempt_at - row.created_at).total_seconds())
    assert result == "failed" and row.status == "failed"
    assert gaps[:-1] == sorted(gaps[:-1]) and gaps[0] <= 6  # growing, the first within 5 s
    assert outbound.RETRY_SCHEDULE[0] <= 5 and sum(outbound.RETRY_SCHEDULE) >= 24 * 3600
    assert list(outbound.RETRY_SCHEDULE) == sorted(outbound.RETRY_SCHEDULE)


def test_the_circuit_of_a_failing_endpoint_opens_and_another_endpoint_still_gets_its_turn(
    engine,
):
    org = tx(engine, new_org, billing="prepaid")
    dead, _ = add_endpoint(engine, "http://127.0.0.1:9/dead")
    tight = outbound.OutboundPolicy(secret_key=KEY, allow_private=True, circuit_threshold=2)
    for n in range(3):
        tx(engine, lambda c, n=n: outbound.record(c, "wallet.frozen", org, {"n": n}))
    for _ in range(2):
        [claim] = tx(engine, lambda c: outbound.claim_due(c, 10, tight))
        _fail(engine, claim, tight)
    with engine.connect() as c:
        open_until = c.execute(
            text("SELECT circuit_open_until > now() FROM outbound_endpoints WHERE endpoint_id = :e"),
            {"e": dead.endpoint_id},
        ).scalar_one()  # fmt: skip
    assert open_until
    live, _ = add_endpoint(engine, "http://127.0.0.1:9/live")
    tx(engine, lambda c: outbound.record(c, "wallet.frozen", org, {"n": 9}))
    with engine.begin() as c:  # the dead one's retries are due, but its circuit is open
        c.execute(text("UPDATE outbound_deliveries SET next_attempt_at = now() - interval '1s'"))
        c.execute(text("UPDATE outbound_endpoints SET circuit_open_until = now() + interval '1h' "
                       "WHERE endpoint_id = :e"), {"e": dead.endpoint_id})  # fmt: skip
    claims = tx(engine, lambda c: outbound.claim_due(c, 10, tight))
    with engine.connect() as c:
        owners = {
            c.execute(text("SELECT endpoint_id FROM outbound_deliveries WHERE id = :d"),
                      {"d": cl.delivery_id}).scalar_one()
            for cl in claims
        }  # fmt: skip
    assert owners == {live.endpoint_id}


def test_delivered_events_are_pruned_after_the_retention_and_owed_ones_stay(engine):
    org = tx(engine, new_org, billing="prepaid")
    _ep, _ = add_endpoint(engine, "http://127.0.0.1:9/x")
    for n in range(2):
        tx(engine, lambda c, n=n: outbound.record(c, "wallet.frozen", org, {"n": n}))
    with engine.begin() as c:
        first = c.execute(text("SELECT min(sequence) FROM outbound_deliveries")).scalar_one()
        c.execute(text("UPDATE outbound_deliveries SET status = 'delivered' WHERE sequence = :s"),
                  {"s": first})  # fmt: skip
        c.execute(text("UPDATE outbound_events SET created_at = now() - interval '31 days'"))
    assert tx(engine, lambda c: outbound.prune(c, 30)) == 1
    with engine.connect() as c:
        left = c.execute(text("SELECT sequence FROM outbound_events")).scalars().all()
        attempts = c.execute(text("SELECT count(*) FROM outbound_deliveries")).scalar_one()
    assert first not in left and len(left) == 1 and attempts == 1


def test_the_procfile_runs_events_on_their_own_queue_and_worker_keeps_its_queues():
    from tests.stack import procfile_command

    assert "-Q payguard.outbound " in procfile_command("events")
    worker_queues = procfile_command("worker").split("-Q ")[1].split()[0].split(",")
    assert set(worker_queues) >= {"celery", "payguard.events", "payguard.send",
                                  "payguard.twilio", "payguard.beat"}  # fmt: skip
    assert "payguard.outbound" not in worker_queues


def test_an_endpoint_that_trickles_its_answer_is_cut_off_at_the_timeout():
    import time

    from core.outbound_net import post

    with HookEndpoint() as hook:
        hook.script(["trickle"])
        started = time.monotonic()
        answer = post(hook.url, b"{}", {}, resolver=lambda h, p: ["127.0.0.1"],
                      allow_private=True, timeout=2)  # fmt: skip
        took = time.monotonic() - started
    assert not answer.ok
    assert took < 20  # the trickle lasts over a minute; a per-read timeout would never fire


def test_message_updates_are_reported_when_a_message_settles_even_by_beat(engine):
    org = tx(engine, new_org, balance=100, billing="prepaid")
    policy = sending.Policy()
    msg = tx(engine, lambda c: messages.queue(c, org, "+15005550010", "hi", policy))
    tx(engine, lambda c: messages.prepare(c, msg.message_id, policy))  # held, sending
    with engine.begin() as c:
        c.execute(text("UPDATE holds SET created_at = now() - interval '2 hours'"))
    assert messages.expire_stale_holds(engine, 3600, 10, policy) == 1
    updates = [e["data"] for e in events_of(engine, "message.updated")]
    assert updates[-1] == {"message_id": msg.message_id, "org_id": org, "status": "unknown",
                           "charged_cents": 1}  # fmt: skip


@pytest.fixture
def beat_runtime(monkeypatch, database_url, redis_clean):
    """The worker runtime of this process pointed at this test's database and Redis."""
    from worker import beat_jobs, runtime

    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", redis_clean)
    monkeypatch.setenv("PAYGUARD_SECRET_KEY", KEY)
    monkeypatch.setattr(runtime, "_state", {})
    monkeypatch.setattr(beat_jobs, "_publisher", {})
    yield redis_clean
    if runtime._state.get("engine") is not None:
        runtime._state["engine"].dispose()
    if "p" in beat_jobs._publisher:
        beat_jobs._publisher["p"].close()


def test_beat_prunes_old_delivered_events_in_batches_until_none_are_left(
    engine, beat_runtime, monkeypatch
):
    from worker import outbound_tasks

    monkeypatch.setattr(outbound_tasks, "PRUNE_BATCH", 7)
    org = tx(engine, new_org, billing="prepaid")

    def fifty(c):
        for n in range(50):
            outbound.record(c, "wallet.frozen", org, {"n": n})

    tx(engine, fifty)
    with engine.begin() as c:
        c.execute(text("UPDATE outbound_events SET created_at = now() - interval '31 days'"))
    assert outbound_tasks.prune_outbound() == 50


def test_beat_publishes_one_delivery_per_endpoint_to_the_outbound_queue(engine, beat_runtime):
    import redis

    from worker import outbound_tasks

    org = tx(engine, new_org, billing="prepaid")
    _a, _ = add_endpoint(engine, "http://127.0.0.1:9/a")
    _b, _ = add_endpoint(engine, "http://127.0.0.1:9/b")
    for n in range(3):
        tx(engine, lambda c, n=n: outbound.record(c, "wallet.frozen", org, {"n": n}))
    assert outbound_tasks.dispatch_outbound() == 2
    assert outbound_tasks.dispatch_outbound() == 0  # each endpoint has one in flight
    client = redis.Redis.from_url(beat_runtime)
    try:
        queued = client.lrange("payguard.outbound", 0, -1)
    finally:
        client.close()
    assert len(queued) == 2
    assert {json.loads(q)["headers"]["task"] for q in queued} == {"payguard.deliver_event"}
