"""schemathesis over the app's own OpenAPI spec, against a live server: no 5xx response and no
response that breaks its own schema (jobs are stored but not run: the dispatcher is off)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.openapi.checks import response_schema_conformance

from tests.api.conftest import make_server


@pytest.fixture(scope="module")
def api_schema(ray_head, tmp_path_factory):
    with make_server(tmp_path_factory.mktemp("contract"), ray_head, dispatch=False) as server:
        yield schemathesis.openapi.from_url(f"{server.url}/api/v1/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_api_contract(case):
    if case.path.endswith("/stream"):
        pytest.skip("the live event stream runs until its job ends (tested in test_api.py)")
    response = case.call(timeout=30)
    case.validate_response(response, checks=(not_a_server_error, response_schema_conformance))
