"""Who else may read the broker's secret files: the store, the audit log, the audit key.

A real ``broker server`` (subprocess) on files chmod'ed by hand: each one that others
than its owner may read gets one WARNING line naming it, its mode and ``chmod 600
PATH``; one anyone may write, an ERROR line; the broker starts either way. The files
it creates itself are owner-only, so a fresh broker says nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.broker_harness import (
    config_url,
    spawn_broker,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.integration


@contextmanager
def running(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``broker server --config CONFIG``, healthy, stopped with SIGTERM at the end."""
    old = os.umask(0o022)  # the usual one: what the broker creates must not depend on it
    try:
        proc = spawn_broker(config)
    finally:
        os.umask(old)
    try:
        wait_healthy(config_url(config), timeout=60)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def log_of(config: Path) -> str:
    return (config.parent / "server.log").read_text()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def mode_lines(config: Path) -> list[str]:
    """The log lines of the mode check (each ends with its fix)."""
    return [line for line in log_of(config).splitlines() if "(chmod 600 " in line]


def test_the_files_a_broker_creates_are_owner_only(tmp_path: Path) -> None:
    """A first start (umask 022) creates store, -wal/-shm, locks, audit log and key
    0600, and so logs no mode line."""
    config = write_config(tmp_path, "")
    with running(config):
        made = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()
                if p.name not in {"broker.toml", "server.log"}}
        assert {"broker.db", "broker.db-wal", "broker.db-shm", "audit.jsonl",
                "audit.key"} <= set(made), made
        assert {name: mode for name, mode in made.items() if mode != 0o600} == {}, made
    assert mode_lines(config) == []


def test_shared_store_and_audit_files_are_named_at_start(tmp_path: Path) -> None:
    """A 0644 store is a WARNING naming it, -rw-r--r-- and `chmod 600 PATH`; a
    world-writable audit log or audit key is an ERROR; the broker still starts."""
    config = write_config(tmp_path, "")
    with running(config):
        pass  # creates the files (owner-only)
    store, audit, key = tmp_path / "broker.db", tmp_path / "audit.jsonl", tmp_path / "audit.key"
    store.chmod(0o644)
    audit.chmod(0o666)
    key.chmod(0o646)
    (config.parent / "server.log").write_text("")
    with running(config):
        lines = mode_lines(config)
    store_line = [line for line in lines if f" {store} " in line]
    assert len(store_line) == 1, lines
    assert "[WARNING]" in store_line[0] and "storage.url" in store_line[0]
    assert "-rw-r--r-- (0644)" in store_line[0] and store_line[0].endswith(f"(chmod 600 {store})")
    audit_line = [line for line in lines if f" {audit} " in line]
    assert len(audit_line) == 1 and "[ERROR]" in audit_line[0], lines
    assert "-rw-rw-rw-" in audit_line[0] and "any user on this machine may change it" \
        in audit_line[0]
    key_line = [line for line in lines if f" {key} " in line]
    assert len(key_line) == 1 and "[ERROR]" in key_line[0] and "audit.hmac_key_file" \
        in key_line[0], lines


def test_owner_only_files_get_no_line(tmp_path: Path) -> None:
    """Put back to 0600 (and a 0400 key), the same files start with no mode line."""
    config = write_config(tmp_path, "")
    with running(config):
        pass
    for name in ("broker.db", "audit.jsonl"):
        (tmp_path / name).chmod(0o600)
    (tmp_path / "audit.key").chmod(0o400)
    (config.parent / "server.log").write_text("")
    with running(config):
        pass
    assert mode_lines(config) == []


def test_a_rotated_audit_log_is_checked_on_reload(tmp_path: Path) -> None:
    """SIGHUP after logrotate made a new audit file 0644 (`create 0644`): the reopened
    file gets its WARNING line, prefixed `reload:`."""
    config = write_config(tmp_path, "")
    audit = tmp_path / "audit.jsonl"
    with running(config) as proc:
        audit.rename(tmp_path / "audit.jsonl.1")
        audit.touch(mode=0o644)
        audit.chmod(0o644)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(f" {audit} " in line and "reload: " in line
                             for line in mode_lines(config)), "the reload's mode line")
    line = next(line for line in mode_lines(config) if f" {audit} " in line)
    assert "[WARNING]" in line and "-rw-r--r--" in line and line.endswith(f"(chmod 600 {audit})")
