"""Server fixes from the fourth operator QA pass, against real brokers and servers.

- ``broker server --dev`` restarted: the previous run's root token is revoked as
  ``auth/token/revoke`` revokes it: its child tokens and their leases too;
- SIGTERM: while in-flight requests drain, new ones get 503 (not "connection
  refused"), ``sys/health`` 503 as well, and then the listener closes;
- SIGHUP that removes a mount, or changes its plugin, while it has live leases:
  a warning (removal) or a refusal naming the mount and the count (plugin);
- an empty ``password_file``: a config error naming the file, the key, "is empty";
- the reload log line names what changed (policies, auth methods, mounts);
- a bad TLS pair on SIGHUP: the file and the reason named, the old certificate kept;
- the config check docs/operations.md shows works, in one line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from broker.backend import register_plugin
from broker.bench.noop import NoopBackend
from broker.bench.noop import register as register_noop
from broker.config import ConfigError, load_config
from broker.lease import LeaseFilter, LeaseState
from broker.server import reload
from tests.conftest import run
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    broker_cli,
    config_url,
    pg_roles,
    spawn_broker,
    start_broker,
    stop_spawned,
    wait_healthy,
    write_config,
)
from tests.integration.test_tls_reload import _ca, _install, _leaf, _served_serial

pytestmark = pytest.mark.integration

_ONE_LINE_ERROR = re.compile(r"\Abroker: error: [^\n]+\n\Z")
REPO = Path(__file__).resolve().parents[2]
#: a second in-process plugin name for the no-op backend: a "plugin change".
OTHER_NOOP = "bench-noop-other"


def _wait_for(path: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    tail = path.read_text(errors="replace")[-3000:] if path.exists() else ""
    raise AssertionError(f"no {text!r} in {path} after {timeout}s:\n{tail}")


def _api(url: str, token: str, method: str, path: str, **kw: object) -> requests.Response:
    return requests.request(method, f"{url}/v1/{path}", headers={"X-Vault-Token": token},
                            timeout=30, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 1. dev restart
def _pg_mount(dsn: str, template: str) -> str:
    return f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{dsn}"
connect_timeout = 2

[mounts.pg.roles.app]
username_template = "{template}-{{{{random 10}}}}"
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
]
default_ttl = "1h"
max_ttl = "2h"
"""


def test_dev_restart_revokes_the_old_root_with_its_children_and_their_leases(
        tmp_path: Path, postgres_dsn: str) -> None:
    """The old dev root's child token stopped working (it kept working, and said
    ``orphan: true``), and the leases the tree owned are revoked; a token that
    was never under it (an orphan) keeps its lease. The same chosen root id works again."""
    template = f"dv{os.getpid() % 10000}"
    config = write_config(tmp_path, _pg_mount(postgres_dsn, template))
    url = config_url(config)
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    root = "dev-root-id-for-tests"
    dev = ("--dev", "--dev-root-token-id", root)
    proc = spawn_broker(config, *dev, env=env)
    try:
        wait_healthy(url)
        child = _api(url, root, "POST", "auth/token/create", json={"ttl": "1h"})
        assert child.status_code == 200, child.text
        child_token = child.json()["auth"]["client_token"]
        orphan = _api(url, root, "POST", "auth/token/create-orphan", json={"ttl": "1h"})
        orphan_token = orphan.json()["auth"]["client_token"]
        child_lease = _api(url, child_token, "GET", "pg/creds/app").json()["lease_id"]
        root_lease = _api(url, root, "GET", "pg/creds/app").json()["lease_id"]
        orphan_lease = _api(url, orphan_token, "GET", "pg/creds/app")
        assert orphan_lease.status_code == 200, orphan_lease.text
        orphan_user = orphan_lease.json()["data"]["username"]
        assert len(run(pg_roles(postgres_dsn, template))) == 3
        assert stop_spawned(proc) == 0

        proc = spawn_broker(config, *dev, env=env)  # the same root id, chosen again
        wait_healthy(url)
        assert _api(url, root, "GET", "auth/token/lookup-self").status_code == 200
        looked = _api(url, child_token, "GET", "auth/token/lookup-self")
        assert looked.status_code == 403, looked.text  # was 200 with "orphan": true
        deadline = time.monotonic() + 30
        while run(pg_roles(postgres_dsn, template)) != {orphan_user}:
            assert time.monotonic() < deadline, run(pg_roles(postgres_dsn, template))
            time.sleep(0.2)
        for lease_id in (child_lease, root_lease):  # the ending is recorded just after
            while True:
                found = _api(url, root, "PUT", "sys/leases/lookup", json={"lease_id": lease_id})
                if found.status_code != 200 or found.json()["data"].get("state") == "revoked":
                    break
                assert found.json()["data"]["state"] == "revoking", found.text
                assert time.monotonic() < deadline, found.text
                time.sleep(0.1)
        assert _api(url, orphan_token, "GET", "auth/token/lookup-self").status_code == 200
        log = (tmp_path / "server.log").read_text(errors="replace")
        assert "dev: revoked the previous run's root token" in log
        assert root not in log.replace(f"Root Token: {root}", "").replace(
            f"BROKER_TOKEN='{root}'", "")  # only in the banner
    finally:
        try:
            if proc.poll() is None:
                _api(url, root, "PUT", "sys/leases/revoke-prefix/pg/",
                     json={"sync": True, "force": True})
        finally:
            stop_spawned(proc)


# --------------------------------------------------------------------------- 2. drain
def test_sigterm_answers_503_while_draining_then_closes(tmp_path: Path) -> None:
    """A request in flight at SIGTERM finishes; meanwhile a new client gets 503
    "broker is shutting down" and ``sys/health`` 503 (they got "connection refused")."""
    config = write_config(tmp_path, "")
    url = config_url(config)
    token = broker_cli("operator", "init", "--config", str(config)).stdout.strip().splitlines()[-1]
    proc = spawn_broker(config)
    host, port = url.removeprefix("http://").split(":")
    slow: socket.socket | None = None
    try:
        wait_healthy(url)
        body = json.dumps({"ttl": "1h", "display_name": "drain"}).encode()
        slow = socket.create_connection((host, int(port)), timeout=20)
        # Headers and half the body: the handler is running, reading the rest.
        slow.sendall(b"POST /v1/auth/token/create HTTP/1.1\r\nHost: broker\r\n"
                     b"X-Vault-Token: " + token.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:5])
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _wait_for(tmp_path / "server.log", "shutting down", 10)
        time.sleep(0.3)
        other = requests.get(f"{url}/v1/sys/seal-status", timeout=10)
        assert other.status_code == 503
        assert other.json() == {"errors": ["broker is shutting down"]}
        health = requests.get(f"{url}/v1/sys/health", timeout=10)
        assert health.status_code == 503
        assert proc.poll() is None
        slow.sendall(body[5:])  # the in-flight request completes, and is answered
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = slow.recv(65536)
            assert chunk, answer
            answer += chunk
        slow.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert proc.wait(15) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/v1/sys/health", timeout=5)
    finally:
        if slow is not None:
            slow.close()
        stop_spawned(proc)


# --------------------------------------------------------------------------- 3 & 5. reload
def _noop_mounts(*names: str, plugin: str = "bench-noop", other: str = "") -> str:
    text = ""
    for name in names:
        text += f"""
[mounts.{name}]
plugin = "{other if other and name == names[0] else plugin}"

[mounts.{name}.roles.r]
default_ttl = "1h"
max_ttl = "2h"
"""
    return text


@pytest.fixture
def noop_thread(tmp_path: Path) -> Iterator[tuple[BrokerThread, Path]]:
    register_noop()
    register_plugin(OTHER_NOOP, NoopBackend)
    config = write_config(tmp_path, _noop_mounts("a", "b"))
    broker = start_broker(config)
    try:
        yield broker, config
    finally:
        broker.stop()


def _rewrite(broker: BrokerThread, config: Path, body: str) -> None:
    """The same file with another body (port, store and audit unchanged)."""
    assert write_config(config.parent, body, port=broker.config.server.port) == config


def test_reload_refuses_a_plugin_change_and_warns_of_a_removal_with_live_leases(
        noop_thread: tuple[BrokerThread, Path], caplog: pytest.LogCaptureFixture) -> None:
    broker, config = noop_thread
    assert broker.state is not None
    for mount in ("a", "b"):
        issued = _api(broker.url, ROOT_TOKEN, "GET", f"{mount}/creds/r")
        assert issued.status_code == 200, issued.text
    # a: bench-noop -> another plugin; b: removed.
    _rewrite(broker, config, _noop_mounts("a", other=OTHER_NOOP))
    caplog.set_level(logging.INFO)
    assert broker.call(reload(broker.state)) is True
    engine = broker.state.engine
    assert engine.mounts["a"].spec.plugin == "bench-noop"  # kept: its leases need it
    assert broker.state.config.mounts["a"].plugin == "bench-noop"
    assert "b" not in engine.mounts
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("mount a: plugin change from bench-noop to bench-noop-other refused: 1 live "
               "lease(s)" in m for m in errors), errors
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("mount b removed with 1 live lease(s)" in m for m in warnings), warnings
    # Still issues from the kept mount; once its leases are gone the change goes through.
    assert _api(broker.url, ROOT_TOKEN, "GET", "a/creds/r").status_code == 200
    done = _api(broker.url, ROOT_TOKEN, "PUT", "sys/leases/revoke-prefix/a/",
                json={"sync": True})
    assert done.status_code in (200, 204), done.text
    deadline = time.monotonic() + 20
    while broker.call(engine.store.count_matching(
            LeaseFilter(prefix="a/"),
            states=(LeaseState.ACTIVE, LeaseState.REVOKING, LeaseState.PENDING))):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert broker.call(reload(broker.state)) is True
    assert engine.mounts["a"].spec.plugin == OTHER_NOOP


def test_reload_log_names_policy_and_auth_changes(
        noop_thread: tuple[BrokerThread, Path], caplog: pytest.LogCaptureFixture) -> None:
    """Only a policy changed: the line said "mounts unchanged"."""
    broker, config = noop_thread
    assert broker.state is not None
    _rewrite(broker, config, _noop_mounts("a", "b") + '\n[policies.app]\n"a/creds/r" = ["read"]\n')
    caplog.set_level(logging.INFO)
    assert broker.call(reload(broker.state)) is True
    lines = [r.getMessage() for r in caplog.records if "config reloaded from" in r.getMessage()]
    assert lines and lines[-1].endswith(": policy app added"), lines
    caplog.clear()
    assert broker.call(reload(broker.state)) is True  # the same file again
    lines = [r.getMessage() for r in caplog.records if "config reloaded from" in r.getMessage()]
    assert lines and lines[-1].endswith(": nothing changed"), lines


# --------------------------------------------------------------------------- 4. password_file
@pytest.mark.parametrize("content", [b"", b"\n", b"  \t\n"])
def test_an_empty_password_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    register_noop()
    (tmp_path / "admin.pw").write_bytes(content)
    config = write_config(tmp_path, '[mounts.pg]\nplugin = "postgres"\n'
                                    'connection_url = "postgresql://postgres@127.0.0.1/x"\n'
                                    'password_file = "admin.pw"\n')
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert err.value.key == "mounts.pg.password_file"
    assert str(tmp_path / "admin.pw") in err.value.message and "is empty" in err.value.message
    done = broker_cli("server", "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert _ONE_LINE_ERROR.match(done.stderr), done.stderr
    assert (f"{config}: mounts.pg.password_file: {tmp_path / 'admin.pw'} is empty"
            in done.stderr), done.stderr


def test_a_password_file_emptied_at_runtime_keeps_the_running_secret(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    register_noop()
    pw = tmp_path / "admin.pw"
    pw.write_text("s3cret-admin\n")
    config = write_config(tmp_path, '[mounts.n]\nplugin = "bench-noop"\n'
                                    'password_file = "admin.pw"\n')
    broker = start_broker(config)
    try:
        assert broker.state is not None
        engine = broker.state.engine
        running = engine.mounts["n"]
        pw.write_text("\n")
        caplog.set_level(logging.WARNING)
        broker.call(engine.follow_password_files())
        assert engine.mounts["n"] is running and running.spec.secret == "s3cret-admin"
        assert any(f"mount n: {pw} is empty; still using the old secret" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    finally:
        broker.stop()


# --------------------------------------------------------------------------- 6. TLS reload
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_a_bad_tls_pair_on_sighup_names_the_file_and_the_reason(tmp_path: Path) -> None:
    import ssl

    from cryptography.hazmat.primitives import serialization

    ca = _ca()
    certs = tmp_path / "tls"
    certs.mkdir()
    _install(certs, _leaf(ca, serial=1001))
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    client = ssl.create_default_context(cafile=str(ca_file))
    config = write_config(tmp_path, "", server=f'tls_cert_file = "{certs / "tls.crt"}"\n'
                                               f'tls_key_file = "{certs / "tls.key"}"')
    port = int(config_url(config).rsplit(":", 1)[1])
    log = tmp_path / "server.log"
    proc = spawn_broker(config)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _served_serial(port, client) == 1001
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        # The key of another pair.
        third, fourth = _leaf(ca, serial=3003), _leaf(ca, serial=4004)
        _install(certs, (third[0], fourth[1]))
        proc.send_signal(signal.SIGHUP)
        text = _wait_for(log, "server.tls_key_file", 10)
        assert (f"server.tls_key_file: {certs / 'tls.key'} is not an unencrypted PEM private "
                f"key matching tls_cert_file {certs / 'tls.crt'} (KEY_VALUES_MISMATCH)"
                ) in text, text
        # A damaged certificate: the certificate file is named, not the key.
        (certs / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
                                       "-----END CERTIFICATE-----\n")
        (certs / "tls.key").write_bytes(third[1])
        proc.send_signal(signal.SIGHUP)
        text = _wait_for(log, f"server.tls_cert_file: {certs / 'tls.crt'} is not a valid PEM "
                              "certificate", 10)
        assert proc.poll() is None
        assert _served_serial(port, client) == 1001  # the running certificate stays
    finally:
        stop_spawned(proc)
    text = log.read_text(errors="replace")
    for pair in (third, fourth):
        for line in pair[1].decode().splitlines()[1:-1]:
            assert line not in text  # no key material in the log


# --------------------------------------------------------------------------- 7. docs check
def _docs_check_snippet() -> str:
    """The ``sh`` block under "Check a config without starting anything"."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text[text.index("**Check a config without starting anything**"):]
    block = section[section.index("```sh\n") + len("```sh\n"):]
    return block[: block.index("```")]


def test_the_documented_config_check_answers_in_one_line(tmp_path: Path) -> None:
    """The check docs/operations.md gives (``broker server --check``): "config ok" for a
    good file; for a bad one, exit 2 and one line naming the file and the key (the
    python snippet the docs gave before printed a traceback)."""
    snippet = _docs_check_snippet()
    installed = "sudo -u broker /opt/broker/bin/broker"
    assert installed in snippet
    good = write_config(tmp_path, "")
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = "127.0.0.1:x"\n')

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        command = snippet.replace(installed, f"{sys.executable} -m broker.cli")
        command = command.replace("/etc/broker/broker.toml", str(path))
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                              timeout=60, cwd=REPO)

    ok = check(good)
    assert ok.returncode == 0 and ok.stdout == f"config ok: {good}\n", ok.stderr
    refused = check(bad)
    assert refused.returncode == 2, refused.stderr
    assert _ONE_LINE_ERROR.match(refused.stderr), refused.stderr
    assert f"{bad}: server.listen: expected HOST:PORT" in refused.stderr
    assert not (tmp_path / "broker.db").exists() and not (tmp_path / "audit.jsonl").exists()


def test_check_server_config_is_the_server_check_without_starting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What ``broker server --check`` runs: the server's own
    checks (here: plain HTTP off loopback, which load_config alone lets through
    with --listen), one line, nothing started."""
    from broker.server import check_server_config

    config = write_config(tmp_path, "")
    assert check_server_config(str(config)) == 0
    assert capsys.readouterr().out == f"config ok: {config}\n"
    assert check_server_config(str(config), listen="10.1.2.3:8200") == 2
    err = capsys.readouterr().err
    assert _ONE_LINE_ERROR.match(err) and "TLS" in err and "10.1.2.3" in err, err
    assert not (tmp_path / "broker.db").exists() and not (tmp_path / "audit.jsonl").exists()
