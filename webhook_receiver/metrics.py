"""Prometheus metrics of the receiver (multiprocess-aware when PROMETHEUS_MULTIPROC_DIR is set)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)

WEBHOOKS = Counter(
    "payguard_webhooks_received_total",
    "Webhook requests by provider and answer",
    ["provider", "answer"],
)
VERIFY_FAILURES = Counter(
    "payguard_webhook_verification_failures_total",
    "Webhook verification failures by cause",
    ["provider", "cause"],
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
