"""Every audited request gets its outcome line, errors included (as Vault writes a
response entry for every request entry).

A renew, a revoke, a token create and a JWT login that answered 503 under a
stalled lease store wrote their ``request`` line and nothing more; a request whose
token lookup itself timed out wrote no line at all. Now each gets one ``response``
line with ``outcome: "error"``, the status and the message, unless the handler
wrote an outcome line of its own (an ``issue`` error, a ``policy_denied``): never
two. The stalls are real: a lock another PostgreSQL session holds on the broker's
own store database (a fresh one per test); the broker answers over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from broker.audit import load_key
from broker.audit_verify import verify_file
from broker.bench.noop import register as register_noop_plugin
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, start_broker, write_config
from tests.integration.jwt_fixtures import jwt_role, oidc_issuer_fixture, oidc_method
from tests.integration.store_fixtures import fresh_postgres_database
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

issuer = oidc_issuer_fixture()

#: command_timeout of the store (seconds): what each stalled request waits.
TIMEOUT = 2.0
ROOT = {"X-Vault-Token": ROOT_TOKEN}

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "2h"

[policies.app]
"auth/token/lookup-self" = ["read"]
"""


@pytest.fixture
async def pg_dsn(request: pytest.FixtureRequest) -> str:
    return await fresh_postgres_database(request)


@pytest.fixture
def broker(tmp_path: Path, pg_dsn: str, issuer: OIDCIssuer) -> Iterator[BrokerThread]:
    register_noop_plugin()
    config = CONFIG + oidc_method(issuer) + jwt_role("ci")
    server = start_broker(write_config(tmp_path, config,
                                       storage_url=f"{pg_dsn}?command_timeout={TIMEOUT}"))
    try:
        yield server
    finally:
        server.stop()


async def _locked(dsn: str, statement: str) -> asyncpg.Connection:
    """A session holding the lock ``statement`` takes, in a transaction it keeps open."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("BEGIN")
    await conn.execute(statement)
    return conn


def _text(broker: BrokerThread) -> str:
    return Path(broker.audit_path).read_text()


def _lines(broker: BrokerThread) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _text(broker).splitlines()]


def _turn_into_a_directory(audit: Path) -> None:
    """The audit log's file moved away and a directory in its place: the broker's next
    write finds the file gone and cannot open a new one (as on a broken volume)."""
    audit.rename(audit.with_name("audit.jsonl.moved"))
    audit.mkdir()


def _requests(broker: BrokerThread) -> dict[str, list[dict[str, Any]]]:
    """The audit lines of each request (by its id), in order."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in _lines(broker):
        rid = (line.get("request") or {}).get("id")
        if rid:
            by_id.setdefault(rid, []).append(line)
    return by_id


def _of_path(broker: BrokerThread, path: str) -> list[list[dict[str, Any]]]:
    """The line groups of the requests whose ``request`` line names ``path``."""
    return [group for group in _requests(broker).values()
            if group[0]["type"] == "request" and group[0]["request"]["path"] == path]


def _one(broker: BrokerThread, path: str) -> list[dict[str, Any]]:
    groups = _of_path(broker, path)
    assert len(groups) == 1, f"{path}: {groups}"
    return groups[0]


def _types(group: list[dict[str, Any]]) -> list[str]:
    return [line["type"] for line in group]


def _assert_error_outcome(group: list[dict[str, Any]], status: int, text: str) -> None:
    assert _types(group) == ["request", "response"], group
    response = group[1]
    assert response["outcome"] == "error", response
    assert response["status"] == status, response
    assert text in response["error"], response


def _verified(broker: BrokerThread, tmp_path: Path) -> None:
    result = verify_file(broker.audit_path, load_key(str(tmp_path / "audit.key")))
    assert result.ok, result


async def _send(http: aiohttp.ClientSession, method: str, url: str, *,
                headers: dict[str, str] | None = None,
                body: dict[str, Any] | None = None) -> tuple[int, str]:
    async with http.request(method, url, headers=headers, json=body) as answer:
        return answer.status, await answer.text()


async def test_503s_under_a_stalled_store_get_one_error_outcome_line(
        broker: BrokerThread, pg_dsn: str, issuer: OIDCIssuer, tmp_path: Path) -> None:
    """leases locked: a renew and a revoke; tokens locked for writes: a token create and
    a JWT login. Each answers 503 and leaves request + response (error, 503)."""
    base = f"{broker.url}/v1"
    jwt = issuer.mint(issuer.github_claims(run_id="outcome-1"))
    async with aiohttp.ClientSession() as http:
        status, text = await _send(http, "GET", f"{base}/noop/creds/r", headers=ROOT)
        assert status == 200, text
        lease_id = json.loads(text)["lease_id"]
        leases = await _locked(pg_dsn, "LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
        try:
            renew, revoke = await asyncio.gather(
                _send(http, "PUT", f"{base}/sys/leases/renew", headers=ROOT,
                      body={"lease_id": lease_id}),
                _send(http, "PUT", f"{base}/sys/leases/revoke", headers=ROOT,
                      body={"lease_id": lease_id}))
        finally:
            await leases.close()
        # SHARE: the token lookups (reads) go through, the new tokens' INSERTs wait.
        tokens = await _locked(pg_dsn, "LOCK TABLE tokens IN SHARE MODE")
        try:
            create, login = await asyncio.gather(
                _send(http, "POST", f"{base}/auth/token/create", headers=ROOT,
                      body={"policies": ["app"]}),
                _send(http, "POST", f"{base}/auth/github/login",
                      body={"role": "ci", "jwt": jwt}))
        finally:
            await tokens.close()
    for answer in (renew, revoke, create, login):
        assert answer[0] == 503, answer
        assert "lease store unavailable" in answer[1], answer
    for path in ("sys/leases/renew", "sys/leases/revoke", "auth/token/create",
                 "auth/github/login"):
        _assert_error_outcome(_one(broker, path), 503, "lease store unavailable")
    # The authenticated ones say who; the login had no token yet.
    assert _one(broker, "sys/leases/renew")[1]["auth"]["policies"] == ["root"]
    assert "auth" not in _one(broker, "auth/github/login")[1]
    _verified(broker, tmp_path)


async def test_a_token_lookup_that_times_out_writes_request_and_outcome_lines(
        broker: BrokerThread, pg_dsn: str, tmp_path: Path) -> None:
    """tokens locked: the lookup of the caller's token times out before anything was
    written. The 503 now leaves a request and a response line (no auth block: the
    token was not checked), and never the token itself."""
    url = f"{broker.url}/v1/auth/token/lookup-self"
    async with aiohttp.ClientSession() as http:
        locker = await _locked(pg_dsn, "LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
        try:
            status, text = await _send(http, "GET", url, headers=ROOT)
        finally:
            await locker.close()
        assert status == 503, text
        group = _one(broker, "auth/token/lookup-self")
        _assert_error_outcome(group, 503, "lease store unavailable")
        assert all("auth" not in line for line in group), group
        # Once the store answers, the same request is audited as it always was.
        status, text = await _send(http, "GET", url, headers=ROOT)
        assert status == 200, text
    assert ROOT_TOKEN not in _text(broker)
    assert len(_of_path(broker, "auth/token/lookup-self")) == 2
    _verified(broker, tmp_path)


async def test_answers_with_outcome_lines_of_their_own_get_no_second_one(
        broker: BrokerThread, tmp_path: Path) -> None:
    """A success keeps exactly its lines (request + issue, request + renew); a policy
    denial its policy_denied; a renew of an unknown lease (400, which wrote no outcome)
    gets one response line."""
    base = f"{broker.url}/v1"
    async with aiohttp.ClientSession() as http:
        status, text = await _send(http, "GET", f"{base}/noop/creds/r", headers=ROOT)
        assert status == 200, text
        lease_id = json.loads(text)["lease_id"]
        status, text = await _send(http, "PUT", f"{base}/sys/leases/renew", headers=ROOT,
                                   body={"lease_id": lease_id})
        assert status == 200, text
        status, text = await _send(http, "POST", f"{base}/auth/token/create", headers=ROOT,
                                   body={"policies": ["app"]})
        assert status == 200, text
        app = {"X-Vault-Token": json.loads(text)["auth"]["client_token"]}
        status, text = await _send(http, "GET", f"{base}/noop/creds/r", headers=app)
        assert status == 403, text
        status, text = await _send(http, "PUT", f"{base}/sys/leases/renew/noop/creds/r/nope",
                                   headers=ROOT)
        assert status == 400, text
    issues = _of_path(broker, "noop/creds/r")
    assert sorted(_types(group) for group in issues) == [
        ["request", "issue"], ["request", "policy_denied"]], issues
    assert _types(_one(broker, "sys/leases/renew")) == ["request", "renew"]
    assert _types(_one(broker, "auth/token/create")) == ["request", "token_create"]
    _assert_error_outcome(_one(broker, "sys/leases/renew/noop/creds/r/nope"), 400,
                          "is not known")
    _verified(broker, tmp_path)


async def test_an_outcome_line_that_cannot_be_written_leaves_the_answer_as_it_was(
        broker: BrokerThread, pg_dsn: str) -> None:
    """The audit log fails between a renew's request line and its outcome line (its
    path turned into a directory while the store stalls the renew): the client still
    gets the store's 503, not the audit log's."""
    base = f"{broker.url}/v1"
    audit = Path(broker.audit_path)
    async with aiohttp.ClientSession() as http:
        status, text = await _send(http, "GET", f"{base}/noop/creds/r", headers=ROOT)
        assert status == 200, text
        lease_id = json.loads(text)["lease_id"]
        leases = await _locked(pg_dsn, "LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
        try:
            renew = asyncio.ensure_future(_send(
                http, "PUT", f"{base}/sys/leases/renew", headers=ROOT,
                body={"lease_id": lease_id}))
            await asyncio.sleep(TIMEOUT / 2)  # its request line is written by now
            _turn_into_a_directory(audit)
            status, text = await renew
        finally:
            await leases.close()
    try:
        assert status == 503, text
        assert "lease store unavailable" in text, text
        group = [line for line in _lines_of(audit.with_name("audit.jsonl.moved"))
                 if (line.get("request") or {}).get("path") == "sys/leases/renew"]
        assert _types(group) == ["request"], group
    finally:
        shutil.rmtree(audit)


def _lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
