"""A tiny Stripe on 127.0.0.1: subscriptions to read and Checkout Sessions to create, so
tests of the stripe package's calls never reach the internet.

* ``GET /v1/subscriptions/{id}``: the ``subscriptions`` dict's status, 404 for an id it does
  not hold.
* ``POST /v1/checkout/sessions``: a session (``cs_test_…``) with a ``url``; the same
  ``Idempotency-Key`` answers the first answer (as Stripe does). ``fail_create`` forces an
  answer (e.g. ``(400, {"error": …})``), ``create_delay`` delays every create.

Any key but ``api_key`` gets 401. ``requests`` logs what it saw.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

STRIPE_KEY = "sk_test_payguard_fake_0123456789"


class FakeStripe:
    def __init__(self, api_key: str = STRIPE_KEY) -> None:
        self.api_key = api_key
        self.subscriptions: dict[str, str] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.create_requests = 0
        self.fail_create: tuple[int, dict[str, Any]] | None = None
        self.create_delay = 0.0
        self._answers: dict[str, tuple[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, dict(self.headers)))
                self._answer(*fake.answer(self.path, self.headers.get("Authorization", "")))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                fake.requests.append(("POST", self.path, dict(self.headers)))
                if self.path != "/v1/checkout/sessions":
                    self._answer(404, {"error": {"type": "invalid_request_error"}})
                    return
                self._answer(
                    *fake.create_session(
                        self.headers.get("Authorization", ""),
                        self.headers.get("Idempotency-Key"),
                        dict(parse_qsl(body, keep_blank_values=True)),
                    )
                )

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Request-Id", f"req_{uuid.uuid4().hex[:14]}")
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (a timeout test)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _unauthorized(self, authorization: str) -> tuple[int, dict[str, Any]] | None:
        if authorization != f"Bearer {self.api_key}":
            return 401, {
                "error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}
            }
        return None

    def answer(self, path: str, authorization: str) -> tuple[int, dict[str, Any]]:
        refused = self._unauthorized(authorization)
        if refused:
            return refused
        prefix = "/v1/subscriptions/"
        sub_id = path.removeprefix(prefix) if path.startswith(prefix) else None
        if sub_id not in self.subscriptions:
            return 404, {
                "error": {
                    "type": "invalid_request_error",
                    "code": "resource_missing",
                    "param": "id",
                    "message": f"No such subscription: '{sub_id}'",
                }
            }
        return 200, {
            "id": sub_id,
            "object": "subscription",
            "status": self.subscriptions[sub_id],
            "metadata": {},
        }

    def create_session(
        self, authorization: str, idempotency_key: str | None, form: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.create_requests += 1
        if self.create_delay:
            time.sleep(self.create_delay)
        refused = self._unauthorized(authorization)
        if refused:
            return refused
        if self.fail_create is not None:
            return self.fail_create
        with self._lock:
            if idempotency_key and idempotency_key in self._answers:
                return self._answers[idempotency_key]
            session_id = "cs_test_" + uuid.uuid4().hex
            session = {
                "id": session_id,
                "object": "checkout.session",
                "mode": form.get("mode"),
                "client_reference_id": form.get("client_reference_id"),
                "currency": form.get("line_items[0][price_data][currency]"),
                "amount_total": int(form.get("line_items[0][price_data][unit_amount]") or 0),
                "success_url": form.get("success_url"),
                "cancel_url": form.get("cancel_url"),
                "payment_status": "unpaid",
                "status": "open",
                "url": f"https://checkout.stripe.com/c/pay/{session_id}",
                "form": form,
            }
            self.sessions[session_id] = session
            answer = (200, {k: v for k, v in session.items() if k != "form"})
            if idempotency_key:
                self._answers[idempotency_key] = answer
            return answer

    def asked(self) -> list[str]:
        return [path for _, path, _ in self.requests]

    def __enter__(self) -> FakeStripe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
