"""The ``broker`` command line against a live ``broker server --dev`` (a real subprocess).

The server runs the embedded dev config (mount ``pg``, role ``readonly``, on the
local PostgreSQL) with HOME and XDG_STATE_HOME in a temporary directory, so
its store, audit log and key are private to this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, server_missing

pytestmark = pytest.mark.integration


def _why_no_server() -> str | None:
    try:
        import broker.server
    except ImportError as exc:
        return f"broker.server does not import yet ({exc})"
    if not hasattr(broker.server, "run_server"):
        return "broker.server has no run_server yet"
    return None


_NO_SERVER = _why_no_server()
if _NO_SERVER:
    pytest.skip(_NO_SERVER, allow_module_level=True)

#: the dev server's root token (--dev-root-token-id).
ROOT = "root"
_ONE_LINE_ERROR = re.compile(r"\Abroker: error: [^\n]+\n\Z")


def _broker_argv() -> list[str]:
    script = Path(sys.executable).with_name("broker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "broker.cli"]


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_"))}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"), PYTHONUNBUFFERED="1")
    return env


@dataclass
class Live:
    """A running dev server and how to run the CLI against it."""

    address: str
    env: dict[str, str]
    state_dir: Path
    tmp: Path

    def cli(
        self, *args: str, token: str | None = ROOT, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, BROKER_ADDR=self.address)
        if token:
            env["BROKER_TOKEN"] = token
        return subprocess.run(
            [*_broker_argv(), *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    def ok(self, *args: str, token: str | None = ROOT) -> str:
        done = self.cli(*args, token=token)
        assert done.returncode == 0, f"broker {' '.join(args)}: {done.stderr}"
        return done.stdout

    def json(self, *args: str, token: str | None = ROOT) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.ok(*args, "--format", "json", token=token))
        return data


def _healthy(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/v1/sys/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """`broker server --dev --dev-root-token-id root` on a free port, stopped with SIGTERM."""
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        server_missing("PostgreSQL at 127.0.0.1:5432 (the dev config's pg mount)")
    home = tmp_path_factory.mktemp("broker-home")
    env = _clean_env(home)
    address = f"http://127.0.0.1:{free_port()}"
    listen = address.removeprefix("http://")
    proc = _start(
        [*_broker_argv(), "server", "--dev", "--dev-root-token-id", ROOT, "--listen", listen],
        env, address, home / "server.log")
    try:
        yield Live(address, env, home / "state" / "broker" / "dev", home)
    finally:
        # Leave no role or user behind on the shared servers: some tests keep
        # their leases, and this broker's store goes with the temp dir.
        request = urllib.request.Request(
            f"{address}/v1/sys/leases/revoke-prefix/", method="PUT",
            data=json.dumps({"all": True, "sync": True}).encode(),
            headers={"X-Vault-Token": ROOT, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            assert json.load(resp)["data"]["still_revoking"] == 0
        _stop(proc)


def _psql(sql: str, env: dict[str, str] | None = None) -> str:
    if shutil.which("psql") is None:
        pytest.skip("psql not installed")
    done = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-tAc", sql],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=30,
    )
    return done.stdout.strip()


def _role_exists(name: str) -> bool:
    return _psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'") == "1"


# --------------------------------------------------------------------------- creds


def test_creds_env_is_usable_by_psql_in_a_shell(live: Live) -> None:
    """`eval "$(broker creds pg/readonly --format env)"` gives psql a working login."""
    if shutil.which("psql") is None:
        pytest.skip("psql not installed")
    out = live.ok("creds", "pg/readonly", "--format", "env")
    names = [line.split("=", 1)[0] for line in out.splitlines()]
    assert names == ["export PGUSER", "export PGPASSWORD", "export BROKER_LEASE_ID"]
    script = (
        'eval "$(broker creds pg/readonly --format env --ttl 10m)" && '
        'printf "%s|%s|" "$PGUSER" "$BROKER_LEASE_ID" && '
        'psql -h 127.0.0.1 -d postgres -tAc "SELECT current_user"'
    )
    env = dict(live.env, BROKER_ADDR=live.address, BROKER_TOKEN=ROOT)
    env["PATH"] = f"{Path(_broker_argv()[0]).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    user, lease_id, current = done.stdout.strip().split("|")
    assert current == user
    assert lease_id.startswith("pg/creds/readonly/")


def test_lease_lookup_renew_list_revoke(live: Live) -> None:
    """A lease goes through lookup, renew, list and revoke; afterwards its role is gone."""
    creds = live.json("creds", "pg/readonly")
    lease_id, user = creds["lease_id"], creds["data"]["username"]
    assert lease_id.startswith("pg/creds/readonly/")
    assert _role_exists(user)

    looked = live.json("lease", "lookup", lease_id)
    assert looked["data"]["id"] == lease_id

    renewed = live.json("lease", "renew", lease_id, "--increment", "10m")
    assert renewed["lease_id"] == lease_id
    assert 590 <= renewed["lease_duration"] <= 600

    random_part = lease_id.rsplit("/", 1)[1]
    assert random_part in live.ok("lease", "list", "pg/creds/readonly/").splitlines()
    assert "creds/" in live.ok("lease", "list", "pg").splitlines()
    assert lease_id in live.ok("lease", "list", "pg/", "--recursive").splitlines()

    assert live.ok("lease", "revoke", lease_id) == f"revoked {lease_id}\n"
    assert not _role_exists(user)
    # Vault clients get 204 for a lease already revoked; the CLI says what happened.
    twice = live.cli("lease", "revoke", lease_id)
    assert twice.returncode == 1
    assert _ONE_LINE_ERROR.match(twice.stderr), twice.stderr
    assert "is revoked; it cannot be revoked" in twice.stderr
    again = live.cli("lease", "lookup", lease_id)
    assert again.returncode == 1
    assert _ONE_LINE_ERROR.match(again.stderr), again.stderr
    assert "revoked" in again.stderr


def test_revoke_prefix_waits_and_prints_a_summary(live: Live) -> None:
    """`lease revoke --prefix` waits for the revocations and reports what happened."""
    users = [live.json("creds", "pg/readonly")["data"]["username"] for _ in range(5)]
    done = live.cli("lease", "revoke", "--prefix", "pg/creds/readonly/")
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"revoked (\d+), irrevocable 0, in \d+\.\d s\n", done.stdout)
    assert match, done.stdout
    assert int(match.group(1)) >= len(users)
    assert not any(_role_exists(u) for u in users)
    assert live.ok("lease", "list", "pg/creds/readonly/") == ""
    stats = live.json("lease", "irrevocable", "pg/")
    assert stats["data"]["leases"] == []


def test_revoke_prefix_force_sync(live: Live) -> None:
    """--force --sync: the server answers when done and the summary counts every lease."""
    users = [live.json("creds", "pg/readonly")["data"]["username"] for _ in range(3)]
    done = live.cli("lease", "revoke", "--prefix", "pg/", "--force", "--sync")
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"revoked (\d+), irrevocable 0, in \d+\.\d s\n", done.stdout)
    assert match and int(match.group(1)) >= len(users), done.stdout
    assert not any(_role_exists(u) for u in users)


def _start(argv: list[str], env: dict[str, str], address: str, log_path: Path
           ) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not _healthy(address):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"broker server did not become healthy:\n{tail}", pytrace=False)
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_UNREVOCABLE = """
[storage]
url = "sqlite:///{dir}/store/broker.db"
[audit]
path = "{dir}/store/audit.jsonl"
hmac_key_file = "{dir}/store/audit.key"
[leases]
revoke_max_attempts = 1
[mounts.pgx]
plugin = "postgres"
connection_url = "postgresql://postgres@127.0.0.1:5432/postgres"
[mounts.pgx.roles.stuck]
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
]
# Fails every time: the lease goes irrevocable at the first attempt.
revocation_statements = ["SELECT 1/0"]
"""


def test_revoke_prefix_counts_leases_that_stay_irrevocable(tmp_path: Path) -> None:
    """A second revoke --prefix over a lease that stays irrevocable reports it and exits 1.

    Also: `--dev --config FILE` names the config's store in its banner, not the dev dir.
    """
    _psql("SELECT 1")  # skips without psql: the role left behind must be dropped
    (tmp_path / "store").mkdir()
    config = tmp_path / "broker.toml"
    config.write_text(_UNREVOCABLE.format(dir=tmp_path))
    address = f"http://127.0.0.1:{free_port()}"
    env = _clean_env(tmp_path)
    proc = _start([*_broker_argv(), "server", "--dev", "--dev-root-token-id", ROOT, "--config",
                   str(config), "--listen", address.removeprefix("http://")],
                  env, address, tmp_path / "server.log")
    live = Live(address, env, tmp_path / "store", tmp_path)
    user = ""
    try:
        user = live.json("creds", "pgx/stuck")["data"]["username"]
        for run in (1, 2):
            done = live.cli("lease", "revoke", "--prefix", "pgx/")
            assert done.returncode == 1, f"run {run}: {done.stdout} {done.stderr}"
            assert re.fullmatch(r"revoked 0, irrevocable 1, in \d+\.\d s\n", done.stdout), (
                f"run {run}: {done.stdout}")
            assert "1 lease(s) could not be revoked" in done.stderr
        forced = live.cli("lease", "revoke", "--prefix", "pgx/", "--force", "--sync")
        assert forced.returncode == 0, forced.stderr
        assert "irrevocable 0" in forced.stdout
    finally:
        _stop(proc)
        if user:
            _psql(f'DROP ROLE IF EXISTS "{user}"')
    banner = (tmp_path / "server.log").read_text(errors="replace")
    assert str(tmp_path / "store" / "broker.db") in banner
    assert str(tmp_path / "state") not in banner, banner


# --------------------------------------------------------------------------- errors


def test_server_errors_are_one_line(live: Live) -> None:
    """Unknown role (404) and a bad token (403) end in one stderr line, exit 1."""
    unknown = live.cli("creds", "pg/no-such-role")
    assert unknown.returncode == 1
    assert _ONE_LINE_ERROR.match(unknown.stderr) and "(HTTP 404)" in unknown.stderr
    denied = live.cli("creds", "pg/readonly", token="not-a-token")
    assert denied.returncode == 1
    assert _ONE_LINE_ERROR.match(denied.stderr) and "(HTTP 403)" in denied.stderr


def test_the_server_runs_on_uvloop(live: Live) -> None:
    """The default ``event_loop = "auto"`` really runs the daemon on uvloop (its log says so)."""
    log = (live.tmp / "server.log").read_text(errors="replace")
    assert "event loop: uvloop" in log, log[-2000:]


def test_an_unknown_event_loop_fails_in_one_line(tmp_path: Path) -> None:
    """`BROKER_EVENT_LOOP=trio broker server --dev` exits 1 naming the variable."""
    done = subprocess.run(
        [*_broker_argv(), "server", "--dev", "--listen", f"127.0.0.1:{free_port()}"],
        env={**_clean_env(tmp_path), "BROKER_EVENT_LOOP": "trio"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "broker: error: BROKER_EVENT_LOOP: unknown event loop 'trio'" in done.stderr


def test_server_with_a_missing_config_fails_in_one_line(tmp_path: Path) -> None:
    """`broker server --config MISSING` exits non-zero with one error line, no traceback."""
    done = subprocess.run(
        [*_broker_argv(), "server", "--config", str(tmp_path / "missing.toml")],
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert _ONE_LINE_ERROR.match(done.stderr), done.stderr
    assert "missing.toml" in done.stderr


_MALFORMED = {
    "ipv6_url": ('[mounts.pg]\nplugin = "postgres"\n'
                 'connection_url = "postgresql://postgres:hunter2@[::1/postgres"\n',
                 "mounts.pg.connection_url: malformed URL"),
    "storage_password": ('[storage]\nurl = "mysql://broker:hunter2@db/broker"\n',
                         "storage.url: expected sqlite:///PATH or postgresql://..., "
                         "got 'mysql://...'"),
    "not_pem": ('[server]\ntls_cert_file = "/etc/hostname"\ntls_key_file = "/etc/hostname"\n',
                "server.tls_cert_file: /etc/hostname is not a PEM certificate"),
    "zero_ttl": ('[leases]\ndefault_ttl = "0s"\n', "leases.default_ttl: must be at least 1s"),
    "not_utf8": (None, "not UTF-8"),
    "directory": (None, "is a directory"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_server_with_a_broken_config_fails_in_one_line(tmp_path: Path, case: str) -> None:
    """`broker server --config FILE` with a broken FILE: one line naming file and key, no secret."""
    text, expected = _MALFORMED[case]
    config = tmp_path / "broker.toml"
    if case == "directory":
        config = tmp_path
    elif text is None:
        config.write_bytes(b'[server]\nlisten = "\xff\xfe"\n')
    else:
        config.write_text(text)
    done = subprocess.run(
        [*_broker_argv(), "server", "--config", str(config)],
        env=_clean_env(tmp_path), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr
    assert _ONE_LINE_ERROR.match(done.stderr), done.stderr
    assert f"broker: error: {config}: " in done.stderr and expected in done.stderr, done.stderr


@pytest.mark.parametrize("case", ["store_down", "short_audit_key"])
def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path: Path, case: str) -> None:
    """A good config, a world that is not: a store nobody listens for, an audit key
    that is too short. One line naming what failed (each was a traceback)."""
    storage = f"sqlite:///{tmp_path / 'broker.db'}"
    if case == "store_down":
        storage = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    key = tmp_path / "audit.key"
    key.write_bytes(b"short" if case == "short_audit_key" else os.urandom(32))
    key.chmod(0o600)
    config = tmp_path / "broker.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{free_port()}"\n'
                      f'[storage]\nurl = "{storage}"\n'
                      f'[audit]\npath = "{tmp_path / "audit.jsonl"}"\nhmac_key_file = "{key}"\n')
    done = subprocess.run(
        [*_broker_argv(), "server", "--config", str(config)],
        env=dict(_clean_env(tmp_path), BROKER_LOG_LEVEL="WARNING"),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert _ONE_LINE_ERROR.match(done.stderr), done.stderr
    expected = {"store_down": "lease store postgresql://", "short_audit_key": str(key)}[case]
    assert expected in done.stderr, done.stderr


def test_a_token_read_from_a_windows_file_works(live: Live) -> None:
    """`--token "$(cat token.txt)"` of a CR LF file: the CR is stripped, the request works."""
    done = live.cli("lease", "irrevocable", "--format", "json", token=f"{ROOT}\r")
    assert done.returncode == 0, done.stderr
    bad = live.cli("lease", "irrevocable", token=f"{ROOT}\r\n{ROOT}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert _ONE_LINE_ERROR.match(bad.stderr) and "control" in bad.stderr, bad.stderr


# --------------------------------------------------------------------------- tokens


def test_token_create_lookup_and_revoke_self(live: Live) -> None:
    """A child token gets its policy and metadata, can issue, and dies on revoke-self."""
    created = live.json(
        "token",
        "create",
        "--policy",
        "app",
        "--ttl",
        "30m",
        "--display-name",
        "cli-test",
        "--meta",
        "team=platform",
    )
    child = created["auth"]["client_token"]
    assert "app" in created["auth"]["policies"]

    looked = live.json("token", "lookup", token=child)
    assert "app" in looked["data"]["policies"]
    assert looked["data"]["meta"] == {"team": "platform"}

    assert live.json("creds", "pg/readonly", token=child)["lease_id"].startswith("pg/creds/")
    live.ok("token", "revoke", "--self", token=child)
    dead = live.cli("token", "lookup", token=child)
    assert dead.returncode == 1
    assert _ONE_LINE_ERROR.match(dead.stderr) and "(HTTP 403)" in dead.stderr


def test_token_capabilities_as_the_vault_cli_prints_them(live: Live) -> None:
    """`broker token capabilities [TOKEN] PATH` (and --accessor): the capabilities on the
    path, comma-separated, `deny` where none, `root` for a root token."""
    created = live.json("token", "create", "--policy", "app", "--ttl", "10m")["auth"]
    child, accessor = created["client_token"], created["accessor"]
    assert live.ok("token", "capabilities", "pg/creds/readonly", "--format", "table",
                   token=child) == "read\n"
    assert live.ok("token", "capabilities", "sys/leases/revoke-prefix/pg/",
                   "--format", "table", token=child) == "deny\n"
    assert live.ok("token", "capabilities", "pg/creds/readonly", "--format", "table") == "root\n"
    # Another token's, by value and by accessor (the root token may ask).
    assert live.json("token", "capabilities", child, "pg/creds/readonly") == {
        "pg/creds/readonly": ["read"]}
    assert live.json("token", "capabilities", "--accessor", accessor, "my/creds/readonly") == {
        "my/creds/readonly": ["read"]}
    # The child itself may not ask about others: sys/capabilities is not in default.
    refused = live.cli("token", "capabilities", "root", "pg/creds/readonly", token=child)
    assert refused.returncode == 1 and "(HTTP 403)" in refused.stderr
    wrong = live.cli("token", "capabilities", "a", "b", "c")
    assert wrong.returncode == 2 and "give PATH, or TOKEN PATH" in wrong.stderr
    live.ok("token", "revoke", "--self", token=child)


# --------------------------------------------------------------------------- operator init


def test_operator_init_prints_the_token_once(tmp_path: Path) -> None:
    """init prints only the token on stdout (warning on stderr); a second init fails."""
    config = tmp_path / "broker.toml"
    # Its own audit log and key: the defaults are /var/log/broker and /etc/broker,
    # which this test wrote to on every machine it ran on.
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path / "broker.db"}"\n'
                      f'[audit]\npath = "{tmp_path / "audit.jsonl"}"\n'
                      f'hmac_key_file = "{tmp_path / "audit.key"}"\n')
    argv = [*_broker_argv(), "operator", "init", "--config", str(config)]
    env = _clean_env(tmp_path)
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(r"\S{16,}\n", first.stdout), first.stdout
    assert "shown ONCE" in first.stderr
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert _ONE_LINE_ERROR.match(second.stderr) and "already initialised" in second.stderr
    assert "operator_init" in (tmp_path / "audit.jsonl").read_text()


# --------------------------------------------------------------------------- audit


def test_audit_verify_accepts_the_log_and_finds_a_dropped_line(live: Live) -> None:
    """The dev server's audit log verifies (with and without key); a dropped line is named."""
    for _ in range(2):  # at least a few events, even when this test runs alone
        live.ok("creds", "pg/readonly")
    log = live.state_dir / "audit.jsonl"
    key = live.state_dir / "audit.key"
    copy = live.tmp / "audit-copy.jsonl"
    shutil.copyfile(log, copy)  # a snapshot: the server keeps appending to the original
    lines = copy.read_text().splitlines(keepends=True)
    assert len(lines) >= 3

    with_key = live.cli("audit", "verify", str(copy), "--key-file", str(key), token=None)
    assert (with_key.returncode, with_key.stdout) == (0, f"ok: {len(lines)} lines\n")
    without_key = live.cli("audit", "verify", str(copy), token=None)
    assert (without_key.returncode, without_key.stdout) == (0, f"ok: {len(lines)} lines\n")

    tampered = live.tmp / "audit-tampered.jsonl"
    tampered.write_text("".join(lines[:1] + lines[2:]))
    bad = live.cli("audit", "verify", str(tampered), "--key-file", str(key), token=None)
    assert bad.returncode == 1
    assert bad.stdout.startswith(f"{tampered}:2: "), bad.stdout
    assert bad.stdout.count("\n") == 1


def test_audit_verify_missing_file_is_one_line(tmp_path: Path) -> None:
    """A missing audit file is a one-line error, exit 1."""
    done = subprocess.run(
        [*_broker_argv(), "audit", "verify", str(tmp_path / "nope.jsonl")],
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert _ONE_LINE_ERROR.match(done.stderr), done.stderr
