"""Celery tasks: load by id, call core in one unit of work, retry transient errors only."""

from __future__ import annotations

import logging
import random

from celery import Task
from sqlalchemy.exc import DBAPIError, OperationalError

from core import handlers, inbox
from core.db import run_in_transaction
from core.errors import NotYetApplicable, ParkEvent, RetryableConflict, TransientError
from core.providers.twilio import accounts as twilio_accounts
from core.statuses import MessageStatus
from worker import metrics, runtime
from worker.celery_app import app

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, RetryableConflict, TransientError, ConnectionError, TimeoutError)


def backoff(retries: int) -> float:
    """Exponential backoff with full jitter, capped (the broker's visibility timeout is longer).

    On RabbitMQ never under a second: native delayed delivery counts whole seconds, and Celery
    refuses to publish a countdown that rounds down to none onto a quorum queue."""
    s = runtime.settings()
    ceiling = min(s.TASK_RETRY_MAX_SECONDS, s.TASK_RETRY_BASE_SECONDS * (2**retries))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, 1.0) if s.broker_is_rabbitmq else delay


def _settle(inbox_id: int, status: str, error: str) -> None:
    run_in_transaction(
        runtime.engine(), lambda conn: inbox.finish(conn, inbox_id, status, error=error[:2000])
    )


def _park(inbox_id: int, exc: ParkEvent) -> str:
    """Park the event; "requeued" when the payment it waited for arrived meanwhile."""
    parked = run_in_transaction(runtime.engine(), lambda conn: inbox.park(conn, inbox_id, exc))
    if not parked:
        log.info("event queued again: its payment arrived", extra={"inbox_id": inbox_id})
        return "requeued"
    log.warning("event parked", extra={"inbox_id": inbox_id, "reason": str(exc)})
    return "parked"


@app.task(
    name="payguard.process_event",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def process_event(self: Task, inbox_id: int) -> str:
    """Apply one stored webhook event exactly once."""
    retries = self.request.retries
    max_retries = runtime.settings().TASK_MAX_RETRIES
    try:
        outcome = run_in_transaction(
            runtime.engine(), lambda conn: handlers.process(conn, inbox_id, runtime.policy())
        )
        return outcome.status
    except NotYetApplicable as exc:
        if retries < max_retries:
            _note_attempt(inbox_id, exc)
            raise self.retry(countdown=backoff(retries), exc=exc) from None
        return _park(inbox_id, exc)
    except ParkEvent as exc:
        return _park(inbox_id, exc)
    except TRANSIENT as exc:
        if retries < max_retries:
            # A retried try is counted here; the last one is counted by _settle (inbox.finish).
            _note_attempt(inbox_id, exc)
            raise self.retry(countdown=backoff(retries), exc=exc) from None
        _settle(inbox_id, "failed", f"retries exhausted: {exc}")
        log.error("event failed", extra={"inbox_id": inbox_id, "error": str(exc)})
        return "failed"
    except DBAPIError as exc:
        # Not a connection problem: a constraint or a bug. Retrying will not help.
        _settle(inbox_id, "failed", f"database refused: {exc.orig}")
        log.exception("event failed", extra={"inbox_id": inbox_id})
        return "failed"
    except Exception as exc:
        _settle(inbox_id, "failed", f"{type(exc).__name__}: {exc}")
        log.exception("event failed", extra={"inbox_id": inbox_id})
        return "failed"


def _note_attempt(inbox_id: int, exc: Exception) -> None:
    try:
        run_in_transaction(
            runtime.engine(), lambda conn: inbox.record_attempt(conn, inbox_id, repr(exc))
        )
    except Exception:  # the database itself may be what is down
        log.warning("could not record attempt", extra={"inbox_id": inbox_id})


@app.task(
    name="payguard.sync_twilio_account",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def sync_twilio_account(self: Task, org_id: str) -> str:
    """Suspend or reactivate one subaccount until Twilio agrees with the desired status."""
    result = twilio_accounts.converge_one(
        runtime.engine(), runtime.gateway(), org_id, runtime.policy()
    )
    metrics.count_twilio_account_sync(result)
    if result == "retry":
        if self.request.retries < runtime.settings().TASK_MAX_RETRIES:
            raise self.retry(countdown=backoff(self.request.retries))
        return "gave_up"  # the converge beat job tries again later
    return result


# A recording of Twilio's answer is tried this many times (RECORD_RESULT_RETRY_SECONDS apart,
# an hour at the default) before it is left to the lease's expiry and to status callbacks.
RECORD_RESULT_MAX_TRIES = 120


@app.task(
    name="payguard.send_message",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def send_message(
    self: Task, message_id: str, answer: dict | None = None, record_tries: int = 0
) -> str:
    """Decide and hold, call Twilio once, settle the hold by its answer.

    `answer` is Twilio's answer carried by a retry whose recording failed: it is recorded,
    never sent again."""
    from core import messages
    from core.providers.ports import SendOutcome, SendResult

    engine, policy, s = runtime.engine(), runtime.policy(), runtime.settings()
    if answer is not None:
        status = _record(self, message_id, SendResult.from_dict(answer), record_tries)
        # the answer was "nothing reached Twilio": send again later
        if status == MessageStatus.RETRYING:
            raise self.retry(args=[message_id], kwargs={}, countdown=backoff(self.request.retries))
        return status
    plan = run_in_transaction(engine, lambda c: messages.prepare(c, message_id, policy))
    if isinstance(plan, messages.LeaseHeld):
        # Another run is sending it (a redelivery, or the relay's copy): look again once its
        # lease is over, when it is settled or can be called unknown.
        raise self.retry(countdown=plan.seconds_left + 1, max_retries=None)
    if plan is None:
        return "nothing to send"
    if not plan.subaccount_sid or not plan.sender:
        result = SendResult(
            SendOutcome.REJECTED, error_message="organization has no Twilio subaccount or sender"
        )
    else:
        callback = (
            messages.status_callback_url(s.PUBLIC_BASE_URL, message_id)
            if s.PUBLIC_BASE_URL
            else None
        )
        try:
            result = runtime.gateway().send_message(
                plan.subaccount_sid, plan.sender, plan.to, plan.body, callback
            )
            metrics.count_twilio_send(result.outcome)
        except ValueError as exc:  # refused before any request was made
            result = SendResult(SendOutcome.REJECTED, error_message=str(exc))
    status = _record(self, message_id, result, 0)
    if status == MessageStatus.RETRYING:
        if self.request.retries < s.TASK_MAX_RETRIES:
            raise self.retry(countdown=backoff(self.request.retries))
        run_in_transaction(
            engine,
            lambda c: messages.give_up(
                c, message_id, policy, f"Twilio unreachable: {result.error_message}"
            ),
        )
        return "not_sent"
    log.info(
        "message settled",
        extra={
            "message_id": message_id,
            "org_id": plan.org_id,
            "status": status,
            "twilio_sid": result.sid,
        },
    )
    return status


def _record(self: Task, message_id: str, result, tries: int) -> str:
    """Record Twilio's answer; when that fails, try again later with the answer in hand:
    what Twilio did must not be lost because the database was away for a moment."""
    from core import messages

    engine, policy, s = runtime.engine(), runtime.policy(), runtime.settings()
    try:
        return run_in_transaction(
            engine, lambda c: messages.record_result(c, message_id, result, policy)
        )
    except Exception as exc:
        if tries + 1 >= RECORD_RESULT_MAX_TRIES:
            log.error(
                "recording of Twilio's answer abandoned",
                extra={"message_id": message_id, "twilio_sid": result.sid, "error": repr(exc)},
            )
            raise
        log.warning(
            "recording of Twilio's answer failed; trying again",
            extra={"message_id": message_id, "twilio_sid": result.sid, "error": repr(exc)},
        )
        raise self.retry(
            args=[message_id],
            kwargs={"answer": result.as_dict(), "record_tries": tries + 1},
            countdown=s.RECORD_RESULT_RETRY_SECONDS,
            max_retries=None,
        ) from None


@app.task(
    name="payguard.fan_out_sends",
    acks_late=True,
    reject_on_worker_lost=True,
)
def fan_out_sends(pairs: list[list]) -> int:
    """Publish the send task of each message of a batch, given as [message id, outbox id]
    pairs: a web request publishes this one task instead of a thousand. Run again after a
    crash it publishes the same task ids again, which send_message settles once; a message
    whose task never got out is still `queued`, and the outbox relay publishes it again."""
    for message_id, outbox_id in pairs:
        send_message.apply_async(
            args=[message_id], task_id=f"outbox-{outbox_id}", queue="payguard.send", retry=False
        )
    return len(pairs)


@app.task(
    name="payguard.capture_top_up",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def capture_top_up(self: Task, top_up_id: str) -> str:
    """Capture an approved PayPal top-up and credit what was captured, once. A capture that
    times out is sent again with the same PayPal-Request-Id, so PayPal captures once."""
    from core import top_up_capture

    api = runtime.top_up_apis().get("paypal")
    if api is None:
        log.error("PayPal API not configured: top-up not captured", extra={"top_up_id": top_up_id})
        return "not_configured"
    try:
        return top_up_capture.capture(runtime.engine(), api, top_up_id)
    except TRANSIENT as exc:
        if self.request.retries < runtime.settings().TASK_MAX_RETRIES:
            raise self.retry(countdown=backoff(self.request.retries), exc=exc) from None
        # Still `approved`: a second CHECKOUT.ORDER.APPROVED, PAYMENT.CAPTURE.COMPLETED or
        # an operator's replay of the approval captures it later.
        log.error("top-up capture gave up", extra={"top_up_id": top_up_id, "error": str(exc)})
        return "gave_up"
