"""The beat schedule: every job is safe to run twice at once (advisory lock or SKIP LOCKED)."""

from __future__ import annotations

from core.settings import Settings


def beat_schedule(s: Settings) -> dict:
    return {
        "relay-outbox": {
            "task": "payguard.beat.relay_outbox",
            "schedule": s.RELAY_INTERVAL_SECONDS,
        },
        "dispatch-outbound": {
            "task": "payguard.beat.dispatch_outbound",
            "schedule": s.OUTBOUND_DISPATCH_INTERVAL_SECONDS,
        },
        "prune-outbound": {"task": "payguard.beat.prune_outbound", "schedule": 600.0},
        "converge-twilio": {"task": "payguard.beat.converge_twilio", "schedule": 30.0},
        "reconcile-campaigns": {"task": "payguard.beat.reconcile_campaigns", "schedule": 60.0},
        "expire-holds": {"task": "payguard.beat.expire_holds", "schedule": 60.0},
        "verify-ledger": {"task": "payguard.beat.verify_ledger", "schedule": 300.0},
        "refresh-subscriptions": {"task": "payguard.beat.refresh_subscriptions", "schedule": 900.0},
        "expire-top-ups": {"task": "payguard.beat.expire_top_ups", "schedule": 300.0},
        "prune-idempotency-keys": {
            "task": "payguard.beat.prune_idempotency_keys",
            "schedule": 3600.0,
        },
    }
