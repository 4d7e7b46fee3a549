"""``broker exec``'s login token dies with the run; ``--token-file`` keeps a token out of ``ps``.

Real broker, real PostgreSQL, real OIDC issuer, ``broker`` as a subprocess.

- A JWT login's token used to keep its whole ``token_ttl`` (30 min here) while
  nobody held it after a SIGKILL of exec. exec now cuts it down right after the
  login to :func:`broker.exec.login_token_ttl` (three heartbeats, at least 60 s)
  and the heartbeat renews it before the leases, which follow it; a token exec
  was given, ``--no-revoke`` and ``--heartbeat 0`` keep the token's TTL.
- ``--token-file FILE`` / ``BROKER_TOKEN_FILE``: the token read from a file, one
  error line naming the file when it cannot be used.
"""

from __future__ import annotations

import json
import os
import signal
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
from tests.integration.jwt_fixtures import (
    github_auth,
    kill_group,
    oidc_issuer_fixture,
    running_broker,
    start_exec,
    wait_for_report,
)
from tests.integration.test_api_postgres import pg_mount, role_exists
from tests.integration.test_exec import CHILD
from tests.integration.test_exec_qa_round4 import Env as Qa4Env
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

BROKER = [sys.executable, "-m", "broker.cli"]
EXEC = [*BROKER, "exec"]
LOGIN = ("--jwt-env", "CI_JWT", "--auth-role", "deploy", "--auth-path", "github")
#: the deploy role's token_ttl (github_auth): what the login token lived before.
ROLE_TOKEN_TTL = 30 * 60


def login_token_ttl(heartbeat: int) -> int:
    """The rule (broker.exec.login_token_ttl): the leases' two heartbeats plus one, at
    least a minute. Spelled out here so the tests also run, and fail, on older code."""
    return max(3 * heartbeat, 60)


class Env(Qa4Env):
    """The exec QA round's test environment, plus root calls and token lookups."""

    def root(self, method: str, path: str, **body: Any) -> requests.Response:
        return requests.request(method, f"{self.broker.url}/v1/{path}", json=body or None,
                                headers={"X-Vault-Token": self.broker.root_token}, timeout=30)

    def token_of(self, lease_id: str) -> str:
        """The accessor of the token that issued ``lease_id`` (its owner)."""
        lease = self.lease(lease_id)
        assert lease is not None, lease_id
        return str(lease.owner)

    def lookup(self, accessor: str) -> dict[str, Any] | None:
        """``auth/token/lookup-accessor`` as root: the token's data; None once it is gone."""
        resp = self.root("POST", "auth/token/lookup-accessor", accessor=accessor)
        if resp.status_code != 200:
            return None
        data: dict[str, Any] = resp.json()["data"]
        return data

    def child_token(self, ttl: str = "20m") -> str:
        resp = self.root("POST", "auth/token/create", policies=["app"], ttl=ttl)
        assert resp.status_code == 200, resp.text
        token: str = resp.json()["auth"]["client_token"]
        return token


issuer = oidc_issuer_fixture()


@pytest.fixture
def env(tmp_path: Path, postgres_dsn: str, issuer: OIDCIssuer) -> Iterator[Env]:
    (tmp_path / "child.py").write_text(CHILD)
    with running_broker(tmp_path, pg_mount(postgres_dsn) + github_auth(issuer)) as server:
        yield Env(server, tmp_path, postgres_dsn, issuer)


def _start(env: Env, *exec_args: str, environ: dict[str, str]) -> subprocess.Popen[bytes]:
    """exec with CHILD in "wait" mode: it reports to out.json, then sleeps."""
    return start_exec([*EXEC, *exec_args, "pg/readonly", "--", sys.executable,
                       str(env.tmp / "child.py"), str(env.tmp / "out.json"), "wait"],
                      environ, env.tmp)


def _ready(env: Env, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """What CHILD reported once it runs (exec's stderr if exec ends first)."""
    return wait_for_report(env.tmp / "out.json", proc, env.tmp / "exec.stderr")


def _token_ttl_during_a_run(env: Env, *exec_args: str, **extra: str) -> tuple[int, str]:
    """Run exec around a waiting command, look its token up, end it with SIGTERM:
    (the token's ttl while the command ran, exec's stderr)."""
    (env.tmp / "out.json").unlink(missing_ok=True)
    proc = _start(env, *exec_args, environ=env.environ(**extra))
    try:
        ready = _ready(env, proc)
        data = env.lookup(env.token_of(ready["env"]["BROKER_LEASE_IDS"]))
        assert data is not None
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        kill_group(proc)
    return int(data["ttl"]), (env.tmp / "exec.stderr").read_text()


# --------------------------------------------------------------------------- task 1


@pytest.mark.parametrize("heartbeat", [1, 30])
def test_the_login_token_is_cut_down_to_the_heartbeat_bound(env: Env, heartbeat: int) -> None:
    """Right after the JWT login, exec's token has at most login_token_ttl(heartbeat)
    left (60 s for a 1 s heartbeat, 90 s for the default 30 s), not the role's 30 min:
    a SIGKILLed exec leaves it alive about as long as its leases. Nothing secret in
    exec's output, and the leases are not warned about (the token is renewed)."""
    jwt = env.jwt(f"690{heartbeat}")
    ttl, stderr = _token_ttl_during_a_run(env, "--heartbeat", f"{heartbeat}s", "--ttl", "10m",
                                          *LOGIN, CI_JWT=jwt)
    assert 0 < ttl <= login_token_ttl(heartbeat) + 1, (ttl, stderr)
    assert "before --ttl" not in stderr and "could not shorten" not in stderr, stderr
    assert jwt.rsplit(".", 1)[-1] not in stderr


def test_only_a_token_exec_logged_in_for_is_cut_down(env: Env) -> None:
    """The JWT login's token is cut down; a token exec was given (BROKER_TOKEN) is not
    its to shorten, and with --no-revoke or --heartbeat 0 the login token keeps its
    TTL (the leases are meant to live on / nothing would renew it)."""
    ttl, stderr = _token_ttl_during_a_run(env, "--heartbeat", "2s", *LOGIN,
                                          CI_JWT=env.jwt("6910"))
    assert ttl <= login_token_ttl(2) + 1, stderr
    # A given token: its owner's to manage.
    ttl, stderr = _token_ttl_during_a_run(env, "--heartbeat", "2s",
                                          BROKER_TOKEN=env.child_token("20m"))
    assert 1100 < ttl <= 1200, stderr
    # --no-revoke: the leases and the token are left alive on purpose.
    ttl, stderr = _token_ttl_during_a_run(env, "--heartbeat", "2s", "--no-revoke", *LOGIN,
                                          CI_JWT=env.jwt("6911"))
    assert ROLE_TOKEN_TTL - 60 < ttl <= ROLE_TOKEN_TTL, stderr
    # --heartbeat 0: nothing renews the token later; it keeps what the login gave it.
    ttl, stderr = _token_ttl_during_a_run(env, "--heartbeat", "0", *LOGIN,
                                          CI_JWT=env.jwt("6912"))
    assert ROLE_TOKEN_TTL - 60 < ttl <= ROLE_TOKEN_TTL, stderr


def test_leases_outlive_the_cut_down_token_ttl_and_sigkill_ends_the_token(env: Env) -> None:
    """--heartbeat 2s: the token starts with 60 s. The command runs past that (about
    66 s): the heartbeat renewed the token before the leases each time, so the lease
    is still active and its role still exists, the token never had more than the
    bound left. Then exec is SIGKILLed: the token expires within the bound (here
    within a few heartbeats, as the heartbeat keeps it at three), and the role is
    dropped soon after (two heartbeats plus sweeper slack; the bug keeps it 30 min).

    2 s, not 1 s: a lease renewed every heartbeat by two heartbeats has one
    heartbeat of slack, and a loaded CI machine once kept the broker from
    answering one renewal within 1 s, which (rightly) let the lease expire."""
    heartbeat = 2
    bound = login_token_ttl(heartbeat)
    proc = _start(env, "--heartbeat", f"{heartbeat}s", *LOGIN,
                  environ=env.environ(CI_JWT=env.jwt("6920")))
    try:
        ready = _ready(env, proc)
        lease_id, user = ready["env"]["BROKER_LEASE_IDS"], ready["env"]["PGUSER"]
        accessor = env.token_of(lease_id)
        first = env.lookup(accessor)
        assert first is not None and 0 < first["ttl"] <= bound + 1, first
        started = time.monotonic()
        while time.monotonic() - started < bound + 6:
            time.sleep(5)
            assert proc.poll() is None, (env.tmp / "exec.stderr").read_text()
            data = env.lookup(accessor)
            assert data is not None and 0 < data["ttl"] <= bound + 1, data
            lease = env.lease(lease_id)
            assert lease.state is LeaseState.ACTIVE, (env.tmp / "exec.stderr").read_text()
            assert lease.expire_time > time.time()
        # Past the token's first expiry: renewed, and the lease with it.
        data = env.lookup(accessor)
        assert data is not None and data["expire_time"] > first["expire_time"]
        assert run(role_exists(env.dsn, user))
        stderr = (env.tmp / "exec.stderr").read_text()
        assert "warning" not in stderr.lower(), stderr
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(10)
        while env.lookup(accessor) is not None and time.monotonic() - killed < bound + 10:
            time.sleep(0.25)
        gone_after = time.monotonic() - killed
        assert env.lookup(accessor) is None
        assert gone_after <= bound + 2, f"the token lived {gone_after:.1f}s after SIGKILL"
        # Once the heartbeat has taken over, the token has at most 3 heartbeats + 1 s left.
        assert gone_after <= 3 * heartbeat + 1 + 3, f"the token lived {gone_after:.1f}s after SIGKILL"
        deadline = time.monotonic() + 2 * heartbeat + 10
        while run(role_exists(env.dsn, user)) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not run(role_exists(env.dsn, user))
    finally:
        kill_group(proc)


# --------------------------------------------------------------------------- task 2


def _cli(env: Env, *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BROKER, *argv], env=env.environ(**extra), capture_output=True,
                          text=True, timeout=60, cwd=env.tmp)


def _one_error_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("broker: error: "), lines
    return lines[0]


def test_token_file_flag_and_variable(env: Env) -> None:
    """--token-file FILE (CR LF and blanks around the token are stripped), as a global
    option or after the command, and BROKER_TOKEN_FILE; the flag wins over the
    variables (a wrong BROKER_TOKEN here), as --token does."""
    token = env.child_token()
    token_file = env.tmp / "token"
    token_file.write_text(f"  {token}\r\n\n")
    for argv, extra in (
        (("--token-file", str(token_file), "token", "lookup", "--format", "json"), {}),
        (("token", "lookup", "--token-file", str(token_file), "--format", "json"),
         {"BROKER_TOKEN": "not-a-token"}),
        (("token", "lookup", "--format", "json"), {"BROKER_TOKEN_FILE": str(token_file)}),
    ):
        done = _cli(env, *argv, **extra)
        assert done.returncode == 0, done.stderr
        assert sorted(json.loads(done.stdout)["data"]["policies"]) == ["app", "default"]
        assert token not in done.stderr


def test_token_file_errors_are_one_line_naming_the_file(env: Env) -> None:
    """Unreadable, missing or empty file: one line naming the file, exit 1. With
    --token too, or BROKER_TOKEN and BROKER_TOKEN_FILE both set: a usage error (2).
    No token value is ever echoed."""
    missing = env.tmp / "no-such-token"
    line = _one_error_line(_cli(env, "--token-file", str(missing), "token", "lookup"), 1)
    assert line == f"broker: error: cannot read --token-file {missing}: No such file or directory"
    empty = env.tmp / "empty-token"
    empty.write_text(" \r\n")
    line = _one_error_line(_cli(env, "lease", "list", "pg/", "--token-file", str(empty)), 1)
    assert line == f"broker: error: --token-file {empty} is empty"
    line = _one_error_line(_cli(env, "token", "lookup", BROKER_TOKEN_FILE=str(env.tmp)), 1)
    assert line.startswith(f"broker: error: cannot read BROKER_TOKEN_FILE {env.tmp}: ")
    good = env.tmp / "token"
    good.write_text(env.broker.root_token)
    line = _one_error_line(_cli(env, "--token", "secret-ish-value", "--token-file", str(good),
                                "token", "lookup"), 2)
    assert "--token and --token-file" in line and "secret-ish-value" not in line
    line = _one_error_line(_cli(env, "token", "lookup", BROKER_TOKEN="secret-ish-value",
                                BROKER_TOKEN_FILE=str(good)), 2)
    assert "BROKER_TOKEN and BROKER_TOKEN_FILE" in line and "secret-ish-value" not in line
    assert env.broker.root_token not in line


def test_exec_with_a_token_file(env: Env) -> None:
    """exec reads its token from --token-file without the --token warning, and keeps
    BROKER_TOKEN_FILE from the command (it could read the file); --token's warning
    now points to --token-file."""
    token_file = env.tmp / "token"
    token_file.write_text(env.child_token() + "\n")
    out = env.tmp / "names.txt"
    done = subprocess.run(
        [*EXEC, "--token-file", str(token_file), "pg/readonly", "--", "sh", "-c",
         f'env | cut -d= -f1 > {out}'],
        env=env.environ(), capture_output=True, text=True, timeout=60, cwd=env.tmp)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    done = subprocess.run(
        [*EXEC, "pg/readonly", "--", "sh", "-c", f'env | cut -d= -f1 > {out}'],
        env=env.environ(BROKER_TOKEN_FILE=str(token_file)), capture_output=True, text=True,
        timeout=60, cwd=env.tmp)
    assert done.returncode == 0, done.stderr
    names = out.read_text().split()
    assert "PGUSER" in names and "BROKER_TOKEN_FILE" not in names
    done = subprocess.run([*EXEC, "--token", env.broker.root_token, "pg/readonly", "--",
                           "true"], env=env.environ(), capture_output=True, text=True,
                          timeout=60, cwd=env.tmp)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "--token" in line]
    assert len(warning) == 1 and "--token-file" in warning[0], done.stderr
    assert env.broker.root_token not in done.stderr
