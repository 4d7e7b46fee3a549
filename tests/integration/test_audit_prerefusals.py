"""Requests refused before any token is looked at are on record: a path the broker does
not have (aiohttp's 404), a method a route does not take (405, raised by aiohttp or
answered by a read-only handler such as ``sys/mounts/NAME/tune``), a response-wrapping
header, a NUL in the URL. Each writes the ``request`` + ``response`` pair an
unauthenticated failure writes (no ``auth``, never the token sent along), through the
same per-client limit, so a flood of them is summarised, not written line by line.
The answers do not change.

A real broker (in-process, real HTTP); each test sends from its own loopback address.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.api.audit_limit import BURST, RATE
from broker.audit_verify import verify_file
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker
from tests.integration.test_security_hygiene_audit_limit import (
    CONFIG,
    events,
    of,
    wait_for_summary,
)

pytestmark = pytest.mark.integration

#: a token that must not reach the audit file in any form but (at most) its HMAC.
TOKEN = "s.ThisTokenMustNotBeAudited0"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with noop_broker(tmp_path_factory.mktemp("prerefusals"), CONFIG) as server:
        yield server


def send(broker: BrokerThread, source: str, method: str, target: str,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One request with a raw target (``%00`` kept as sent), from ``source``."""
    conn = http.client.HTTPConnection("127.0.0.1", broker.config.server.port, timeout=30,
                                      source_address=(source, 0))
    try:
        conn.request(method, target, body=b"{}" if method in {"POST", "PUT"} else None,
                     headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


CASES = [
    # (source, method, target, extra headers, status, error starts with, audited path)
    ("127.0.0.51", "POST", "/v1/sys/mounts/noop/tune", {}, 405,
     "method POST not allowed here", "sys/mounts/noop/tune"),
    ("127.0.0.52", "GET", "/v1/noop/creds/a", {"X-Vault-Wrap-TTL": "60"}, 400,
     "response wrapping (X-Vault-Wrap-TTL) is not supported", "noop/creds/a"),
    ("127.0.0.53", "GET", "/v1/noop/creds/a%00b", {}, 400,
     "role holds a NUL character", "noop/creds/a%00b"),
    ("127.0.0.54", "GET", "/v1/no/such/path/here", {}, 404, "unsupported path",
     "no/such/path/here"),
    ("127.0.0.55", "DELETE", "/v1/sys/health", {}, 405, "method DELETE not allowed here",
     "sys/health"),
]


@pytest.mark.parametrize(("source", "method", "target", "headers", "status", "error", "path"),
                         CASES, ids=["tune-405", "wrap-ttl", "nul", "unknown-route", "route-405"])
def test_a_refusal_before_any_token_check_is_audited(
        broker: BrokerThread, source: str, method: str, target: str, headers: dict[str, str],
        status: int, error: str, path: str) -> None:
    """The answer is unchanged; the audit file gains request + response (outcome error,
    the status, the message), same request id, no auth block, and not the token sent."""
    got, body = send(broker, source, method, target, {**headers, "X-Vault-Token": TOKEN})
    assert got == status and body["errors"][0].startswith(error), (got, body)
    mine = [e for e in events(broker) if of(source)(e)]
    assert [e["type"] for e in mine] == ["request", "response"], mine
    request, response = mine
    assert request["request"]["id"] == response["request"]["id"]
    assert request["request"]["path"] == response["request"]["path"] == path
    assert request["request"]["method"] == method
    assert response["outcome"] == "error" and response["status"] == status
    assert response["error"].startswith(error)
    assert all(e.get("auth") is None for e in mine)
    assert TOKEN not in Path(broker.audit_path).read_text()
    assert verify_file(broker.audit_path, None).ok


def test_a_flood_of_refusals_is_summarised(broker: BrokerThread) -> None:
    """BURST*2 requests to a path the broker does not have, all 404: at most BURST (+ the
    refill while they ran) pairs are written, one auth_failure / suppressed line counts
    the rest; a health probe's own status codes are no refusal (no line)."""
    source, n = "127.0.0.56", BURST * 2
    conn = http.client.HTTPConnection("127.0.0.1", broker.config.server.port, timeout=30,
                                      source_address=(source, 0))
    start = time.monotonic()
    for _ in range(n):
        conn.request("GET", "/v1/nothing/here")
        resp = conn.getresponse()
        assert resp.status == 404 and json.loads(resp.read())["errors"] == ["unsupported path"]
    took = time.monotonic() - start
    conn.close()
    summary = wait_for_summary(broker, source)
    mine = [e for e in events(broker) if of(source)(e)]
    written = [e for e in mine if e["type"] == "response" and e["outcome"] == "error"]
    assert len([e for e in mine if e["type"] == "request"]) == len(written)
    assert BURST <= len(written) <= BURST + RATE * took + 1, (len(written), took)
    assert summary["count"] == n - len(written)
    assert summary["types"] == {"response": summary["count"]}
    # sys/health answers Vault's codes as asked (here a 429 for "active"): not a refusal.
    got, _ = send(broker, "127.0.0.57", "GET", "/v1/sys/health?activecode=429")
    assert got == 429
    assert [e for e in events(broker) if of("127.0.0.57")(e)] == []
    # A valid token's request is audited as before (not as a refusal).
    got, _ = send(broker, "127.0.0.58", "GET", "/v1/noop/creds/a", {"X-Vault-Token": ROOT_TOKEN})
    assert got == 200
    kinds = [e["type"] for e in events(broker) if of("127.0.0.58")(e)]
    assert kinds == ["request", "issue"], kinds


@pytest.mark.parametrize("target", ["/v1/auth/token/accessors", "/v1/sys/mounts/noop/tune?list=true"])
def test_a_405_answered_after_the_token_check_gets_its_outcome_line(
        broker: BrokerThread, target: str) -> None:
    """A handler that authenticates (its request line written) and then answers a 405
    (GET on a LIST-only path): the request line gets its ``response`` outcome line,
    as every request line does; it stood alone."""
    source = "127.0.0.61" if "accessors" in target else "127.0.0.62"
    got, body = send(broker, source, "GET", target, {"X-Vault-Token": ROOT_TOKEN})
    assert got == 405, (got, body)
    mine = [e for e in events(broker) if of(source)(e)]
    assert [e["type"] for e in mine] == ["request", "response"], mine
    assert mine[1]["outcome"] == "error" and mine[1]["status"] == 405
    assert mine[0]["request"]["id"] == mine[1]["request"]["id"]


def test_a_token_spelt_in_percent_escapes_beside_a_nul_is_not_audited(
        broker: BrokerThread) -> None:
    """The path of a ``%00`` refusal is audited decoded (the NUL shown as ``%00``), so the
    credential filter sees a token in it however its characters were escaped: the
    percent-encoded path carried ``%62rk.<secret>`` past it, in clear."""
    secret = "Zq8vN3kLw0TPaYx7RbC2mD5hGf9sJ1uE"  # brk.<it> is a broker token's shape
    source = "127.0.0.63"
    got, _ = send(broker, source, "GET", f"/v1/nope/%62rk.{secret}%00")
    assert got == 400
    mine = [e for e in events(broker) if of(source)(e)]
    assert [e["type"] for e in mine] == ["request", "response"], mine
    assert secret not in Path(broker.audit_path).read_text()
    assert mine[0]["request"]["path"].startswith("nope/"), mine[0]
    assert mine[0]["request"]["path"].endswith("%00"), mine[0]
