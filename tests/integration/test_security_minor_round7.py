"""Security review, round 7: four small findings, each against a real broker over HTTP
(the CLI as a subprocess, as users run it).

1. ``broker token capabilities TOKEN`` (no PATH) sent the token as the path and printed
   it back as the key of the answer: a PATH that looks like a token is now a usage error
   that does not repeat it, and nothing is sent.
2. ``--token VALUE`` got no warning, while a TOKEN argument did: it gets the same one
   line (not ``--token -``, nor ``BROKER_TOKEN`` / ``VAULT_TOKEN``).
3. A JWT's ``jti`` was written in clear in ``auth_failure`` / ``reuse_attempt`` lines
   (the store keeps only its SHA-256): it is now the audit HMAC, which
   ``broker audit hash`` computes.
4. A 403 on revoking another root token said that the accessor's token has the root
   policy: the caller now gets Vault's plain ``permission denied``; the audit line
   keeps the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests

from broker.audit import hash_value, load_key
from broker.auth import describe_token
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker
from tests.integration.jwt_fixtures import (
    jwt_role,
    oidc_issuer_fixture,
    oidc_method,
    running_broker,
)
from tests.integration.token_fixtures import audit_events, client, made_by_root
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.a]
default_ttl = "1h"

[policies.app]
"noop/creds/a" = ["read"]

[policies.ender]
"auth/token/revoke-accessor" = ["update"]
"auth/token/revoke" = ["update"]
"""

#: the --token warning, exactly (tests/unit/test_cli.py pins it for the other commands).
TOKEN_FLAG_WARNING = ("broker: warning: --token TOKEN on the command line is visible in the "
                      "process list (ps) and kept in shell history; use --token - to read it "
                      "from stdin, or --token-file FILE\n")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with noop_broker(tmp_path_factory.mktemp("secminor-r7"), CONFIG) as server:
        yield server


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, ROOT_TOKEN)


def cli(broker: BrokerThread, *args: str, stdin: str = "",
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``broker ARGS`` with ``stdin``; no BROKER_* / VAULT_* of ours but BROKER_ADDR and
    ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_"))}
    environ |= {"BROKER_ADDR": broker.url, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], input=stdin,
                          env=environ, capture_output=True, text=True, timeout=60)


def app_token(root: hvac.Client) -> str:
    """A fresh ``brk.`` token with the ``app`` policy."""
    return str(root.auth.token.create(policies=["app"], ttl="1h")["auth"]["client_token"])


def capability_requests(broker: BrokerThread) -> int:
    """How many requests reached the sys/capabilities* endpoints so far."""
    return sum(1 for e in audit_events(broker, "request")
               if e["request"]["path"].startswith("sys/capabilities"))


# -- 1. a token given where the PATH goes ---------------------------------------------------
@pytest.mark.parametrize("shape", [["{token}"], ["noop/creds/a", "{token}"],
                                   ["--accessor", "some-accessor", "{token}"],
                                   ["noop/creds/{token}"]])
def test_a_token_in_the_path_place_is_refused_and_never_echoed(
        broker: BrokerThread, root: hvac.Client, shape: list[str]) -> None:
    """`token capabilities TOKEN` (the PATH forgotten), `PATH TOKEN` (swapped), an
    accessor with a token as PATH and a path holding a token: exit 2, one line saying what to give, the token in
    neither stdout nor stderr, and nothing sent (it used to be sent as the path and
    printed back as the answer's key)."""
    token = app_token(root)
    before = capability_requests(broker)
    done = cli(broker, "token", "capabilities", *(p.format(token=token) for p in shape),
               "--format", "json", env={"BROKER_TOKEN": ROOT_TOKEN})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.startswith("broker: error: the PATH argument looks like (or holds) a token")
    assert done.stderr.count("\n") == 1, done.stderr
    assert token not in done.stderr and token[4:12] not in done.stderr
    assert capability_requests(broker) == before


def test_a_lone_dash_asks_for_the_path(broker: BrokerThread) -> None:
    """`token capabilities -` (the token on stdin, no PATH): a usage error naming the
    form, not a request for the path "-" with the stdin unread."""
    done = cli(broker, "token", "capabilities", "-", stdin="brk.whatever\n",
               env={"BROKER_TOKEN": ROOT_TOKEN})
    assert done.returncode == 2
    assert done.stderr == ("broker: error: - (read the TOKEN from stdin) comes before the "
                           "PATH: give - PATH\n")


def test_a_path_alone_is_still_the_callers_own(broker: BrokerThread,
                                               root: hvac.Client) -> None:
    """Vault's one-argument form: the PATH, for the token in use (BROKER_TOKEN: no
    warning)."""
    done = cli(broker, "token", "capabilities", "noop/creds/a", "--format", "json",
               env={"BROKER_TOKEN": app_token(root)})
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert json.loads(done.stdout) == {"noop/creds/a": ["read"]}


# -- 2. --token VALUE warns, as a TOKEN argument does ---------------------------------------
@pytest.mark.parametrize("where", ["before", "after"])
def test_the_token_flag_with_a_value_warns_once(broker: BrokerThread, root: hvac.Client,
                                                where: str) -> None:
    """`--token VALUE` (before or after the command): the command works, with exactly
    the one warning line on stderr, which never holds the token."""
    token = app_token(root)
    command = ["token", "capabilities", "noop/creds/a", "--format", "json"]
    argv = ["--token", token, *command] if where == "before" else [*command, "--token", token]
    done = cli(broker, *argv)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"noop/creds/a": ["read"]}
    assert done.stderr == TOKEN_FLAG_WARNING


def test_the_flag_and_a_token_argument_warn_once_each(broker: BrokerThread,
                                                      root: hvac.Client) -> None:
    """`--token T1 token lookup T2`: two secrets on the command line, two lines."""
    done = cli(broker, "--token", ROOT_TOKEN, "token", "lookup", app_token(root),
               "--format", "json")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines(keepends=True)
    assert len(lines) == 2 and TOKEN_FLAG_WARNING in lines, done.stderr
    assert ROOT_TOKEN not in done.stderr


@pytest.mark.parametrize("how", ["stdin", "BROKER_TOKEN", "VAULT_TOKEN", "token-file"])
def test_no_warning_where_the_token_is_not_on_the_command_line(
        broker: BrokerThread, root: hvac.Client, tmp_path: Path, how: str) -> None:
    """`--token -`, the variables and --token-file keep the token out of ps: no warning."""
    token = app_token(root)
    args, env, stdin = ["token", "lookup", "--format", "json"], {}, ""
    if how == "stdin":
        args, stdin = ["--token", "-", *args], token + "\n"
    elif how == "token-file":
        (tmp_path / "t").write_text(token)
        args = ["--token-file", str(tmp_path / "t"), *args]
    else:
        env = {how: token}
    done = cli(broker, *args, stdin=stdin, env=env)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert json.loads(done.stdout)["data"]["policies"] == ["app", "default"]


# -- 3. the jti in audit lines ------------------------------------------------------------
issuer = oidc_issuer_fixture()


@pytest.fixture(scope="module")
def jwt_broker(issuer: OIDCIssuer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[BrokerThread]:
    config = (oidc_method(issuer) + jwt_role("once") + "single_use = true\n"
              + jwt_role("other", bound_claims={"repository": "other/*"})
              + '\n[policies.app]\n"x/y" = ["read"]\n')
    with running_broker(tmp_path_factory.mktemp("secminor-jti"), config, revoke=()) as server:
        yield server


def login(broker: BrokerThread, role: str, jwt: str) -> requests.Response:
    return requests.post(f"{broker.url}/v1/auth/github/login", json={"role": role, "jwt": jwt},
                         timeout=30)


def audit_hmac(broker: BrokerThread, value: str) -> str:
    return hash_value(load_key(broker.config.audit.hmac_key_file), value)


def lines_with(broker: BrokerThread, type_: str, text: str) -> list[dict[str, Any]]:
    return [e for e in audit_events(broker, type_) if text in json.dumps(e)]


def test_an_auth_failure_writes_the_jti_as_its_audit_hmac(jwt_broker: BrokerThread,
                                                          issuer: OIDCIssuer) -> None:
    """A refused login (a claim the role does not bind): the line has the other claims
    as before and the jti as `broker audit hash` prints it, never in clear."""
    claims = issuer.github_claims(run_id="r7-failure")
    assert login(jwt_broker, "other", issuer.mint(claims)).status_code == 403
    mac = audit_hmac(jwt_broker, claims["jti"])
    [line] = lines_with(jwt_broker, "auth_failure", mac)
    assert line["jwt_claims"]["jti"] == mac
    assert line["jwt_claims"]["sub"] == claims["sub"]
    assert claims["jti"] not in Path(jwt_broker.audit_path).read_text()
    # How docs/auth.md says to find it: the jti on stdin of `broker audit hash --config`.
    done = subprocess.run([sys.executable, "-m", "broker.cli", "audit", "hash", "--config",
                           str(jwt_broker.config.source)], input=claims["jti"] + "\n",
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stdout) == (0, mac + "\n"), done.stderr


def test_a_reuse_attempt_writes_the_jti_as_its_audit_hmac(jwt_broker: BrokerThread,
                                                          issuer: OIDCIssuer) -> None:
    """A single_use JWT presented again: reuse_attempt with the jti's HMAC."""
    claims = issuer.github_claims(run_id="r7-reuse")
    jwt = issuer.mint(claims)
    assert login(jwt_broker, "once", jwt).status_code == 200
    assert login(jwt_broker, "once", jwt).status_code == 403
    [line] = lines_with(jwt_broker, "reuse_attempt", audit_hmac(jwt_broker, claims["jti"]))
    assert line["first_accessor"].startswith("hmac-sha256:")
    assert claims["jti"] not in Path(jwt_broker.audit_path).read_text()


def test_describe_token_never_shows_the_jti_in_clear(issuer: OIDCIssuer) -> None:
    """Without a hash function the jti is left out; a jti that is no string too."""
    claims = issuer.github_claims()
    assert "jti" not in describe_token(issuer.mint(claims))["jwt_claims"]
    shown = describe_token(issuer.mint(claims), lambda v: f"H({len(v)})")
    assert shown["jwt_claims"]["jti"] == f"H({len(claims['jti'])})"
    odd = describe_token(issuer.mint({**claims, "jti": 12345}), lambda v: "H")
    assert "jti" not in odd["jwt_claims"]


# -- 4. revoking a root token: a plain 403 ---------------------------------------------------
def test_a_refused_root_revoke_does_not_say_it_is_a_root_token(broker: BrokerThread,
                                                              root: hvac.Client) -> None:
    """update on revoke-accessor / revoke, a root token named: 403 `permission denied`
    and no more (the body used to say that the token has the root policy); the
    policy_denied line keeps the reason, and the root token lives on."""
    assert broker.state is not None
    value, record = broker.call(broker.state.tokens.create(
        policies=["root"], ttl=None, display_name="root", accessor="r7-root"))
    ender = {"X-Vault-Token": made_by_root(root, ["ender"])}
    for path, body in (("revoke-accessor", {"accessor": "r7-root"}), ("revoke", {"token": value})):
        answer = requests.post(f"{broker.url}/v1/auth/token/{path}", json=body, headers=ender,
                               timeout=30)
        assert (answer.status_code, answer.json()) == (403, {"errors": ["permission denied"]})
        assert "root" not in answer.text
        [denied] = [e for e in audit_events(broker, "policy_denied")
                    if e.get("checked_path") == f"auth/token/{path}"
                    and e["target"] == audit_hmac(broker, record.accessor)]
        assert "has the root policy" in denied["error"]
        assert f"sudo on auth/token/{path}" in denied["error"]
    assert client(broker, value).auth.token.lookup_self()["data"]["accessor"] == "r7-root"
