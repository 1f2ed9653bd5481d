"""Every SQL statement core runs, named and registered once, at import.

A statement is a module-level constant,
`_MARK_SENDING = sql.statement("messages.mark_sending", \"\"\"...\"\"\")`:
its name is `<module>.<what it does>`, unique across core; its binds are full words
(`:org_id`, `:message_id`). Registering them by name is what lets
tests/integration/test_sql_statements.py run EXPLAIN on every one against the migrated schema,
so a statement naming a missing column fails a test rather than a request.
"""

from __future__ import annotations

import re

from sqlalchemy import TextClause, text

_STATEMENTS: dict[str, TextClause] = {}


def statement(name: str, sql: str) -> TextClause:
    """The statement `sql`, registered as `name`; a second, different statement of the same
    name is refused (the same one again, a module imported twice, is the first)."""
    known = _STATEMENTS.get(name)
    if known is not None:
        if known.text != sql:
            raise ValueError(f"two SQL statements are named {name!r}")
        return known
    clause = text(sql)
    _STATEMENTS[name] = clause
    return clause


def statements() -> dict[str, TextClause]:
    """Every statement registered so far, by name (import the modules first)."""
    return dict(_STATEMENTS)


# A bind is a colon and a word, not part of a cast (`::bigint`) or of a longer word.
_BIND = re.compile(r"(?<![:\w]):(\w+)")


def for_driver(clause: TextClause) -> str:
    """A registered statement's SQL with psycopg's placeholders (`%(org_id)s` for `:org_id`),
    for the hot statements core runs on the driver connection itself (core/db.py::one_on_driver):
    the same text, so the EXPLAIN of the registered statement covers it."""
    return _BIND.sub(r"%(\1)s", clause.text.replace("%", "%%"))
