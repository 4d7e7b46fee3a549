"""QA round 4 of ``broker exec`` in a CI pipeline: real broker, real PostgreSQL, real
OIDC issuer, ``broker exec`` as a subprocess.

- a closed stderr (``2>&1 | head``, a log stream gone) used to make exec skip the
  command and exit 0; now the command runs and its exit code is exec's;
- the command could read the job's JWT (and a ``BROKER_TOKEN``) from its parent's
  ``/proc/$PPID/environ``; exec now makes itself non-dumpable;
- ``--token`` on the command line is in the process list for the whole run: a warning;
- a token the broker refuses: one error line, not a sys/mounts warning first;
- ``--heartbeat 0`` with a JWT login whose token_ttl is shorter than ``--ttl``: the
  login token is renewed to the budget at start, so the lease lives it;
- a heartbeat stopped before it started does not raise (which skipped the cleanup);
- the CI flow end to end: a JWT file with a trailing newline, SIGTERM to exec, the
  lease and the login token revoked; a bad JWT is one line and never echoed.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.client import Client
from broker.exec import Heartbeat
from broker.lease import LeaseFilter, LeaseState
from tests.conftest import run
from tests.integration.jwt_fixtures import (
    BRIEF_ROLE,
    ExecEnv,
    cli_environ,
    github_auth,
    kill_group,
    oidc_issuer_fixture,
    running_broker,
    start_exec,
    wait_for_report,
)
from tests.integration.test_api_postgres import pg_mount, role_exists
from tests.integration.test_exec import CHILD
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

#: Prints what it can read of its parent's (exec's) environment: "denied", or whether
#: the piece given as $1 is in it. sh: the plain user may not run this venv's python.
PEEK = ('if cat "/proc/$PPID/environ" >/dev/null 2>&1; then '
        'if tr "\\0" "\\n" <"/proc/$PPID/environ" | grep -qF -- "$1"; '
        'then echo found; else echo absent; fi; else echo denied; fi')


class Env(ExecEnv):
    def environ(self, **extra: str) -> dict[str, str]:
        """exec's environment without a token (and without a CI_JWT of the runner's)."""
        return cli_environ(self.broker, self.dsn, drop=("CI_JWT",), **extra)

    def jwt(self, run_id: str) -> str:
        return self.issuer.github_token(repository="acme/app", run_id=run_id)

    def leases(self) -> list[object]:
        assert self.broker.state is not None
        return list(self.broker.call(self.broker.state.store.list_leases(
            LeaseFilter(prefix="pg/"))))


EXEC = [sys.executable, "-m", "broker.cli", "exec"]
LOGIN = ("--auth-path", "github")


issuer = oidc_issuer_fixture()


@pytest.fixture
def env(tmp_path: Path, postgres_dsn: str, issuer: OIDCIssuer) -> Iterator[Env]:
    (tmp_path / "child.py").write_text(CHILD)
    with running_broker(tmp_path,
                        pg_mount(postgres_dsn) + github_auth(issuer) + BRIEF_ROLE) as server:
        yield Env(server, tmp_path, postgres_dsn, issuer)


# --------------------------------------------------------------------------- fixes


def test_a_closed_stderr_does_not_skip_the_command(env: Env) -> None:
    """exec's stderr is a pipe nobody reads any more: the first status line raised
    BrokenPipeError, exec never ran the command and exited 0 (a CI step that passed
    without running). Now the messages are lost, the command runs, its code is exec's,
    and the lease is revoked."""
    marker = env.tmp / "ran"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [*EXEC, "pg/readonly", "--", sys.executable, "-c",
             f"open({str(marker)!r}, 'w').write('ran'); raise SystemExit(5)"],
            env=env.environ(BROKER_TOKEN=env.broker.root_token), stdout=subprocess.DEVNULL,
            stderr=write_end, timeout=60, cwd=env.tmp)
    finally:
        os.close(write_end)
    assert done.returncode == 5
    assert marker.read_text() == "ran"
    rows = env.leases()
    assert len(rows) == 1 and rows[0].state is LeaseState.REVOKED  # type: ignore[attr-defined]


def _as_nobody() -> list[str]:
    """Run exec as an unprivileged user: root may read any process's /proc entries."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop to a plain user")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_the_command_cannot_read_the_jwt_from_execs_environment(env: Env) -> None:
    """docs/ci.md: the JWT never reaches the command. It was kept out of the command's
    environment, but the command (same user) read it in /proc/$PPID/environ, with the
    BROKER_TOKEN exec keeps from it. exec is not dumpable any more: denied."""
    jwt = env.jwt("5101")
    piece = jwt.rsplit(".", 1)[-1]
    done = subprocess.run(
        [*_as_nobody(), *EXEC, "--jwt-env", "CI_JWT", "--auth-role", "deploy", *LOGIN,
         "pg/readonly", "--", "sh", "-c", PEEK, "peek", piece],
        env=env.environ(CI_JWT=jwt), capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "denied", done.stdout
    assert piece not in done.stderr


def test_token_on_the_command_line_is_warned_about(env: Env) -> None:
    """--token is in argv, which ps shows to every user (and the command) for the whole
    run: exec still runs, with a one-line warning pointing to BROKER_TOKEN."""
    done = subprocess.run([*EXEC, "--token", env.broker.root_token, "pg/readonly", "--",
                           "true"], env=env.environ(), capture_output=True, text=True,
                          timeout=60, cwd=env.tmp)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "--token" in line]
    assert len(warning) == 1 and "BROKER_TOKEN" in warning[0]
    assert env.broker.root_token not in done.stderr


def test_a_refused_token_is_one_error_line(env: Env) -> None:
    """A wrong BROKER_TOKEN: one ``broker: error:`` line, exit 125; it used to be preceded
    by a warning that sys/mounts could not be read (with the same 403)."""
    done = subprocess.run([*EXEC, "pg/readonly", "--", "true"],
                          env=env.environ(BROKER_TOKEN="not-a-token-at-all"),
                          capture_output=True, text=True, timeout=60, cwd=env.tmp)
    assert done.returncode == 125
    assert done.stderr.splitlines() == [
        "broker: error: pg/readonly: permission denied: invalid token (HTTP 403)"]
    assert "not-a-token-at-all" not in done.stderr


def test_no_heartbeat_with_a_short_login_token_still_lives_the_ttl(env: Env) -> None:
    """--heartbeat 0 --ttl 10s with a login token of 4s: nothing renewed the token, so the
    lease died with it at 4s (and the warning named the token's max TTL, 20s, as the
    end). Now exec renews the token to the budget before issuing: the role works at 6s,
    and no warning (the budget ends first)."""
    out = env.tmp / "out.json"
    done = subprocess.run(
        [*EXEC, "--heartbeat", "0", "--ttl", "10s", "--jwt-env", "CI_JWT", "--auth-role",
         "brief", *LOGIN, "pg/readonly", "--", sys.executable, str(env.tmp / "child.py"),
         str(out), "ok", "6", "0"],
        env=env.environ(CI_JWT=env.jwt("5102")), capture_output=True, text=True,
        timeout=60, cwd=env.tmp)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["logins"] == {"PGUSER": seen["env"]["PGUSER"]}, done.stderr
    assert "before --ttl" not in done.stderr
    assert not run(role_exists(env.dsn, seen["env"]["PGUSER"]))


def test_no_heartbeat_warns_with_the_real_end_when_the_token_max_ttl_comes_first(
        env: Env) -> None:
    """--heartbeat 0 --ttl 60s, token max TTL 20s: the warning names the time the lease
    really ends (the token's max, to which it was renewed), and the lease ends then."""
    started = time.time()
    done = subprocess.run(
        [*EXEC, "--heartbeat", "0", "--ttl", "60s", "--jwt-env", "CI_JWT", "--auth-role",
         "brief", *LOGIN, "pg/readonly", "--", "sh", "-c", 'echo "$BROKER_LEASE_IDS"'],
        env=env.environ(CI_JWT=env.jwt("5103")), capture_output=True, text=True,
        timeout=60, cwd=env.tmp)
    assert done.returncode == 0, done.stderr
    assert "token's max TTL (token_max_ttl) ends the lease at" in done.stderr
    lease = env.lease(done.stdout.strip())
    # Issued for the token's whole max TTL (20 s), not its first 4 s.
    assert lease is not None
    assert lease.expire_time - started > 15  # type: ignore[attr-defined]


def test_a_heartbeat_stopped_before_it_started_does_not_raise(env: Env) -> None:
    """A signal between creating the heartbeat and starting it: run() stops it and
    cleans up; join() on a thread never started raised RuntimeError, which skipped the
    revocations and printed a traceback."""
    Heartbeat(Client(env.broker.url, env.broker.root_token), [], 1).stop()


def _wchan(pid: int) -> str:
    """What the process's main thread waits in, in the kernel ("" if not readable)."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def test_a_signal_while_exec_writes_to_a_full_stderr_does_not_deadlock(env: Env) -> None:
    """exec's stderr is a full pipe (a log reader lagging behind; here a process the
    command left behind fills it): exec blocks writing its --no-revoke summary, inside
    the output lock. A SIGTERM then (a cancelled job) runs the handler in that same
    thread, which says "got SIGTERM while revoking": with a plain Lock it waited for
    itself forever. Now, once the pipe drains, exec ends."""
    pid_file, done_file = env.tmp / "spammer.pid", env.tmp / "command.done"
    proc = subprocess.Popen(
        [*EXEC, "--no-revoke", "--ttl", "30s", "pg/readonly", "--", "sh", "-c",
         f'yes spam >&2 & echo $! > {pid_file}; sleep 1; touch {done_file}'],
        env=env.environ(BROKER_TOKEN=env.broker.root_token), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, cwd=env.tmp, start_new_session=True)
    try:
        # Wait until the command is done and exec's main thread is blocked writing to the
        # full pipe (its summary line), rather than a fixed 3 s: on a loaded machine exec
        # was sometimes not there yet, and the SIGTERM came before the revoking phase.
        deadline = time.monotonic() + 30
        while not (done_file.exists() and "pipe_write" in _wchan(proc.pid)):
            assert proc.poll() is None, "exec ended before the signal"
            assert time.monotonic() < deadline, "exec never blocked on its summary line"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        assert proc.stderr is not None
        tail = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # drain, so that exec can go on writing
            if not select.select([proc.stderr], [], [], 0.5)[0]:
                continue
            chunk = proc.stderr.read1(1 << 16)
            if not chunk:
                break
            tail = (tail + chunk)[-4096:]
        assert proc.wait(10) == 0, tail
        assert b"got SIGTERM while revoking" in tail
        assert b"leases left alive (--no-revoke)" in tail
    finally:
        kill_group(proc)
        if proc.stderr is not None:
            proc.stderr.close()


# --------------------------------------------------------------------------- the CI flow


def test_ci_jwt_file_with_newline_sigterm_revokes_lease_and_login_token(env: Env) -> None:
    """The CI user story end to end: the OIDC token in a file ending in a newline,
    SIGTERM to exec (a cancelled job): the command gets it, exec answers 143, and both
    the lease (its role dropped) and the login token are revoked."""
    jwt_file = env.tmp / "oidc-token"
    jwt_file.write_text(env.jwt("5104") + "\n")
    out = env.tmp / "out.json"
    proc = start_exec(
        [*EXEC, "--jwt-file", str(jwt_file), "--auth-role", "deploy", *LOGIN,
         "--heartbeat", "2s", "pg/readonly", "--", sys.executable,
         str(env.tmp / "child.py"), str(out), "wait"],
        env.environ(), env.tmp)
    try:
        ready = wait_for_report(out, proc, env.tmp / "exec.stderr")
        # Past two heartbeats: the lease is alive because it is renewed. Heartbeat 2 s,
        # not 1 s: one broker answer slower than 1 s on a loaded machine (rightly) let
        # the lease expire, with renewals of one heartbeat of slack each.
        time.sleep(5)
        assert run(role_exists(env.dsn, ready["env"]["PGUSER"]))
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert json.loads((env.tmp / "out.json.signal").read_text()) == {
            "signum": signal.SIGTERM}
        assert not run(role_exists(env.dsn, ready["env"]["PGUSER"]))
        lease = env.lease(ready["env"]["BROKER_LEASE_IDS"])
        assert lease.state is LeaseState.REVOKED  # type: ignore[attr-defined]
        assert lease.metadata["run_id"] == "5104"  # type: ignore[attr-defined]
        assert env.token_state(lease.owner) == "revoked"  # type: ignore[attr-defined]
    finally:
        kill_group(proc)


def test_a_bad_jwt_is_one_line_never_echoed_and_the_command_does_not_run(env: Env) -> None:
    """A JWT the broker refuses (signed by a key it does not know): one error line,
    exit 125, the JWT nowhere in the output, the command not started."""
    bad = env.jwt("5105")
    head, payload, _sig = bad.split(".")
    bad = f"{head}.{payload}.{'A' * 40}"
    marker = env.tmp / "ran"
    done = subprocess.run(
        [*EXEC, "--jwt-env", "CI_JWT", "--auth-role", "deploy", *LOGIN, "pg/readonly", "--",
         "touch", str(marker)],
        env=env.environ(CI_JWT=bad), capture_output=True, text=True, timeout=60, cwd=env.tmp)
    assert done.returncode == 125
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "broker: error: login at auth/github/login as role 'deploy': "), lines
    assert payload not in done.stderr and "A" * 40 not in done.stderr
    assert not marker.exists()
    assert env.leases() == []
