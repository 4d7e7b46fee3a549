"""Operator-facing fixes from a QA pass, against real processes and servers.

- a ``password_file`` that is not UTF-8: one config error at start, a rejected
  reload on SIGHUP, one log line from the every-second job, and no mount's
  health check held up by it;
- ``broker operator init``: one line (no traceback) when the store or the audit
  log cannot be opened, and what docs/operations.md says it does;
- a configured ``default`` policy extends the built-in one;
- SIGHUP names the changed settings that only a restart applies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from broker.audit import hash_value, load_key
from broker.lease import TokenState
from broker.store import open_store
from tests.integration.broker_harness import (
    TcpProxy,
    broker_cli,
    dsn_port,
    free_port,
    noop_broker,
    spawn_broker,
    start_broker,
    stop_spawned,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.integration

_ONE_LINE_ERROR = re.compile(r"\Abroker: error: [^\n]+\n\Z")
#: bytes that are no UTF-8 text (a UTF-16 byte order mark)
NOT_UTF8 = b"\xff\xfe"


def _wait_for(path: Path, text: str, timeout: float, *, count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count(text) >= count:
            return
        time.sleep(0.05)
    tail = path.read_text()[-3000:] if path.exists() else ""
    raise AssertionError(f"no {text!r} (x{count}) in {path} after {timeout}s:\n{tail}")


def _pg_mount(name: str, dsn: str, extra: str = "", *, port: int | None = None) -> str:
    """A postgres mount on ``dsn``'s server (or ``port`` on its host), no password in the URL."""
    url = urlsplit(dsn)
    where = f"{url.hostname}:{port or dsn_port(dsn)}"
    return f"""
[mounts.{name}]
plugin = "postgres"
connection_url = "postgresql://{url.username or 'postgres'}@{where}{url.path or '/postgres'}"
{extra}
"""


# --------------------------------------------------------------------------- password_file


def test_start_with_a_non_utf8_password_file_is_one_config_error(tmp_path: Path) -> None:
    """``broker server``: the config error line and exit 2, not a UnicodeDecodeError traceback."""
    (tmp_path / "admin.pw").write_bytes(NOT_UTF8)
    config = write_config(tmp_path, _pg_mount("pg", "postgresql://postgres@127.0.0.1:5432/x",
                                              'password_file = "admin.pw"'))
    done = broker_cli("server", "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert _ONE_LINE_ERROR.match(done.stderr), done.stderr
    assert (f"{config}: mounts.pg.password_file: cannot read {tmp_path / 'admin.pw'}: "
            "not UTF-8 text (byte 0)") in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_a_non_utf8_password_file_at_runtime_is_logged_once_and_rejects_a_reload(
        tmp_path: Path, postgres_dsn: str) -> None:
    """Written into a running broker's file: one warning (not a traceback a second), and
    SIGHUP says ``reload rejected, keeping the running config`` (not ``reload failed``)."""
    pw = tmp_path / "admin.pw"
    pw.write_text("anything\n")  # the local PostgreSQL trusts 127.0.0.1
    config = write_config(tmp_path, _pg_mount("pg", postgres_dsn, 'password_file = "admin.pw"'))
    proc = spawn_broker(config)
    log = tmp_path / "server.log"
    try:
        wait_healthy(f"http://127.0.0.1:{_port(config)}")
        pw.write_bytes(NOT_UTF8)
        _wait_for(log, "mount pg: cannot read", 10)
        time.sleep(3)  # three more runs of the every-second job
        proc.send_signal(signal.SIGHUP)
        _wait_for(log, "reload rejected, keeping the running config", 10)
        time.sleep(1.5)
        text = log.read_text()
        assert text.count("mount pg: cannot read") == 1, text
        assert f"mount pg: cannot read {pw}: not UTF-8 text (byte 0)" in text
        assert (f"reload rejected, keeping the running config: {config}: "
                f"mounts.pg.password_file: cannot read {pw}: not UTF-8 text (byte 0)") in text
        assert "Traceback" not in text and "reload failed" not in text, text
        assert proc.poll() is None
    finally:
        stop_spawned(proc)


def _port(config: Path) -> int:
    match = re.search(r'listen = "127\.0\.0\.1:(\d+)"', config.read_text())
    assert match
    return int(match.group(1))


def test_one_mounts_bad_password_file_does_not_stop_another_mounts_health(
        tmp_path: Path, postgres_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """The health job follows password files first: a bad one used to raise there, and no
    mount recovered. Now it is one warning, and the other mount comes back."""
    proxy = TcpProxy(dsn_port(postgres_dsn))
    proxy.down()  # pg2's backend is unreachable when the broker starts
    pw = tmp_path / "admin.pw"
    pw.write_text("anything\n")
    config = write_config(tmp_path, _pg_mount("pg", postgres_dsn, 'password_file = "admin.pw"')
                          + _pg_mount("pg2", postgres_dsn, port=proxy.port))
    server = start_broker(config)
    try:
        assert server.state is not None
        engine = server.state.engine
        assert engine.mount("pg").healthy and not engine.mount("pg2").healthy
        pw.write_bytes(NOT_UTF8)
        proxy.up()
        for _ in range(3):
            server.call(engine.follow_password_files())  # the every-second job
        server.call(engine.check_mounts())  # the health job: used to raise here
        assert engine.mount("pg2").healthy, engine.mount("pg2").error
        assert engine.mount("pg").healthy  # the running secret stays in use
        notes = [r for r in caplog.records if "mount pg: cannot read" in r.getMessage()]
        assert len(notes) == 1 and notes[0].exc_info is None, caplog.text
        assert "not UTF-8 text (byte 0)" in notes[0].getMessage()
    finally:
        server.stop()
        proxy.close()


def test_a_failure_following_one_file_is_logged_once_and_spares_the_others(
        tmp_path: Path, postgres_dsn: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Any error while following one mount's file (here: a rebuild that raises) is isolated
    to that mount, logged once with its traceback, and the next mount is still followed."""
    (tmp_path / "a.pw").write_text("one\n")
    (tmp_path / "b.pw").write_text("one\n")
    config = write_config(tmp_path, _pg_mount("pga", postgres_dsn, 'password_file = "a.pw"')
                          + _pg_mount("pgb", postgres_dsn, 'password_file = "b.pw"'))
    server = start_broker(config)
    try:
        assert server.state is not None
        engine = server.state.engine
        build = engine._build_mount

        def broken_for_pga(name: str, cfg: object) -> object:
            if name == "pga":
                raise RuntimeError("plugin bug")
            return build(name, cfg)  # type: ignore[arg-type]

        monkeypatch.setattr(engine, "_build_mount", broken_for_pga)
        (tmp_path / "a.pw").write_text("two\n")
        (tmp_path / "b.pw").write_text("two\n")
        caplog.set_level(logging.WARNING, logger="broker.engine")
        for _ in range(3):
            server.call(engine.follow_password_files())
        server.call(engine.check_mounts())
        assert engine.mount("pgb").spec.secret == "two"  # followed despite pga's failure
        failed = [r for r in caplog.records if " failed: " in r.getMessage()]
        assert len(failed) == 1 and failed[0].exc_info is not None, caplog.text
        assert "mount pga: following" in failed[0].getMessage()
        assert "RuntimeError: plugin bug" in failed[0].getMessage()
    finally:
        server.stop()


# --------------------------------------------------------------------------- operator init


@pytest.mark.parametrize("case", ["store under a file", "store refuses", "audit under a file"])
def test_operator_init_failures_are_one_line(tmp_path: Path, case: str) -> None:
    """A store or audit log init cannot open is one line, exit 1, as ``broker server`` says it."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory\n")
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    audit = tmp_path / "audit.jsonl"
    if case == "store under a file":
        url, expected = f"sqlite:///{blocker / 'x.db'}", "lease store sqlite:///"
    elif case == "store refuses":
        url = f"postgresql://postgres@127.0.0.1:{free_port()}/db"
        expected = "lease store postgresql://postgres@127.0.0.1:"
    else:
        audit, expected = blocker / "audit.jsonl", f"audit log {blocker / 'audit.jsonl'}: "
    config = tmp_path / "broker.toml"
    config.write_text(f'[storage]\nurl = "{url}"\n[audit]\npath = "{audit}"\n'
                      f'hmac_key_file = "{tmp_path / "audit.key"}"\n')
    done = broker_cli("operator", "init", "--config", str(config))
    assert done.returncode == 1, done.stderr
    assert _ONE_LINE_ERROR.match(done.stderr), done.stderr
    assert expected in done.stderr and done.stdout == ""


def test_operator_init_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    """A config error is the one ``FILE: KEY: ...`` line and exit 2, as for ``broker server``."""
    config = tmp_path / "broker.toml"
    config.write_text('[storage]\nurl = "sqlite:///"\n')
    done = broker_cli("operator", "init", "--config", str(config))
    assert done.returncode == 2
    assert _ONE_LINE_ERROR.match(done.stderr), done.stderr
    assert f"{config}: storage.url: names a directory" in done.stderr


def test_operator_init_does_what_the_operations_guide_says(tmp_path: Path) -> None:
    """Refused while root-init is active; once it is revoked, root-init-2; both audited."""
    db = tmp_path / "broker.db"
    config = tmp_path / "broker.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{db}"\n[audit]\n'
                      f'path = "{tmp_path / "audit.jsonl"}"\n'
                      f'hmac_key_file = "{tmp_path / "audit.key"}"\n')
    first = broker_cli("operator", "init", "--config", str(config))
    assert first.returncode == 0, first.stderr
    again = broker_cli("operator", "init", "--config", str(config))
    assert (again.returncode, again.stderr) == (1, (
        "broker: error: already initialised: root token root-init is active "
        "(revoke it with a root token to initialise again)\n"))

    async def revoke() -> None:
        store = open_store(f"sqlite:///{db}")
        await store.open()
        try:
            assert await store.end_token("root-init", state=TokenState.REVOKED, now=time.time())
        finally:
            await store.close()

    asyncio.run(revoke())
    second = broker_cli("operator", "init", "--config", str(config))
    assert second.returncode == 0, second.stderr
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    inits = [ev for ev in lines if ev.get("type") == "admin"
             and ev.get("action") == "operator_init"]
    key = load_key(str(tmp_path / "audit.key"))  # accessors are written as HMACs
    assert [ev["created"]["accessor"] for ev in inits] == [
        hash_value(key, "root-init"), hash_value(key, "root-init-2")]
    tokens = {first.stdout.strip(), second.stdout.strip()}
    assert not any(ev["created"]["client_token"] in tokens for ev in inits)  # HMACs only


# --------------------------------------------------------------------------- default policy


@pytest.fixture
def default_extended(tmp_path: Path) -> Iterator[str]:
    """A broker whose config has a ``[policies.default]`` adding one path: its URL."""
    with noop_broker(tmp_path, """
[policies.default]
"sys/leases/stats" = ["read"]

[policies.app]
"pg/creds/ro" = ["read"]
""") as server:
        yield server.url


def test_a_configured_default_policy_keeps_token_self_management(default_extended: str) -> None:
    """A token can still look itself up, renew and revoke itself; the added path is granted."""
    url = default_extended
    root = {"X-Vault-Token": "root-token-for-tests"}
    created = requests.post(f"{url}/v1/auth/token/create", headers=root, timeout=10,
                            json={"policies": ["app"], "ttl": "1h"})
    assert created.status_code == 200, created.text
    own = {"X-Vault-Token": created.json()["auth"]["client_token"]}
    assert requests.get(f"{url}/v1/sys/leases/stats", headers=own, timeout=10).status_code == 200
    looked = requests.get(f"{url}/v1/auth/token/lookup-self", headers=own, timeout=10)
    assert looked.status_code == 200, looked.text
    renewed = requests.post(f"{url}/v1/auth/token/renew-self", headers=own, timeout=10, json={})
    assert renewed.status_code == 200, renewed.text
    revoked = requests.post(f"{url}/v1/auth/token/revoke-self", headers=own, timeout=10)
    assert revoked.status_code == 204, revoked.text
    gone = requests.get(f"{url}/v1/auth/token/lookup-self", headers=own, timeout=10)
    assert gone.status_code == 403


# --------------------------------------------------------------------------- SIGHUP


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_names_the_changed_settings_only_a_restart_applies(tmp_path: Path,
                                                                  workers: int) -> None:
    """listen, workers, audit and the sweeper's [leases] changed: one warning naming them, the
    broker keeps serving where it was. --listen overriding the file is no change of the file."""
    config = write_config(tmp_path, "", workers=workers)
    served = free_port()  # --listen: not what the file says
    proc = spawn_broker(config, "--listen", f"127.0.0.1:{served}")
    log = tmp_path / "server.log"
    try:
        wait_healthy(f"http://127.0.0.1:{served}")
        if workers > 1:  # every worker up, so that each hears the SIGHUP
            _wait_for(log, "serving; audit log", 15, count=workers)
        proc.send_signal(signal.SIGHUP)  # the file as it was loaded: nothing to warn about
        _wait_for(log, "config reloaded from", 15, count=1 if workers == 1 else workers)
        assert "only applied by a restart" not in log.read_text()

        text = config.read_text()
        text = re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{free_port()}"', text)
        text = text.replace(f"workers = {workers}", f"workers = {workers + 1}")
        text += "fsync = true\n[leases]\nsweeper_batch = 50\n[tokens]\nmax_ttl = \"2h\"\n"
        config.write_text(text)
        proc.send_signal(signal.SIGHUP)
        _wait_for(log, "only applied by a restart", 15)
        time.sleep(1)  # other workers' reloads: they do not say it again
        lines = [line for line in log.read_text().splitlines()
                 if "only applied by a restart" in line]
        assert len(lines) == 1, lines
        assert lines[0].endswith(f"reload: changed in {config} but only applied by a restart "
                                 "(the running values stay): server.listen, server.workers, "
                                 "audit.fsync, leases.sweeper_batch"), lines[0]
        wait_healthy(f"http://127.0.0.1:{served}", timeout=5)
        assert proc.poll() is None
    finally:
        stop_spawned(proc)
