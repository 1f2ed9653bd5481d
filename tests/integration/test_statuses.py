"""Each status enum of core/statuses.py allows exactly what its column's CHECK allows."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from core import statuses
from tests.support.factories import new_org

# The single-column CHECK constraints of a column: `status IN (...)` reads back as
# `CHECK ((status = ANY (ARRAY['open'::text, ...])))`.
CHECKS = text("""
SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
WHERE c.contype = 'c' AND cardinality(c.conkey) = 1
  AND c.conrelid = CAST(:table_name AS regclass) AND a.attname = :column_name
""")


def allowed_by_check(conn, table_name: str, column_name: str) -> set[str]:
    definitions = conn.execute(
        CHECKS, {"table_name": table_name, "column_name": column_name}
    ).scalars()
    lists = [d for d in definitions if "= ANY (ARRAY[" in d]
    assert len(lists) == 1, f"{table_name}.{column_name}: one IN (...) CHECK, found {lists}"
    return set(re.findall(r"'([^']*)'::", lists[0]))


def test_every_status_column_is_checked_with_its_enums_values(engine):
    with engine.connect() as conn:
        found = {column: allowed_by_check(conn, *column) for column in statuses.COLUMNS}
    assert found == {column: {*enum} for column, enum in statuses.COLUMNS.items()}


def test_an_unknown_message_status_is_refused(engine, db):
    org_id = db(new_org)
    with pytest.raises(IntegrityError, match="messages_status_known"), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (message_id, org_id, to_number, body, segments, encoding, "
                "price_cents, status) VALUES ('m1', :org_id, '+15005550010', 'hi', 1, 'GSM-7', "
                "1, 'lost')"
            ),
            {"org_id": org_id},
        )
