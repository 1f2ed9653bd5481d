"""The OpenAPI 3.1 document of `/v1`, generated from the route declarations and the very
pydantic models that validate requests (OpenAPI 3.1 schemas are JSON Schema 2020-12, which
is what pydantic writes)."""

from __future__ import annotations

import re
from functools import cache

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from webhook_receiver.api import schemas
from webhook_receiver.api.problems import TITLES
from webhook_receiver.api.registry import ENDPOINTS, PREFIX

REF = "#/components/schemas/{model}"
ERRORS_BY_SCOPE = (400, 401, 403, 404, 409, 413, 422, 429, 503)


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


@cache
def document() -> dict:
    """The document of every endpoint declared (the package declares them all on import)."""
    requests = {ep.body for ep in ENDPOINTS if ep.body}
    answers = {m for ep in ENDPOINTS for m in ep.answers.values() if m} | {schemas.Problem}
    _, top = models_json_schema(
        [(m, "validation") for m in sorted(requests, key=lambda m: m.__name__)]
        + [(m, "serialization") for m in sorted(answers, key=lambda m: m.__name__)],
        ref_template=REF,
    )
    problem = {
        "content": {"application/problem+json": {"schema": _ref(schemas.Problem)}},
    }
    paths: dict[str, dict] = {}
    for ep in ENDPOINTS:
        op: dict = {"operationId": ep.name, "summary": ep.summary, "responses": {}}
        params = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": ep.path_patterns.get(name, "^[^/]+$")},
            }
            for name in re.findall(r"\{(\w+)\}", ep.path)
        ]
        if ep.query:
            query = ep.query.model_json_schema()
            for name, schema in query.get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": False, "schema": schema})
        if ep.idempotency_header:
            params.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string", "pattern": schemas.IDEMPOTENCY_KEY_PATTERN},
                }
            )
        if params:
            op["parameters"] = params
        if ep.body:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(ep.body)}},
            }
        for status, model in ep.answers.items():
            answer: dict = {"description": "success"}
            answer["content"] = {
                "application/json": {"schema": _ref(model) if model else {"type": "object"}}
            }
            op["responses"][str(status)] = answer
        if ep.scope is not None:
            op["security"] = [{"apiKey": []}]
            op["description"] = f"Needs a key of scope `{ep.scope}` or wider."
            for status in ERRORS_BY_SCOPE:
                if status == 413 and not ep.body:
                    continue
                op["responses"][str(status)] = {"description": TITLES[status], **problem}
        else:
            op["security"] = []
        paths.setdefault(PREFIX + ep.path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Payguard host API",
            "version": "1",
            "description": "What a host application drives Payguard with: organizations, "
            "wallets, campaigns and messages. Errors are RFC 9457 problem documents.",
        },
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a secret from `payguard apikey create`",
                }
            },
        },
    }
