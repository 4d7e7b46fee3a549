"""Token accessors in the audit log: HMAC'd (Vault's ``hmac_accessor``), and findable.

A real broker (in-process, real HTTP), hvac as the client. An accessor lets its
holder look up and revoke its token, so the audit log writes it as
``hmac-sha256:...`` under the audit key, as it writes tokens; ``sys/audit-hash/file``
(hvac's ``sys.calculate_hash``) and ``broker audit hash`` compute that form from a
known accessor, so an operator can still grep for one. ``[audit] hmac_accessor =
false`` writes them in clear.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests

from broker.config import ConfigError, load_config
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, start_broker, write_config

pytestmark = pytest.mark.integration

POLICIES = """
[policies.hasher]
"sys/audit-hash/*" = ["update", "sudo"]

[policies.updater]
"sys/audit-hash/*" = ["update"]

[policies.sudoer]
"sys/audit-hash/*" = ["sudo"]
"""


def _broker_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def _lines(broker: BrokerThread) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(broker.audit_path).read_text().splitlines()]


def _child(root: hvac.Client, policies: list[str]) -> tuple[str, str]:
    """A new 1h token: (token, accessor)."""
    auth = root.auth.token.create(policies=policies, ttl="1h")["auth"]
    return str(auth["client_token"]), str(auth["accessor"])


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    server = start_broker(write_config(tmp_path_factory.mktemp("hmac-accessor"), POLICIES))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def root(broker: BrokerThread) -> hvac.Client:
    return hvac.Client(url=broker.url, token=ROOT_TOKEN)


def test_accessors_are_written_as_the_hmac_that_audit_hash_gives(broker: BrokerThread,
                                                                  root: hvac.Client) -> None:
    """A token's accessor is not in clear in any audit line; its lines carry the HMAC that
    sys/audit-hash/file and ``broker audit hash --config`` (stdin or argument) compute."""
    token, accessor = _child(root, ["default"])
    hvac.Client(url=broker.url, token=token).auth.token.lookup_self()
    root.auth.token.revoke_accessor(accessor)

    text = Path(broker.audit_path).read_text()
    assert accessor not in text
    assert "test-root" not in text  # the root token's accessor, on every root line
    mac = root.sys.calculate_hash("file", accessor)["hash"]
    assert mac.startswith("hmac-sha256:") and len(mac) == len("hmac-sha256:") + 64
    config = str(broker.config.source)
    piped = _broker_cli("audit", "hash", "--config", config, stdin=accessor + "\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == mac + "\n"
    given = _broker_cli("audit", "hash", "--config", config, accessor)
    assert given.returncode == 0 and given.stdout == mac + "\n", given.stderr

    lines = _lines(broker)
    [created] = [e for e in lines if e["type"] == "token_create"
                 and e["created"]["accessor"] == mac]
    assert created["auth"]["accessor"] == root.sys.calculate_hash("file", "test-root")["hash"]
    assert any(e["type"] == "token_lookup" and e["auth"]["accessor"] == mac for e in lines)
    assert any(e["type"] == "token_revoke" and e["target"] == mac for e in lines)
    # The answer has Vault's envelope too, with the hash under data.
    assert root.sys.calculate_hash("file/", accessor)["data"] == {"hash": mac}


def test_lease_owner_and_reuse_lines_carry_hmacs(broker: BrokerThread,
                                                 root: hvac.Client) -> None:
    """A dead token's reuse line names it by HMAC (token_accessor), not in clear."""
    token, accessor = _child(root, ["default"])
    root.auth.token.revoke_accessor(accessor)
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=broker.url, token=token).auth.token.lookup_self()
    mac = root.sys.calculate_hash("file", accessor)["hash"]
    assert accessor not in Path(broker.audit_path).read_text()
    reuse = [e for e in _lines(broker) if e["type"] == "reuse_attempt"]
    assert reuse and reuse[-1]["token_accessor"] == mac


def test_audit_hash_needs_sudo_and_update(broker: BrokerThread, root: hvac.Client) -> None:
    """The default policy, update alone or sudo alone get a 403; update and sudo, or root,
    get the hash. The value hashed is in no audit line."""
    for policies in (["default"], ["updater"], ["sudoer"]):
        token, _ = _child(root, policies)
        with pytest.raises(hvac.exceptions.Forbidden):
            hvac.Client(url=broker.url, token=token).sys.calculate_hash("file", "x")
    token, _ = _child(root, ["hasher"])
    value = "a-value-searched-for-7d1c"
    answer = hvac.Client(url=broker.url, token=token).sys.calculate_hash("file", value)
    assert answer["hash"] == root.sys.calculate_hash("file", value)["hash"]
    assert value not in Path(broker.audit_path).read_text()
    assert _lines(broker)[-1]["type"] == "audit_hash" and _lines(broker)[-1]["device"] == "file"


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("sys/audit-hash/syslog", {"input": "x"}, 400, "unknown audit device 'syslog'"),
    ("sys/audit-hash/", {"input": "x"}, 400, "name the audit device"),
    ("sys/audit-hash/file", {}, 400, "missing required parameter 'input'"),
    ("sys/audit-hash/file", {"input": 7}, 400, "input must be a string"),
    ("sys/audit-hash/file?input=x", {}, 400, "not in the URL"),
])
def test_audit_hash_bad_requests(broker: BrokerThread, path: str, body: dict[str, Any],
                                 status: int, says: str) -> None:
    """A wrong device, no input or input in the URL: 400 with one error saying which."""
    resp = requests.post(f"{broker.url}/v1/{path}", json=body,
                         headers={"X-Vault-Token": ROOT_TOKEN}, timeout=30)
    assert resp.status_code == status
    [error] = resp.json()["errors"]
    assert says in error


def test_hmac_accessor_false_writes_accessors_in_clear(tmp_path: Path) -> None:
    """With ``[audit] hmac_accessor = false`` accessors are written as they are (Vault's
    option); tokens still only as HMACs."""
    server = start_broker(write_config(tmp_path, "hmac_accessor = false\n"))
    try:
        root = hvac.Client(url=server.url, token=ROOT_TOKEN)
        token, accessor = _child(root, ["default"])
        hvac.Client(url=server.url, token=token).auth.token.lookup_self()
        lines = _lines(server)
    finally:
        server.stop()
    assert any(e["type"] == "token_create" and e["created"]["accessor"] == accessor
               for e in lines)
    assert any(e["type"] == "token_lookup" and e["auth"]["accessor"] == accessor
               for e in lines)
    assert token not in Path(server.audit_path).read_text()


def test_hmac_accessor_must_be_a_boolean(tmp_path: Path) -> None:
    """A non-boolean hmac_accessor is a config error naming the file and the key; and
    ``broker audit hash --config`` says so in one line."""
    config = write_config(tmp_path, 'hmac_accessor = "no"\n')
    with pytest.raises(ConfigError) as bad:
        load_config(config)
    assert str(bad.value) == f"{config}: audit.hmac_accessor: expected bool, got str 'no'"
    out = _broker_cli("audit", "hash", "--config", str(config), stdin="x\n")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"broker: error: {bad.value}\n"
    neither = _broker_cli("audit", "hash", stdin="x\n")
    assert neither.returncode == 2 and "--config" in neither.stderr


def test_audit_hash_config_reads_only_the_audit_table(tmp_path: Path) -> None:
    """``broker audit hash --config`` works offline on a config whose mounts could not
    load here (an admin password in an unset environment variable)."""
    config = write_config(tmp_path, """
[mounts.pg]
plugin = "postgres"
connection_url = "postgresql://admin@db.invalid:5432/app"
password_env = "H4_AUDIT_HASH_UNSET_PASSWORD"
""")
    with pytest.raises(ConfigError):
        load_config(config)
    (tmp_path / "audit.key").write_text("ab" * 32 + "\n")
    out = _broker_cli("audit", "hash", "--config", str(config), stdin="x\n")
    keyed = _broker_cli("audit", "hash", "--key-file", str(tmp_path / "audit.key"),
                        stdin="x\n")
    assert out.returncode == 0 and out.stdout == keyed.stdout, out.stderr
    assert out.stdout.startswith("hmac-sha256:")
