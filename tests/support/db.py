"""Running a core function the way the entrypoints do: one unit of work, committed.

`tx(engine, fn, *args, **kwargs)` runs `fn(conn, *args, **kwargs)` in a transaction of its own
(core.db.run_in_transaction, retried on a lost race) and returns what it returned. The `db`
fixture (tests/conftest.py) is the same bound to the test's engine:
`org = db(new_org, balance=100)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine

from core.db import run_in_transaction

T = TypeVar("T")


def tx(engine: Engine, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(conn, *args, **kwargs) as one committed unit of work; its result."""
    return run_in_transaction(engine, lambda conn: fn(conn, *args, **kwargs))


class Db:
    """`tx` bound to one engine: `db(fn, *args, **kwargs)`; `db.engine` is that engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return tx(self.engine, fn, *args, **kwargs)
