"""The audit log of a real ``broker server`` when its disk fills up, and after.

A file size limit set on the running broker (prlimit) stands in for a full
disk: writes past it fail with EFBIG, as they would with ENOSPC. The lease
store is PostgreSQL, so the limit hits nothing but the audit log.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.broker_harness import config_url, spawn_broker, wait_healthy, write_config
from tests.integration.store_fixtures import broker_store_url
from tests.integration.test_workers import _broker, _call, _served, _wait

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgresql"])
def pg_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return broker_store_url(request, tmp_path)


def _health(url: str) -> tuple[int, dict[str, object]]:
    return _call(url, "", "GET", "sys/health")


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="prlimit (Linux)")
def test_health_recovers_by_itself_once_the_audit_disk_is_back(tmp_path: Path,
                                                              pg_store_url: str) -> None:
    """After an audit outage, health turns 200 again with no request to write a line.

    Before, only a successful request line reset the audit's health, and a
    load balancer (or Kubernetes readiness probe) that drains on health 503
    sends none: the broker stayed out of service after the disk was freed.
    The outage is logged once (``audit write failed``), and the file still
    verifies, with an ``audit_resumed`` line where it came back.
    """
    config = write_config(tmp_path, "", storage_url=pg_store_url)
    audit = tmp_path / "audit.jsonl"
    with _served(config) as (proc, token, url, server_log):
        # Room for the broker's own log lines under the limit: the audit file
        # must be the larger one, since the limit is on every file it writes.
        while audit.stat().st_size < server_log.stat().st_size + 8192:
            assert _call(url, token, "GET", "sys/mounts")[0] == 200
        full = audit.stat().st_size
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (full, resource.RLIM_INFINITY))
        try:
            status, body = _call(url, token, "GET", "sys/mounts")
            assert status == 503 and "audit log" in body["errors"][0], body
            status, health = _health(url)
            assert status == 503 and health["audit"] == {"healthy": False,
                                                         "error": "File too large"}
            time.sleep(1.5)  # the log keeps trying on its own: still failing, still 503
            assert _health(url)[0] == 503
            assert audit.stat().st_size == full
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        # No request that writes an audit line from here on: health alone.
        _wait(lambda: _health(url)[0] == 200, 10, "health to recover without a request")
        assert _health(url)[1]["audit"] == {"healthy": True, "error": None}
        text = server_log.read_text()
        assert text.count("audit write failed") == 1, text[-3000:]
        assert "is writable again" in text
        resumed = [json.loads(line) for line in audit.read_text().splitlines()][-1]
        assert resumed["type"] == "admin" and resumed["action"] == "audit_resumed"
        assert resumed["failed_with"] == "File too large"
        assert _call(url, token, "GET", "sys/mounts")[0] == 200
    verify = _broker("audit", "verify", str(audit), "--key-file", str(tmp_path / "audit.key"))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_new_hmac_key_starts_a_new_file_and_both_verify(tmp_path: Path) -> None:
    """Restarted with a new audit key, the broker sets the old file aside: each verifies.

    Before, it went on in the same file, so the file verified with neither
    key ("keep the old key to verify old logs" did not hold).
    """
    config = write_config(tmp_path, "")
    audit, key = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    with _served(config) as (_proc, token, url, _log):
        assert _call(url, token, "GET", "auth/token/lookup-self")[0] == 200
    old_key = tmp_path / "audit.key.old"
    os.rename(key, old_key)
    key.write_text(secrets.token_hex(32) + "\n")
    key.chmod(0o600)
    proc = spawn_broker(config)
    try:
        wait_healthy(config_url(config))
        assert _call(config_url(config), token, "GET", "auth/token/lookup-self")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    [aside] = tmp_path.glob("audit.jsonl.*.other-key")
    assert "moved it to" in (tmp_path / "server.log").read_text()
    for path, k in ((aside, old_key), (audit, key)):
        verify = _broker("audit", "verify", "--key-file", str(k), str(path))
        assert verify.returncode == 0, (path, verify.stdout + verify.stderr)
    first = json.loads(audit.read_text().splitlines()[0])
    assert first["seq"] == 1 and "prev_file" in first
    chain = _broker("audit", "verify", str(aside), str(audit))  # the link, without a key
    assert chain.returncode == 0, chain.stdout + chain.stderr


def test_audit_hash_finds_a_known_tokens_lines(tmp_path: Path) -> None:
    """``broker audit hash`` prints what a token is written as; grep finds its lines.

    The log only holds HMACs of tokens; without this command (Vault's
    sys/audit-hash) an operator could not search it for a leaked token.
    """
    config = write_config(tmp_path, "")
    audit, key = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    with _served(config) as (_proc, token, url, _log):
        status, body = _call(url, token, "POST", "auth/token/create", {"policies": ["default"]})
        assert status == 200, body
        child = body["auth"]["client_token"]
    text = audit.read_text()
    assert child not in text
    out = subprocess.run([sys.executable, "-m", "broker.cli", "audit", "hash", "--key-file",
                          str(key)], input=child + "\n", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    [mac] = out.stdout.split()
    assert mac.startswith("hmac-sha256:")
    found = [json.loads(line) for line in text.splitlines() if mac in line]
    assert [(e["type"], e["created"]["client_token"]) for e in found] == [("token_create", mac)]
    args = _broker("audit", "hash", "--key-file", str(key), child, token)
    assert args.returncode == 0 and args.stdout.split()[0] == mac
    missing = _broker("audit", "hash", "--key-file", str(tmp_path / "nope"), child)
    assert missing.returncode != 0 and "cannot read key file" in missing.stderr
