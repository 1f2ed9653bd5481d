"""Beat's repair of missed subscription webhooks: ask the provider, apply what it says."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from core import sending, subscriptions
from core.db import run_in_transaction
from core.errors import PayguardError
from core.providers.apis import build_subscription_apis
from core.settings import Settings

log = logging.getLogger(__name__)

BATCH = 100


def refresh_stale(settings: Settings, engine: Engine, policy: sending.Policy) -> int:
    """Refresh stale subscriptions of every provider whose API credentials are set; return
    how many changed status."""
    apis = build_subscription_apis(settings)
    if not apis:
        return 0
    stale = run_in_transaction(
        engine,
        lambda c: subscriptions.stale(
            c, timedelta(seconds=settings.SUBSCRIPTION_STALE_SECONDS), BATCH, sorted(apis)
        ),
    )
    changed = 0
    for row in stale:
        try:
            status, when = apis[row.provider].subscription_status(row.subscription_id)
        except PayguardError as exc:
            log.warning(
                "subscription refresh failed",
                extra={
                    "provider": row.provider,
                    "subscription_id": row.subscription_id,
                    "error": str(exc),
                },
            )
            continue  # asked again next run

        def apply(conn, row=row, status=status, when=when) -> bool:
            applied = subscriptions.apply_status(
                conn,
                row.provider,
                row.subscription_id,
                row.org_id,
                status,
                when or datetime.now(UTC),
            )
            subscriptions.mark_checked(conn, row.provider, row.subscription_id)
            if applied.org_id:
                sending.reconcile(conn, applied.org_id, policy)
            return applied.changed

        if run_in_transaction(engine, apply):
            changed += 1
            log.info(
                "subscription refreshed from its provider",
                extra={
                    "provider": row.provider,
                    "subscription_id": row.subscription_id,
                    "status": status,
                },
            )
    return changed
