"""The OpenAPI document and the live server agree: schemathesis drives every operation."""

from __future__ import annotations

import copy
import json
import urllib.request
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.core.failures import AcceptedNegativeData, FailureGroup
from schemathesis.core.parameters import ParameterLocation
from schemathesis.openapi.checks import JsonSchemaError, UndefinedStatusCode
from support import Spawned, spawned

DOCUMENT_BYTES = resources.files("incrementer").joinpath("openapi.json").read_bytes()
DOCUMENT: dict[str, Any] = json.loads(DOCUMENT_BYTES)

# The key a well-behaved client sends. The server does not check keys yet; once it does, start it
# with this key accepted, set AUTH_ENFORCED and add checks.ignored_auth and
# checks.missing_required_header to CHECKS.
API_KEY = "conformance-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
AUTH_ENFORCED = False


def negative_data_rejection(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """schemathesis' check, except for cases whose only invalid part is the Authorization header
    while the server does not enforce authentication."""
    meta = case.meta
    if not AUTH_ENFORCED and meta is not None:
        negative = {loc for loc, info in meta.components.items() if info.mode.is_negative}
        if negative == {ParameterLocation.HEADER}:
            return None
    result: bool | None = checks.negative_data_rejection(ctx, response, case)
    return result


CHECKS: list[Callable[..., bool | None]] = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.unsupported_method,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawned]:
    tmp = tmp_path_factory.mktemp("openapi")
    args = ["--database-url", f"sqlite:///{tmp / 'counters.db'}", "--data-dir", str(tmp / "data")]
    with spawned([*args, "--flush-interval", "0.05"]) as srv:
        yield srv
        assert srv.stop() == 0, srv.read_log()


schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))


@schema.parametrize()
@settings(max_examples=80, deadline=None, derandomize=True)
def test_server_conforms(case: schemathesis.Case, server: Spawned) -> None:
    """Every operation answers only documented statuses, media types, bodies and headers, and
    refuses every request the document calls invalid."""
    case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS)


def test_served_document_is_the_packaged_one(server: Spawned) -> None:
    """GET /openapi.json serves the package's document, a valid OpenAPI 3.1 schemathesis loads
    without warnings."""
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.read() == DOCUMENT_BYTES
    loaded = schemathesis.openapi.from_url(server.url + "/openapi.json")
    assert loaded.raw_schema["openapi"].startswith("3.1.")
    loaded.validate()
    assert loaded.iter_schema_warnings() == []
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == {
        "POST /increment",
        "POST /increments",
        "GET /counters/{key}",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /openapi.json",
    }


def drifted(alter: Callable[[dict[str, Any]], None], operation_id: str) -> schemathesis.BaseSchema:
    """The document with one deliberate mistake, narrowed to the operation it affects."""
    doc = copy.deepcopy(DOCUMENT)
    alter(doc)
    return schemathesis.openapi.from_dict(doc).include(operation_id=operation_id)


def _without_202(doc: dict[str, Any]) -> None:
    del doc["paths"]["/increment"]["post"]["responses"]["202"]


def _short_keys(doc: dict[str, Any]) -> None:
    doc["components"]["schemas"]["Key"]["maxLength"] = 8


def _value_as_string(doc: dict[str, Any]) -> None:
    doc["components"]["schemas"]["Increment"]["properties"]["value"] = {"type": "string"}


def _error_renamed(doc: dict[str, Any]) -> None:
    error = doc["components"]["schemas"]["Error"]
    error["properties"]["message"] = error["properties"].pop("detail")
    error["required"] = ["error", "message"]


DRIFT = pytest.mark.xfail(raises=FailureGroup, strict=True, reason="the document is wrong")
DRIFT_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@drifted(_without_202, "increment").parametrize()
@DRIFT
@DRIFT_SETTINGS
def test_undocumented_status_fails(case: schemathesis.Case, server: Spawned) -> None:
    """A status code the document does not list fails the run."""
    case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS)


@drifted(_short_keys, "increment").parametrize()
@DRIFT
@DRIFT_SETTINGS
def test_looser_validation_fails(case: schemathesis.Case, server: Spawned) -> None:
    """A server accepting what the document calls invalid fails the run."""
    case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS)


@drifted(_value_as_string, "increment").parametrize()
@DRIFT
@DRIFT_SETTINGS
def test_changed_field_type_fails(case: schemathesis.Case, server: Spawned) -> None:
    """A request field whose documented type the server does not take fails the run."""
    case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS)


@drifted(_error_renamed, "getCounter").parametrize()
@DRIFT
@DRIFT_SETTINGS
def test_undocumented_body_shape_fails(case: schemathesis.Case, server: Spawned) -> None:
    """A response body that does not match its documented schema fails the run."""
    case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS)
