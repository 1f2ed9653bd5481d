"""Every status a Payguard row moves through, in one place.

Each enum holds exactly the values a CHECK constraint of its column allows
(`COLUMNS`; tests/integration/test_statuses.py compares them with pg_constraint), so Python,
SQL and /metrics cannot drift apart. Python compares and sets statuses through these enums;
a SQL statement may name one as a literal (`WHERE status = 'queued'`), which the CHECK keeps
honest. They are `StrEnum`s: a member is its string, in comparisons, JSON and bind parameters.

`subscriptions.status` is not here: it is the provider's own word, lower-cased, stored as it
comes (core/subscriptions.py decides which of them allow sending).
"""

from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    """`messages.status`. Payguard's own: queued (or blocked) → sending → accepted | rejected |
    unknown, retrying → not_sent when its tries run out; then Twilio's callbacks move an
    accepted message forward only (`CallbackStatus`)."""

    QUEUED = "queued"
    BLOCKED = "blocked"
    SENDING = "sending"
    RETRYING = "retrying"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    UNKNOWN = "unknown"
    NOT_SENT = "not_sent"
    SENT = "sent"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    READ = "read"


class CallbackStatus(StrEnum):
    """Twilio's status callbacks Payguard applies (`early_callbacks.status` keeps one that
    came before its SID was recorded); any other status Twilio reports is ignored."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    READ = "read"


class HoldStatus(StrEnum):
    """`holds.status`: open → captured | released, once."""

    OPEN = "open"
    CAPTURED = "captured"
    RELEASED = "released"


class EventStatus(StrEnum):
    """`webhook_events.status`, the inbox of provider webhooks."""

    RECEIVED = "received"
    PROCESSED = "processed"
    IGNORED = "ignored"
    PARKED = "parked"
    FAILED = "failed"


class CampaignStatus(StrEnum):
    """`campaigns.status`."""

    RUNNING = "running"
    PAUSED = "paused"


class PausedBy(StrEnum):
    """`campaigns.paused_by`: a user's pause stays; the system's lifts itself."""

    USER = "user"
    SYSTEM = "system"


class AccountStatus(StrEnum):
    """`organizations.twilio_status` and `twilio_desired_status`: the Twilio subaccount's."""

    ACTIVE = "active"
    SUSPENDED = "suspended"


class Billing(StrEnum):
    """`organizations.billing`: what makes an organization's sending paid for."""

    SUBSCRIPTION = "subscription"
    PREPAID = "prepaid"


class DeliveryStatus(StrEnum):
    """`outbound_deliveries.status`: one event to one host endpoint."""

    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TopUpStatus(StrEnum):
    """`top_ups.status`: created → approved → completed | failed | expired."""

    CREATED = "created"
    APPROVED = "approved"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"


class PaymentOutcome(StrEnum):
    """`subscriptions.last_payment_outcome`: how a subscription's last invoice went."""

    PAID = "paid"
    FAILED = "failed"


# (table, column) → the enum whose values its CHECK constraint allows.
COLUMNS: dict[tuple[str, str], type[StrEnum]] = {
    ("messages", "status"): MessageStatus,
    ("early_callbacks", "status"): CallbackStatus,
    ("holds", "status"): HoldStatus,
    ("webhook_events", "status"): EventStatus,
    ("campaigns", "status"): CampaignStatus,
    ("campaigns", "paused_by"): PausedBy,
    ("organizations", "twilio_status"): AccountStatus,
    ("organizations", "twilio_desired_status"): AccountStatus,
    ("organizations", "billing"): Billing,
    ("outbound_deliveries", "status"): DeliveryStatus,
    ("top_ups", "status"): TopUpStatus,
    ("subscriptions", "last_payment_outcome"): PaymentOutcome,
}
