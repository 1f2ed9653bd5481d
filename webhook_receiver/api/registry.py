"""How a `/v1` route is declared, and what happens around every one of them.

    @endpoint("GET", "/organizations/{org_id}/can-send", scope="read", answers={200: CanSend})
    def can_send(call: Call, org_id: str) -> Reply: ...

Before the function runs: the key is authenticated (401), its scope checked (403), its rate
counted (429), the body read within its cap (413) and parsed (400), then validated against
the route's pydantic model with the query (422). The function gets a `Call`, and whatever
core raises is mapped to a problem document in one place (`_problem_of`). The same
declarations produce the OpenAPI document (openapi.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from flask import Blueprint, Flask, Response, current_app, g, request
from pydantic import BaseModel, ValidationError
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from core.apikeys import ApiKey
from core.db import driver_autocommit, run_in_transaction
from core.errors import Conflict, InvalidInput, NotFound, PayguardError, Refused
from core.providers.apis import build_top_up_apis
from core.sending import Policy
from webhook_receiver.api import access
from webhook_receiver.api.problems import Problem, invalid, pointer
from webhook_receiver.api.schemas import IDEMPOTENCY_KEY_PATTERN, ORG_ID_PATTERN

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "/v1"
MAX_BODY = 1024 * 1024
blueprint = Blueprint("api", __name__, url_prefix=PREFIX)
_ORG_ID = re.compile(ORG_ID_PATTERN)
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)

Reply = tuple[int, dict] | tuple[int, dict, dict[str, str]] | Response


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str  # OpenAPI form: /organizations/{org_id}
    summary: str
    scope: str | None
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    answers: dict[int, type[BaseModel] | None]
    idempotency_header: bool
    max_body: int
    path_patterns: dict[str, str]


ENDPOINTS: list[Endpoint] = []


@dataclass
class Api:
    """Per-process state of `/v1`, kept in app.extensions["payguard_api"]."""

    keys: access.KeyCache
    limiter: access.RateLimiter
    policy: Policy
    top_up_apis: dict[str, Any] = field(default_factory=dict)  # core.topup_api, by provider


@dataclass
class Call:
    """One authenticated, validated request, as a route function sees it."""

    key: ApiKey
    body: Any
    query: Any
    document: Any  # the body as parsed JSON: what idempotency compares
    receiver: Any
    policy: Policy
    extra: dict = field(default_factory=dict)

    @property
    def settings(self) -> Any:
        return self.receiver.settings

    def top_up_api(self, provider: str) -> Any:
        return current_app.extensions["payguard_api"].top_up_apis.get(provider)

    @property
    def actor(self) -> str:
        """Who writes, in audit rows: the key, never a person's name."""
        return f"api:{self.key.key_id}"

    def org(self, org_id: str) -> str:
        """The organization, if this key may see it; others do not exist for it (404)."""
        if not _ORG_ID.fullmatch(org_id) or not self.key.reaches(org_id):
            raise Problem(404, f"unknown organization {org_id!r}", kind="not-found")
        return org_id

    def spanning_organizations(self) -> None:
        """Routes that span organizations are not for a key confined to one."""
        if self.key.org_id is not None:
            raise Problem(403, "this key is confined to one organization", kind="forbidden")

    def idempotency_key(self) -> str:
        value = request.headers.get("Idempotency-Key")
        if value is None:
            raise Problem(400, "an Idempotency-Key header is required", kind="idempotency-key")
        if not _IDEMPOTENCY_KEY.fullmatch(value):
            raise Problem(
                400, "Idempotency-Key must be 1-200 printable ASCII characters",
                kind="idempotency-key",
            )  # fmt: skip
        return value

    def transaction(self, fn: Callable[[Connection], T]) -> T:
        return run_in_transaction(self.receiver.engine, fn)

    def read(self, fn: Callable[[Connection], T]) -> T:
        """A read of several statements, from one snapshot (rolled back at the end)."""
        with self.receiver.engine.connect() as conn:
            return fn(conn)

    def read_one(self, fn: Callable[[Connection], T]) -> T:
        """A read of one statement, in autocommit: no BEGIN and no ROLLBACK around it, so a
        hot read such as can-send costs a single database round trip."""
        with self.receiver.engine.connect() as conn:
            return fn(conn.execution_options(isolation_level="AUTOCOMMIT"))

    def read_on_driver(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """A read of one statement on psycopg's own connection, in autocommit: one round trip
        and none of SQLAlchemy's CPU around it, for the hottest read (can-send)."""
        with driver_autocommit(self.receiver.engine) as conn:
            return fn(conn)


def endpoint(
    method: str,
    path: str,
    *,
    summary: str,
    scope: str | None,
    answers: dict[int, type[BaseModel] | None],
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    idempotency_header: bool = False,
    max_body: int = MAX_BODY,
    path_patterns: dict[str, str] | None = None,
) -> Callable[[Callable[..., Reply]], Callable[..., Reply]]:
    def register(fn: Callable[..., Reply]) -> Callable[..., Reply]:
        ep = Endpoint(
            fn.__name__, method, path, summary, scope, body, query, answers,
            idempotency_header, max_body, path_patterns or {},
        )  # fmt: skip
        ENDPOINTS.append(ep)

        def view(**path_params: str) -> Response:
            return _handle(ep, fn, path_params)

        flask_path = re.sub(r"\{(\w+)\}", r"<\1>", path)
        blueprint.add_url_rule(flask_path, ep.name, view, methods=[method])
        return fn

    return register


def _api() -> Api:
    return current_app.extensions["payguard_api"]


def _handle(ep: Endpoint, fn: Callable[..., Reply], path_params: dict[str, str]) -> Response:
    try:
        call = _prepare(ep)
        reply = fn(call, **path_params)
    except Problem as problem:
        return problem.response()
    except Exception as exc:
        return _problem_of(exc).response()
    if isinstance(reply, Response):
        return reply
    status, body, *rest = reply
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    for name, value in (rest[0] if rest else {}).items():
        response.headers[name] = value
    return response


def _prepare(ep: Endpoint) -> Call:
    api = _api()
    receiver = current_app.extensions["payguard"]
    if ep.scope is None:  # the OpenAPI document: public
        return Call(None, None, None, None, receiver, api.policy)  # type: ignore[arg-type]
    try:
        key = api.keys.authenticate(request.headers.get("Authorization"))
    except access.Unauthenticated as exc:
        raise Problem(
            401, str(exc), kind="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="v1"'}
        ) from None
    g.api_key_id = key.key_id
    if not key.allows(ep.scope):
        raise Problem(403, f"this route needs a key of scope {ep.scope!r}", kind="scope")
    verdict = api.limiter.check(key.key_id)
    if not verdict.allowed:
        raise Problem(
            429,
            f"over {api.limiter.per_second} requests per second for this key",
            kind="rate-limited",
            headers={"Retry-After": str(verdict.retry_after)},
        )
    document = None
    body = None
    if ep.body is not None:
        document = _read_json(ep.max_body)
        body = _validate(ep.body, document)
    query = _validate(ep.query, request.args.to_dict(), query=True) if ep.query else None
    return Call(key, body, query, document, receiver, api.policy)


def _read_json(limit: int) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    request.max_content_length = limit + 1  # a chunked body is cut one byte past the cap
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise _too_large(limit) from None
    if len(raw) > limit:
        raise _too_large(limit)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise Problem(
            400, "the body is not well-formed JSON (UTF-8)", kind="malformed-json"
        ) from None


def _too_large(limit: int) -> Problem:
    return Problem(413, f"the body is over {limit // (1024 * 1024)} MiB", kind="too-large")


def _validate(model: type[BaseModel], data: Any, *, query: bool = False) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {
                "field": (".".join(str(p) for p in e["loc"]) if query else pointer(e["loc"])),
                "message": e["msg"],
            }
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise invalid(errors) from None


def _problem_of(exc: Exception) -> Problem:
    """Core's refusals and dependency failures as answers; anything else is a bug (500)."""
    if isinstance(exc, NotFound):
        return Problem(404, str(exc), kind="not-found")
    if isinstance(exc, InvalidInput):
        return invalid([{"field": "", "message": str(exc)}], str(exc))
    if isinstance(exc, (Refused, Conflict)):
        return Problem(409, str(exc), kind="conflict")
    if isinstance(exc, PayguardError):
        return Problem(409, str(exc), kind="refused")
    if isinstance(exc, (OperationalError, InterfaceError, psycopg.OperationalError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        log.warning("database unavailable", extra={"error": str(exc)[:200]})
        return Problem(
            503, "the database is unavailable", kind="unavailable", headers={"Retry-After": "1"}
        )
    log.exception("unexpected error in the API", extra={"path": request.path})
    return Problem(500, "internal error", kind="internal")


def install(app: Flask, receiver: Any) -> None:
    """Register `/v1` on the app: its routes (declared when the package is imported, see
    webhook_receiver/api/__init__.py), its per-process state and its 404/405s."""
    settings = receiver.settings
    app.extensions["payguard_api"] = Api(
        keys=access.KeyCache(receiver.engine),
        limiter=access.RateLimiter(settings.REDIS_URL or "", settings.API_RATE_LIMIT),
        policy=Policy.from_settings(settings),
        top_up_apis=build_top_up_apis(settings),
    )
    app.register_blueprint(blueprint)

    @app.errorhandler(HTTPException)
    def _v1_http_errors(exc: HTTPException) -> Any:
        # Unknown routes and methods under /v1 answer problem documents too; others as before.
        if not request.path.startswith(PREFIX + "/") and request.path != PREFIX:
            return exc
        headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
        return Problem(exc.code or 500, exc.description or "", headers=headers).response()

    @app.after_request
    def _log_api_request(response: Response) -> Response:
        if request.path.startswith(PREFIX + "/"):
            log.info(
                "api request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "key_id": g.get("api_key_id"),
                    "ms": round(
                        (time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 1
                    ),
                },
            )
        return response

    @app.before_request
    def _start_clock() -> None:
        g.started = time.perf_counter()
