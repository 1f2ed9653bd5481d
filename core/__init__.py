"""Payguard's domain: the wallet ledger, subscriptions, campaigns, sending decisions and
provider event normalization. Nothing here imports Flask, Celery or an entrypoint."""
