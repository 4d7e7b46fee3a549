"""QA fixes for ``broker exec`` with short-lived tokens, and for the JWT login path.

Real broker, real PostgreSQL, real OIDC issuer, ``broker exec`` as a subprocess:

- exec renews its own token so its leases (capped at the token's expiry) live
  the whole ``--ttl``, and says so when the token's max TTL comes first;
- exec does not revoke a login token that has expired already (a reuse attempt);
- a JWT with a huge integer ``exp``/``nbf``/``iat`` is a 403, audited;
- a key rotated within the JWKS refresh interval gets a message saying to retry.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.lease import LeaseState
from tests.conftest import run
from tests.integration.broker_harness import drop_pg_roles
from tests.integration.jwt_fixtures import (
    BRIEF_ROLE,
    ExecEnv,
    cli_environ,
    jwt_role,
    oidc_issuer_fixture,
    oidc_method,
    running_broker,
)
from tests.integration.test_api_postgres import role_exists
from tests.integration.test_exec import CHILD
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

#: every PostgreSQL role these tests make starts with it (shared server).
PREFIX = "jwtqa-"
#: a JWT role whose tokens cannot be renewed past their 3 s (and carry no run id).
FIXED_ROLE = jwt_role("fixed", claim_mappings=None, ttl="3s", max_ttl="3s")


def config(dsn: str, issuer: OIDCIssuer) -> str:
    return f"""
[leases]
revoke_backoff_base = "1s"
revoke_max_attempts = 3

[mounts.pg]
plugin = "postgres"
connection_url = "{dsn}"

[mounts.pg.roles.readonly]
username_template = "{PREFIX}{{{{random 8}}}}-{{{{unix_time}}}}"
default_ttl = "1h"
max_ttl = "2h"

[policies.app]
"pg/creds/readonly" = ["read"]
""" + oidc_method(issuer) + BRIEF_ROLE + FIXED_ROLE


class Env(ExecEnv):
    def exec(self, *exec_args: str, child: tuple[str, ...], jwt: str | None = None,
             token: str | None = None, extra: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        """Run ``broker exec`` with CHILD; logged in with ``jwt`` (CI_JWT) or ``token``."""
        environ = cli_environ(self.broker, self.dsn, **(extra or {}))
        login: tuple[str, ...] = ()
        if jwt is not None:
            environ["CI_JWT"] = jwt
            login = ("--jwt-env", "CI_JWT", "--auth-path", "github")
        else:
            environ["BROKER_TOKEN"] = token or self.broker.root_token
        argv = [sys.executable, "-m", "broker.cli", "exec", *login, *exec_args, "pg/readonly",
                "--", sys.executable, str(self.tmp / "child.py"), *child]
        return subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=60,
                              cwd=self.tmp)

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in
                Path(self.broker.audit_path).read_text().splitlines()]


issuer = oidc_issuer_fixture()


@pytest.fixture
def env(tmp_path: Path, postgres_dsn: str, issuer: OIDCIssuer) -> Iterator[Env]:
    (tmp_path / "child.py").write_text(CHILD)
    try:
        with running_broker(tmp_path, config(postgres_dsn, issuer)) as server:
            yield Env(server, tmp_path, postgres_dsn, issuer)
    finally:
        run(drop_pg_roles(postgres_dsn, PREFIX))


def test_exec_renews_its_login_token_so_the_leases_last_past_token_ttl(env: Env) -> None:
    """A JWT login whose token_ttl (4s) is shorter than --ttl: exec renews the token,
    the lease follows it, and the role still works at 6s; the start-up warning names
    the login token's max TTL (20s, before --ttl 30s), not the role's."""
    out = env.tmp / "out.json"
    jwt = env.issuer.github_token(repository="acme/app", run_id="9001")
    # Heartbeat 2 s, not 1 s: each renewal has one heartbeat of slack, and one broker
    # answer slower than 1 s on a loaded machine printed "cannot renew" (or let the
    # lease expire). The token's 4 s still ends before the command's 6 s.
    done = env.exec("--ttl", "30s", "--heartbeat", "2s", "--auth-role", "brief",
                    child=(str(out), "ok", "6", "0"), jwt=jwt)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    user = seen["env"]["PGUSER"]
    assert user.startswith(PREFIX)
    # 6 s > token_ttl: without renewing the token the role was dropped at 4 s.
    assert seen["logins"] == {"PGUSER": user}, done.stderr
    assert "the login token's max TTL (token_max_ttl) ends the lease at" in done.stderr
    assert "before --ttl" in done.stderr
    assert "role's max TTL" not in done.stderr
    assert "warning: cannot renew" not in done.stderr
    assert not run(role_exists(env.dsn, user))
    lease = env.lease(seen["env"]["BROKER_LEASE_IDS"])
    assert lease.state is LeaseState.REVOKED
    assert env.token_state(lease.owner) == "revoked"
    assert not [e for e in env.audit() if e["type"] == "reuse_attempt"]


def test_a_token_ttl_shorter_than_the_heartbeat_is_renewed_in_time(env: Env) -> None:
    """With a heartbeat (10s) longer than the login token's TTL (4s), exec renews the
    token and the lease before the token would end them, not at the next heartbeat."""
    out = env.tmp / "out.json"
    jwt = env.issuer.github_token(repository="acme/app", run_id="9004")
    done = env.exec("--heartbeat", "10s", "--auth-role", "brief",
                    child=(str(out), "ok", "6", "0"), jwt=jwt)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["logins"] == {"PGUSER": seen["env"]["PGUSER"]}, done.stderr
    assert not run(role_exists(env.dsn, seen["env"]["PGUSER"]))


def test_exec_does_not_revoke_its_login_token_once_it_has_expired(env: Env) -> None:
    """A login token that cannot outlive the command (token_max_ttl 3s) has expired by
    the time exec cleans up: exec leaves it be, so no reuse_attempt is audited and no
    warning printed."""
    out = env.tmp / "out.json"
    jwt = env.issuer.github_token(repository="acme/app", run_id="9002")
    done = env.exec("--heartbeat", "1s", "--auth-role", "fixed",
                    child=(str(out), "ok", "4.5", "0"), jwt=jwt)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    lease = env.lease(seen["env"]["BROKER_LEASE_IDS"])
    # Expired at the token's 3 s; the sweeper may not have ended it yet when exec
    # returns 1.5 s later on a loaded machine: wait for it (a lease exec revoked
    # would read REVOKED, which ends the wait too and fails).
    deadline = time.monotonic() + 15
    while (lease.state in (LeaseState.ACTIVE, LeaseState.REVOKING)
           and time.monotonic() < deadline):
        time.sleep(0.2)
        lease = env.lease(seen["env"]["BROKER_LEASE_IDS"])
    assert lease.state is LeaseState.EXPIRED
    assert "could not revoke" not in done.stderr
    assert not [e for e in env.audit() if e["type"] == "reuse_attempt"], done.stderr


def test_exec_warns_that_a_non_renewable_token_ends_the_lease_before_ttl(env: Env) -> None:
    """A given BROKER_TOKEN that is not renewable caps the lease at its expiry: the
    warning says so (it used to blame the role's max TTL)."""
    resp = requests.post(f"{env.broker.url}/v1/auth/token/create",
                         json={"policies": ["app"], "ttl": "30s", "renewable": False},
                         headers={"X-Vault-Token": env.broker.root_token}, timeout=30)
    assert resp.status_code == 200, resp.text
    out = env.tmp / "out.json"
    done = env.exec("--ttl", "5m", "--heartbeat", "1s", child=(str(out), "ok", "0", "0"),
                    token=resp.json()["auth"]["client_token"])
    assert done.returncode == 0, done.stderr
    assert "the broker token is not renewable and expires at" in done.stderr
    assert "role's max TTL" not in done.stderr


@pytest.mark.parametrize("exported", [False, True])
def test_pass_token_with_a_jwt_login_says_what_it_passes(env: Env, exported: bool) -> None:
    """--pass-token with a JWT login: one warning that the login token is not passed
    (and, with BROKER_TOKEN exported, that the exported one is)."""
    out = env.tmp / "out.json"
    jwt = env.issuer.github_token(repository="acme/app", run_id="9003")
    extra = {"VAULT_TOKEN": "s.not-used-by-exec"} if exported else {}
    done = env.exec("--pass-token", "--auth-role", "brief", child=(str(out), "ok", "0", "0"),
                    jwt=jwt, extra=extra)
    assert done.returncode == 0, done.stderr
    if exported:
        assert ("warning: --pass-token with a JWT login passes on VAULT_TOKEN from the "
                "environment, not the login token") in done.stderr
    else:
        assert ("warning: --pass-token has no effect with a JWT login: the login token "
                "never reaches the command") in done.stderr


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_a_huge_integer_time_claim_is_a_403_and_audited(env: Env, claim: str) -> None:
    """A signed JWT whose exp/nbf/iat is a 401-digit integer is refused (403) and
    audited as auth_failure; it used to be a 500 (OverflowError) with no audit line."""
    claims = env.issuer.github_claims(repository="acme/app")
    marker = 7_777_777_777
    claims[claim] = marker
    # JSON allows an integer of any length (Python reads up to 4300 digits).
    token = env.issuer.mint(json.loads(json.dumps(claims).replace(str(marker), "1" + "0" * 400)))
    resp = requests.post(f"{env.broker.url}/v1/auth/github/login",
                         json={"role": "brief", "jwt": token}, timeout=30)
    assert resp.status_code == 403, resp.text
    error = resp.json()["errors"][0]
    assert error == f"permission denied: the {claim} claim is out of range"
    assert any(e["type"] == "auth_failure" and e.get("error") == error for e in env.audit())


def test_a_key_rotated_within_the_refresh_interval_gets_a_retry_hint(
        tmp_path: Path, postgres_dsn: str) -> None:
    """A token signed with a key published moments after the last JWKS fetch is refused
    (403), and the message says the keys were fetched less than 10s ago and to retry
    shortly, not that the key is unknown for good."""
    with OIDCIssuer() as oidc, running_broker(tmp_path, config(postgres_dsn, oidc),
                                              revoke=()) as server:
        def login(token: str) -> requests.Response:
            return requests.post(f"{server.url}/v1/auth/github/login",
                                 json={"role": "brief", "jwt": token}, timeout=30)

        assert login(oidc.github_token(repository="acme/app")).status_code == 200
        new = oidc.rotate()
        resp = login(oidc.github_token(repository="acme/app", key=new))
        assert resp.status_code == 403, resp.text
        error = resp.json()["errors"][0]
        assert error.startswith(f"permission denied: unknown signing key id '{new.kid}': "
                                "not in the issuer's keys as fetched less than 1s ago")
        assert "fetched again at most every 10s" in error
        assert re.search(r"retry in (9|10)s$", error), error
