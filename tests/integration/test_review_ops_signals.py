"""Signals around start-up: a reload sent while the broker starts is not fatal.

Real ``broker server`` subprocesses, real signals, a real (silent) TCP peer.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.broker_harness import config_url, wait_healthy, write_config

pytestmark = pytest.mark.integration


def _wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {path} after {timeout}s")


def _slow_starting_broker(tmp_path: Path, silent: socket.socket, *, backend_timeout: str,
                          workers: int) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """A ``broker server`` whose pg mount points at ``silent`` (a socket that accepts
    and never answers), so its start-up waits ``backend_timeout`` for the mount:
    (config, server log, process)."""
    config = write_config(tmp_path, f"""
[leases]
backend_timeout = "{backend_timeout}"

[mounts.pg]
plugin = "postgres"
connection_url = "postgresql://admin@127.0.0.1:{silent.getsockname()[1]}/app"
""", workers=workers)
    server_log = tmp_path / "server.log"
    with open(server_log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "server", "--config",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT)
    return config, server_log, proc


def _silent() -> socket.socket:
    silent = socket.socket()  # accepts TCP connections (backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    return silent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_while_starting_is_carried_out_once_serving(tmp_path: Path, workers: int) -> None:
    """SIGHUP during a slow start-up (a mount's backend that never answers) is not fatal.

    Before, a single broker died of it (SIGHUP's default action), and systemd
    counts an end by SIGHUP as clean, so Restart=on-failure left it down.
    """
    silent = _silent()
    config, server_log, proc = _slow_starting_broker(tmp_path, silent, backend_timeout="4s",
                                                     workers=workers)
    try:
        # The broker's first log line: it is past its imports, opening the store
        # and connecting the mount, which takes backend_timeout.
        _wait_for(server_log, "event loop:", 30)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None, server_log.read_text()[-2000:]
        wait_healthy(config_url(config), timeout=30)
        # Held back, not lost: carried out once the handler is in place.
        _wait_for(server_log, "config reloaded from", 15)
        assert proc.poll() is None
    finally:
        silent.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, server_log.read_text()[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_sigterm_while_workers_start_is_a_clean_stop(tmp_path: Path) -> None:
    """SIGTERM to the supervisor while its workers are still starting (a mount's
    backend that never answers) ends them, and the broker exits 0: they had
    nothing in flight. Before, each worker's death by the forwarded signal
    counted as a failure and the supervisor exited 1."""
    silent = _silent()
    _, server_log, proc = _slow_starting_broker(tmp_path, silent, backend_timeout="20s",
                                                workers=2)
    try:
        _wait_for(server_log, "workers started", 30)
        time.sleep(1.0)  # the workers are connecting the mount, for up to 20 s
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        silent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, server_log.read_text()[-3000:]
