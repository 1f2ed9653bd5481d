"""The OpenAPI 3.1 document of `/v1`: valid (openapi-spec-validator), generated from the
models that validate, and true of a running `web` (schemathesis fuzzes it: no 5xx, every
answer of a documented status, content type and schema)."""

from __future__ import annotations

import os

import pytest
import requests
from openapi_spec_validator import validate

from tests.stack import start_web
from tests.support.api import api_org, make_key
from tests.support.db import tx
from webhook_receiver.api import openapi, schemas
from webhook_receiver.api.registry import ENDPOINTS

# About 30 s on two busy CPUs; set more for a longer hunt (PAYGUARD_FUZZ_EXAMPLES=5000).
EXAMPLES = int(os.environ.get("PAYGUARD_FUZZ_EXAMPLES", "400"))
CONTRACT_ROUTES = {
    ("get", "/v1/openapi.json"),
    ("post", "/v1/organizations"),
    ("get", "/v1/organizations/{org_id}"),
    ("patch", "/v1/organizations/{org_id}"),
    ("get", "/v1/organizations/{org_id}/can-send"),
    ("get", "/v1/organizations/{org_id}/wallet"),
    ("get", "/v1/organizations/{org_id}/wallet/entries"),
    ("post", "/v1/organizations/{org_id}/campaigns"),
    ("get", "/v1/organizations/{org_id}/campaigns"),
    ("post", "/v1/organizations/{org_id}/campaigns/{campaign_id}/pause"),
    ("post", "/v1/organizations/{org_id}/campaigns/{campaign_id}/resume"),
    ("post", "/v1/messages"),
    ("post", "/v1/messages/batch"),
    ("get", "/v1/messages/{message_id}"),
    ("post", "/v1/organizations/{org_id}/top-ups"),
    ("get", "/v1/organizations/{org_id}/top-ups/{top_up_id}"),
    ("post", "/v1/webhook-endpoints"),
    ("get", "/v1/webhook-endpoints"),
    ("delete", "/v1/webhook-endpoints/{endpoint_id}"),
    ("post", "/v1/webhook-endpoints/{endpoint_id}/rotate-secret"),
    ("get", "/v1/events"),
}


def test_the_document_is_valid_openapi_3_1_and_lists_every_route():
    document = openapi.document()

    validate(document)
    assert document["openapi"].startswith("3.1")
    routes = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert routes == CONTRACT_ROUTES
    assert len(ENDPOINTS) == len(CONTRACT_ROUTES)  # none declared twice


def test_request_schemas_are_the_validating_models_own():
    components = openapi.document()["components"]["schemas"]

    for model in (schemas.MessageCreate, schemas.BatchCreate, schemas.OrganizationCreate):
        assert components[model.__name__]["additionalProperties"] is False
        assert set(components[model.__name__]["properties"]) == set(model.model_fields)
    batch = components["BatchCreate"]["properties"]["messages"]
    assert (batch["minItems"], batch["maxItems"]) == (1, schemas.MAX_BATCH)


@pytest.mark.slow
def test_fuzzing_a_running_web_finds_no_5xx_and_no_answer_outside_the_document(
    app_env, engine, tmp_path
):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    org = tx(engine, api_org, balance=1000)
    key = make_key(engine, "admin")
    auth = {"Authorization": f"Bearer {key}"}
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    with start_web(app_env, tmp_path, workers=2) as web:
        # Registering an endpoint resolves its host name: fuzzed names would be DNS queries
        # out of this machine. test_api_events.py and test_security_outbound.py cover it.
        schema = schemathesis.openapi.from_url(f"{web.url}/v1/openapi.json").exclude(
            method="POST", path="/v1/webhook-endpoints"
        )
        requests.post(
            f"{web.url}/v1/organizations/{org}/campaigns", json={"campaign_id": "c"},
            headers=auth, timeout=30,
        )  # fmt: skip
        cases = st.one_of(
            schema.as_strategy(GenerationMode.POSITIVE, headers=auth),
            schema.as_strategy(GenerationMode.NEGATIVE, headers=auth),
            # Positive requests on a real organization reach past the 404s.
            *(
                schema[path][method].as_strategy(
                    GenerationMode.POSITIVE, headers=auth, path_parameters={"org_id": org}
                )
                for method, path in CONTRACT_ROUTES
                if "{org_id}" in path
            ),
        )
        session = requests.Session()

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases)
        def exercise(case) -> None:
            response = case.call(base_url=web.url, session=session, headers=auth, timeout=30)
            case.validate_response(response, checks=checks)

        exercise()
    assert "Traceback" not in web.log()
