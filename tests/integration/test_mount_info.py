"""Least privilege for mount information, against a real broker issuing real PostgreSQL roles.

The built-in ``default`` policy no longer grants ``read`` on ``sys/mounts`` (every mount
and role): a token learns about a mount it may use from Vault's
``sys/internal/ui/mounts/{path}``, and ``broker creds --format env`` and ``broker exec``
name the variables from it, so a CI token allowed one role still gets ``PGPASSWORD``.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
    cli_environ,
    github_auth,
    oidc_issuer_fixture,
    running_broker,
    second_pg_mount,
)
from tests.integration.test_api_postgres import pg_mount, role_exists
from tests.integration.test_openapi import CHECKS, schema
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

INFO = "sys/internal/ui/mounts"
PG_ENV_NAMES = {"username": "PGUSER", "password": "PGPASSWORD"}

#: Writes the PG* and BROKER_LEASE_IDS variables it was given to argv[1].
CHILD = r'''
import json, os, sys
with open(sys.argv[1], "w") as fh:
    json.dump({k: v for k, v in os.environ.items()
               if k.startswith("PG") or k == "BROKER_LEASE_IDS"}, fh)
'''


def config(dsn: str, issuer: OIDCIssuer) -> str:
    """pg (roles readonly, short) and pg2; a policy for one role of pg only; a JWT login."""
    return pg_mount(dsn) + second_pg_mount(dsn) + """
[policies.one-role]
"pg/creds/readonly" = ["read"]

[policies.denied]
"pg/creds/readonly" = ["deny"]

[policies.lister]
"sys/leases/lookup/*" = ["list", "sudo"]

[policies.templated]
"{{identity.metadata.where}}/readonly" = ["read"]
""" + github_auth(issuer, policies=["one-role"])


issuer = oidc_issuer_fixture()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str,
           issuer: OIDCIssuer) -> Iterator[BrokerThread]:
    tmp = tmp_path_factory.mktemp("mount-info")
    (tmp / "child.py").write_text(CHILD)
    with running_broker(tmp, config(postgres_dsn, issuer), revoke=("pg/", "pg2/")) as server:
        yield server


def token(broker: BrokerThread, *policies: str) -> str:
    created = call(broker, broker.root_token, "POST", "auth/token/create",
                   json={"policies": list(policies), "ttl": "3h"})
    assert created.status_code == 200, created.text
    return str(created.json()["auth"]["client_token"])


def call(broker: BrokerThread, tok: str | None, method: str, path: str,
         **kwargs: Any) -> requests.Response:
    headers = {"X-Vault-Token": tok} if tok is not None else {}
    return requests.request(method, f"{broker.url}/v1/{path}", headers=headers, timeout=30,
                            **kwargs)


def cli_env(broker: BrokerThread, tok: str | None) -> dict[str, str]:
    """A ``broker`` subprocess's environment, with BROKER_TOKEN ``tok`` if there is one."""
    return cli_environ(broker, **({"BROKER_TOKEN": tok} if tok else {}))


# --------------------------------------------------------------------------- the API


def test_a_token_for_one_role_reads_its_mount_and_env_names(broker: BrokerThread) -> None:
    """A token whose only grant is pg/creds/readonly gets pg's type, path and env_names, by
    the mount's name or any path under it, in Vault's shape; no role is named, not even
    its own (pg has another, "short")."""
    tok = token(broker, "one-role")
    answers = [call(broker, tok, "GET", f"{INFO}/{path}")
               for path in ("pg", "pg/", "pg/creds/readonly", "pg/creds/short")]
    for resp in answers:
        assert resp.status_code == 200, resp.text
        assert resp.json()["data"] == answers[0].json()["data"]
        assert "readonly" not in resp.text and "short" not in resp.text
    body = answers[0].json()
    data = body["data"]
    assert data["type"] == "postgres" and data["path"] == "pg/"
    assert data["env_names"] == PG_ENV_NAMES
    assert data["options"] is None and data["description"] == ""
    assert data["config"] == {"default_lease_ttl": 0, "max_lease_ttl": 0,
                              "force_no_cache": False}
    assert data["accessor"].startswith("postgres_") and data["uuid"]
    assert data["healthy"] is True
    assert "roles" not in data
    assert body["request_id"] and body["lease_id"] == "" and body["auth"] is None


def test_another_mount_and_a_missing_one_get_the_same_403(broker: BrokerThread) -> None:
    """pg2 (which exists) and nope (which does not) are refused alike, in Vault's words, so
    the path tells nothing about which mounts exist; so is pg to a token denied there."""
    tok = token(broker, "one-role")
    errors = {}
    for path in ("pg2", "nope", "pg2/creds/readonly"):
        resp = call(broker, tok, "GET", f"{INFO}/{path}")
        assert resp.status_code == 403, resp.text
        errors[path] = resp.json()["errors"]
    assert errors["pg2"] == ["preflight capability check returned 403, please ensure "
                             "client's policies grant access to path \"pg2/\""]
    assert errors["nope"] == [errors["pg2"][0].replace("pg2/", "nope/")]
    assert call(broker, token(broker, "denied"), "GET", f"{INFO}/pg").status_code == 403
    assert call(broker, None, "GET", f"{INFO}/pg").status_code == 403
    assert call(broker, "not-a-token", "GET", f"{INFO}/pg").status_code == 403


def test_an_auth_method_is_answered_on_its_auth_path(broker: BrokerThread) -> None:
    """As Vault: sys/internal/ui/mounts/auth/github answers the auth method (it was a 403
    even for root, the name taken as a mount "auth"); token/ for any token (the default
    policy grants auth/token/lookup-self); github/ only to a token granted under it."""
    root = call(broker, broker.root_token, "GET", f"{INFO}/auth/github")
    assert root.status_code == 200, root.text
    assert root.json()["data"]["type"] == "jwt" and root.json()["data"]["path"] == "auth/github/"
    one = token(broker, "one-role")
    mine = call(broker, one, "GET", f"{INFO}/auth/token/lookup-self")
    assert mine.status_code == 200 and mine.json()["data"]["path"] == "auth/token/", mine.text
    for path in ("auth/github", "auth/nope", "auth", "auth/"):
        assert call(broker, one, "GET", f"{INFO}/{path}").status_code == 403, path


def test_sys_mounts_shows_a_token_without_the_grant_only_its_mounts_without_roles(
        broker: BrokerThread) -> None:
    """sys/mounts listed every mount and every role to every token (the default policy
    granted it). Now a token without ``read`` on it (capabilities-self says deny) gets
    only the mounts it may use, without roles, not a 403: an older ``broker creds`` /
    ``exec`` reads its variable names there, and a 403 made it fall back to BROKER_*
    names (the command ran without PGUSER). Root still reads everything."""
    for tok, seen in ((token(broker, "default"), set()), (token(broker, "one-role"), {"pg/"})):
        resp = call(broker, tok, "GET", "sys/mounts")
        assert resp.status_code == 200, resp.text
        assert set(resp.json()["data"]) == seen, resp.text
        assert all("roles" not in m for m in resp.json()["data"].values())
        assert "short" not in resp.text
        assert resp.json()["warnings"] and "only the mounts this token may use" in \
            resp.json()["warnings"][0]
        caps = call(broker, tok, "POST", "sys/capabilities-self",
                    json={"paths": ["sys/mounts"]})
        assert caps.json()["capabilities"] == ["deny"], caps.text
    one = call(broker, token(broker, "one-role"), "GET", "sys/mounts").json()["data"]
    assert one["pg/"]["type"] == "postgres" and one["pg/"]["env_names"] == PG_ENV_NAMES
    root = call(broker, broker.root_token, "GET", "sys/mounts")
    assert root.status_code == 200, root.text
    assert root.json()["data"]["pg/"]["roles"] == ["readonly", "short"]
    assert root.json()["data"]["pg2/"]["env_names"] == PG_ENV_NAMES


def test_a_templated_rule_whose_value_holds_a_slash_counts_for_its_mount(
        broker: BrokerThread) -> None:
    """``{{identity.metadata.where}}/readonly`` with ``where = "pg/creds"`` grants read on
    pg/creds/readonly (capabilities-self); the mount info agreed only once the resolved
    value's ``/`` was split into segments (it answered 403)."""
    created = call(broker, broker.root_token, "POST", "auth/token/create",
                   json={"policies": ["templated"], "ttl": "1h",
                         "meta": {"where": "pg/creds"}})
    assert created.status_code == 200, created.text
    tok = created.json()["auth"]["client_token"]
    caps = call(broker, tok, "POST", "sys/capabilities-self",
                json={"paths": ["pg/creds/readonly"]}).json()
    assert caps["capabilities"] == ["read"], caps
    assert call(broker, tok, "GET", f"{INFO}/pg").status_code == 200
    assert call(broker, tok, "GET", f"{INFO}/pg2").status_code == 403


def test_the_listing_shows_only_the_mounts_the_token_may_use(broker: BrokerThread) -> None:
    """GET sys/internal/ui/mounts: pg and token/ for the one-role token, every mount and
    auth method for root, nothing without a token (Vault's unauthenticated answer)."""
    one = call(broker, token(broker, "one-role"), "GET", INFO)
    assert one.status_code == 200, one.text
    assert set(one.json()["data"]["secret"]) == {"pg/"}
    assert set(one.json()["data"]["auth"]) == {"token/"}
    pg = one.json()["data"]["secret"]["pg/"]
    assert pg["type"] == "postgres" and pg["env_names"] == PG_ENV_NAMES and "roles" not in pg
    assert "short" not in one.text
    denied = call(broker, token(broker, "denied"), "GET", INFO).json()["data"]
    assert denied == {"secret": {}, "auth": denied["auth"]} and set(denied["auth"]) == {"token/"}
    root = call(broker, broker.root_token, "GET", INFO).json()["data"]
    assert set(root["secret"]) == {"pg/", "pg2/"}
    assert set(root["auth"]) == {"token/", "github/"}
    assert root["auth"]["github/"]["type"] == "jwt"
    anonymous = call(broker, None, "GET", INFO)
    assert anonymous.status_code == 200
    assert anonymous.json()["data"] == {"secret": {}, "auth": {}}
    assert call(broker, "not-a-token", "GET", INFO).status_code == 403


def test_hvac_reads_the_mount_and_lists_only_its_own(broker: BrokerThread) -> None:
    """hvac has no method for the path; its generic read gets it. Its mount listing
    (list_mounted_secrets_engines, sys/mounts) shows the one-role token only pg."""
    client = hvac.Client(url=broker.url, token=token(broker, "one-role"))
    answer = client.read(f"{INFO}/pg/creds/readonly")
    assert isinstance(answer, dict) and answer["data"]["type"] == "postgres"
    with pytest.raises(hvac.exceptions.Forbidden):
        client.read(f"{INFO}/pg2")
    assert set(client.sys.list_mounted_secrets_engines()["data"]) == {"pg/"}
    root = hvac.Client(url=broker.url, token=broker.root_token)
    assert set(root.sys.list_mounted_secrets_engines()["data"]) == {"pg/", "pg2/"}


def test_the_answers_match_the_api_document(broker: BrokerThread) -> None:
    """Real 200 answers of both paths (a one-role token, root) as docs/openapi.yaml says."""
    for tok in (token(broker, "one-role"), broker.root_token):
        listing = call(broker, tok, "GET", INFO)
        case = schema["/v1/sys/internal/ui/mounts"]["GET"].Case()
        case.validate_response(listing, checks=CHECKS)
        one = call(broker, tok, "GET", f"{INFO}/pg/creds/readonly")
        case = schema["/v1/sys/internal/ui/mounts/{path}"]["GET"].Case(
            path_parameters={"path": "pg/creds/readonly"})
        case.validate_response(one, checks=CHECKS)


# --------------------------------------------------------------------------- the CLI


def test_creds_env_names_the_variables_for_a_one_role_token(broker: BrokerThread,
                                                            postgres_dsn: str) -> None:
    """broker creds pg/readonly --format env with the one-role token: PGUSER/PGPASSWORD
    (not BROKER_*), and no warning; the role is real."""
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "creds", "pg/readonly", "--format", "env"],
        env=cli_env(broker, token(broker, "one-role")), capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [
        "export PGUSER", "export PGPASSWORD", "export BROKER_LEASE_ID"]
    assert run(role_exists(postgres_dsn, lines[0].split("=", 1)[1]))


def test_lease_list_with_a_partial_mount_answer_does_not_call_a_mount_missing(
        broker: BrokerThread) -> None:
    """A token that may list leases but not read sys/mounts, with no grant under pg/:
    sys/mounts answers it an empty, partial list (said in ``warnings``). An empty
    listing of pg's leases is then nothing, exit 0, not "no mount named 'pg'" (the
    mount exists); a mount that does not exist cannot be told apart either."""
    env = cli_env(broker, token(broker, "lister"))
    for prefix, code in (("pg/creds/short/", 0), ("nomount/", 0)):
        done = subprocess.run([sys.executable, "-m", "broker.cli", "lease", "list", prefix],
                              env=env, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (code, "", ""), prefix
    # Root reads the whole list: an unknown mount is named as before.
    done = subprocess.run([sys.executable, "-m", "broker.cli", "lease", "list", "nomount/"],
                          env=cli_env(broker, broker.root_token), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "no mount named 'nomount'" in done.stderr, done.stderr


def test_exec_with_a_ci_login_token_names_the_variables(broker: BrokerThread,
                                                        issuer: OIDCIssuer) -> None:
    """broker exec logging in with a CI JWT (a token allowed pg/creds/readonly only): the
    command gets PGUSER/PGPASSWORD, and exec warns about nothing."""
    out = Path(broker.config.audit.path).parent / "exec-out.json"
    child = str(Path(broker.config.audit.path).parent / "child.py")
    argv = [sys.executable, "-m", "broker.cli", "exec", "--jwt-env", "CI_JWT", "--auth-role",
            "deploy", "--auth-path", "github", "pg/readonly", "--", sys.executable, child,
            str(out)]
    jwt = issuer.github_token(repository="acme/app", run_id="9001")
    done = subprocess.run(argv, env=cli_env(broker, None) | {"CI_JWT": jwt},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    seen = json.loads(out.read_text())
    assert set(seen) == {"PGUSER", "PGPASSWORD", "BROKER_LEASE_IDS"}, seen
    assert seen["BROKER_LEASE_IDS"].startswith("pg/creds/readonly/")


def test_exec_for_a_mount_the_token_may_not_use_is_one_error_line(
        broker: BrokerThread) -> None:
    """The one-role token asking exec for pg2's role: pg2's information is refused, and so
    is the credential; exec says so in one error line, not a warning about the variable
    names first."""
    out = Path(broker.config.audit.path).parent / "exec-denied.json"
    child = str(Path(broker.config.audit.path).parent / "child.py")
    argv = [sys.executable, "-m", "broker.cli", "exec", "pg2/readonly", "--", sys.executable,
            child, str(out)]
    done = subprocess.run(argv, env=cli_env(broker, token(broker, "one-role")),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 125, done.stderr
    assert done.stderr.splitlines() == [
        "broker: error: pg2/readonly: permission denied: read on pg2/creds/readonly (HTTP 403)"]
    assert not out.exists()
