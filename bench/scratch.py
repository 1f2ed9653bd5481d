"""A throwaway migrated database for a benchmark: on the given server, or on an embedded
PostgreSQL started for the run; dropped when the run's ExitStack closes."""

from __future__ import annotations

import secrets
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

import migrations
from devtools.devstack import database_url as url_for
from devtools.devstack import start_postgres


def prepare_database(admin_url: str | None, tmp: Path, stack: ExitStack) -> tuple[str, str]:
    """(URL of a fresh migrated scratch database, where it lives and how it is tuned)."""
    if admin_url is None:
        server = start_postgres(tmp / "pgdata", database=None)
        stack.callback(server.stop)
        admin_url, where = server.admin_url, "embedded PostgreSQL (default durability)"
    else:
        where = f"PostgreSQL at {urlsplit(admin_url).hostname}:{urlsplit(admin_url).port}"
    name = f"payguard_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        settings = conn.execute(
            "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings "
            "WHERE name IN ('fsync', 'synchronous_commit', 'max_connections')"
        ).fetchone()[0]

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    stack.callback(drop)
    url = url_for(admin_url, name)
    migrations.upgrade(url)
    return url, f"{where}, {settings}"
