"""Calls and checks shared by the HTTP API tests: a raw request with a token of the test's
choosing, the broker's audit lines, and an answer checked against docs/openapi.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread
from tests.integration.test_openapi import CHECKS, schema

__all__ = ["audit_lines", "conforms", "raw"]


def raw(broker: BrokerThread, method: str, path: str, token: str = ROOT_TOKEN,
        **kwargs: Any) -> requests.Response:
    """``method /v1/path`` with ``token`` as sent: no client's checks or retries between
    the test and the answer (hvac would raise on an error status)."""
    return requests.request(method, f"{broker.url}/v1/{path}", headers={"X-Vault-Token": token},
                            timeout=30, **kwargs)


def audit_lines(broker: BrokerThread) -> list[dict[str, Any]]:
    """Every line of ``broker``'s audit log so far, parsed."""
    return [json.loads(line) for line in Path(broker.audit_path).read_text().splitlines()]


def conforms(path: str, method: str, resp: requests.Response, **path_parameters: str) -> None:
    """``resp`` matches docs/openapi.yaml's answer for ``method path``."""
    case = schema[path][method].Case(path_parameters=path_parameters)
    case.validate_response(resp, checks=CHECKS)
