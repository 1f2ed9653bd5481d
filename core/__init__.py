"""Payguard's domain: the wallet ledger, subscriptions, campaigns, sending decisions and the
use cases the entrypoints call. Nothing here imports Flask, Celery, kombu, Redis or an
entrypoint; vendor SDKs only under core/providers/ (tests/unit/test_layering.py)."""
