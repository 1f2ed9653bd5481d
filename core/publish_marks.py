"""Marks of outbox rows this process has published, written in batches off the request path.

A webhook request commits its event with an outbox row, publishes the task, and answers. Marking
the row published used to be a second transaction inside the request: a commit per webhook
that only tells the relay "no need". Here the request hands the row's id to a background
thread, which marks everything handed to it in one statement every `interval` seconds.

Nothing can be lost or done twice by this: a mark that never lands (a crash, the database away)
only lets the outbox relay publish the task again after OUTBOX_GRACE_SECONDS, and processing is
idempotent. The interval is kept well below that grace so that, normally, the relay finds
nothing to do.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine

from core import outbox
from core.db import run_in_transaction

log = logging.getLogger(__name__)


class PublishMarks:
    def __init__(self, engine: Engine, *, interval: float = 0.1) -> None:
        self._engine = engine
        self._interval = interval
        self._pending: list[tuple[int, float]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def add(self, outbox_ids: list[int]) -> None:
        """Mark these rows published soon. Never raises and never waits for the database."""
        with self._lock:
            if self._closed:
                return  # shutting down: the relay covers what is not marked
            now = time.time()  # the moment of the publish, recorded as such
            self._pending.extend((outbox_id, now) for outbox_id in outbox_ids)
            if self._thread is None:
                # Started at first use, not at construction: gunicorn may fork after the app
                # is built, and a thread does not survive a fork.
                self._thread = threading.Thread(
                    target=self._run, name="payguard-publish-marks", daemon=True
                )
                self._thread.start()

    def flush(self) -> int:
        """Mark what is pending now, in one statement; the number of rows handed over."""
        with self._lock:
            marks, self._pending = self._pending, []
        if not marks:
            return 0
        try:
            run_in_transaction(
                self._engine,
                lambda conn: outbox.mark_published(
                    conn, [i for i, _ in marks], at=[t for _, t in marks], durable=False
                ),
            )
        except Exception as exc:
            log.warning(
                "publish marks left to the relay",
                extra={"rows": len(marks), "error": str(exc)[:200]},
            )
        return len(marks)

    def close(self) -> None:
        """Mark what is pending and stop the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        while not self._wake.wait(self._interval):
            self.flush()
