"""``[server] workers = 2``: a real ``broker server`` subprocess, two workers, one store.

Real PostgreSQL roles behind the mount, real HTTP with a new TCP connection
per call (so the kernel spreads them over both workers), real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import run
from tests.integration.broker_harness import config_url, pg_roles, wait_healthy, write_config
from tests.integration.store_fixtures import broker_store_url

pytestmark = pytest.mark.integration


def _broker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def _call(url: str, token: str, method: str, path: str, body: dict[str, Any] | None = None
          ) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/v1/{path}", data=data, method=method,
                                 headers={"X-Vault-Token": token,
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _workers(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(p) for p in f.read().split())


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@contextmanager
def _served(config: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, str, Path]]:
    """``operator init``, then ``broker server`` on ``config`` until healthy.

    Yields (the server process, the root token, its URL, its log file). On the
    way out it is sent SIGTERM, and must then exit 0.
    """
    init = _broker("operator", "init", "--config", str(config))
    assert init.returncode == 0, init.stderr
    url = config_url(config)
    server_log = config.parent / "server.log"
    with open(server_log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "server", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url)
            yield proc, init.stdout.strip(), url, server_log
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
    assert code == 0, server_log.read_text()[-3000:]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return broker_store_url(request, tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and SO_REUSEPORT")
def test_two_workers_share_the_port_and_the_store(tmp_path: Path, postgres_dsn: str,
                                                  store_url: str) -> None:
    config = write_config(tmp_path, f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{postgres_dsn}"
[mounts.pg.roles.short]
username_template = "wrk-{{{{random 10}}}}"
default_ttl = "3s"
max_ttl = "1h"
[mounts.pg.roles.long]
username_template = "wrk-{{{{random 10}}}}"
default_ttl = "1h"
max_ttl = "1h"
""", storage_url=store_url, workers=2)
    with _served(config) as (proc, token, url, _log):
        first = _wait(lambda: len(_workers(proc.pid)) == 2 and _workers(proc.pid), 30,
                      "two workers")
        w1, w2 = tmp_path / "audit.w1.jsonl", tmp_path / "audit.w2.jsonl"

        # Short leases issued through both workers expire exactly once each.
        short = []
        for _ in range(12):
            status, body = _call(url, token, "GET", "pg/creds/short")
            assert status == 200, body
            short.append((body["lease_id"], body["data"]["username"]))

        # A revoke is carried out by the worker that takes the request, at once
        # (it claims the lease itself), whichever worker issued it.
        long = []
        for _ in range(6):
            status, body = _call(url, token, "GET", "pg/creds/long")
            assert status == 200, body
            long.append((body["lease_id"], body["data"]["username"]))
        # 18 new connections: both workers got some (by chance alone, 1 in 2**17 not).
        assert _audit(w1) and _audit(w2), "the kernel sent no connection to one worker"

        # Metrics add up every worker's calls, whichever worker answers (the
        # other worker's figures are up to a second old).
        def staged(metrics: dict[str, Any]) -> int:
            return int(metrics["backends"]["pg"]["stage_user"]["calls"])

        _wait(lambda: staged(_call(url, token, "GET", "sys/metrics")[1]["data"]) == 18, 10,
              "metrics to count all 18 issues")
        answered_by = set()
        for _ in range(16):
            status, body = _call(url, token, "GET", "sys/metrics")
            assert status == 200, body
            metrics = body["data"]
            assert staged(metrics) == 18, metrics
            per_worker = [staged(w) for w in metrics["workers"].values()]
            assert len(per_worker) == 2 and sum(per_worker) == 18 and min(per_worker) > 0
            answered_by.add(metrics["worker"])
        assert answered_by == {1, 2}  # by chance alone, 1 in 2**15 not
        for lease_id, _user in long:
            started = time.monotonic()
            status, body = _call(url, token, "PUT", "sys/leases/revoke", {"lease_id": lease_id})
            assert status == 204, body
            # 5 s, not 2 s: twelve revokes (two stores) each with a DROP ROLE were one
            # loaded-machine stall from failing. That the worker which took the
            # request revoked it itself is checked below in the audit files.
            assert time.monotonic() - started < 5.0
        assert not run(pg_roles(postgres_dsn, "wrk-")) & {u for _, u in long}
        for path in (w1, w2):  # each revoke ended in the worker that took the request
            lines = _audit(path)
            asked = {e["lease"]["id"] for e in lines if e["type"] == "revoke_request"}
            done = {e["lease"]["id"] for e in lines if e["type"] == "revoke"}
            assert asked == done & {lease_id for lease_id, _ in long}, path.name

        ours = {user for _, user in short + long}  # not roles an earlier, killed run left
        _wait(lambda: not run(pg_roles(postgres_dsn, "wrk-")) & ours, 30, "expired roles dropped")
        events = _audit(w1) + _audit(w2)
        ended = Counter(e["lease"]["id"] for e in events
                        if e["type"] in ("expire", "revoke") and e.get("outcome") == "ok")
        assert {lease_id for lease_id, _ in short + long} == set(ended)
        assert set(ended.values()) == {1}, "a lease was revoked twice"

        # Each worker's audit file is its own valid chain.
        for path in (w1, w2):
            verify = _broker("audit", "verify", str(path), "--key-file",
                             str(tmp_path / "audit.key"))
            assert verify.returncode == 0, verify.stdout + verify.stderr

        # A worker that dies is started again; the broker keeps serving.
        os.kill(first[0], signal.SIGKILL)
        now = _wait(lambda: len(_workers(proc.pid)) == 2 and first[0] not in _workers(proc.pid)
                    and _workers(proc.pid), 30, "a new worker")

        # SIGHUP reaches every worker, the one still starting too (it is held
        # until that worker's handler is in place, not fatal to it).
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: (tmp_path / "server.log").read_text().count("config reloaded") >= 2,
              30, "both workers to reload")
        assert _workers(proc.pid) == now, "a worker died of the SIGHUP"
        assert all(_call(url, token, "GET", "sys/health")[0] == 200 for _ in range(5))

        # The restarted worker carries on its slot's counts: the sums do not drop.
        def pids() -> set[int]:
            listed = _call(url, token, "GET", "sys/metrics")[1]["data"]["workers"]
            return {w["pid"] for w in listed.values()}

        _wait(lambda: pids() == set(now), 10, "both current workers to publish")
        for _ in range(8):
            assert staged(_call(url, token, "GET", "sys/metrics")[1]["data"]) == 18
    assert not any(Path(f"/proc/{pid}").exists() for pid in first[1:])
    secret = urlsplit(store_url).password  # the PostgreSQL store's, in its URL
    if secret:
        text = (tmp_path / "server.log").read_text()
        assert "Storage:  postgresql://" in text and secret not in text


def test_workers_config_is_checked(tmp_path: Path) -> None:
    config = write_config(tmp_path, "", workers=0)
    out = _broker("server", "--config", str(config))
    assert out.returncode == 2
    assert "server.workers" in out.stderr and "between 1 and 64" in out.stderr
    config = write_config(tmp_path, "", workers=2, storage_url="sqlite:///:memory:")
    out = _broker("server", "--config", str(config))
    assert out.returncode == 2 and "in-memory store cannot be shared" in out.stderr
    config = write_config(tmp_path, "", workers=2, server='worker_stall_timeout = "1s"')
    out = _broker("server", "--config", str(config))
    assert out.returncode == 2
    assert "server.worker_stall_timeout" in out.stderr and "at least 3s" in out.stderr


#: worker_stall_timeout of test_a_stuck_worker_is_killed_and_started_again (seconds). Not
#: the 3 s minimum: beats come once a second, so at 3 s a healthy worker whose loop a
#: stalled CI machine held up for 2 s read as stuck and was killed. At 8 s it takes a
#: hold-up of some 6 s to do that, and the stopped worker is still replaced within ~8 s.
STALL_LIMIT = 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc")
def test_a_stuck_worker_is_killed_and_started_again(tmp_path: Path) -> None:
    """A worker whose event loop stops running is replaced after worker_stall_timeout.

    SIGSTOP stands in for a loop blocked by a synchronous call: no heartbeat,
    and no SIGTERM handler would ever run. The supervisor SIGKILLs it and
    starts the worker again; the other worker, beating, is left alone (watched
    for longer than the limit), and the broker keeps answering throughout.
    """
    config = write_config(tmp_path, "", workers=2,
                          server=f'worker_stall_timeout = "{STALL_LIMIT}s"')
    with _served(config) as (proc, token, url, server_log):
        stuck, other = _wait(lambda: len(_workers(proc.pid)) == 2 and _workers(proc.pid), 30,
                             "two workers")

        def publishing() -> set[int]:
            status, body = _call(url, token, "GET", "sys/metrics")
            assert status == 200, body
            return {w["pid"] for w in body["data"]["workers"].values()}

        # Watched from their first heartbeat on: wait until both have one.
        _wait(lambda: publishing() == {stuck, other}, 15, "both workers to publish")
        # Both are watched from here on at the latest. Read before the signal: a stall
        # between the two can only lengthen the time measured from it below.
        watched = stopped = time.monotonic()
        os.kill(stuck, signal.SIGSTOP)
        try:
            now = _wait(lambda: len(_workers(proc.pid)) == 2 and stuck not in _workers(proc.pid)
                        and _workers(proc.pid), STALL_LIMIT + 20, "the stuck worker to be replaced")
        finally:
            if stuck in _workers(proc.pid):  # not replaced: end it, or shutdown would hang
                os.kill(stuck, signal.SIGKILL)
        # Not at once: its last beat was about a second old when it stopped (more if its
        # loop ran the beat late; 3 s late still passes), and the limit is STALL_LIMIT s.
        # Killing on the first missed beat would take 1-2 s.
        assert time.monotonic() - stopped > STALL_LIMIT - 5
        assert other in now
        assert not Path(f"/proc/{stuck}").exists() or \
            Path(f"/proc/{stuck}/stat").read_text().split()[2] == "Z"
        text = server_log.read_text()
        assert f"(pid {stuck}) has not run its event loop" in text, text[-2000:]
        # The supervisor logs how long the worker had been silent when it killed it: at
        # least the limit, whenever the test's clock saw the kill.
        silent = int(text.split(f"(pid {stuck}) has not run its event loop for ")[1]
                     .split("s", 1)[0])
        assert silent >= STALL_LIMIT, text[-2000:]
        assert f"(pid {stuck}) exited with -9; starting it again" in text
        _wait(lambda: publishing() == set(now), 15, "the new worker to publish")
        # Beating workers are not killed: the other worker (and the new one since it
        # started) stay, though the other has now been watched for longer than the limit.
        # (This was a separate 4 s sleep before the SIGSTOP; checked here, the wait for
        # the replacement serves as most of it.)
        time.sleep(max(0.0, watched + STALL_LIMIT + 2 - time.monotonic()))
        assert _workers(proc.pid) == now
        assert f"(pid {other}) has not run its event loop" not in server_log.read_text()
        for _ in range(6):  # both workers answer
            status, body = _call(url, token, "GET", "auth/token/lookup-self")
            assert status == 200, body


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc")
def test_workers_that_cannot_start_stop_the_broker(tmp_path: Path) -> None:
    """A worker that dies at once is restarted, but not forever: the broker exits 1."""
    config = write_config(tmp_path, "", workers=2,
                          storage_url="sqlite:////proc/no-such-dir/broker.db")
    started = time.monotonic()
    out = _broker("server", "--config", str(config), timeout=120)
    assert out.returncode == 1
    assert "times in a row" in out.stderr, out.stderr[-2000:]
    assert time.monotonic() - started < 60


_PG_MOUNT = """
[mounts.{name}]
plugin = "postgres"
connection_url = "{dsn}"
[mounts.{name}.roles.app]
username_template = "wrk-{{{{random 10}}}}"
default_ttl = "1h"
max_ttl = "1h"
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and SO_REUSEPORT")
def test_a_restarted_worker_runs_the_reloaded_config(tmp_path: Path, postgres_dsn: str) -> None:
    """SIGHUP adds a mount; a worker that dies afterwards comes back with it too.

    A later SIGHUP with a broken file changes nothing, in the supervisor
    either: the worker it restarts after that still has the added mount.
    """
    config = write_config(tmp_path, _PG_MOUNT.format(name="pg", dsn=postgres_dsn), workers=2)
    with _served(config) as (proc, token, url, server_log):
        _wait(lambda: len(_workers(proc.pid)) == 2, 30, "two workers")
        config.write_text(config.read_text() + _PG_MOUNT.format(name="pg2", dsn=postgres_dsn))
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: server_log.read_text().count("mount pg2 added") >= 2
              and "supervisor: config re-read" in server_log.read_text(),
              30, "both workers and the supervisor to reload")

        good = config.read_text()
        config.write_text(good + "\n[mounts.broken\n")
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: server_log.read_text().count("reload rejected") >= 3, 30,
              "both workers and the supervisor to reject the broken file")
        assert "supervisor: reload rejected" in server_log.read_text()
        config.write_text(good)

        victims = _workers(proc.pid)
        for n, victim in enumerate(victims, start=1):  # both, one after the other
            os.kill(victim, signal.SIGKILL)
            _wait(lambda v=victim: len(_workers(proc.pid)) == 2 and v not in _workers(proc.pid),
                  30, "a new worker")
            _wait(lambda n=n: server_log.read_text().count(") serving; audit log") >= 2 + n, 30,
                  "the new worker to serve")
        # Both workers are restarted ones now: each has pg2, which only the
        # first SIGHUP brought (on the start-up config they would lack it).
        for _ in range(8):
            status, body = _call(url, token, "GET", "sys/mounts")
            assert status == 200, body
            assert {"pg/", "pg2/"} <= set(body["data"]), body["data"]
