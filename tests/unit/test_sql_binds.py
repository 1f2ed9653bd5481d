"""Every named statement core runs with a literal dict of parameters gets exactly its binds.

A bind renamed in the SQL but not at the call (or the other way round) fails here, without a
database; statements run with a dict built elsewhere are covered by the integration tests.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import core


def _literal_calls():
    for info in pkgutil.walk_packages(core.__path__, "core."):
        module = importlib.import_module(info.name)
        tree = ast.parse(Path(module.__file__ or "").read_text())
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "execute"
                and node.args
                and isinstance(node.args[0], ast.Name)
            ):
                continue
            statement = getattr(module, node.args[0].id, None)
            if not hasattr(statement, "compile"):
                continue  # not a named statement of this module
            params = node.args[1] if len(node.args) > 1 else ast.Dict(keys=[], values=[])
            if isinstance(params, ast.Dict) and all(
                isinstance(k, ast.Constant) for k in params.keys
            ):
                keys = {k.value for k in params.keys if isinstance(k, ast.Constant)}
                yield f"{info.name}:{node.lineno}", keys, set(statement.compile().params)


def test_literal_parameters_name_exactly_the_statements_binds():
    calls = list(_literal_calls())
    assert len(calls) > 100
    assert [(where, keys, binds) for where, keys, binds in calls if keys != binds] == []


def test_a_statement_for_the_driver_has_psycopgs_placeholders_for_exactly_its_binds():
    import re

    from sqlalchemy import text

    from core import sql, wallet

    for statement in (wallet._CREDIT, wallet._DEBIT, wallet._CLAWBACK):
        on_driver = sql.for_driver(statement)
        named = set(statement._bindparams)  # what SQLAlchemy binds
        assert set(re.findall(r"%\((\w+)\)s", on_driver)) == named
        assert not re.search(r"(?<![:\w]):\w", on_driver)  # no bind left in SQLAlchemy's form
    cast = text("SELECT CAST(:n AS int)::bigint, '100%'")
    assert sql.for_driver(cast) == "SELECT CAST(%(n)s AS int)::bigint, '100%%'"
