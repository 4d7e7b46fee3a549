"""What the scenarios share: a work directory, broker subprocesses, HTTP load, PostgreSQL.

Every broker the bench measures is a real server process
(``python -m broker.bench.server``) on a loopback port, so the client load
the bench generates does not share an interpreter (or a GIL) with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from broker.bench.http import LeanClient, Response
from broker.bench.report import Row, percentile

__all__ = [
    "ROOT_TOKEN",
    "Bench",
    "BrokerProcess",
    "Exhausted",
    "LoadResult",
    "broker_config",
    "create_root_token",
    "free_port",
    "run_load",
    "worker_counts",
]

#: The bench's root token (a throw-away store: the value needs no secrecy).
ROOT_TOKEN = "bench-root-token"  # noqa: S105
ROOT_ACCESSOR = "bench-root"


def worker_counts() -> list[int]:
    """1, and one worker per CPU where there is more than one: the rate and
    expiry targets are judged on the broker as it would be configured for
    this machine (docs/operations.md#workers), the last of these."""
    cpus = os.cpu_count() or 1
    return [1, cpus] if cpus > 1 else [1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Bench:
    """One bench run: where it writes, which PostgreSQL it may use, how big it goes."""

    workdir: Path
    quick: bool = False
    #: admin DSN of a PostgreSQL server; None when none is reachable.
    pg_dsn: str | None = None
    #: N of the expiry scenario (and of HA).
    leases: int = 10_000
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)
    _seq: int = 0

    def subdir(self, name: str) -> Path:
        self._seq += 1
        path = self.workdir / f"{self._seq:02d}-{name}"
        path.mkdir(parents=True)
        return path

    def pg_url(self, database: str, **params: str) -> str:
        """The admin DSN pointed at ``database`` (plus store URL parameters)."""
        assert self.pg_dsn is not None
        parts = urlsplit(self.pg_dsn)
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return urlunsplit(parts._replace(path=f"/{database}", query=query))

    async def fresh_database(self, name: str) -> str:
        """Drop and create ``name``; returns its URL."""
        import asyncpg

        conn = await asyncpg.connect(self.pg_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.pg_url(name)

    def stores(self, scenario: str, rows: list[Row]) -> list[str]:
        """The stores a scenario runs on: SQLite, and PostgreSQL when there is one.

        Without PostgreSQL, appends the scenario's SKIP row for it to ``rows``.
        """
        if self.pg_dsn is None:
            rows.append(Row(scenario, "postgresql store", None, skipped=True,
                            note="no PostgreSQL (--postgres-dsn)"))
            return ["sqlite"]
        return ["sqlite", "postgresql"]

    async def empty_store(self, store: str, tmp: Path, database: str) -> str:
        """The URL of an empty store: a SQLite file in ``tmp``, or PostgreSQL ``database`` anew."""
        if store == "sqlite":
            return f"sqlite:///{tmp / 'broker.db'}"
        return await self.fresh_database(database)

    async def drop_database(self, name: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.pg_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def broker_config(
    tmp: Path,
    *,
    store_url: str | None = None,
    mounts: str = "",
    leases: Mapping[str, Any] | None = None,
    port: int | None = None,
    name: str = "broker",
    workers: int = 1,
) -> Path:
    """A broker TOML file under ``tmp``: loopback listener, store and audit log in ``tmp``.

    The audit log keeps its default (no fsync per line); the SQLite store keeps
    ``synchronous=FULL``, which the store never lets anyone weaken.
    """
    port = port or free_port()
    store_url = store_url or f"sqlite:///{tmp / 'broker.db'}"
    lease_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (leases or {}).items())
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "5s"
workers = {workers}

[storage]
url = {json.dumps(store_url)}

[audit]
path = {json.dumps(str(tmp / f'{name}-audit.jsonl'))}
hmac_key_file = {json.dumps(str(tmp / 'audit.key'))}

[leases]
{lease_lines}

[mounts.bench]
plugin = "bench-noop"

[mounts.bench.roles.r]
default_ttl = "1h"
max_ttl = "24h"
{mounts}
"""
    )
    return path


async def create_root_token(store_url: str) -> None:
    """Open the store (creating its schema) and put the bench's root token in it."""
    from broker.store import open_store
    from broker.tokens import TokenManager

    store = open_store(store_url)
    await store.open()
    try:
        if await store.token_by_accessor(ROOT_ACCESSOR) is None:
            await TokenManager(store).create(policies=["root"], ttl=None, display_name="bench",
                                             token_id=ROOT_TOKEN, accessor=ROOT_ACCESSOR)
    finally:
        await store.close()


class BrokerError(RuntimeError):
    """A broker process did not start or died."""


@dataclass
class BrokerProcess:
    """``python -m broker.bench.server --config FILE`` as a child process.

    It runs in the config's directory: ``python -m`` puts the working
    directory first on ``sys.path``, ahead of ``PYTHONPATH``, so started from
    a checkout it would import that checkout's broker whatever ``PYTHONPATH``
    (how the before/after tools in tests/bench pick a code tree) says.
    """

    config: Path
    env: Mapping[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    @property
    def url(self) -> str:
        text = self.config.read_text()
        listen = text.split('listen = "', 1)[1].split('"', 1)[0]
        return f"http://{listen}"

    @property
    def log_path(self) -> Path:
        return self.config.with_suffix(".log")

    def start(self) -> BrokerProcess:
        env = {**os.environ, "BROKER_LOG_LEVEL": "WARNING", **self.env}
        with open(self.log_path, "ab") as log:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "broker.bench.server", "--config", str(self.config)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.config.parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_healthy(self, timeout: float = 60.0, poll: float = 0.01) -> float:
        """Seconds from spawn to the first 200 from /v1/sys/health."""
        url = f"{self.url}/v1/sys/health"
        deadline = time.perf_counter() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.perf_counter() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise BrokerError(f"broker exited with {self.proc.returncode}:\n"
                                      f"{self.log_tail()}")
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return time.perf_counter() - self.started
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                await asyncio.sleep(poll)
        raise BrokerError(f"broker not healthy after {timeout}s:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        """The broker's process and, with ``workers > 1``, its workers (Linux ``/proc``)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [self.pid, *(int(p) for p in f.read().split())]
        except (OSError, ValueError):
            return [self.pid]

    def _sum_over_pids(self, name: str, read: Callable[[str], float]) -> float | None:
        """``read(text of /proc/PID/name)`` summed over :meth:`pids`; None if the
        broker's own process cannot be read (gone, or not Linux). A worker that
        exited meanwhile counts as nothing."""
        total = 0.0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/{name}") as f:
                    total += read(f.read())
            except OSError:
                if pid == self.pid:
                    return None
        return total

    def peak_rss_mb(self) -> float | None:
        """VmHWM summed over :meth:`pids`: the most resident memory each ever had."""
        return self._sum_over_pids("status", lambda text: next(
            (int(line.split()[1]) / 1024 for line in text.splitlines()
             if line.startswith("VmHWM:")), 0.0))

    def cpu_seconds(self) -> float | None:
        """User + system CPU :meth:`pids` have used so far (Linux ``/proc``; None elsewhere).

        A worker that exited during the measurement takes its CPU with it: the
        figure is for comparing phases of a broker that stays up.
        """
        def read(text: str) -> float:
            # fields after the ")" that ends the command name; utime, stime are 14, 15
            fields = text.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        return self._sum_over_pids("stat", read)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - a child
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@contextlib.asynccontextmanager
async def running(config: Path, env: Mapping[str, str] | None = None,
                  timeout: float = 60.0) -> AsyncIterator[BrokerProcess]:
    """A started, healthy broker; stopped on the way out whatever happens."""
    broker = BrokerProcess(config, dict(env or {})).start()
    try:
        await broker.wait_healthy(timeout)
        yield broker
    finally:
        await broker.stop()


@dataclass
class LoadResult:
    ok: int
    errors: int
    seconds: float
    latencies: list[float]
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def p(self, q: float) -> float:
        """Latency quantile in milliseconds."""
        return percentile(sorted(self.latencies), q) * 1000

    @classmethod
    def merge(cls, parts: Sequence[LoadResult]) -> LoadResult:
        """Several phases of the same load as one (their times and calls summed)."""
        return cls(
            ok=sum(p.ok for p in parts),
            errors=sum(p.errors for p in parts),
            seconds=sum(p.seconds for p in parts),
            latencies=[x for p in parts for x in p.latencies],
            first_error=next((p.first_error for p in parts if p.first_error), None),
        )


class Exhausted(Exception):
    """Raised by a load op when there is nothing left for it to do: its worker stops."""


async def run_load(
    op: Callable[[int], Awaitable[None]],
    *,
    concurrency: int,
    seconds: float,
    max_ops: int | None = None,
) -> LoadResult:
    """Run ``op(worker)`` from ``concurrency`` coroutines for ``seconds`` (or ``max_ops`` calls).

    An op that raises counts as an error; the loop stops after too many, so a
    broken broker ends the phase quickly instead of spinning.
    """
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0, "started": 0}
    first_error: list[str] = []
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        while time.perf_counter() < deadline:
            if max_ops is not None and counts["started"] >= max_ops:
                return
            counts["started"] += 1
            t0 = time.perf_counter()
            try:
                await op(n)
            except Exhausted:
                counts["started"] -= 1
                return
            except Exception as exc:
                counts["errors"] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}"[:300])
                if counts["errors"] > 50 and counts["errors"] > counts["ok"]:
                    return
                continue
            latencies.append(time.perf_counter() - t0)
            counts["ok"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - started
    return LoadResult(counts["ok"], counts["errors"], elapsed, latencies,
                      first_error[0] if first_error else None)


class ApiClient:
    """The few Vault-shaped calls the bench makes, on keep-alive connections.

    Built on :class:`broker.bench.http.LeanClient`, so the load generator takes
    as little as it can of the machine the broker is measured on.
    """

    def __init__(self, url: str, *, concurrency: int, token: str = ROOT_TOKEN) -> None:
        self.http = LeanClient(url, concurrency=concurrency, headers={"X-Vault-Token": token})

    async def close(self) -> None:
        await self.http.close()

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, what: str, method: str, path: str, body: Any = None) -> Response:
        resp = await self.http.request(method, path, body)
        if resp.status >= 300:
            text = resp.body[:200].decode("utf-8", "replace")
            raise RuntimeError(f"{what}: HTTP {resp.status}: {text}")
        return resp

    async def issue(self, mount: str, role: str) -> str:
        body = (await self._call("issue", "POST", f"/v1/{mount}/creds/{role}")).json()
        return str(body["lease_id"])

    async def renew(self, lease_id: str) -> None:
        await self._call("renew", "PUT", "/v1/sys/leases/renew",
                         {"lease_id": lease_id, "increment": "1h"})

    async def revoke(self, lease_id: str) -> None:
        # strict: a lease that ended already is a 400, not Vault's 204 (nothing to revoke).
        resp = await self._call("revoke", "PUT", "/v1/sys/leases/revoke",
                                {"lease_id": lease_id, "strict": True})
        if resp.status != 204:
            raise RuntimeError(f"revoke answered {resp.status}, not 204 (not done)")

    async def revoke_prefix(self, prefix: str) -> dict[str, Any]:
        resp = await self._call("revoke-prefix", "PUT", f"/v1/sys/leases/revoke-prefix/{prefix}")
        body: dict[str, Any] = resp.json()
        return body


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)
