"""A host's webhook endpoint on 127.0.0.1 that records every delivery and fails on command.

    with HookEndpoint() as hook:
        hook.script([500, 500])      # the next two requests answer 500, then 200 again
        hook.script(["hang"])        # hold the next request open until `release()`
        hook.script(["trickle"])     # answer one byte every half second (a slow-loris)
        ... hook.requests            # each: headers (lower-cased), body bytes, time

Use it with OUTBOUND_ALLOW_PRIVATE=1 (it is on loopback, over http)."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int | str


class HookEndpoint:
    def __init__(self, default: int = 200) -> None:
        self.default = default
        self.requests: list[Received] = []
        self._script: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._released = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook._lock:
                    what = hook._script.popleft() if hook._script else hook.default
                    hook.requests.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.monotonic(),
                            what,
                        )
                    )
                if what == "trickle":  # one byte of an answer every half second, for a minute
                    try:
                        for byte in b"HTTP/1.1 200 OK\r\n" * 8:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            if hook._released.wait(0.5):
                                break
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                if what == "hang":
                    hook._released.wait(120)
                    self.close_connection = True
                    return
                self.send_response(int(what))
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    def script(self, behaviours: list) -> None:
        with self._lock:
            self._script.extend(behaviours)

    def release(self) -> None:
        self._released.set()

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def __enter__(self) -> HookEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
