"""A real HTTP server on 127.0.0.1 that fakes the part of Twilio's REST API Payguard uses.

Point the gateway at it with TWILIO_API_BASE=fake.base_url. Routes:

* ``"messages"``: ``POST /2010-04-01/Accounts/{sid}/Messages.json`` (Messages.create)
* ``"account"``:  ``POST /2010-04-01/Accounts/{sid}.json`` with ``Status=suspended|active|closed``
  (and ``GET`` of the same path, answering the account's current status)

Usage::

    with FakeTwilio() as fake:
        fake.script("messages", [429, 201, "timeout", 500])  # one behaviour per request
        gateway = TwilioGateway(ACCOUNT_SID, TOKEN, api_base=fake.base_url, timeout=(0.5, 0.5))
        ...
        assert fake.message_count(SUBACCOUNT_SID) == 4

A behaviour is consumed by one request, first in first out; when a route's queue is empty
the route's default (``set_default``, normally plain success) answers. Behaviours:

* ``200``/``201``: success, a body shaped like Twilio's (a new ``SM`` + 32 hex sid, status
  ``queued``, or ``accepted`` for a Messaging Service sender);
* any other ``int``: that status with Twilio's error JSON ``{code, message, more_info,
  status}`` (429 carries code 20429, 500 code 20500, ...);
* ``"timeout"``: read the request, create the message, then answer only after
  ``hang_seconds`` (longer than any client read timeout in the tests): "it may have been sent";
* ``"drop"``: read the request, create the message, close the connection without answering;
* ``Reply(status, body=..., code=..., message=..., delay=...)`` for anything more specific
  (``body`` is merged into a success body, or replaces an error body).

Every request is recorded (method, path, route, account SID, form params, basic auth)
thread-safely, whatever it was answered; ``message_count`` counts the Messages POSTs a
subaccount received, which is what a "never sent twice" test wants. The server is a
ThreadingHTTPServer with a deep listen backlog, so hundreds of concurrent senders are fine.

Like Twilio, a message sent on a subaccount this fake has seen suspended is refused
(401, code 10001 "Account is not active"), and invalid sends get Twilio's 400 codes
(21604 no To, 21603 no sender, 21602 no Body, 21211 To not E.164). With ``credentials=``
set, a request with other basic-auth credentials is answered 401, code 20003.

Concurrency: ``peak_concurrency(account_sid)`` is the most Messages.create requests one
account had in flight at once; with ``concurrency_limit=N`` a create beyond N in flight for
its account is answered 429 (code 20429), as Twilio does. ``keep_alive=True`` keeps
connections open between requests (a pooled client's case; the default closes each one).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from core.sms import count_segments

MESSAGES = "messages"
ACCOUNT = "account"
ROUTES = (MESSAGES, ACCOUNT)
_ROUTE_ALIASES = {"accounts": ACCOUNT, "message": MESSAGES}

_MESSAGES_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-fA-F]{32})/Messages\.json")
_ACCOUNT_PATH = re.compile(r"/2010-04-01/Accounts/(AC[0-9a-fA-F]{32})\.json")
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")

# Twilio's error code and message for each status the tests script by number.
_DEFAULT_ERRORS = {
    400: (21211, "The 'To' number is not a valid phone number."),
    401: (20003, "Authenticate"),
    403: (20403, "Forbidden"),
    404: (20404, "The requested resource was not found"),
    429: (20429, "Too Many Requests"),
    500: (20500, "An internal server error has occurred"),
    502: (20502, "Bad Gateway"),
    503: (20503, "Service Unavailable"),
}


@dataclass(frozen=True)
class Reply:
    """A scripted answer. ``status`` 200/201 means success; ``delay`` seconds are waited
    after reading the request (interrupted when the fake closes)."""

    status: int
    body: Mapping[str, Any] | None = None
    code: int | None = None
    message: str | None = None
    delay: float = 0.0


Behaviour = int | str | Reply


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    seq: int
    method: str
    path: str
    route: str | None
    account_sid: str | None
    params: dict[str, str]
    auth: tuple[str, str] | None
    headers: dict[str, str]
    behaviour: str
    received_at: float = field(default_factory=time.monotonic)


def _normalise_route(route: str) -> str:
    route = _ROUTE_ALIASES.get(route, route)
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    return route


def _check_behaviour(b: Behaviour) -> Behaviour:
    if isinstance(b, bool) or not isinstance(b, int | str | Reply):
        raise TypeError(f"behaviour must be an int, 'timeout', 'drop' or a Reply: {b!r}")
    if isinstance(b, str) and b not in ("timeout", "drop"):
        raise ValueError(f"unknown behaviour {b!r}")
    return b


def _twilio_date(now: datetime) -> str:
    return now.strftime("%a, %d %b %Y %H:%M:%S +0000")


def error_body(status: int, code: int | None = None, message: str | None = None) -> dict:
    """Twilio's error JSON for a status (default code/message per status)."""
    default_code, default_message = _DEFAULT_ERRORS.get(status, (status, "Error"))
    code = default_code if code is None else code
    return {
        "code": code,
        "message": message or default_message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # listen backlog: hundreds of concurrent connects must not drop
    fake: FakeTwilio

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (read timeout) makes our late write fail: expected, quiet.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY the second waits for the
    # client's delayed ACK of the first (40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True
    server: _Server
    timeout = 30  # a stuck client must not hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.fake._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.fake._handle(self, "POST")

    def send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.server.fake._answered(self)  # before the client can read it and call again
        keep = self.server.fake.keep_alive and not self.server.fake._stopping.is_set()
        self.close_connection = not keep
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "keep-alive" if keep else "close")
            self.send_header("Twilio-Request-Id", "RQ" + secrets.token_hex(16))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            pass  # the client already went away


class FakeTwilio:
    """The fake server: a context manager, started on enter and stopped on exit.

    :param credentials: (account_sid, auth_token) to require; None accepts any auth.
    :param hang_seconds: how long a ``"timeout"`` behaviour withholds its answer.
    """

    def __init__(
        self,
        *,
        credentials: tuple[str, str] | None = None,
        hang_seconds: float = 5.0,
        host: str = "127.0.0.1",
        concurrency_limit: int | None = None,
        keep_alive: bool = False,
    ):
        self.credentials = credentials
        self.hang_seconds = hang_seconds
        self.concurrency_limit = concurrency_limit
        self.keep_alive = keep_alive
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._peak: collections.Counter[str] = collections.Counter()
        self._host = host
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._scripts: dict[tuple[str, str | None], collections.deque[Behaviour]] = {}
        self._defaults: dict[str, Behaviour] = {MESSAGES: 201, ACCOUNT: 200}
        self._requests: list[RecordedRequest] = []
        self._messages: list[dict[str, Any]] = []
        self._account_status: dict[str, str] = {}
        self._auth_tokens: dict[str, str] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakeTwilio:
        """Bind a random port on 127.0.0.1 and serve from a daemon thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self._host, 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.name = f"fake-twilio-{self.port}"
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; hanging ``"timeout"`` answers are released at once."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeTwilio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the fake is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """What to use as TWILIO_API_BASE, e.g. ``http://127.0.0.1:53127``."""
        return f"http://{self._host}:{self.port}"

    # --- scripting ----------------------------------------------------------------------

    def script(
        self, route: str, behaviours: Iterable[Behaviour], account_sid: str | None = None
    ) -> None:
        """Queue behaviours for the next requests on a route (optionally one subaccount's
        requests only; those queues are consulted first)."""
        key = (_normalise_route(route), account_sid)
        items = [_check_behaviour(b) for b in behaviours]
        with self._lock:
            self._scripts.setdefault(key, collections.deque()).extend(items)

    def set_default(self, route: str, behaviour: Behaviour) -> None:
        """What a route answers once its queue is empty (initially success)."""
        route = _normalise_route(route)
        with self._lock:
            self._defaults[route] = _check_behaviour(behaviour)

    def pending(self, route: str, account_sid: str | None = None) -> int:
        """How many scripted behaviours are still queued."""
        with self._lock:
            return len(self._scripts.get((_normalise_route(route), account_sid), ()))

    def reset(self) -> None:
        """Forget scripts, defaults, recorded requests, messages and account states."""
        with self._lock:
            self._scripts.clear()
            self._defaults = {MESSAGES: 201, ACCOUNT: 200}
            self._requests.clear()
            self._messages.clear()
            self._account_status.clear()
            self._auth_tokens.clear()
            self._peak.clear()

    # --- inspection ---------------------------------------------------------------------

    def requests(
        self, route: str | None = None, account_sid: str | None = None
    ) -> list[RecordedRequest]:
        """A snapshot of recorded requests, oldest first, optionally filtered."""
        route = _normalise_route(route) if route else None
        with self._lock:
            return [
                r
                for r in self._requests
                if (route is None or r.route == route)
                and (account_sid is None or r.account_sid == account_sid)
            ]

    def message_count(self, account_sid: str | None = None) -> int:
        """Messages.create requests received (however they were answered)."""
        return sum(1 for r in self.requests(MESSAGES, account_sid) if r.method == "POST")

    def messages(self, account_sid: str | None = None) -> list[dict[str, Any]]:
        """Message resources the fake created (success, ``"timeout"`` and ``"drop"``)."""
        with self._lock:
            return [
                dict(m)
                for m in self._messages
                if account_sid is None or m["account_sid"] == account_sid
            ]

    def peak_concurrency(self, account_sid: str) -> int:
        """The most Messages.create requests this account had in flight at once."""
        with self._lock:
            return self._peak[account_sid]

    def account_status(self, account_sid: str) -> str:
        """The subaccount's status as this fake knows it (``active`` until changed)."""
        with self._lock:
            return self._account_status.get(account_sid, "active")

    def set_account_status(self, account_sid: str, status: str) -> None:
        """Change a subaccount's status directly, as if done in Twilio's console."""
        with self._lock:
            self._account_status[account_sid] = status

    def set_auth_token(self, account_sid: str, token: str) -> None:
        """The auth token the account resource reports for this subaccount (default 32 zeros),
        so tests can give each subaccount a token of its own."""
        with self._lock:
            self._auth_tokens[account_sid] = token

    # --- the server side ----------------------------------------------------------------

    def _handle(self, handler: _Handler, method: str) -> None:
        path = urlsplit(handler.path).path
        m = _MESSAGES_PATH.fullmatch(path)
        if method != "POST" or m is None:
            return self._answer(handler, method, path)
        account = m.group(1)
        handler.in_flight_account = account  # type: ignore[attr-defined]
        with self._lock:
            self._in_flight[account] += 1
            over = (
                self.concurrency_limit is not None
                and self._in_flight[account] > self.concurrency_limit
            )
            self._peak[account] = max(self._peak[account], self._in_flight[account])
        try:
            return self._answer(handler, method, path, over_limit=over)
        finally:
            self._answered(handler)

    def _answered(self, handler: _Handler) -> None:
        """The request of `handler` is no longer in flight (counted once)."""
        account = getattr(handler, "in_flight_account", None)
        if account is not None:
            handler.in_flight_account = None  # type: ignore[attr-defined]
            with self._lock:
                self._in_flight[account] -= 1

    def _answer(  # noqa: C901 (one fake endpoint table, read top to bottom)
        self, handler: _Handler, method: str, path: str, *, over_limit: bool = False
    ) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length).decode("utf-8", "replace") if length else ""
        params = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        auth = _basic_auth(handler.headers.get("Authorization"))

        route, account_sid = None, None
        if m := _MESSAGES_PATH.fullmatch(path):
            route, account_sid = MESSAGES, m.group(1)
        elif m := _ACCOUNT_PATH.fullmatch(path):
            route, account_sid = ACCOUNT, m.group(1)

        authorised = self.credentials is None or auth == self.credentials
        with self._lock:
            if not authorised:
                behaviour: Behaviour = 401  # a refused request consumes no scripted behaviour
            elif route is None:
                behaviour = 404
            elif over_limit:
                behaviour = 429  # too many in flight: consumes no scripted behaviour
            else:
                behaviour = self._next_behaviour(route, account_sid)
            self._requests.append(
                RecordedRequest(
                    seq=len(self._requests),
                    method=method,
                    path=path,
                    route=route,
                    account_sid=account_sid,
                    params=params,
                    auth=auth,
                    headers={k: v for k, v in handler.headers.items()},
                    behaviour=repr(behaviour),
                )
            )

        if not authorised:
            return handler.send_json(401, error_body(401))
        if route is None or (route == MESSAGES and method != "POST"):
            return handler.send_json(404, error_body(404))

        reply = behaviour if isinstance(behaviour, Reply) else None
        status = reply.status if reply else behaviour
        if reply and reply.delay:
            self._stopping.wait(reply.delay)

        if isinstance(status, int) and status not in (200, 201):
            body = dict(reply.body) if reply and reply.body else None
            code, message = (reply.code, reply.message) if reply else (None, None)
            return handler.send_json(status, body or error_body(status, code, message))

        assert account_sid is not None
        extra = dict(reply.body) if reply and reply.body else {}
        if route == MESSAGES:
            answer_status, payload = self._create_message(account_sid, params, extra)
        else:
            answer_status, payload = self._account(method, account_sid, params, extra)

        if status == "drop" and answer_status < 300:
            handler.close_connection = True  # closes without an answer
            return
        if status == "timeout" and answer_status < 300:
            self._stopping.wait(self.hang_seconds)
        return handler.send_json(answer_status, payload)

    def _next_behaviour(self, route: str, account_sid: str | None) -> Behaviour:
        # Called with the lock held.
        for key in ((route, account_sid), (route, None)):
            queue = self._scripts.get(key)
            if queue:
                return queue.popleft()
        return self._defaults[route]

    def _create_message(
        self, account_sid: str, params: dict[str, str], extra: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        to, body = params.get("To"), params.get("Body")
        sender, service = params.get("From"), params.get("MessagingServiceSid")
        if self.account_status(account_sid) != "active":
            return 401, error_body(401, 10001, "Account is not active")
        if not to:
            return 400, error_body(400, 21604, "A 'To' phone number is required.")
        if not _E164.fullmatch(to):
            return 400, error_body(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not sender and not service:
            return 400, error_body(
                400, 21603, "A 'From' phone number or a Messaging Service SID is required."
            )
        if not body:
            return 400, error_body(400, 21602, "Message body is required.")
        sid = "SM" + secrets.token_hex(16)
        now = _twilio_date(datetime.now(UTC))
        uri = f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json"
        message: dict[str, Any] = {
            "account_sid": account_sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender,
            "messaging_service_sid": service,
            "num_media": "0",
            "num_segments": str(count_segments(body)[0]),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service and not sender else "queued",
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
            "to": to,
            "uri": uri,
            "status_callback": params.get("StatusCallback"),
        }
        message.update(extra)
        with self._lock:
            self._messages.append(message)
        return 201, message

    def _account(
        self, method: str, account_sid: str, params: dict[str, str], extra: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        with self._lock:
            current = self._account_status.get(account_sid, "active")
            if method == "POST" and "Status" in params:
                wanted = params["Status"]
                if wanted not in ("active", "suspended", "closed"):
                    return 400, error_body(400, 20001, f"Invalid Status: {wanted}")
                if current == "closed" and wanted != "closed":
                    return 400, error_body(400, 20001, "A closed account cannot be reopened")
                self._account_status[account_sid] = current = wanted
        now = _twilio_date(datetime.now(UTC))
        payload = {
            "auth_token": self._auth_tokens.get(account_sid, "0" * 32),
            "date_created": now,
            "date_updated": now,
            "friendly_name": params.get("FriendlyName", f"Subaccount {account_sid}"),
            "owner_account_sid": self.credentials[0] if self.credentials else None,
            "sid": account_sid,
            "status": current,
            "subresource_uris": {},
            "type": "Full",
            "uri": f"/2010-04-01/Accounts/{account_sid}.json",
        }
        payload.update(extra)
        return 200, payload


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


def unused_port() -> int:
    """A local port nothing listens on (for "connection refused" tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def signed_status_callback(
    auth_token: str, url: str, params: Mapping[str, str]
) -> tuple[dict[str, str], str]:
    """Sign a status callback the way Twilio does: (params, X-Twilio-Signature value).

    HMAC-SHA1 keyed with the auth token over the full URL followed by each parameter name
    and value, sorted by name, base64-encoded. Written independently of the twilio library
    so a test of the validator does not check the library against itself.
    """
    payload = url + "".join(f"{k}{params[k]}" for k in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return dict(params), base64.b64encode(digest).decode()


def status_callback_params(
    message_sid: str,
    status: str,
    account_sid: str,
    to: str = "+15005550006",
    sender: str = "+15005550001",
    error_code: str | None = None,
) -> dict[str, str]:
    """The form fields of a Twilio message status callback."""
    params = {
        "AccountSid": account_sid,
        "ApiVersion": "2010-04-01",
        "From": sender,
        "MessageSid": message_sid,
        "MessageStatus": status,
        "SmsSid": message_sid,
        "SmsStatus": status,
        "To": to,
    }
    if error_code is not None:
        params["ErrorCode"] = error_code
    return params
