"""The Celery app. Its configuration is computed from settings when Celery first needs it
(at process start), not when this module is imported."""

from __future__ import annotations

import sys

from celery import Celery
from celery.signals import celeryd_init, setup_logging, worker_process_init

from bus import broker
from worker import metrics, runtime  # noqa: F401  (metrics: its signal handlers connect)


def _config() -> dict:
    s = runtime.settings()
    from worker.schedule import beat_schedule

    return {
        # Redis (REDIS_URL) unless BROKER_URL names RabbitMQ: bus/broker.py.
        **broker.celery_options(
            s.broker_url,
            delivery_limit=s.BROKER_DELIVERY_LIMIT,
            visibility_timeout=s.BROKER_VISIBILITY_TIMEOUT,
        ),
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": "payguard.events",
        # One table of routes (bus/broker.py) for Celery and for the publishers.
        "task_routes": {
            **{task: {"queue": queue} for task, queue in broker.ROUTES.items()},
            "payguard.beat.*": {"queue": "payguard.beat"},
        },
        "beat_schedule": beat_schedule(s),
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


app = Celery(
    "payguard",
    include=["worker.tasks", "worker.send_tasks", "worker.beat_jobs", "worker.outbound_tasks"],
)
app.add_defaults(_config)


@worker_process_init.connect
def _fresh_resources(**_: object) -> None:
    runtime.reset_after_fork()


def _queues(options: dict | None) -> set[str]:
    raw = (options or {}).get("queues") or ()
    names = raw.split(",") if isinstance(raw, str) else list(raw)
    return {str(n).strip() for n in names if str(n).strip()} or {"every queue"}


@celeryd_init.connect
def _require_twilio(options: dict | None = None, **_: object) -> None:
    """Before anything starts: refuse to run a worker whose sends would go nowhere, and an
    events worker that could not read the endpoint secrets it signs with."""
    from core.settings import ConfigError, require_twilio_or_console

    settings = runtime.settings()
    queues = _queues(options)
    try:
        if "payguard.outbound" in queues or "every queue" in queues:
            _require_secret_key()
        if queues == {"payguard.outbound"}:
            return  # delivers events only: no Twilio call, no charge
        require_twilio_or_console(settings)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        raise SystemExit(2) from None  # not an Exception: Celery's signal dispatch lets it pass
    if not settings.twilio_configured:
        print(
            "payguard worker: TWILIO_CONSOLE=1, console backend: messages and subaccount "
            "changes are only logged",
            file=sys.stderr,
            flush=True,
        )


def _require_secret_key() -> None:
    """Once an endpoint exists, its secret can be read only with PAYGUARD_SECRET_KEY."""
    from core import outbound
    from core.settings import ConfigError

    if runtime.settings().PAYGUARD_SECRET_KEY:
        return
    try:
        with runtime.engine().connect() as conn:
            exists = outbound.has_endpoints(conn)
    except Exception:  # no database yet, or not migrated: the tasks will say so themselves
        return
    if exists:
        raise ConfigError(
            "configuration error: PAYGUARD_SECRET_KEY is required: webhook endpoints exist "
            "and their secrets are stored encrypted with it"
        )


@celeryd_init.connect
def _guard_broker_close(**_: object) -> None:
    from worker import broker_guard

    broker_guard.install()


def _task_context() -> dict:
    from celery import current_task

    if current_task and current_task.request and current_task.request.id:
        return {"task_id": current_task.request.id, "task": current_task.name}
    return {}


@setup_logging.connect
def _logging(loglevel: object = None, **_: object) -> None:
    """Our formatter instead of Celery's: JSON lines carrying the task id."""
    from core import logging_setup

    # Celery hands over the level already resolved to a number (20); str() of it is no level.
    level = loglevel if isinstance(loglevel, int) else str(loglevel or "INFO").upper()
    logging_setup.configure(runtime.settings().LOG_FORMAT, level)
    logging_setup.add_context_provider(_task_context)
