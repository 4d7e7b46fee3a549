"""Review of the JWT login path against a real broker over HTTP and a real OIDC issuer.

Tokens that a parser chokes on, JWKS documents that arrive in pieces or late,
JWKS keys without ``alg``/``use``, and replays: each through hvac's
``jwt_login`` (or plain HTTP where hvac would hide the status) and the audit log.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

POLICIES = """
[policies.ci]
"pg/creds/readonly" = ["read"]
"""


def method(name: str, issuer: OIDCIssuer, extra: str = "") -> str:
    """An ``[auth.jwt.NAME]`` method on ``issuer``'s discovery URL with a ``deploy`` role."""
    return f"""
[auth.jwt.{name}]
oidc_discovery_url = "{issuer.url}"
{extra}

[auth.jwt.{name}.roles.deploy]
bound_audiences = ["broker"]
bound_claims = {{ repository = "acme/*", run_id = "4*", ref_protected = true }}
claim_mappings = {{ repository = "repository", run_id = "run_id", "/extra/env" = "env" }}
token_policies = ["ci"]
token_ttl = "30m"
"""


@pytest.fixture(scope="module")
def github() -> Iterator[OIDCIssuer]:
    with OIDCIssuer() as issuer:
        yield issuer


@pytest.fixture(scope="module")
def chunked() -> Iterator[OIDCIssuer]:
    """An issuer whose discovery and JWKS arrive in 200-byte pieces, as over a real network."""
    with OIDCIssuer(chunk_size=200, chunk_pause=0.02) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def slow() -> Iterator[OIDCIssuer]:
    """An issuer that answers 3 s late: longer than the method's 1 s fetch timeout."""
    with OIDCIssuer(delay=3.0) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def bare() -> Iterator[OIDCIssuer]:
    """An issuer whose JWKS entries have no ``alg`` and no ``use`` (both are optional)."""
    with OIDCIssuer(omit_jwk_members=("alg", "use")) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, github: OIDCIssuer, chunked: OIDCIssuer,
           slow: OIDCIssuer, bare: OIDCIssuer) -> Iterator[BrokerThread]:
    tmp = tmp_path_factory.mktemp("review-jwt")
    body = (POLICIES + method("github", github) + method("chunked", chunked)
            + method("slow", slow, 'fetch_timeout = "1s"') + method("bare", bare))
    server = start_broker(write_config(tmp, body))
    yield server
    server.stop()


def claims(issuer: OIDCIssuer, **extra: Any) -> dict[str, Any]:
    return issuer.github_claims(**{"ref_protected": True, "extra": {"env": "prod"}, **extra})


def login(broker: BrokerThread, jwt: str, path: str = "github",
          role: str = "deploy") -> dict[str, Any]:
    client = hvac.Client(url=broker.url)
    auth: dict[str, Any] = client.auth.jwt.jwt_login(role=role, jwt=jwt, path=path)["auth"]
    return auth


def raw_login(broker: BrokerThread, jwt: Any, path: str = "github",
              role: str = "deploy") -> requests.Response:
    return requests.post(f"{broker.url}/v1/auth/{path}/login",
                         json={"role": role, "jwt": jwt}, timeout=30)


def audit_events(broker: BrokerThread) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(broker.audit_path).read_text().splitlines()]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def test_nested_claims_numbers_and_booleans_bind_and_map(broker: BrokerThread,
                                                         github: OIDCIssuer) -> None:
    """A boolean claim matches a TOML true, a glob binds run_id, a JSON pointer maps /extra/env."""
    auth = login(broker, github.mint(claims(github, run_id="4711")))
    assert auth["metadata"] == {"repository": "acme/app", "run_id": "4711", "env": "prod",
                                "role": "deploy", "auth": "github"}
    # A numeric run_id (as some issuers send) is compared as its decimal text.
    assert login(broker, github.mint(claims(github, run_id=4712)))["metadata"]["run_id"] == "4712"
    with pytest.raises(hvac.exceptions.Forbidden, match="claim 'ref_protected'"):
        login(broker, github.mint(claims(github, ref_protected=False)))
    with pytest.raises(hvac.exceptions.Forbidden, match="claim 'run_id' value '5"):
        login(broker, github.mint(claims(github, run_id="5000")))


@pytest.mark.parametrize("where", ["header", "payload"])
def test_deeply_nested_jwt_json_is_a_403_and_audited(broker: BrokerThread, github: OIDCIssuer,
                                                     where: str) -> None:
    """A JWT whose header or payload is JSON nested thousands deep is refused (403), not a 500."""
    header = _b64(json.dumps({"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims(github)).encode())
    nested = _b64(b"[" * 5000)
    token = (f"{nested}.{payload}.c2ln" if where == "header" else f"{header}.{nested}.c2ln")
    resp = raw_login(broker, token)
    assert resp.status_code == 403, resp.text
    (error,) = resp.json()["errors"]
    assert error == ("permission denied: malformed JWT: the header is not base64url JSON"
                     if where == "header" else "permission denied: JWT signature verification "
                     "failed")
    assert token not in error and nested not in error
    failures = [e for e in audit_events(broker) if e["type"] == "auth_failure"
                and e.get("error") == error]
    assert failures, "no auth_failure audit event"
    assert token not in Path(broker.audit_path).read_text()


def test_deeply_nested_jwt_with_an_unknown_role_is_a_400_and_audited(
        broker: BrokerThread) -> None:
    """The audit's description of a refused token survives a nested token too (no 500)."""
    token = f"{_b64(b'[' * 5000)}.e30.c2ln"
    resp = raw_login(broker, token, role="nope")
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"errors": ["role 'nope' could not be found in auth method 'github'"]}
    assert any(e["type"] == "auth_failure" and e.get("role") == "nope"
               for e in audit_events(broker))


def test_oversized_jwt_is_refused_before_parsing(broker: BrokerThread) -> None:
    """A 100 KiB "JWT" is a 403 naming the limit; neither the error nor the audit echo it."""
    token = "eyJ" + "A" * (100 * 1024)
    resp = raw_login(broker, token)
    assert resp.status_code == 403
    assert resp.json() == {"errors": [
        "permission denied: the JWT is longer than 16384 characters"]}
    assert "A" * 100 not in Path(broker.audit_path).read_text()


def test_jwks_served_in_pieces_is_read_whole(broker: BrokerThread,
                                             chunked: OIDCIssuer) -> None:
    """Discovery and JWKS documents that arrive in several reads are read to the end."""
    auth = login(broker, chunked.mint(claims(chunked)), path="chunked")
    assert auth["metadata"]["repository"] == "acme/app"
    assert chunked.count("/jwks") == 1


def test_slow_jwks_fails_fast_with_503_and_never_blocks_the_loop(
        broker: BrokerThread, slow: OIDCIssuer) -> None:
    """An issuer slower than fetch_timeout gives a 503 within it; other requests go on meanwhile."""
    health: list[float] = []

    def poll() -> None:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            started = time.monotonic()
            requests.get(f"{broker.url}/v1/sys/health", timeout=10)
            health.append(time.monotonic() - started)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.monotonic()
    resp = raw_login(broker, slow.mint(claims(slow)), path="slow")
    took = time.monotonic() - started
    poller.join()
    assert resp.status_code == 503, resp.text
    (error,) = resp.json()["errors"]
    assert "cannot load the signing keys" in error and "no answer within 1s" in error
    assert took < 2.5
    # A fetch on the loop would hold a health call for the whole 1 s fetch_timeout
    # (at least ~0.95 s of it, polled every 50 ms). 0.8 s, not 0.5 s: one of ~25 calls
    # slowed 0.5 s by a loaded machine failed the test.
    assert health and max(health) < 0.8, health
    # Rate-limited: a second login at once does not wait for another fetch (>= 1 s).
    started = time.monotonic()
    assert raw_login(broker, slow.mint(claims(slow)), path="slow").status_code == 503
    assert time.monotonic() - started < 0.8


@pytest.mark.parametrize("key", ["rsa", "ec"])
def test_jwks_keys_without_alg_or_use_verify_by_key_type(broker: BrokerThread,
                                                         bare: OIDCIssuer, key: str) -> None:
    """A JWK with neither alg nor use verifies tokens of its key type, and not the other type."""
    signer = bare.rsa_key if key == "rsa" else bare.ec_key
    assert login(broker, bare.mint(claims(bare), key=signer), path="bare")["accessor"]
    # The other key's kid with this key's algorithm: a type mismatch, refused.
    other = bare.ec_key if key == "rsa" else bare.rsa_key
    with pytest.raises(hvac.exceptions.Forbidden, match="cannot verify"):
        login(broker, bare.mint(claims(bare), key=signer, kid=other.kid), path="bare")


def test_the_same_jwt_logs_in_twice_as_in_vault(broker: BrokerThread,
                                                github: OIDCIssuer) -> None:
    """Like Vault, a JWT is not single-use: a replay before exp gets a second, distinct token."""
    token = github.mint(claims(github))
    first, second = login(broker, token), login(broker, token)
    assert first["accessor"] != second["accessor"]
    assert first["client_token"] != second["client_token"]
    # The broker token's TTL is the role's token_ttl, not the JWT's 5-minute life.
    assert 1790 <= second["lease_duration"] <= 1800
