"""Alembic environment: online migrations only, with a lock timeout so a busy table fails fast."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool, text

from core.db import make_engine

config = context.config


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    engine = make_engine(url, poolclass=pool.NullPool) if url else None
    assert engine is not None, "sqlalchemy.url is required"
    with engine.connect() as connection:
        connection.execute(text("SET lock_timeout = '5s'"))
        # Two releases at once must not both migrate: serialize them on an advisory lock.
        connection.execute(text("SELECT pg_advisory_lock(8675309)"))
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=None)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(8675309)"))
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported")
run_migrations_online()
