"""Twilio's limits in Redis (worker/twilio_limits.py): the per-account concurrency cap that
every worker shares, slots a crashed worker held coming back by themselves, and a 429
backoff that stops one account only; and how a batch (worker/send_tasks.py) takes its slots
together and gives every one back."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from core.messages import Plan
from worker.send_tasks import _Slots
from worker.twilio_limits import TwilioLimits

pytestmark = pytest.mark.integration

A = "AC" + "a" * 32
B = "AC" + "b" * 32


@pytest.fixture
def client(redis_clean):
    c = redis.Redis.from_url(redis_clean)
    yield c
    c.close()


def test_an_account_gets_no_more_slots_than_its_cap_and_another_account_is_not_counted(client):
    limits = TwilioLimits(client, 3)
    tokens = [limits.try_acquire(A) for _ in range(3)]
    assert all(tokens)
    assert limits.try_acquire(A) is None
    assert limits.try_acquire(B) is not None  # another account has slots of its own
    limits.release(A, tokens[0])
    assert limits.try_acquire(A) is not None
    assert limits.in_use(A) == 3


def test_workers_sharing_redis_never_exceed_the_cap(redis_clean):
    # Four "workers" (clients of their own), eight threads each, racing for three slots.
    workers = [TwilioLimits(redis.Redis.from_url(redis_clean), 3) for _ in range(4)]
    in_flight, peak, lock = [0], [0], threading.Lock()

    def call(limits: TwilioLimits) -> None:
        for _ in range(5):
            token = limits.acquire(A, timeout=30)
            assert token is not None
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            time.sleep(0.01)
            with lock:
                in_flight[0] -= 1
            limits.release(A, token)

    threads = [threading.Thread(target=call, args=(w,)) for w in workers for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 3
    assert workers[0].in_use(A) == 0


def test_the_slots_of_a_crashed_worker_come_back_when_their_lease_runs_out(client):
    crashed = TwilioLimits(client, 2, slot_seconds=0.3)
    assert crashed.try_acquire(A) and crashed.try_acquire(A)  # never released
    survivor = TwilioLimits(client, 2, slot_seconds=0.3)
    assert survivor.try_acquire(A) is None
    time.sleep(0.4)
    assert survivor.try_acquire(A) is not None


def test_a_429_backs_off_its_account_and_no_other(client):
    limits = TwilioLimits(client, 10)
    limits.back_off(A, 0.5)
    limits.back_off(A, 0.1)  # a shorter backoff never cuts a longer one short
    assert 0.3 < limits.backoff_left(A) <= 0.5
    assert limits.backoff_left(B) == 0
    assert limits.acquire(B, timeout=0) is not None
    assert limits.acquire(A, timeout=0.1) is None  # not within the backoff
    started = time.monotonic()
    assert limits.acquire(A, timeout=5) is not None
    assert time.monotonic() - started >= 0.2


def test_a_batch_takes_only_the_free_slots_in_one_call_and_none_while_backing_off(client):
    limits = TwilioLimits(client, 5)
    held = limits.try_acquire(A)
    tokens, wait = limits.try_acquire_many(A, 10)
    assert (len(tokens), wait) == (4, 0.0)
    assert limits.try_acquire_many(A, 3) == ([], 0.0)  # full
    limits.release(A, held, *tokens[:2])  # several given back at once
    assert limits.in_use(A) == 2
    limits.back_off(A, 0.5)
    tokens, wait = limits.try_acquire_many(A, 2)
    assert tokens == [] and 0.3 < wait <= 0.5
    assert limits.try_acquire(A) is None
    assert limits.in_use(A) == 2


def _plans(account: str, n: int) -> list[Plan]:
    return [Plan(f"m{i}", "org", account, "+15005550006", "+15005550010", "hi") for i in range(n)]


def test_a_batch_hands_out_the_slots_it_took_and_every_slot_comes_back(client):
    limits = TwilioLimits(client, 4)
    slots = _Slots(limits, _plans(A, 10), at_once=6)  # 10 calls, 6 at once, 4 free
    assert limits.in_use(A) == 4
    far = time.monotonic() + 60
    taken = [slots.acquire(A, far) for _ in range(4)]
    assert all(taken)
    assert slots.acquire(A, time.monotonic()) is None  # the rest wait for a slot as before

    threads = [threading.Thread(target=slots.give_back, args=(A, t)) for t in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slots.release_unused()
    assert limits.in_use(A) == 0


def test_after_a_429_the_batch_gives_back_its_unused_slots_and_waits_on_the_backoff(client):
    limits = TwilioLimits(client, 10)
    slots = _Slots(limits, _plans(A, 5), at_once=5)
    first = slots.acquire(A, time.monotonic() + 60)
    limits.back_off(A, 0.5)
    slots.back_off(A)
    assert limits.in_use(A) == 1  # only the slot of the call that got the 429
    assert slots.acquire(A, time.monotonic() + 0.1) is None  # not within the backoff
    slots.give_back(A, first)
    assert limits.in_use(A) == 0
