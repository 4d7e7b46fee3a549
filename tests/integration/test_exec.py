"""``broker exec`` as a real subprocess against a real broker issuing real PostgreSQL roles.

The command run under exec is a small Python script (``CHILD``) that reports
what it saw (its environment, whether it could log in) into a JSON file, so
the tests can check both sides: what the command got, and that the role is
gone from PostgreSQL when exec is done with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.lease import LeaseFilter, LeaseState
from tests.conftest import run
from tests.integration.broker_harness import BrokerThread
from tests.integration.jwt_fixtures import (
    cli_environ,
    github_auth,  # test_review_exec_aws imports it from here too
    kill_group,
    oidc_issuer_fixture,
    running_broker,
    second_pg_mount,
    start_exec,
    wait_for_report,
)
from tests.integration.test_api_postgres import pg_mount, role_exists
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

#: The command exec runs. argv: OUT MODE [SECONDS EXIT_CODE].
#: ok:   sleep SECONDS, log in with PGUSER/PGPASSWORD (and the PG2 pair if set),
#:       report, exit EXIT_CODE.
#: wait: report "ready", then sleep; on SIGTERM/SIGINT write OUT.signal and die of it;
#:       on SIGUSR1 write OUT.usr1 and go on sleeping.
CHILD = r'''
import asyncio, json, os, signal, sys, time
import asyncpg

out, mode = sys.argv[1], sys.argv[2]
host, port = os.environ["TEST_PG_HOST"], int(os.environ["TEST_PG_PORT"])


def report(path, **fields):
    with open(path + ".tmp", "w") as fh:
        json.dump(fields, fh)
    os.replace(path + ".tmp", path)


async def login(user, password):
    try:
        conn = await asyncpg.connect(host=host, port=port, database="postgres",
                                     user=user, password=password)
    except Exception as exc:
        return "failed: " + type(exc).__name__
    try:
        return await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()


def seen():
    return {k: v for k, v in os.environ.items()
            if k.startswith(("PG", "BROKER_LEASE")) and "PASSWORD" not in k}


if mode == "ok":
    time.sleep(float(sys.argv[3]))
    logins = {"PGUSER": asyncio.run(login(os.environ["PGUSER"], os.environ["PGPASSWORD"]))}
    if "PGUSER_PG2_READONLY" in os.environ:
        logins["PGUSER_PG2_READONLY"] = asyncio.run(login(
            os.environ["PGUSER_PG2_READONLY"], os.environ["PGPASSWORD_PG2_READONLY"]))
    report(out, env=seen(), logins=logins, has_password=bool(os.environ.get("PGPASSWORD")))
    sys.exit(int(sys.argv[4]))

def on_signal(signum, _frame):
    report(out + ".signal", signum=signum)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGUSR1, lambda signum, _frame: report(out + ".usr1", signum=signum))
report(out, env=seen(), pid=os.getpid())
time.sleep(120)
'''


#: Writes the names of its environment variables (and whether a piece of the JWT,
#: its signature, is anywhere in it) to argv[1].
SPY = r'''
import json, os, sys
piece = sys.argv[2]
with open(sys.argv[1], "w") as fh:
    json.dump({"names": sorted(os.environ),
               "jwt_anywhere": any(piece in v for v in os.environ.values())}, fh)
'''


def mounts(dsn: str) -> str:
    """The shared pg mount (roles readonly, short) plus a second postgres mount, pg2."""
    return pg_mount(dsn) + second_pg_mount(dsn)


@dataclass
class Env:
    broker: BrokerThread
    tmp: Path
    dsn: str

    @property
    def child(self) -> Path:
        return self.tmp / "child.py"

    def environ(self, token: str | None = None) -> dict[str, str]:
        """exec's environment: the broker's address and (root unless given) token."""
        return cli_environ(self.broker, self.dsn, BROKER_TOKEN=token or self.broker.root_token)

    def argv(self, *exec_args: str, child: tuple[str, ...]) -> list[str]:
        return [sys.executable, "-m", "broker.cli", "exec", *exec_args, "--",
                sys.executable, str(self.child), *child]

    def run(self, *exec_args: str, child: tuple[str, ...], token: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*exec_args, child=child), env=self.environ(token),
                              capture_output=True, text=True, timeout=timeout, cwd=self.tmp)

    @property
    def stderr(self) -> str:
        """What a ``start()``ed exec wrote to stderr so far."""
        path = self.tmp / "exec.stderr"
        return path.read_text() if path.exists() else ""

    def start(self, *exec_args: str, child: tuple[str, ...]) -> subprocess.Popen[bytes]:
        return start_exec(self.argv(*exec_args, child=child), self.environ(), self.tmp)

    def wait_for(self, path: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        """What a ``start()``ed CHILD reported to ``path`` once it runs."""
        return wait_for_report(path, proc, self.tmp / "exec.stderr")

    def lease_state(self, lease_id: str) -> LeaseState | None:
        assert self.broker.state is not None
        lease = self.broker.call(self.broker.state.store.get(lease_id))
        return lease.state if lease else None

    def role_exists(self, user: str) -> bool:
        return bool(run(role_exists(self.dsn, user)))


issuer = oidc_issuer_fixture()


@pytest.fixture
def env(tmp_path: Path, postgres_dsn: str, issuer: OIDCIssuer) -> Iterator[Env]:
    (tmp_path / "child.py").write_text(CHILD)
    with running_broker(tmp_path, mounts(postgres_dsn) + github_auth(issuer),
                        revoke=("pg/", "pg2/")) as server:
        yield Env(server, tmp_path, postgres_dsn)


# --------------------------------------------------------------------------- tests


def test_child_gets_working_credentials_and_exec_revokes_them_on_exit(env: Env) -> None:
    """The command sees PGUSER/PGPASSWORD/BROKER_LEASE_IDS, can log in after several
    heartbeats (renewals work), and the role is gone as soon as exec returns."""
    out = env.tmp / "out.json"
    # Heartbeat 2 s, not 1 s: each renewal has one heartbeat of slack, and one broker
    # answer slower than 1 s on a loaded machine (rightly) let the lease expire.
    done = env.run("--heartbeat", "2s", "pg/readonly", child=(str(out), "ok", "6", "0"))
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    user = seen["env"]["PGUSER"]
    lease_id = seen["env"]["BROKER_LEASE_IDS"]
    assert seen["has_password"] and lease_id.startswith("pg/creds/readonly/")
    # 6 s > 2 heartbeats (4 s) plus sweeper slack: without renewals the lease would have
    # expired and its role been dropped by now.
    assert seen["logins"] == {"PGUSER": user}
    assert not env.role_exists(user)
    assert env.lease_state(lease_id) is LeaseState.REVOKED
    # Nothing secret on exec's own output: the lease id, yes; the password, no.
    assert lease_id in done.stderr and "PGPASSWORD" not in done.stderr


def test_exit_code_is_passed_through_and_leases_revoked(env: Env) -> None:
    """A failing command's exit code is exec's exit code; its credential is revoked anyway."""
    out = env.tmp / "out.json"
    done = env.run("pg/readonly", child=(str(out), "ok", "0", "7"))
    assert done.returncode == 7, done.stderr
    seen = json.loads(out.read_text())
    assert not env.role_exists(seen["env"]["PGUSER"])
    assert env.lease_state(seen["env"]["BROKER_LEASE_IDS"]) is LeaseState.REVOKED


def test_two_postgres_mounts_get_suffixed_names(env: Env) -> None:
    """A second credential with the same variable names gets NAME_<MOUNT>_<ROLE>; both work."""
    out = env.tmp / "out.json"
    done = env.run("pg/readonly", "pg2/readonly", child=(str(out), "ok", "0", "0"))
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    first, second = seen["env"]["PGUSER"], seen["env"]["PGUSER_PG2_READONLY"]
    assert seen["logins"] == {"PGUSER": first, "PGUSER_PG2_READONLY": second}
    ids = seen["env"]["BROKER_LEASE_IDS"].split(",")
    assert [i.rsplit("/", 1)[0] for i in ids] == ["pg/creds/readonly", "pg2/creds/readonly"]
    assert not env.role_exists(first) and not env.role_exists(second)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_exec_reaches_the_child_then_leases_are_revoked(env: Env, sig: int) -> None:
    """SIGTERM/SIGINT to exec is forwarded; exec waits for the command, answers 128+N
    like a shell, and revokes the roles."""
    out = env.tmp / "out.json"
    proc = env.start("pg/readonly", child=(str(out), "wait"))
    try:
        ready = env.wait_for(out, proc)
        os.kill(proc.pid, sig)
        assert proc.wait(30) == 128 + sig, env.stderr
        assert json.loads((env.tmp / "out.json.signal").read_text()) == {"signum": sig}
        assert not env.role_exists(ready["env"]["PGUSER"])
        assert env.lease_state(ready["env"]["BROKER_LEASE_IDS"]) is LeaseState.REVOKED
    finally:
        kill_group(proc)


def test_sigusr1_is_forwarded_and_the_command_keeps_its_credentials(env: Env) -> None:
    """SIGUSR1 (reopen logs, dump state) reaches the command; exec does not die of it,
    and the lease lives on until the command ends."""
    out = env.tmp / "out.json"
    proc = env.start("pg/readonly", child=(str(out), "wait"))
    try:
        ready = env.wait_for(out, proc)
        os.kill(proc.pid, signal.SIGUSR1)
        usr1 = env.tmp / "out.json.usr1"
        deadline = time.monotonic() + 30
        while not usr1.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(usr1.read_text()) == {"signum": signal.SIGUSR1}, env.stderr
        assert proc.poll() is None, env.stderr
        assert env.role_exists(ready["env"]["PGUSER"])
        assert env.lease_state(ready["env"]["BROKER_LEASE_IDS"]) is LeaseState.ACTIVE
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM, env.stderr
        assert not env.role_exists(ready["env"]["PGUSER"])
    finally:
        kill_group(proc)


def test_sigkill_of_exec_lets_the_leases_expire_within_two_heartbeats(env: Env) -> None:
    """With exec SIGKILLed (no cleanup possible), the heartbeat stops and the broker
    revokes the role within 2 x heartbeat plus sweeper slack.

    Heartbeat 2 s, not 1 s: a renewal has one heartbeat of slack, and on a loaded
    machine one broker answer slower than 1 s let the lease expire before the kill."""
    heartbeat = 2.0
    out = env.tmp / "out.json"
    proc = env.start("--heartbeat", "2s", "pg/readonly", child=(str(out), "wait"))
    try:
        ready = env.wait_for(out, proc)
        user = ready["env"]["PGUSER"]
        time.sleep(3 * heartbeat)  # past 2 heartbeats: alive only because it is renewed
        assert env.role_exists(user)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        while env.role_exists(user) and time.monotonic() - killed < 20:
            time.sleep(0.1)
        gone_after = time.monotonic() - killed
        assert not env.role_exists(user)
        # 4 s of sweeper slack (was 2 s: tight for a DROP ROLE on a loaded machine); the
        # bug, a lease not bounded by the heartbeat, keeps the role for its 1 h TTL.
        assert gone_after <= 2 * heartbeat + 4, f"role lived {gone_after:.1f}s after SIGKILL"
        assert env.lease_state(ready["env"]["BROKER_LEASE_IDS"]) is LeaseState.EXPIRED
    finally:
        kill_group(proc)  # the orphaned child


def test_ttl_budget_ends_renewals(env: Env) -> None:
    """--ttl is the overall budget: renewals stop there and the role dies at --ttl,
    even while the command still runs."""
    out = env.tmp / "out.json"
    started = time.monotonic()
    # --ttl 6s --heartbeat 2s (was 3s / 1s): the same two renewals, the last one cut
    # to the budget, but each with 2 s of slack; a renewal slower than 1 s on a loaded
    # machine lost the "end of its budget" line.
    done = env.run("--ttl", "6s", "--heartbeat", "2s", "pg/readonly",
                   child=(str(out), "ok", "10", "0"))
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["logins"]["PGUSER"].startswith("failed")  # the role died at 6 s
    assert not env.role_exists(seen["env"]["PGUSER"])
    assert time.monotonic() - started >= 10
    assert "end of its budget" in done.stderr


def test_no_revoke_leaves_the_lease_until_its_ttl(env: Env) -> None:
    """--no-revoke extends the lease to the end of --ttl and leaves it alive after exec."""
    out = env.tmp / "out.json"
    done = env.run("--ttl", "30s", "--heartbeat", "1s", "--no-revoke", "pg/readonly",
                   child=(str(out), "ok", "0", "0"))
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    lease_id = seen["env"]["BROKER_LEASE_IDS"]
    assert env.role_exists(seen["env"]["PGUSER"])
    assert env.lease_state(lease_id) is LeaseState.ACTIVE
    assert env.broker.state is not None
    lease = env.broker.call(env.broker.state.store.get(lease_id))
    assert lease is not None and 20 < lease.expire_time - time.time() <= 30


def test_no_revoke_without_ttl_leaves_a_token_capped_lease_until_the_token_expires(
        env: Env) -> None:
    """--no-revoke with a token that expires before the role's default TTL (a CI
    login's): the last renewal is capped at the token's expiry. It used to be
    refused (400, past the max TTL), leaving the lease two heartbeats to live."""
    created = requests.post(f"{env.broker.url}/v1/auth/token/create",
                            json={"policies": ["app"], "ttl": "20m"},
                            headers={"X-Vault-Token": env.broker.root_token}, timeout=30)
    assert created.status_code == 200, created.text
    out = env.tmp / "out.json"
    done = env.run("--no-revoke", "pg/readonly", child=(str(out), "ok", "0", "0"),
                   token=created.json()["auth"]["client_token"])
    assert done.returncode == 0, done.stderr
    assert "could not extend" not in done.stderr
    lease_id = json.loads(out.read_text())["env"]["BROKER_LEASE_IDS"]
    assert env.broker.state is not None
    lease = env.broker.call(env.broker.state.store.get(lease_id))
    assert lease is not None and 1100 < lease.expire_time - time.time() <= 1200


def test_unreachable_broker_fails_before_running_the_command(env: Env) -> None:
    """No broker: one error line, exit 125 (exec's own failure, as env and docker run
    say it: not the 1 a failing command most often gives), and the command never runs."""
    out = env.tmp / "out.json"
    argv = env.argv("pg/readonly", child=(str(out), "ok", "0", "0"))
    done = subprocess.run(argv, env=env.environ() | {"BROKER_ADDR": "http://127.0.0.1:9"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 125
    assert done.stderr.startswith("broker: error: cannot connect to http://127.0.0.1:9")
    assert len(done.stderr.splitlines()) == 1
    assert not out.exists()


def test_refused_credential_fails_and_revokes_what_was_issued(env: Env) -> None:
    """A creds request the policy refuses stops exec before the command; the lease
    issued just before it is revoked."""
    resp = requests.post(f"{env.broker.url}/v1/auth/token/create",
                         json={"policies": ["app"]},
                         headers={"X-Vault-Token": env.broker.root_token}, timeout=30)
    token = resp.json()["auth"]["client_token"]
    out = env.tmp / "out.json"
    done = env.run("pg/readonly", "pg2/readonly", child=(str(out), "ok", "0", "0"), token=token)
    assert done.returncode == 125
    assert "broker: error: pg2/readonly: permission denied" in done.stderr
    assert "(HTTP 403)" in done.stderr
    assert not out.exists()
    assert env.broker.state is not None
    rows = env.broker.call(env.broker.state.store.list_leases(
        LeaseFilter(prefix="pg/")))
    assert len(rows) == 1 and rows[0].state is LeaseState.REVOKED
    assert not env.role_exists(rows[0].username)


def test_exec_logs_in_with_a_ci_jwt_and_revokes_the_login_token(env: Env,
                                                                 issuer: OIDCIssuer) -> None:
    """--jwt-env/--auth-role: exec logs in itself (no BROKER_TOKEN), the lease carries the
    run id from the JWT, and both the lease and the login token are revoked at the end."""
    out = env.tmp / "out.json"
    argv = env.argv("--jwt-env", "CI_JWT", "--auth-role", "deploy", "--auth-path", "github",
                    "pg/readonly", child=(str(out), "ok", "0", "0"))
    jwt = issuer.github_token(repository="acme/app", run_id="4711")
    environ = {k: v for k, v in env.environ().items() if k != "BROKER_TOKEN"}
    done = subprocess.run(argv, env=environ | {"CI_JWT": jwt}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert jwt not in done.stderr
    seen = json.loads(out.read_text())
    assert seen["logins"] == {"PGUSER": seen["env"]["PGUSER"]}
    assert not env.role_exists(seen["env"]["PGUSER"])
    assert env.broker.state is not None
    store = env.broker.state.store
    lease = env.broker.call(store.get(seen["env"]["BROKER_LEASE_IDS"]))
    assert lease is not None and lease.state is LeaseState.REVOKED
    assert lease.metadata["run_id"] == "4711"
    token = env.broker.call(store.token_by_accessor(lease.owner))
    assert token is not None and token.state.value == "revoked"


@pytest.mark.parametrize("pass_token", [False, True])
def test_the_broker_token_reaches_the_command_only_with_pass_token(env: Env,
                                                                    pass_token: bool) -> None:
    """BROKER_TOKEN / VAULT_TOKEN are kept from the command unless --pass-token: it
    gets its credentials, not a token that could issue more and outlives them."""
    spy = env.tmp / "spy.py"
    spy.write_text(SPY)
    out = env.tmp / "out.json"
    token = env.broker.root_token
    argv = [sys.executable, "-m", "broker.cli", "exec", *(["--pass-token"] * pass_token),
            "pg/readonly", "--", sys.executable, str(spy), str(out), token]
    done = subprocess.run(argv, env=env.environ() | {"VAULT_TOKEN": token}, capture_output=True,
                          text=True, timeout=60, cwd=env.tmp)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert "PGPASSWORD" in seen["names"]
    assert ("BROKER_TOKEN" in seen["names"]) is pass_token
    assert ("VAULT_TOKEN" in seen["names"]) is pass_token
    assert seen["jwt_anywhere"] is pass_token  # the token's value, under any name


def test_the_login_jwt_never_reaches_the_command(env: Env, issuer: OIDCIssuer) -> None:
    """--jwt-env VAR: the command's environment holds neither VAR nor the JWT itself
    (docs/ci.md promises it), yet it still gets its credential."""
    spy = env.tmp / "spy.py"
    spy.write_text(SPY)
    out = env.tmp / "out.json"
    jwt = issuer.github_token(repository="acme/app", run_id="4712")
    argv = [sys.executable, "-m", "broker.cli", "exec", "--jwt-env", "CI_JWT", "--auth-role",
            "deploy", "--auth-path", "github", "pg/readonly", "--",
            sys.executable, str(spy), str(out), jwt.rsplit(".", 1)[-1]]
    environ = {k: v for k, v in env.environ().items() if k != "BROKER_TOKEN"}
    done = subprocess.run(argv, env=environ | {"CI_JWT": jwt}, capture_output=True, text=True,
                          timeout=60, cwd=env.tmp)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert "PGPASSWORD" in seen["names"]
    assert "CI_JWT" not in seen["names"]
    assert seen["jwt_anywhere"] is False

