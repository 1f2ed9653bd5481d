"""Logging for every process: one JSON object a line in production, readable text in the dev
stack. Context (provider event id, organization, message, task) travels as `extra=` fields, so
one payment can be followed from request to ledger by grepping one id."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came from `extra=` and is context.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

_context_providers: list[Callable[[], dict[str, Any]]] = []


def add_context_provider(provider: Callable[[], dict[str, Any]]) -> None:
    """Register a function whose dict is added to every record (e.g. the current task id)."""
    _context_providers.append(provider)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    for provider in _context_providers:
        try:
            for k, v in provider().items():
                fields.setdefault(k, v)
        except Exception:  # context is a nicety; never lose the log line over it
            pass
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _context(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure(fmt: str = "json", level: str | int = "INFO") -> None:
    """`level` as logging takes it: a name ("INFO") or a number (20)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
