"""Per-key rate limits of the host API (`API_RATE_LIMIT` per second, counted in Redis):
429 with Retry-After past the limit, counted across web processes, one key's excess never
touching another key; with Redis down, requests are let through (the limit protects
capacity; money is guarded in PostgreSQL)."""

from __future__ import annotations

import time

from tests.stack import free_port
from tests.support.api import Client, api_org, api_settings, assert_problem, key_id, make_key
from tests.support.db import tx


def _app(make_app, database_url: str, redis_url: str, limit: int):
    return make_app(api_settings(database_url, redis_url, API_RATE_LIMIT=limit))


def _at_a_fresh_second() -> None:
    time.sleep(1 - (time.time() % 1) + 0.01)


def test_past_the_limit_a_key_gets_429_with_retry_after_across_processes_and_others_do_not(
    make_app, database_url, redis_clean, engine
):
    org = tx(engine, api_org, balance=100)
    noisy, quiet = make_key(engine, "read"), make_key(engine, "read")
    one, two = (
        Client(_app(make_app, database_url, redis_clean, 4).test_client()) for _ in range(2)
    )
    path = f"/organizations/{org}/can-send"
    for _attempt in range(5):  # a window may close mid-burst on a slow machine: try again
        _at_a_fresh_second()
        started = time.time()
        burst = [c.get(path, noisy).status for c in (one, two, one, two)]
        over = two.get(path, noisy)
        if int(time.time()) == int(started):
            break
    else:
        raise AssertionError("never managed five requests within one second")

    assert burst == [200, 200, 200, 200]  # four, shared by two processes
    assert_problem(over, 429)
    assert int(over.headers["Retry-After"]) >= 1
    assert one.get(path, quiet).status == 200  # another key is untouched


def test_with_redis_down_requests_are_let_through(make_app, database_url, engine):
    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "read")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    api = Client(_app(make_app, database_url, dead, 1).test_client())

    started = time.monotonic()
    answers = [api.get(f"/organizations/{org}/can-send", key).status for _ in range(5)]

    assert answers == [200] * 5  # over a limit of 1, yet not refused: the count is unknown
    assert time.monotonic() - started < 10


def test_processes_claim_requests_in_chunks_and_never_allow_more_than_the_limit(
    make_app, database_url, redis_clean, engine
):
    """At 100 per second a process claims 2 requests per trip to Redis (100 // 50): two
    processes alternating get exactly the first 100 of 111 requests in one window; past the limit each process asks
    Redis once more and then remembers the refusal until the window ends."""
    import redis

    org = tx(engine, api_org, balance=100)
    key = make_key(engine, "read")
    one, two = (
        Client(_app(make_app, database_url, redis_clean, 100).test_client()) for _ in range(2)
    )
    path = f"/organizations/{org}/can-send"
    for _attempt in range(5):  # a window may close mid-burst on a slow machine: try again
        _at_a_fresh_second()
        started = time.time()
        answers = [(one if i % 2 else two).get(path, key).status for i in range(111)]
        window = int(started)
        if int(time.time()) == window:
            break
    else:
        raise AssertionError("never managed 111 requests within one second")

    assert answers[:100] == [200] * 100
    assert set(answers[100:]) == {429}
    counted = redis.Redis.from_url(redis_clean).get(f"payguard:ratelimit:{key_id(key)}:{window}")
    assert int(counted) == 104  # 50 chunks of two, then one refused claim per process
