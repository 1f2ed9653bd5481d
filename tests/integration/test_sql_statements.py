"""Every named statement of core plans against the migrated schema.

core/sql.py registers each statement by name at import; here every core module is imported
and each statement is EXPLAINed on a freshly migrated database with NULL for every
parameter (psycopg binds server-side, so PostgreSQL infers each parameter's type). A
statement naming a column, table or function the schema lacks fails its own test, before any
request would.
"""

from __future__ import annotations

import importlib
import pkgutil

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import core
from core import sql

# Parameters whose type PostgreSQL cannot infer from a NULL: sample values of the right type.
SAMPLES: dict[str, dict[str, object]] = {}


def _import_core() -> dict[str, object]:
    for module in pkgutil.walk_packages(core.__path__, "core."):
        importlib.import_module(module.name)
    return sql.statements()


STATEMENTS = _import_core()


def test_core_has_named_statements():
    assert len(STATEMENTS) > 100


def _check(conn, name: str, statement) -> str | None:
    """None if the statement plans (a utility statement such as SET: runs), else the error."""
    params = dict.fromkeys(statement.compile().params)
    params.update(SAMPLES.get(name, {}))
    sql_text = statement.text
    if sql_text.lstrip().upper().startswith("SET "):
        clause = text(sql_text)  # EXPLAIN plans no utility statement; SET LOCAL ends with us
    else:
        clause = text("EXPLAIN " + sql_text)
    try:
        with conn.begin_nested():
            conn.execute(clause, params)
    except DBAPIError as exc:
        return str(exc.orig).splitlines()[0]
    return None


def test_every_statement_plans_on_the_migrated_schema(engine):
    with engine.connect() as conn, conn.begin():
        failures = {name: _check(conn, name, STATEMENTS[name]) for name in sorted(STATEMENTS)}
    assert {name: why for name, why in failures.items() if why} == {}
