"""``broker exec`` without a broker: argument parsing, TTL math, the command's environment,
and the login/issue/revoke conversation against a canned HTTP server (real sockets)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker.cli import build_parser, main
from broker.cli.app import _parse as parse_cli
from broker.exec import (
    Held,
    build_env,
    exit_code,
    first_ttl,
    options_from_args,
    renew_increment,
    split_command,
    stale_names,
)
from tests.unit.test_cli import Canned, canned, env  # noqa: F401 - fixtures

# --------------------------------------------------------------------------- parsing


def parse(*argv: str) -> Any:
    return parse_cli(build_parser(), list(argv))


def test_split_command_keeps_everything_after_the_first_double_dash() -> None:
    """Only the first `--` separates; later ones belong to the command."""
    assert split_command(["pg/ro", "--", "./x", "--", "-v"]) == (["pg/ro"], ["./x", "--", "-v"])
    assert split_command(["pg/ro", "./x"]) == (["pg/ro", "./x"], None)
    assert split_command(["pg/ro", "--"]) == (["pg/ro"], [])


def test_exec_parses_specs_options_and_command() -> None:
    """Options may come before or after the specs; words after `--` that look like specs
    or flags are the command's."""
    args = parse("exec", "--ttl", "15m", "pg/readonly", "aws/deploy", "--heartbeat", "10s",
                 "--", "./migrate.sh", "pg/other", "--ttl", "1s")
    opts = options_from_args(args, {})
    assert opts.specs == (("pg", "readonly"), ("aws", "deploy"))
    assert opts.command == ("./migrate.sh", "pg/other", "--ttl", "1s")
    assert (opts.ttl, opts.heartbeat, opts.revoke, opts.jwt) == (900, 10, True, None)


def test_exec_reads_the_jwt_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """--jwt-file and --jwt-env give the JWT (stripped); it never shows in the options' repr."""
    token_file = tmp_path / "jwt"
    token_file.write_text("aaa.bbb.ccc\n")
    by_file = options_from_args(parse("exec", "--jwt-file", str(token_file), "--auth-role",
                                      "ci", "pg/ro", "--", "true"), {})
    by_env = options_from_args(parse("exec", "--jwt-env", "CI_JWT", "--auth-role", "ci",
                                     "--auth-path", "/github/", "pg/ro", "--", "true"),
                               {"CI_JWT": " aaa.bbb.ccc "})
    assert by_file.jwt == by_env.jwt == "aaa.bbb.ccc"
    assert (by_file.auth_path, by_env.auth_path) == ("jwt", "github")
    assert "aaa.bbb" not in repr(by_env)


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["exec", "pg/ro"], 2, "put the command after '--'"),
        (["exec", "pg/ro", "--"], 2, "put the command after '--'"),
        (["exec", "--", "true"], 2, "the following arguments are required: MOUNT/ROLE"),
        (["exec", "pg", "--", "true"], 2, "expected MOUNT/ROLE"),
        (["exec", "pg/ro", "pg/ro", "--", "true"], 2, "pg/ro is given twice"),
        (["exec", "--heartbeat", "500ms", "pg/ro", "--", "true"], 2, "at least 1s"),
        (["exec", "--ttl", "0", "pg/ro", "--", "true"], 2, "--ttl must be at least 1s"),
        (["exec", "--jwt-env", "X", "pg/ro", "--", "true"], 2, "need --auth-role"),
        (["exec", "--auth-role", "r", "pg/ro", "--", "true"], 2, "only applies with --jwt"),
        (["exec", "--jwt-env", "X", "--jwt-file", "f", "--auth-role", "r", "pg/ro", "--", "t"],
         2, "not allowed with argument"),
        (["exec", "--jwt-env", "NOPE_UNSET", "--auth-role", "r", "pg/ro", "--", "true"],
         125, "NOPE_UNSET is empty or unset"),
        (["exec", "--jwt-file", "/nonexistent/jwt", "--auth-role", "r", "pg/ro", "--", "true"],
         125, "cannot read --jwt-file /nonexistent/jwt"),
        (["exec", "pg/ro", "--", "true"], 2, "no token"),
    ],
)
def test_exec_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch,  # noqa: F811
    argv: list[str], code: int, needle: str,
) -> None:
    """Wrong flags end in one `broker: error:` line (exit 2; 125, exec's own failure, for an
    unreadable JWT)."""
    env.delenv("NOPE_UNSET", raising=False)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("broker: error: ") and err.count("\n") == 1
    assert needle in err


def test_heartbeat_zero_turns_it_off() -> None:
    """--heartbeat 0 is allowed: no renewals, leases get the whole --ttl."""
    opts = options_from_args(parse("exec", "--heartbeat", "0", "pg/ro", "--", "true"), {})
    assert opts.heartbeat == 0


# --------------------------------------------------------------------------- TTL math


@pytest.mark.parametrize(
    ("heartbeat", "budget", "expected"),
    [(30, None, 60), (30, 900, 60), (30, 45, 45), (1, 1, 1), (0, 900, 900), (0, None, None)],
)
def test_first_ttl_is_two_heartbeats_within_the_budget(
    heartbeat: int, budget: int | None, expected: int | None
) -> None:
    """Leases start with 2 x heartbeat (so a killed exec lets them die soon), never past --ttl."""
    assert first_ttl(heartbeat, budget) == expected


@pytest.mark.parametrize(
    ("now", "end", "expected"),
    [(0.0, None, 60), (0.0, 1000.0, 60), (950.0, 1000.0, 50), (999.5, 1000.0, None),
     (1000.0, 1000.0, None), (940.0, 1000.0, 60)],
)
def test_renew_increment_stops_at_the_budget(
    now: float, end: float | None, expected: int | None
) -> None:
    """Renewals ask for 2 x heartbeat, cut to what is left of the budget; none when < 1 s."""
    assert renew_increment(now, end, 30) == expected


def test_exit_code_like_a_shell() -> None:
    """A child killed by signal N gives 128+N; a normal exit passes through."""
    assert [exit_code(c) for c in (0, 3, -15, -9)] == [0, 3, 143, 137]


# --------------------------------------------------------------------------- environment


def held(mount: str, role: str, plugin: str, lease: str, **data: Any) -> Held:
    return Held(mount=mount, role=role, plugin=plugin, lease_id=lease, data=data)


def test_env_uses_each_backends_variable_names() -> None:
    """postgres, mysql and aws fields get their tools' names; lease ids are comma-joined."""
    got = build_env([
        held("pg", "ro", "postgres", "pg/creds/ro/1", username="u1", password="p1"),
        held("my", "rw", "mysql", "my/creds/rw/2", username="u2", password="p2"),
        held("aws", "dep", "aws", "aws/creds/dep/3", access_key="AK", secret_key="SK",
             security_token=None),
    ])
    assert got == {
        "PGUSER": "u1", "PGPASSWORD": "p1", "MYSQL_USER": "u2", "MYSQL_PWD": "p2",
        "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK",
        "BROKER_LEASE_IDS": "pg/creds/ro/1,my/creds/rw/2,aws/creds/dep/3",
    }


def test_later_credentials_with_the_same_names_get_a_mount_role_suffix() -> None:
    """The first postgres credential keeps PGUSER; a second gets PGUSER_<MOUNT>_<ROLE>."""
    got = build_env([
        held("pg", "readonly", "postgres", "a", username="u1", password="p1"),
        held("pg-2", "rw", "postgres", "b", username="u2", password="p2"),
        held("pg", "other", "", "c", username="u3"),  # unknown plugin: BROKER_* names
    ])
    assert got["PGUSER"] == "u1" and got["PGPASSWORD"] == "p1"
    assert got["PGUSER_PG_2_RW"] == "u2" and got["PGPASSWORD_PG_2_RW"] == "p2"
    assert got["BROKER_USERNAME"] == "u3"
    assert got["BROKER_LEASE_IDS"] == "a,b,c"


def test_empty_fields_clear_the_inherited_variable() -> None:
    """An IAM user's null security_token drops an inherited AWS_SESSION_TOKEN; a field the
    credential does not have at all says nothing about the variable."""
    iam_user = held("aws", "ci", "aws", "a", access_key="AK", secret_key="SK",
                    security_token=None)
    assert stale_names([iam_user]) == {"AWS_SESSION_TOKEN"}
    assert stale_names([held("pg", "ro", "postgres", "c", username="u")]) == set()


def test_plain_aws_names_always_come_from_one_credential() -> None:
    """An STS credential after an IAM user is suffixed as a whole: its session token never
    pairs with the IAM user's key under the plain names."""
    iam_user = held("aws", "ci", "aws", "a", access_key="AK", secret_key="SK",
                    security_token=None)
    sts = held("aws2", "dep", "aws", "b", access_key="AK2", secret_key="SK2",
               security_token="T2")
    got = build_env([iam_user, sts])
    assert (got["AWS_ACCESS_KEY_ID"], got["AWS_SECRET_ACCESS_KEY"]) == ("AK", "SK")
    assert "AWS_SESSION_TOKEN" not in got
    assert got["AWS_SESSION_TOKEN_AWS2_DEP"] == "T2"
    assert got["AWS_ACCESS_KEY_ID_AWS2_DEP"] == "AK2"
    assert stale_names([iam_user, sts]) == {"AWS_SESSION_TOKEN"}
    # The other way round the STS credential's triple is the plain one.
    got = build_env([sts, iam_user])
    assert (got["AWS_ACCESS_KEY_ID"], got["AWS_SESSION_TOKEN"]) == ("AK2", "T2")
    assert got["AWS_ACCESS_KEY_ID_AWS_CI"] == "AK"
    assert stale_names([sts, iam_user]) == set()


def test_held_credentials_never_show_their_secret() -> None:
    """repr() of a held credential (in a log or traceback) has no password."""
    cred = held("pg", "ro", "postgres", "pg/creds/ro/1", username="u", password="s3cret")
    assert "s3cret" not in repr(cred)


# --------------------------------------------------------------------------- against a server


def _broker(canned: Canned, tmp_path: Path) -> None:  # noqa: F811
    """Canned answers: JWT login, mounts, creds (role pg/readonly), lookup, renew, revoke."""
    canned.on("POST", "/v1/auth/github/login",
              body={"auth": {"client_token": "login-token", "accessor": "acc"}})
    canned.on("GET", "/v1/sys/internal/ui/mounts/pg", body={"data": {"type": "postgres"}})
    canned.on("GET", "/v1/pg/creds/readonly", body={
        "lease_id": "pg/creds/readonly/L1", "lease_duration": 60, "renewable": True,
        "data": {"username": "v-user", "password": "the-password"}})
    canned.on("GET", "/v1/pg/creds/denied", status=403,
              body={"errors": ["permission denied: read on pg/creds/denied"]})
    canned.on("PUT", "/v1/sys/leases/lookup", body={"data": {
        "max_expire_time": "2099-01-01T00:00:00Z"}})
    canned.on("PUT", "/v1/sys/leases/revoke", body=None, status=204)
    canned.on("POST", "/v1/auth/token/revoke-self", body=None, status=204)


def _child(out: Path) -> list[str]:
    code = ("import json, os, sys; json.dump({k: os.environ.get(k) for k in "
            "('PGUSER', 'PGPASSWORD', 'BROKER_LEASE_IDS', 'BROKER_TOKEN')}, "
            f"open({str(out)!r}, 'w')); sys.exit(5)")
    return [sys.executable, "-c", code]


def test_jwt_login_token_is_used_then_revoked(
    canned: Canned, env: pytest.MonkeyPatch, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """exec logs in with the JWT, issues with the login token (ttl = 2 heartbeats), runs
    the command with the credential, then revokes the lease and the login token."""
    _broker(canned, tmp_path)
    env.setenv("CI_JWT", "header.payload.signature")
    out = tmp_path / "seen.json"
    code = main(["exec", "--address", canned.address, "--jwt-env", "CI_JWT", "--auth-role",
                 "deploy", "--auth-path", "github", "pg/readonly", "--", *_child(out)])
    assert code == 5
    assert json.loads(out.read_text()) == {
        "PGUSER": "v-user", "PGPASSWORD": "the-password",
        "BROKER_LEASE_IDS": "pg/creds/readonly/L1", "BROKER_TOKEN": None}
    calls = [(s.method, s.path) for s in canned.seen]
    assert calls == [
        ("POST", "/v1/auth/github/login"), ("GET", "/v1/sys/internal/ui/mounts/pg"),
        ("GET", "/v1/pg/creds/readonly"), ("PUT", "/v1/sys/leases/lookup"),
        ("PUT", "/v1/sys/leases/revoke"), ("POST", "/v1/auth/token/revoke-self")]
    login, _, creds, _, revoke, revoke_self = canned.seen
    assert login.body == {"role": "deploy", "jwt": "header.payload.signature"}
    assert "X-Vault-Token" not in login.headers
    assert creds.query == {"ttl": ["60"]}
    assert all(s.headers["X-Vault-Token"] == "login-token" for s in (creds, revoke, revoke_self))
    assert revoke.body == {"lease_id": "pg/creds/readonly/L1", "strict": True}
    err = capsys.readouterr().err
    assert "the-password" not in err and "header.payload" not in err and "login-token" not in err


def test_refused_creds_stop_before_the_command_and_clean_up(
    canned: Canned, env: pytest.MonkeyPatch, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 403 on the second credential: one error line, exit 125, the command never runs,
    the first lease is revoked."""
    _broker(canned, tmp_path)
    out = tmp_path / "seen.json"
    code = main(["exec", "--address", canned.address, "--token", "t", "pg/readonly",
                 "pg/denied", "--", *_child(out)])
    assert code == 125
    assert not out.exists()
    err = capsys.readouterr().err
    assert "broker: error: pg/denied: permission denied: read on pg/creds/denied (HTTP 403)\n" in err
    revoked = [s.body for s in canned.seen if s.path == "/v1/sys/leases/revoke"]
    assert revoked == [{"lease_id": "pg/creds/readonly/L1", "strict": True}]
    assert not any(s.path.endswith("revoke-self") for s in canned.seen)  # not our token


def test_missing_command_exits_127_and_revokes(
    canned: Canned, env: pytest.MonkeyPatch, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A command that does not exist: 127 as in a shell, and the lease is revoked."""
    _broker(canned, tmp_path)
    code = main(["exec", "--address", canned.address, "--token", "t", "pg/readonly", "--",
                 str(tmp_path / "no-such-program")])
    assert code == 127
    assert "cannot run" in capsys.readouterr().err
    assert [s.path for s in canned.seen][-1] == "/v1/sys/leases/revoke"



def test_signal_before_the_command_runs_revokes_what_was_issued(
    canned: Canned, env: pytest.MonkeyPatch, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGTERM while exec is still issuing: no command, the issued lease is revoked, 143."""
    _broker(canned, tmp_path)

    # The SIGTERM goes once the second issue is in flight (the first one done), not on
    # a fixed 0.3 s timer: a loaded machine could still be issuing the first by then.
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))

    def slow(_req: Any) -> tuple[int, Any]:
        timer.start()
        time.sleep(1.0)
        return 403, {"errors": ["too late"]}

    canned.routes[("GET", "/v1/pg/creds/denied")] = slow
    out = tmp_path / "seen.json"
    try:
        code = main(["exec", "--address", canned.address, "--token", "t", "pg/readonly",
                     "pg/denied", "--", *_child(out)])
    finally:
        if timer.ident is not None:  # started: the second issue was asked for
            timer.join()
    assert code == 128 + signal.SIGTERM
    assert not out.exists()
    assert "interrupted (SIGTERM) before the command ran" in capsys.readouterr().err
    revoked = [s.body for s in canned.seen if s.path == "/v1/sys/leases/revoke"]
    assert revoked == [{"lease_id": "pg/creds/readonly/L1", "strict": True}]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
