"""Typed settings, read once from the environment when a process starts (never at import)."""

from __future__ import annotations

import sys
from typing import Annotated, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Port = Annotated[int, Field(ge=0, le=65535)]

DEFAULT_CERT_PREFIXES = (
    "https://api.paypal.com/v1/notifications/certs/,"
    "https://api.sandbox.paypal.com/v1/notifications/certs/"
)


AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")
BROKER_SCHEMES = (*AMQP_SCHEMES, "redis://", "rediss://")


def is_amqp_url(url: str) -> bool:
    return url.startswith(AMQP_SCHEMES)


class ConfigError(Exception):
    """A required variable is missing or malformed; the message names it in one line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=True)

    DATABASE_URL: str | None = None
    REDIS_URL: str | None = None
    # The Celery broker when it is not Redis: amqp:// (RabbitMQ, quorum queues). Unset, tasks
    # go through REDIS_URL; Redis stays the shared store of rate limits and caps either way.
    BROKER_URL: str | None = None
    # Deliveries of one message a quorum queue allows before dropping it (a task that kills its
    # worker every time); what matters comes back through the outbox relay.
    BROKER_DELIVERY_LIMIT: int = Field(default=20, ge=1)
    # psycopg's prepare_threshold: how often a statement runs on a connection before psycopg
    # prepares it server-side. "none" never prepares, which PgBouncer in transaction mode needs.
    DATABASE_PREPARE_THRESHOLD: int | None = 5

    PAYPAL_WEBHOOK_ID: str | None = None
    PAYPAL_VERIFY: Literal["offline", "postback"] = "offline"
    PAYPAL_CERT_URL_PREFIXES: str = DEFAULT_CERT_PREFIXES
    PAYPAL_CA_BUNDLE: str | None = None
    PAYPAL_API_BASE: str = "https://api-m.paypal.com"
    PAYPAL_CLIENT_ID: str | None = None
    PAYPAL_CLIENT_SECRET: str | None = None
    # Transmission times accepted: PayPal retries for 3 days, so 4 days back; 5 minutes ahead.
    PAYPAL_TRANSMISSION_MAX_AGE_SECONDS: int = Field(default=4 * 86400, gt=0)
    PAYPAL_TRANSMISSION_MAX_SKEW_SECONDS: int = Field(default=300, ge=0)
    # Certificate fetches any request can trigger: new URLs fetched per 10 minutes per process.
    PAYPAL_CERT_FETCH_BUDGET: int = Field(default=10, ge=1)

    STRIPE_WEBHOOK_SECRET: str | None = None
    STRIPE_PAST_DUE_GRACE_HOURS: int = 72
    # Reconciliation of missed subscription webhooks; unset, Stripe subscriptions are not asked.
    STRIPE_API_KEY: str | None = None
    STRIPE_API_BASE: str = "https://api.stripe.com"

    # Top-ups (POST /v1/organizations/{org_id}/top-ups): bounds of one, in cents.
    TOP_UP_MIN_CENTS: int = Field(default=500, gt=0)
    TOP_UP_MAX_CENTS: int = Field(default=100000, gt=0)
    # How long a call to PayPal's or Stripe's API for a top-up may take before it is called
    # down (the contract says 5 s; tests shorten it).
    TOP_UP_PROVIDER_TIMEOUT_SECONDS: float = Field(default=5.0, gt=0)
    # A PayPal order nobody approved stops being approvable after 3 hours; a Stripe Checkout
    # Session expires after 24 hours unless told otherwise. Beat expires top-ups still
    # `created` after these, plus a margin for clocks and late webhooks.
    TOP_UP_PAYPAL_EXPIRE_SECONDS: int = Field(default=3 * 3600 + 600, gt=0)
    TOP_UP_STRIPE_EXPIRE_SECONDS: int = Field(default=24 * 3600 + 600, gt=0)

    TWILIO_ACCOUNT_SID: str | None = None
    TWILIO_AUTH_TOKEN: str | None = None
    TWILIO_API_BASE: str = "https://api.twilio.com"
    # Without TWILIO_ACCOUNT_SID the worker would "send" through a console backend that only
    # logs, and capture the price of every message: it runs that way only when told to.
    TWILIO_CONSOLE: bool = False
    PUBLIC_BASE_URL: str | None = None

    SMS_SEGMENT_PRICE_CENTS: int = 1
    # How long the run that marks a message `sending` owns it; a copy of the send task waits
    # that long before it calls the send `unknown`. Longer than a Twilio call can last
    # (core.providers.twilio.gateway.DEFAULT_TIMEOUT: 3.05 s connect + 15 s read).
    SEND_LEASE_SECONDS: float = Field(default=60.0, ge=20.0)
    # A recording of Twilio's answer that failed (the database was away) is tried again after
    # this long, with the answer carried in the retried task.
    RECORD_RESULT_RETRY_SECONDS: float = Field(default=30.0, gt=0)
    # The batch send path (core/send_batch.py, worker/send_tasks.py): messages one claim takes,
    # and how many of them a worker process has in flight to Twilio at once (its threads).
    SEND_BATCH_SIZE: int = Field(default=100, ge=1, le=1000)
    SEND_BATCH_THREADS: int = Field(default=100, ge=1, le=1000)
    # Concurrent requests to Twilio per account, shared by every worker through REDIS_URL.
    TWILIO_MAX_CONCURRENCY: int = Field(default=100, ge=1)
    # How long an account is left alone after Twilio answered 429 (Twilio sends no Retry-After).
    TWILIO_RATE_LIMIT_BACKOFF_SECONDS: float = Field(default=1.0, gt=0, le=60)
    HOLD_MAX_AGE_SECONDS: int = 3600
    SUBSCRIPTION_STALE_SECONDS: int = 86400
    LOG_FORMAT: Literal["json", "text"] = "json"

    # Delivery and retry tuning (tests shorten these; production keeps the defaults).
    TASK_MAX_RETRIES: int = 8
    TASK_RETRY_BASE_SECONDS: float = 2.0
    TASK_RETRY_MAX_SECONDS: float = 300.0
    BROKER_VISIBILITY_TIMEOUT: int = 3600
    EVENT_REDELIVER_SECONDS: float = 600.0
    OUTBOX_GRACE_SECONDS: float = 2.0
    RELAY_INTERVAL_SECONDS: float = 2.0
    BROKER_PUBLISH_TIMEOUT: float = 0.5

    # Requests per second per API key on /v1, counted in Redis across every web process.
    API_RATE_LIMIT: int = Field(default=1000, gt=0)

    # Bearer token that web's /metrics requires; unset or empty, /metrics answers 404.
    METRICS_TOKEN: str | None = None
    # Prometheus /metrics of the worker's main process and of beat (0: not served). They have
    # no token: they listen on loopback unless an operator chooses an address.
    WORKER_METRICS_PORT: Port = 9808
    BEAT_METRICS_PORT: Port = 9809
    WORKER_METRICS_HOST: str = "127.0.0.1"
    BEAT_METRICS_HOST: str = "127.0.0.1"

    # Events to the host (outbound webhooks).
    PAYGUARD_SECRET_KEY: str | None = None
    OUTBOUND_ALLOW_PRIVATE: bool = False
    EVENT_RETENTION_DAYS: int = Field(default=30, ge=1)
    OUTBOUND_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0)
    # Multiplies the retry schedule and circuit pauses (tests shrink it; production keeps 1).
    OUTBOUND_RETRY_SCALE: float = Field(default=1.0, gt=0)
    # How long a claimed delivery is its worker's; after it, a lost worker's try is redone.
    OUTBOUND_LEASE_SECONDS: float = Field(default=60.0, gt=0)
    OUTBOUND_DISPATCH_INTERVAL_SECONDS: float = Field(default=1.0, gt=0)
    OUTBOUND_CIRCUIT_THRESHOLD: int = Field(default=5, ge=1)

    @field_validator("PAYGUARD_SECRET_KEY")
    @classmethod
    def _fernet_key(cls, v: str | None) -> str | None:
        if not v:
            return None
        import base64
        import binascii

        try:
            raw = base64.urlsafe_b64decode(v.encode())
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError("must be 32 random bytes in URL-safe base64 (a Fernet key)")
        return v

    @field_validator("DATABASE_URL")
    @classmethod
    def _postgres_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(
            ("postgresql://", "postgres://", "postgresql+psycopg://")
        ):
            raise ValueError("must be a postgresql:// URL")
        return v

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL")
        return v

    @field_validator("BROKER_URL")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if not v:
            return None  # set but empty, as in many env files: unset, Redis is the broker
        if not v.startswith(BROKER_SCHEMES):
            raise ValueError("must be an amqp:// (RabbitMQ) or redis:// URL")
        return v

    @field_validator("DATABASE_PREPARE_THRESHOLD", mode="before")
    @classmethod
    def _prepare_threshold(cls, v: object) -> object:
        if isinstance(v, str) and v.strip().lower() in ("none", "off", ""):
            return None
        return v

    @field_validator("SMS_SEGMENT_PRICE_CENTS")
    @classmethod
    def _positive_price(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be zero or more")
        return v

    @field_validator("BROKER_VISIBILITY_TIMEOUT")
    @classmethod
    def _visibility_covers_retries(cls, v: int, info: ValidationInfo) -> int:
        longest = info.data.get("TASK_RETRY_MAX_SECONDS", 300.0)
        if v <= longest:
            raise ValueError("must be longer than TASK_RETRY_MAX_SECONDS (the longest countdown)")
        return v

    @property
    def broker_url(self) -> str:
        """Where tasks are published and consumed: BROKER_URL, else REDIS_URL."""
        return self.BROKER_URL or self.REDIS_URL or ""

    @property
    def broker_is_rabbitmq(self) -> bool:
        return is_amqp_url(self.broker_url)

    @property
    def cert_url_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.PAYPAL_CERT_URL_PREFIXES.split(",") if p.strip())

    @property
    def stripe_secrets(self) -> tuple[str, ...]:
        raw = self.STRIPE_WEBHOOK_SECRET or ""
        return tuple(s.strip() for s in raw.split(",") if s.strip())

    @property
    def twilio_configured(self) -> bool:
        return bool(self.TWILIO_ACCOUNT_SID)


def load_settings(*required: str) -> Settings:
    """Read the environment; raise ConfigError naming the first bad or missing variable."""
    try:
        settings = Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err.get("loc", ())) or "environment"
        raise ConfigError(f"configuration error: {name}: {err.get('msg')}") from None
    for name in required:
        if not getattr(settings, name):
            raise ConfigError(f"configuration error: {name} is required but not set")
    if settings.twilio_configured:
        for name in ("TWILIO_AUTH_TOKEN", "PUBLIC_BASE_URL"):
            if not getattr(settings, name):
                raise ConfigError(
                    f"configuration error: {name} is required when TWILIO_ACCOUNT_SID is set"
                )
    return settings


def require_twilio_or_console(settings: Settings) -> None:
    """For processes that call Twilio (the worker): a real account, or TWILIO_CONSOLE=1 saying
    that a console backend, which sends nothing yet charges wallets, is meant (dev, tests)."""
    if not settings.twilio_configured and not settings.TWILIO_CONSOLE:
        raise ConfigError(
            "configuration error: TWILIO_ACCOUNT_SID is required by the worker (without it "
            "messages are only logged, yet charged); set TWILIO_CONSOLE=1 to run on the "
            "console backend on purpose"
        )


def load_settings_or_exit(*required: str) -> Settings:
    """For process entrypoints: one clear line on stderr and exit status 2."""
    try:
        return load_settings(*required)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from None
