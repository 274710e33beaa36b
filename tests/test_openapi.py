"""The OpenAPI document and the live server agree: schemathesis drives every operation."""

from __future__ import annotations

import asyncio
import copy
import json
import urllib.request
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import pytest
import schemathesis
from hypothesis import settings
from schemathesis import AuthContext, GenerationMode, checks
from schemathesis.auths import set_on_case
from schemathesis.core.failures import AcceptedNegativeData, Failure, FailureGroup
from schemathesis.openapi.checks import JsonSchemaError, UndefinedStatusCode
from support import Spawned, add_api_key, sqlite_server

DOCUMENT_BYTES = resources.files("incrementer.api").joinpath("openapi.json").read_bytes()
DOCUMENT: dict[str, Any] = json.loads(DOCUMENT_BYTES)

# Positive cases carry API_KEY; negative ones drop or mangle it. LIMITED_KEY may make one request
# in a long while, so its second one gets the documented 429.
API_KEY = "ik_c0ffee000001.conformance-test-key"
LIMITED_KEY = "ik_c0ffee000002.rate-limited-test-key"
# A request schemathesis makes invalid may also be refused before any route reads it, by the
# HTTP layer's limits: a query of too many keys exceeds the request line (414), as a body or
# headers may (413, 431). Those refusals are rejections too.
REJECTED = [
    "400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422", "428", "429",
    "431", "5xx",
]  # fmt: skip
CONFIG = schemathesis.Config.from_dict(
    {
        "auth": {"openapi": {"bearerAuth": {"bearer": API_KEY}}},
        "checks": {"negative_data_rejection": {"expected-statuses": REJECTED}},
    }
)

CHECKS: list[Callable[..., bool | None]] = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.unsupported_method,
    checks.negative_data_rejection,
    checks.ignored_auth,
    checks.missing_required_header,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawned]:
    tmp = tmp_path_factory.mktemp("openapi")
    database_url = f"sqlite:///{tmp / 'counters.db'}"
    asyncio.run(add_api_key(database_url, "conformance", key=API_KEY, burst=1))
    asyncio.run(add_api_key(database_url, "limited", key=LIMITED_KEY, rate=0.001, burst=1))
    # Time buckets on, so the series and windowed reads answer 200 too; a body limit above
    # the default, so a batch of maxItems + 1 items with an "at" each reaches the item-count
    # check (400) rather than the size limit (413).
    flags = ("--buckets", "minute,hour,day", "--max-body-bytes", str(4 * 2**20))
    with sqlite_server(tmp, "--auth", "required", *flags) as (srv, _):
        yield srv


schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT), config=CONFIG)


@schema.parametrize()
@settings(max_examples=80, deadline=None, derandomize=True)
def test_server_conforms(case: schemathesis.Case, server: Spawned) -> None:
    """Every operation answers only documented statuses, media types, bodies and headers, and
    refuses every request the document calls invalid."""
    case.call_and_validate(base_url=server.url, checks=CHECKS)


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
        "GET /counters/{key}/series",
        "GET /counters",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /openapi.json",
        "GET /status",
    }


def _without_202(doc: dict[str, Any]) -> None:
    del doc["paths"]["/increment"]["post"]["responses"]["202"]


def _without_415(doc: dict[str, Any]) -> None:
    del doc["paths"]["/increment"]["post"]["responses"]["415"]


def _short_keys(doc: dict[str, Any]) -> None:
    doc["components"]["schemas"]["Key"]["maxLength"] = 8


def _error_renamed(doc: dict[str, Any]) -> None:
    error = doc["components"]["schemas"]["Error"]
    error["properties"]["message"] = error["properties"].pop("detail")
    error["required"] = ["error", "message"]


@pytest.mark.parametrize(
    ("alter", "operation_id", "expected"),
    [
        (_without_202, "increment", UndefinedStatusCode),
        (_without_415, "increment", UndefinedStatusCode),
        (_short_keys, "increment", AcceptedNegativeData),
        (_error_renamed, "getCounter", JsonSchemaError),
    ],
    ids=["202-undocumented", "415-undocumented", "keys-too-short", "error-body-renamed"],
)
def test_drifted_document_fails(
    server: Spawned,
    alter: Callable[[dict[str, Any]], None],
    operation_id: str,
    expected: type[Failure],
) -> None:
    """A document with one deliberate mistake makes the same checks fail."""
    doc = copy.deepcopy(DOCUMENT)
    alter(doc)
    # Coverage cases all send the same Idempotency-Key: every body after the first would get
    # 422 for the reused key instead of the answer the drift is about.
    for path in ("/increment", "/increments"):
        del doc["paths"][path]["post"]["parameters"]
    drifted = schemathesis.openapi.from_dict(doc, config=CONFIG).include(operation_id=operation_id)
    (operation,) = [result.ok() for result in drifted.get_all_operations()]
    # The coverage phase's cases (boundaries, missing parts, wrong media types) are deterministic.
    cases = drifted.iter_coverage_cases(
        operation,
        generation_modes=list(GenerationMode),
        generation_config=drifted.config.generation,
    )
    failures: list[Failure] = []
    for case in cases:
        # The pytest plugin applies the configured key to coverage cases; done by hand here. It
        # stays off the cases that drop or mangle the header on purpose.
        set_on_case(case, AuthContext(operation=case.operation, app=None), None)
        try:
            case.call_and_validate(base_url=server.url, checks=CHECKS)
        except FailureGroup as exc:
            failures.extend(exc.exceptions)
    assert any(isinstance(failure, expected) for failure in failures), failures


def test_rate_limited_answer_is_documented(server: Spawned) -> None:
    """A key over its rate limit gets the documented 429 with Retry-After."""
    operation = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))["/increment"]["POST"]
    statuses = []
    for _ in range(2):
        case = operation.Case(
            body={"key": "limited", "value": 1},
            media_type="application/json",
            headers={"Authorization": f"Bearer {LIMITED_KEY}"},
        )
        statuses.append(case.call_and_validate(base_url=server.url, checks=CHECKS).status_code)
    assert statuses == [202, 429]
