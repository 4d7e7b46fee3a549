"""End to end: a CI job's OIDC token, via hvac, becomes a broker token and real PostgreSQL creds.

A real OIDC issuer (tests/oidc_issuer.py) serves discovery and JWKS on
loopback; a real broker fetches its keys over HTTP (and over TLS with a pinned
CA for the GitLab method) and issues roles on the local PostgreSQL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from tests.conftest import run
from tests.integration.broker_harness import BrokerThread
from tests.integration.jwt_fixtures import (
    github_auth,
    jwt_role,
    oidc_issuer_fixture,
    running_broker,
)
from tests.integration.test_api_postgres import connect_as, pg_mount
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

POLICIES_AND_ROLES = """
[mounts.pg.roles.acme-ro]
default_ttl = "10m"
max_ttl = "1h"

[mounts.pg.roles.other-ro]
default_ttl = "10m"
max_ttl = "1h"

[policies.ci]
"pg/creds/readonly" = ["read"]

[policies.owner]
"pg/creds/{{identity.metadata.repository_owner}}-*" = ["read"]
"""


def auth_config(github: OIDCIssuer, gitlab: OIDCIssuer) -> str:
    """auth/github: deploy (the main branch of an acme repository, policy ci) and owner
    (any repository, its owner mapped for the templated policy); auth/gitlab, its keys
    fetched over TLS from a pinned CA: ci."""
    return github_auth(
        github, policies=["ci"],
        bound_claims={"repository": "acme/*", "ref": "refs/heads/main"},
        claim_mappings={"repository": "repository", "run_id": "run_id", "actor": "actor"},
    ) + jwt_role(
        "owner", policies=["owner"], bound_claims=None,
        claim_mappings={"repository_owner": "repository_owner"}, ttl="10m",
    ) + f"""
[auth.jwt.gitlab]
jwks_url = "{gitlab.jwks_url}"
bound_issuer = "{gitlab.url}"
jwks_ca_pem = '''
{gitlab.ca_pem}'''

[auth.jwt.gitlab.roles.ci]
bound_audiences = "broker"
bound_claims = {{ namespace_path = "acme", ref_type = "branch", ref = ["main", "release-*"] }}
user_claim = "user_login"
claim_mappings = {{ project_path = "project_path", pipeline_id = "pipeline_id" }}
token_policies = ["ci"]
"""


github = oidc_issuer_fixture()
gitlab = oidc_issuer_fixture(tls=True)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str, github: OIDCIssuer,
           gitlab: OIDCIssuer) -> Iterator[BrokerThread]:
    tmp = tmp_path_factory.mktemp("jwt")
    body = pg_mount(postgres_dsn) + POLICIES_AND_ROLES + auth_config(github, gitlab)
    with running_broker(tmp, body) as server:
        yield server


def login(broker: BrokerThread, jwt: str, role: str = "deploy",
          path: str = "github") -> hvac.Client:
    """A fresh hvac client (no token) that logs in exactly as a CI job would."""
    client = hvac.Client(url=broker.url)
    client.auth.jwt.jwt_login(role=role, jwt=jwt, path=path)
    return client


def audit_events(broker: BrokerThread) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(broker.audit_path).read_text().splitlines()]


def test_github_login_issues_postgres_credentials(broker: BrokerThread, github: OIDCIssuer,
                                                  postgres_dsn: str) -> None:
    """hvac's jwt_login yields a token whose creds work and whose leases carry the run id."""
    client = hvac.Client(url=broker.url)
    resp = client.auth.jwt.jwt_login(role="deploy", path="github",
                                     jwt=github.github_token(repository="acme/app",
                                                             run_id="31337"))
    auth = resp["auth"]
    assert client.token == auth["client_token"] and client.is_authenticated()
    assert auth["policies"] == ["ci", "default"] == auth["token_policies"]
    assert 1790 <= auth["lease_duration"] <= 1800 and auth["renewable"] is True
    assert auth["metadata"] == {"repository": "acme/app", "run_id": "31337",
                                "actor": "octocat", "role": "deploy", "auth": "github"}
    me = client.auth.token.lookup_self()["data"]
    assert me["display_name"] == "github-repo:acme/app:ref:refs/heads/main"
    assert me["orphan"] is True and me["accessor"] == auth["accessor"]

    creds = client.secrets.database.generate_credentials("readonly", mount_point="pg")

    async def use() -> int:
        conn = await connect_as(postgres_dsn, creds["data"]["username"],
                                creds["data"]["password"])
        try:
            return int(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()

    assert run(use()) == 1
    lease = client.sys.read_lease(creds["lease_id"])["data"]
    assert lease["metadata"]["run_id"] == "31337"
    assert lease["metadata"]["repository"] == "acme/app"
    client.sys.revoke_lease(creds["lease_id"])


def test_login_token_reaches_only_its_policy(broker: BrokerThread, github: OIDCIssuer) -> None:
    """The ci policy grants pg/creds/readonly and nothing else: other roles and paths are 403."""
    client = login(broker, github.github_token())
    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
        client.secrets.database.generate_credentials("short", mount_point="pg")
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.database.generate_credentials("acme-ro", mount_point="pg")
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.token.create(policies=["ci"])
    with pytest.raises(hvac.exceptions.Forbidden):
        client.sys.list_leases("pg/creds/readonly/")


def test_templated_policy_grants_only_the_owners_role(broker: BrokerThread,
                                                      github: OIDCIssuer) -> None:
    """pg/creds/{{identity.metadata.repository_owner}}-* follows the token's mapped claim."""
    acme = login(broker, github.github_token(repository="acme/app"), role="owner")
    other = login(broker, github.github_token(repository="other/tool"), role="owner")
    lease = acme.secrets.database.generate_credentials("acme-ro", mount_point="pg")
    with pytest.raises(hvac.exceptions.Forbidden):
        acme.secrets.database.generate_credentials("other-ro", mount_point="pg")
    with pytest.raises(hvac.exceptions.Forbidden):
        acme.secrets.database.generate_credentials("readonly", mount_point="pg")
    lease2 = other.secrets.database.generate_credentials("other-ro", mount_point="pg")
    with pytest.raises(hvac.exceptions.Forbidden):
        other.secrets.database.generate_credentials("acme-ro", mount_point="pg")
    acme.sys.revoke_lease(lease["lease_id"])
    other.sys.revoke_lease(lease2["lease_id"])


BAD_TOKENS: dict[str, tuple[dict[str, Any], str]] = {
    "wrong repository": ({"repository": "evil/app"}, "claim 'repository' value 'evil/app'"),
    "wrong branch": ({"ref": "refs/heads/feature"}, "claim 'ref'"),
    "wrong audience": ({"aud": "https://github.com/acme"}, "bound_audiences"),
    "wrong issuer": ({"iss": "https://token.actions.githubusercontent.com"},
                     "is not the bound issuer"),
    "expired": ({"expired": True}, "the JWT expired at"),
    "not yet valid": ({"nbf_in": 600}, "not valid before"),
    "bad signature": ({"signing": "unknown-key", "kid": "rsa-1"},
                      "signature verification failed"),
    "alg none": ({"signing": "none"}, "unsigned JWT (alg none) refused"),
    "hs256 with the public key": ({"signing": "hs256-public-key"},
                                  "symmetric algorithm 'HS256' refused"),
    "unknown kid": ({"signing": "unknown-key"}, "unknown signing key id 'rogue-"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_tokens_are_refused_and_audited_without_the_jwt(
        broker: BrokerThread, github: OIDCIssuer, case: str) -> None:
    """Each forged, misbound or stale token is a 403 with its reason; the audit names it, not it."""
    overrides, reason = BAD_TOKENS[case]
    token = github.github_token(**overrides)
    with pytest.raises(hvac.exceptions.Forbidden) as info:
        login(broker, token)
    assert reason in str(info.value)
    failures = [e for e in audit_events(broker) if e["type"] == "auth_failure"
                and reason in e.get("error", "")]
    assert failures, f"no auth_failure audit event for {case}"
    event = failures[-1]
    assert event["outcome"] == "denied" and event["auth_method"] == "github"
    assert event["role"] == "deploy"
    assert event["jwt_header"]["alg"] in {"RS256", "none", "HS256"}
    text = Path(broker.audit_path).read_text()
    assert token not in text
    assert token.split(".")[2] not in text or not token.split(".")[2]


def test_unknown_role_and_method_and_missing_jwt(broker: BrokerThread,
                                                 github: OIDCIssuer) -> None:
    """An unknown role or a missing jwt is 400; an auth path nobody configured is 404."""
    with pytest.raises(hvac.exceptions.InvalidRequest, match="role 'nope' could not be found"):
        login(broker, github.github_token(), role="nope")
    with pytest.raises(hvac.exceptions.InvalidPath, match="no auth method 'jenkins'"):
        login(broker, github.github_token(), path="jenkins")
    resp = requests.post(f"{broker.url}/v1/auth/github/login", json={"role": "deploy"},
                         timeout=10)
    assert resp.status_code == 400 and resp.json() == {
        "errors": ["missing required parameter 'jwt'"]}


def test_a_jwt_sent_as_the_role_is_neither_echoed_nor_audited(broker: BrokerThread,
                                                              github: OIDCIssuer) -> None:
    """hvac's jwt_login(role, jwt) with the two swapped: the JWT (a bearer credential
    until it expires) went into the error and, twice, into the auth_failure line."""
    token = github.github_token()
    resp = requests.post(f"{broker.url}/v1/auth/github/login",
                         json={"role": token, "jwt": "deploy"}, timeout=10)
    assert resp.status_code == 400, resp.text
    assert token not in resp.text and "[hidden: " in resp.text
    failures = [e for e in audit_events(broker) if e["type"] == "auth_failure"]
    assert failures[-1]["role"] == f"[hidden: {len(token)} characters]"
    assert token not in Path(broker.audit_path).read_text()
    assert token.split(".")[1] not in Path(broker.audit_path).read_text()


def test_rotated_key_is_picked_up_by_one_rate_limited_refresh(
        broker: BrokerThread, github: OIDCIssuer) -> None:
    """After the issuer rotates, the new kid works via one JWKS refresh; made-up kids add none."""
    login(broker, github.github_token())  # keys are cached
    before = github.count("/jwks")
    time.sleep(10.2)  # past the 10 s refresh rate limit, well within the 10 min cache TTL
    new = github.rotate()
    client = login(broker, github.github_token(key=new))
    assert client.is_authenticated()
    assert github.count("/jwks") == before + 1
    for _ in range(10):
        with pytest.raises(hvac.exceptions.Forbidden, match="unknown signing key id"):
            login(broker, github.github_token(signing="unknown-key"))
    assert github.count("/jwks") == before + 1  # rate-limited: no fetch per forged kid


def test_login_is_audited_with_the_token_hmacd(broker: BrokerThread,
                                               github: OIDCIssuer) -> None:
    """A login writes a 'login' event with the new accessor; the token appears only as an HMAC."""
    client = hvac.Client(url=broker.url)
    auth = client.auth.jwt.jwt_login(role="deploy", jwt=github.github_token(run_id="99"),
                                     path="github")["auth"]
    events = [e for e in audit_events(broker) if e["type"] == "login"
              and e["created"]["accessor"] == broker.state.audit.hmac(auth["accessor"])]
    assert len(events) == 1
    event = events[0]
    assert event["auth_method"] == "github" and event["role"] == "deploy"
    assert event["created"]["client_token"].startswith("hmac-sha256:")
    assert event["auth"]["metadata"]["run_id"] == "99"
    assert auth["client_token"] not in Path(broker.audit_path).read_text()


def test_gitlab_login_over_tls_with_pinned_ca(broker: BrokerThread, gitlab: OIDCIssuer) -> None:
    """GitLab id_tokens verify with keys fetched over TLS from a CA given as jwks_ca_pem."""
    client = login(broker, gitlab.gitlab_token(ref="release-1.2", pipeline_id="555"),
                   role="ci", path="gitlab")
    me = client.auth.token.lookup_self()["data"]
    assert me["display_name"] == "gitlab-alice"
    assert me["meta"]["pipeline_id"] == "555" and me["meta"]["project_path"] == "acme/app"
    with pytest.raises(hvac.exceptions.Forbidden, match="claim 'namespace_path'"):
        login(broker, gitlab.gitlab_token(project_path="evil/app"), role="ci", path="gitlab")
    with pytest.raises(hvac.exceptions.Forbidden, match="claim 'ref'"):
        login(broker, gitlab.gitlab_token(ref="feature-x"), role="ci", path="gitlab")
    # A GitHub token is not a GitLab token, even if it were signed by a trusted key.
    with pytest.raises(hvac.exceptions.Forbidden):
        login(broker, gitlab.github_token(), role="ci", path="gitlab")
