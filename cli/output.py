"""How the console prints: one JSON object for machines, `key: value` lines and tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO


def emit_json(payload: Mapping[str, Any], stream: TextIO | None = None) -> None:
    """Exactly one JSON object on one line, so `payguard … --json | jq` always works."""
    print(json.dumps(payload, default=str), file=stream or sys.stdout)


def render(payload: Mapping[str, Any], columns: Mapping[str, Sequence[str]] | None = None) -> str:
    """A readable form of a command's result.

    Scalars become aligned `key: value` lines, nested objects an indented block, and lists
    of objects a table (restricted to `columns[key]` when given, so wide rows stay legible).
    """
    columns = columns or {}
    scalars = {k: v for k, v in payload.items() if not _is_block(v)}
    blocks = {k: v for k, v in payload.items() if _is_block(v)}
    lines = _key_values(scalars)
    for key, value in blocks.items():
        lines.append("")
        if isinstance(value, Mapping):
            lines.append(f"{key}:")
            lines += [f"  {line}".rstrip() for line in render(value, columns).splitlines()]
        else:
            lines.append(f"{key}:")
            lines += _table(value, columns.get(key))
    return "\n".join(lines)


def _is_block(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    return isinstance(value, list) and bool(value) and isinstance(value[0], Mapping)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value) or "(none)"
    return str(value)


def _key_values(items: Mapping[str, Any]) -> list[str]:
    if not items:
        return []
    width = max(len(k) for k in items) + 1
    return [f"{k + ':':<{width}} {_cell(v)}" for k, v in items.items()]


def _table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None) -> list[str]:
    keys = list(keys or rows[0].keys())
    cells = [[_cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(r[i]) for r in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return lines
