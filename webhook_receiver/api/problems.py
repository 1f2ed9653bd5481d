"""Errors of `/v1` as RFC 9457 problem documents (`application/problem+json`)."""

from __future__ import annotations

import json
from typing import Any

from flask import Response

TYPE_BASE = "urn:payguard:problem:"
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}


class Problem(Exception):
    """An answer other than success: raised anywhere under a route, rendered once."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or TITLES.get(status, "error").lower().replace(" ", "-")
        self.headers = headers or {}
        self.extensions = extensions

    def as_dict(self) -> dict:
        return {
            "type": TYPE_BASE + self.kind,
            "title": TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
            **self.extensions,
        }

    def response(self) -> Response:
        response = Response(
            json.dumps(self.as_dict()), status=self.status, mimetype="application/problem+json"
        )
        for name, value in self.headers.items():
            response.headers[name] = value
        return response


def invalid(errors: list[dict[str, str]], detail: str = "the request is not valid") -> Problem:
    """422 with `errors`: each `{field, message}`, field a JSON Pointer into the body."""
    return Problem(422, detail, kind="validation", errors=errors)


def pointer(location: tuple[Any, ...]) -> str:
    """A JSON Pointer (RFC 6901) to a pydantic error location."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in location)
