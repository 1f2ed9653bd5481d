"""The batch send task: drain one organization's queued messages, a batch at a time, sending
each batch to Twilio concurrently from a thread pool over one pooled keep-alive HTTP client.

Per batch: claim (decide, hold, mark `sending`: one transaction, committed before any call,
core/send_batch.py), call Twilio for every message at once within the account's concurrency
cap and outside its 429 backoff (worker/twilio_limits.py, shared through Redis), then record
the answers (one transaction). The rules of the single send task (worker/tasks.py) hold per
message: nothing that reached nothing at Twilio is lost (`retrying`, sent again by a later run
until its tries run out, then `not_sent` with the hold released), nothing that may have gone
out is sent again (`unknown`, charged), and answers whose recording failed are carried by the
retried task and recorded, never sent again.

A run sends one batch. When it claimed a full one it first publishes the next run for the
organization, which another worker process takes while this one waits on Twilio: a backlog
spreads over every process, one batch per task, between other organizations' tasks, and one
organization's backlog never holds a worker process for long.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Task

from core import messages, orgs, send_batch
from core.db import run_in_transaction
from core.statuses import MessageStatus
from worker import metrics, runtime
from worker.celery_app import app
from worker.tasks import RECORD_RESULT_MAX_TRIES, backoff

log = logging.getLogger(__name__)

SEND_BATCH_TASK = send_batch.SEND_BATCH_TASK
MAX_CLAIMS = 20
# Kept free at the end of a lease: the longest Twilio call (3.05 s connect + 15 s read) and a
# margin, so a call never starts that could outlast the lease claimed for it.
_CALL_SECONDS = 18.05 + 1.0

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _resources() -> tuple[Any, ThreadPoolExecutor, Any]:
    """(gateway, thread pool, limits) of this process, built on first use after a fork."""
    with _lock:
        if _state.get("pid") != os.getpid():
            from core.providers.twilio.gateway import build_gateway
            from worker.twilio_limits import TwilioLimits

            s = runtime.settings()
            _state.clear()
            _state.update(
                pid=os.getpid(),
                gateway=build_gateway(s, pool_maxsize=s.SEND_BATCH_THREADS),
                pool=ThreadPoolExecutor(s.SEND_BATCH_THREADS, thread_name_prefix="twilio-send"),
                limits=TwilioLimits.from_url(s.REDIS_URL or "", s.TWILIO_MAX_CONCURRENCY),
            )
        return _state["gateway"], _state["pool"], _state["limits"]


@app.task(
    name=SEND_BATCH_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def send_org_batch(
    self: Task, org_id: str, answers: list | None = None, record_tries: int = 0
) -> str:
    """Send the organization's queued messages, in batches (see the module).

    `answers` are [message id, Twilio's answer] pairs carried by a retry whose recording
    failed: they are recorded first, never sent again."""
    from core.providers.ports import SendResult

    engine, policy, s = runtime.engine(), runtime.policy(), runtime.settings()
    owner = self.request.id or f"local-{uuid.uuid4().hex}"
    if answers:
        carried = [send_batch.Answer(m, SendResult.from_dict(a)) for m, a in answers]
        _record(self, org_id, carried, record_tries, {})
    _, _, limits = _resources()
    come_back, sent = 0.0, 0
    for _ in range(MAX_CLAIMS):  # claims that blocked every message they took go on
        account = _account(engine, org_id)
        wait = limits.backoff_left(account) if account else 0.0
        if wait > 0:
            come_back = wait + 0.1
            break
        claim = run_in_transaction(
            engine, lambda c: send_batch.claim(c, org_id, s.SEND_BATCH_SIZE, policy, owner)
        )
        claimed_at = time.monotonic()
        if claim.owner_lease_left > 0:
            come_back = claim.owner_lease_left + 1
        if not claim.plans:
            if claim.blocked:
                continue
            break  # drained
        if len(claim.plans) + claim.blocked >= s.SEND_BATCH_SIZE:
            # More may be queued: the next batch goes to another worker process now, while
            # this one waits on Twilio. A backlog spreads over every process this way, one
            # batch per task, between other organizations' tasks.
            _publish_next(org_id)
        results = _send_all(claim.plans, claimed_at + policy.send_lease.total_seconds())
        statuses = _record(self, org_id, results, 0, claim.send_tries)
        sent = len(results)
        if any(status == MessageStatus.RETRYING for status in statuses.values()):
            come_back = max(come_back, backoff(self.request.retries))
        break
    else:
        _publish_next(org_id)  # only blocked messages so far: the rest in a task of its own
    if come_back > 0:
        raise self.retry(args=[org_id], kwargs={}, countdown=come_back)
    return f"sent {sent}"


def _publish_next(org_id: str) -> None:
    """Another drain of the organization; if the publish fails, the messages stay `queued`
    and the outbox relay sends them (the single task) after EVENT_REDELIVER_SECONDS."""
    try:
        send_org_batch.apply_async(args=[org_id], queue="payguard.send")
    except Exception as exc:
        log.warning("next batch not published", extra={"org_id": org_id, "error": repr(exc)})


def _account(engine, org_id: str) -> str | None:
    with engine.connect() as conn:
        return orgs.subaccount_sid(conn, org_id)


def _send_all(plans: list[messages.Plan], lease_ends: float) -> list[send_batch.Answer]:
    gateway, pool, limits = _resources()
    s = runtime.settings()
    base = s.PUBLIC_BASE_URL
    last_start = lease_ends - _CALL_SECONDS
    slots = _Slots(limits, plans, s.SEND_BATCH_THREADS)

    def one(plan: messages.Plan) -> send_batch.Answer:
        callback = messages.status_callback_url(base, plan.message_id) if base else None
        return send_batch.Answer(
            plan.message_id, _send_one(gateway, slots, plan, callback, last_start)
        )

    try:
        return list(pool.map(one, plans))
    finally:
        slots.release_unused()


class _Slots:
    """The batch's Twilio slots: as many as its calls can use at once, taken for each account
    in one round trip to Redis before the calls start (rather than one each, and one more for
    the backoff), and handed to the calls; a call that finds none left, or finds that the
    account has backed off since, waits for a slot of its own as it always did. A call gives
    its slot back as soon as it returns; calls returning together give theirs back together:
    the one that finds nobody giving back takes every slot returned meanwhile with its own."""

    def __init__(self, limits, plans: list[messages.Plan], at_once: int) -> None:
        self.limits = limits
        self.backed_off: set[str] = set()
        self.ready: dict[str, list[str]] = {}
        self.returned: list[tuple[str, str]] = []
        self.giving_back = threading.Lock()
        wanted: dict[str, int] = {}
        for plan in plans:
            if plan.subaccount_sid and plan.sender:
                wanted[plan.subaccount_sid] = wanted.get(plan.subaccount_sid, 0) + 1
        for account, n in wanted.items():
            with contextlib.suppress(Exception):  # Redis away: each call finds out for itself
                self.ready[account] = limits.try_acquire_many(account, min(n, at_once))[0]

    def acquire(self, account: str, last_start: float) -> str | None:
        if account not in self.backed_off and time.monotonic() <= last_start:
            with contextlib.suppress(IndexError):
                return self.ready.get(account, []).pop()  # list.pop is atomic between threads
        return self.limits.acquire(account, timeout=max(0.0, last_start - time.monotonic()))

    def give_back(self, account: str, token: str) -> None:
        self.returned.append((account, token))
        # Whoever holds the lock takes this slot too; a slot returned just as that thread let
        # go of the lock is seen by this check, made after the lock is free again.
        while self.returned and self.giving_back.acquire(blocking=False):
            try:
                taken: dict[str, list[str]] = {}
                with contextlib.suppress(IndexError):
                    while True:
                        a, t = self.returned.pop()
                        taken.setdefault(a, []).append(t)
                for a, tokens in taken.items():
                    with contextlib.suppress(Exception):  # the leases expire by themselves
                        self.limits.release(a, *tokens)
            finally:
                self.giving_back.release()

    def back_off(self, account: str) -> None:
        """Twilio said 429: calls of this batch not yet started go through the shared backoff."""
        self.backed_off.add(account)
        self.release_unused(account)

    def release_unused(self, *accounts: str) -> None:
        for account in accounts or list(self.ready):
            tokens, taken = self.ready.get(account, []), []
            with contextlib.suppress(IndexError):  # calls may be taking them meanwhile
                while True:
                    taken.append(tokens.pop())
            with contextlib.suppress(Exception):  # the slots' leases expire by themselves
                self.limits.release(account, *taken)


def _send_one(gateway, slots: _Slots, plan: messages.Plan, callback: str | None, last_start: float):
    from core.providers.ports import SendOutcome, SendResult
    from core.providers.twilio.gateway import RATE_LIMIT_CODE

    if not plan.subaccount_sid or not plan.sender:
        return SendResult(
            SendOutcome.REJECTED, error_message="organization has no Twilio subaccount or sender"
        )
    account = plan.subaccount_sid
    try:
        token = slots.acquire(account, last_start)
    except Exception as exc:  # Redis away: nothing was sent, so it is safe to try later
        return SendResult(SendOutcome.RETRY_SAFE, error_message=f"concurrency cap: {exc!r}")
    if token is None:
        return SendResult(SendOutcome.RETRY_SAFE, error_message="no Twilio slot free in time")
    try:
        result = gateway.send_message(account, plan.sender, plan.to, plan.body, callback)
    except ValueError as exc:  # refused before any request was made
        result = SendResult(SendOutcome.REJECTED, error_message=str(exc))
    finally:
        slots.give_back(account, token)
    if result.http_status == 429 or result.error_code == RATE_LIMIT_CODE:
        try:
            slots.limits.back_off(account, runtime.settings().TWILIO_RATE_LIMIT_BACKOFF_SECONDS)
        except Exception:
            log.warning("could not record Twilio's 429 backoff", extra={"account": account})
        slots.back_off(account)
    metrics.count_twilio_send(result.outcome)
    return result


def _record(
    self: Task,
    org_id: str,
    answers: list[send_batch.Answer],
    tries: int,
    send_tries: dict[str, int],
) -> dict[str, str]:
    """Record the answers in one transaction; messages that reached nothing at Twilio and
    have used their tries are given up there too. When recording fails, the task is retried
    with the answers in hand: what Twilio did is never lost because the database was away."""
    engine, policy, s = runtime.engine(), runtime.policy(), runtime.settings()

    def unit(conn) -> dict[str, str]:
        statuses = send_batch.record(conn, org_id, answers, policy)
        for message_id, status in statuses.items():
            if (
                status == MessageStatus.RETRYING
                and send_tries.get(message_id, 0) > s.TASK_MAX_RETRIES
            ):
                result: Any = next(a.result for a in answers if a.message_id == message_id)
                messages.give_up(
                    conn, message_id, policy, f"Twilio unreachable: {result.error_message}"
                )
                statuses[message_id] = "not_sent"
        return statuses

    try:
        statuses = run_in_transaction(engine, unit)
    except Exception as exc:
        if tries + 1 >= RECORD_RESULT_MAX_TRIES:
            log.error(
                "recording of Twilio's answers abandoned",
                extra={"org_id": org_id, "messages": len(answers), "error": repr(exc)},
            )
            raise
        log.warning(
            "recording of Twilio's answers failed; trying again",
            extra={"org_id": org_id, "messages": len(answers), "error": repr(exc)},
        )
        carried = [[a.message_id, a.result.as_dict()] for a in answers]
        raise self.retry(
            args=[org_id],
            kwargs={"answers": carried, "record_tries": tries + 1},
            countdown=s.RECORD_RESULT_RETRY_SECONDS,
            max_retries=None,
        ) from None
    log.info(
        "batch settled",
        extra={
            "org_id": org_id,
            "messages": len(answers),
            "accepted": sum(1 for v in statuses.values() if v == MessageStatus.ACCEPTED),
        },
    )
    return statuses
