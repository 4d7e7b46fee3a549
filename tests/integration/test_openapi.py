"""docs/openapi.yaml against the server: same routes, same methods, every answer as documented.

The broker under test is a real server process with a SQLite store and the
bench's no-op mount ``bench`` (role ``r``), so generated requests exercise the
API itself and leave nothing behind on a database server. schemathesis
generates requests from the document (valid ones and broken ones) and checks
each answer: never a 5xx, a status the document lists, a JSON body matching
its schema (every error ``{"errors": [...]}``), and a 405 with an ``Allow``
header naming the documented methods.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hypothesis
import openapi_spec_validator
import pytest
import requests
import schemathesis
import yaml
from aiohttp import web
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from broker.api import ROUTE_TABLES, system
from broker.bench.harness import ROOT_TOKEN, BrokerProcess, broker_config, create_root_token

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
#: What the server sends (package data, so a wheel serves it without PyYAML).
PACKAGED_PATH = Path(system.__file__).with_name(system.OPENAPI_JSON)
REGENERATE = ("python -c \"import json, yaml; open('broker/api/openapi.json', 'w').write("
              "json.dumps(yaml.safe_load(open('docs/openapi.yaml')), indent=1) + '\\n')\"")
HTTP_METHODS = ("get", "post", "put", "delete", "patch")
#: These end the calling token (the test's root token): called by hand below instead.
TOKEN_ENDING = r"/v1/auth/token/(revoke-self|revoke|revoke-accessor)$"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]

schema = schemathesis.openapi.from_path(SPEC_PATH)


def _server_routes() -> set[str]:
    """Every path the server routes, in OpenAPI's template form."""
    paths = set()
    for table in ROUTE_TABLES:  # what create_app adds
        for route in table:
            assert isinstance(route, web.RouteDef)
            # aiohttp's {name:regex} is OpenAPI's {name}
            paths.add(re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.path))
    return paths


@pytest.fixture(scope="module")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("openapi")
    store = f"sqlite:///{tmp / 'broker.db'}"
    asyncio.run(create_root_token(store))
    broker = BrokerProcess(broker_config(tmp, store_url=store)).start()
    try:
        asyncio.run(broker.wait_healthy())
        yield broker.url
    finally:
        asyncio.run(broker.stop())


def _call(url: str, method: str, path: str, **kwargs: Any) -> requests.Response:
    headers = {"X-Vault-Token": kwargs.pop("token", ROOT_TOKEN)}
    return requests.request(method, f"{url}{path}", headers=headers, timeout=30, **kwargs)


def test_the_document_is_valid_openapi() -> None:
    """docs/openapi.yaml passes the OpenAPI 3.1 validator."""
    openapi_spec_validator.validate(SPEC)


def test_every_route_is_documented_and_nothing_else() -> None:
    """The document's paths are exactly the paths the server routes."""
    documented = set(SPEC["paths"])
    routed = _server_routes()
    assert routed - documented == set(), "routes missing from docs/openapi.yaml"
    assert documented - routed == set(), "documented paths the server does not have"


def test_the_packaged_json_is_the_document() -> None:
    """broker/api/openapi.json, what GET sys/internal/specs/openapi sends, is
    docs/openapi.yaml as JSON."""
    packaged = json.loads(PACKAGED_PATH.read_text())
    assert packaged == json.loads(json.dumps(SPEC)), f"out of date; run: {REGENERATE}"


def test_the_server_serves_the_document_to_anyone(broker_url: str) -> None:
    """GET /v1/sys/internal/specs/openapi without a token (hvac, as a Vault client asks)
    answers the document as JSON, listing every route the server has."""
    anonymous = hvac.Client(url=broker_url, token="")  # "": no token, not even VAULT_TOKEN's
    document = anonymous.read("sys/internal/specs/openapi")
    assert isinstance(document, dict), document
    assert set(document["paths"]) == _server_routes()
    assert document == json.loads(json.dumps(SPEC))


def test_documented_methods_are_served_and_no_others(broker_url: str) -> None:
    """Without a token, a documented method is refused for the token (or served), never 405;
    an undocumented one is a 405 whose Allow header lists the documented ones."""
    for path, item in SPEC["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        documented = {m for m in HTTP_METHODS if m in item}
        query = {"list": "true"} if path.startswith("/v1/sys/leases/lookup/") else {}
        for method in HTTP_METHODS:
            resp = requests.request(method, f"{broker_url}{concrete}", params=query, timeout=30)
            where = f"{method.upper()} {path}: {resp.status_code} {resp.text[:200]}"
            if method in documented:
                assert resp.status_code != 405, where
                assert resp.status_code < 500, where
            else:
                assert resp.status_code == 405, where
                allowed = {m.lower() for m in resp.headers["Allow"].split(",")}
                assert documented <= allowed, where  # (LIST and HEAD besides)


@schema.exclude(path_regex=TOKEN_ENDING).parametrize()
@hypothesis.settings(max_examples=25, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_generated_requests_get_documented_answers(case: schemathesis.Case,
                                                   broker_url: str) -> None:
    """Whatever schemathesis sends, the answer is no 5xx and matches the document."""
    case.call_and_validate(base_url=broker_url, headers={"X-Vault-Token": ROOT_TOKEN},
                           checks=[*CHECKS, unsupported_method])


def _validate(path: str, method: str, resp: requests.Response, **path_parameters: str) -> None:
    """``resp`` (a real call) against the document's answer for ``method path``."""
    case = schema[path][method].Case(path_parameters=path_parameters)
    case.validate_response(resp, checks=CHECKS)


def test_a_lease_and_token_life_matches_the_document(broker_url: str) -> None:
    """Issue, renew, look up, list, search, count and revoke a lease, and create, look up,
    renew and revoke tokens: each real answer matches its documented schema."""
    url = broker_url
    issued = _call(url, "POST", "/v1/bench/creds/r", json={"ttl": "10m"})
    assert issued.status_code == 200, issued.text
    _validate("/v1/{mount}/creds/{role}", "POST", issued, mount="bench", role="r")
    lease_id = issued.json()["lease_id"]
    calls = [
        ("/v1/sys/leases/renew", "PUT", {"json": {"lease_id": lease_id, "increment": "5m"}}),
        ("/v1/sys/leases/lookup", "PUT", {"json": {"lease_id": lease_id}}),
        ("/v1/sys/leases/lookup/{prefix}", "GET", {"params": {"list": "true"},
                                                   "fill": "bench/creds/r/"}),
        ("/v1/sys/leases/search", "GET", {"params": {"prefix": "bench/"}}),
        ("/v1/sys/leases/stats", "GET", {}),
        ("/v1/sys/leases/irrevocable", "GET", {}),
        ("/v1/sys/mounts", "GET", {}),
        ("/v1/sys/metrics", "GET", {}),
        ("/v1/sys/health", "GET", {}),
        ("/v1/sys/leases/revoke", "PUT", {"json": {"lease_id": lease_id}}),
        ("/v1/sys/leases/revoke-prefix/{prefix}", "PUT", {"fill": "bench/creds/r/"}),
    ]
    for path, method, kwargs in calls:
        fill = kwargs.pop("fill", None)
        resp = _call(url, method, path.replace("{prefix}", fill or ""), **kwargs)
        assert resp.status_code < 300, (path, resp.status_code, resp.text)
        _validate(path, method, resp, **({"prefix": fill} if fill else {}))
    created = _call(url, "POST", "/v1/auth/token/create", json={"policies": ["default"]})
    _validate("/v1/auth/token/create", "POST", created)
    child = created.json()["auth"]["client_token"]
    for path, method, kwargs in [
        ("/v1/auth/token/lookup-self", "GET", {"token": child}),
        ("/v1/auth/token/lookup", "POST", {"json": {"token": child}}),
        ("/v1/auth/token/renew-self", "POST", {"token": child, "json": {"increment": "1h"}}),
        ("/v1/auth/token/revoke-self", "POST", {"token": child}),
    ]:
        resp = _call(url, method, path, **kwargs)
        assert resp.status_code < 300, (path, resp.status_code, resp.text)
        _validate(path, method, resp)
    for path, field in [("/v1/auth/token/revoke", "token"),
                        ("/v1/auth/token/revoke-accessor", "accessor")]:
        auth = _call(url, "POST", "/v1/auth/token/create", json={}).json()["auth"]
        value = auth["client_token"] if field == "token" else auth["accessor"]
        resp = _call(url, "POST", path, json={field: value})
        assert resp.status_code == 204, resp.text
        _validate(path, "POST", resp)
        gone = _call(url, "GET", "/v1/auth/token/lookup-self", token=auth["client_token"])
        assert gone.status_code == 403, gone.text
