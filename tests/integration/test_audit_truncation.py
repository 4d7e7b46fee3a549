"""A real ``broker server`` whose live audit file loses its tail: verify must say so.

The store is the SQLite file in the test's tmp dir (no shared database). The
unit tests in tests/unit/test_audit_truncation.py cover the cases one by one;
this is the end-to-end path an intruder would take: the running server's file
is cut, the server goes on serving, ``broker audit verify`` names the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.broker_harness import write_config
from tests.integration.test_workers import _broker, _call, _served

pytestmark = pytest.mark.integration


def test_tail_cut_off_a_running_brokers_audit_file_fails_verify(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    audit, key = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    with _served(config) as (_proc, token, url, server_log):
        for _ in range(5):
            assert _call(url, token, "GET", "sys/mounts")[0] == 200
        assert _broker("audit", "verify", "--key-file", str(key), str(audit)).returncode == 0
        before = audit.read_bytes().splitlines()
        os.truncate(audit, audit.stat().st_size - 300)  # `truncate -s -300`: mid-line
        for _ in range(3):
            assert _call(url, token, "GET", "sys/mounts")[0] == 200
        after = audit.read_bytes().splitlines()
    gaps = [(n, json.loads(line)) for n, line in enumerate(after, 1) if b'"gap"' in line]
    assert len(gaps) == 1, gaps
    n, marker = gaps[0]
    assert marker["action"] == "audit_gap" and marker["gap"]["kind"] == "truncated"
    assert marker["gap"]["expected_seq"] == json.loads(before[-1])["seq"]
    assert after[:n - 1] == before[:n - 1]
    assert "changed under us" in server_log.read_text()
    done = _broker("audit", "verify", "--key-file", str(key), str(audit))
    assert done.returncode == 1, done
    [line] = done.stdout.splitlines()
    assert line.startswith(f"{audit}:{n}: ") and "removed before this line" in line, line
