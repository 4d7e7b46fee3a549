"""Scenario ``pg-issue``: issuing PostgreSQL roles through the broker vs raw asyncpg DDL.

The broker side is ``POST /v1/pg/creds/bench`` against a broker process (SQLite
store, durable commits) whose ``postgres`` mount has as many admin connections
as there are clients. The baseline runs the plugin's default creation statement
(``CREATE ROLE ... LOGIN PASSWORD '<plaintext>' VALID UNTIL ...``, as Vault
sends it) on an asyncpg pool of the same size, one statement per call: the
server hashes each password. The broker sends a SCRAM verifier instead, which
it hashes in its own threads; the server still runs one
PBKDF2 per role for it (it checks a verifier against the empty password), so
the broker side does one PBKDF2 more than the raw side (plugins/_scram.py).
The judged runs alternate the two sides in segments (raw, broker, broker,
raw, ...: 5 of 1 s each), so the machine's drift lands on both; roles are
dropped after each segment so every one starts with the same catalog.

Where PostgreSQL runs: the judged runs give it cores of its own (a private
cluster on the first half of the CPUs, the bench and its brokers on the other
half; or the ``--postgres-dsn`` server when it is on another host), as in any
deployment; the same alternating runs on the bench's local server, sharing
every core, follow unjudged (``..., shared cores``). See :func:`run`.
The judged runs use the mount's default ``serialize_ddl = "auto"`` (no DDL
lock for this template). Unjudged diagnosis: the raw statement with a
verifier hashed outside the timing (what the server's part costs on its own,
its empty-password check included), the broker at c=8 with ``serialize_ddl =
false`` and ``= true`` (what the lock costs) and with ``password_hashing =
"server"`` (what the verifier costs), and at c=1 the time the target
leaves the broker per call, what it adds (issue p50 - raw p50), and what a
no-op issue and a bare ``/v1/sys/health`` round trip take on the same broker
(its serial floor).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from urllib.parse import urlsplit

from broker.bench.harness import (
    ApiClient,
    Bench,
    LoadResult,
    broker_config,
    create_root_token,
    run_load,
    running,
)
from broker.bench.pg import ROLE_PREFIX, create_role_sql, drop_roles, pg_mount, raw_load
from broker.bench.pgcluster import PrivateCluster
from broker.bench.report import Row, Target
from broker.templating import generate_password
from plugins._scram import scram_verifier

__all__ = ["pinned", "run", "split_cpus"]

NAME = "pg-issue"
TARGET = Target("ratio>=", 0.85, ">= 0.85 x raw")


def _prehashed_sql() -> Callable[[int], str]:
    """Creation statements carrying one SCRAM verifier, hashed once, before the timing."""
    verifier = scram_verifier(generate_password())
    return lambda _i: create_role_sql(f"{ROLE_PREFIX}pre-{secrets.token_hex(8)}", verifier)


#: The judged runs alternate raw and broker segments (5 of 1 s each side), so a
#: drift of the shared machine (raw CREATE ROLE p50 moved 3.8-6.9 ms within
#: minutes here) lands on both sides of the ratio instead of one.
SEGMENTS = 5


@dataclass(frozen=True)
class _Site:
    """A PostgreSQL server the scenario measures on, and how it shares the machine."""

    dsn: str
    #: appended to the metric names ("" for the judged site: the names stay stable).
    suffix: str
    #: on the rate rows: where PostgreSQL ran.
    note: str
    #: the CPUs the bench (its load and the brokers it starts) is held to; None: all.
    cpus: frozenset[int] | None = None


async def run(bench: Bench) -> list[Row]:
    """Judged where PostgreSQL has cores of its own; on the shared server as diagnosis.

    On one machine the broker's CPU otherwise comes out of PostgreSQL's own
    (each role costs the server one PBKDF2 whoever hashes the verifier), and the
    ratio measures how the two split the cores rather than what the broker adds
    (docs/performance.md). So, unless ``--postgres-dsn`` names a server on
    another host, the judged runs use a private cluster started from the local
    server binaries and held to the first half of the CPUs, with the bench and
    its brokers on the other half. The bench's own server is then measured
    again, unjudged, with everything sharing every core.
    """
    cluster, judged, reason = _isolated_site(bench)
    rows: list[Row] = []
    try:
        if judged is None:
            if bench.pg_dsn is None:
                return [Row(NAME, "PostgreSQL backend", None, skipped=True,
                            note="no PostgreSQL (--postgres-dsn)")]
            judged = _Site(bench.pg_dsn, "", reason)
            rows += await _measure(bench, judged, judged=True)
            return rows
        with pinned(judged.cpus):
            rows += await _measure(bench, judged, judged=True)
        if cluster is not None and bench.pg_dsn is not None:
            shared = _Site(bench.pg_dsn, ", shared cores",
                           "diagnosis: the bench's server, sharing every core with the broker")
            rows += await _measure(bench, shared, judged=False)
        return rows
    finally:
        if cluster is not None:
            cluster.stop()


def _isolated_site(bench: Bench) -> tuple[PrivateCluster | None, _Site | None, str]:
    """A server with cores of its own: (cluster to stop, site) or (None, None, why not)."""
    if bench.pg_dsn is not None and not _is_local(bench.pg_dsn):
        return None, _Site(bench.pg_dsn, "", "PostgreSQL on its own host"), ""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, "PostgreSQL shares the only CPU with the broker"
    server_cpus, bench_cpus = split_cpus(cpus)
    try:
        cluster = PrivateCluster.start(cpus=server_cpus, prefix="broker-bench-pg-")
    except (LookupError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, None, f"PostgreSQL shares the broker's cores (no private cluster: {exc})"
    bench.log(f"{NAME}: private PostgreSQL on CPU {_cpu_list(server_cpus)}, "
              f"bench and brokers on CPU {_cpu_list(bench_cpus)}")
    note = (f"private PostgreSQL on CPU {_cpu_list(server_cpus)}, "
            f"bench and broker on CPU {_cpu_list(bench_cpus)}")
    return cluster, _Site(cluster.dsn, "", note, frozenset(bench_cpus)), ""


def split_cpus(cpus: list[int]) -> tuple[list[int], list[int]]:
    """(the private cluster's CPUs, the bench's and its brokers'): the first half, the rest."""
    return cpus[:len(cpus) // 2], cpus[len(cpus) // 2:]


def _is_local(dsn: str) -> bool:
    host = urlsplit(dsn).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1") or str(host).startswith("/")


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


@contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """Hold every thread of this process (and what it starts meanwhile) to ``cpus``."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    threads = [int(t) for t in os.listdir("/proc/self/task")]
    for tid in threads:
        os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        for tid in [int(t) for t in os.listdir("/proc/self/task")]:
            with suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(tid, before)


async def _measure(bench: Bench, site: _Site, *, judged: bool) -> list[Row]:
    """The alternating broker/raw runs at c=1 and 8 on ``site``; with ``judged``, the
    target and every diagnosis run too."""
    dsn = site.dsn
    seconds = 0.25 if bench.quick else 5.0
    segments = 1 if bench.quick else SEGMENTS
    rows: list[Row] = []
    tmp = bench.subdir(NAME)
    store_url = f"sqlite:///{tmp / 'broker.db'}"
    await create_root_token(store_url)
    await drop_roles(dsn)
    # (concurrency, mount options): the default mount is measured against raw; the
    # others are a diagnosis: what the DDL lock costs, and what the verifier costs.
    runs: list[tuple[int, dict[str, str]]] = [(1, {}), (8, {})] + ([] if bench.quick or not judged
                                                                     else [
        (8, {"serialize_ddl": "false"}), (8, {"serialize_ddl": "true"}),
        (8, {"password_hashing": '"server"'})])
    raws: dict[int, LoadResult] = {}
    for concurrency, options in runs:
        against_raw = not options
        turns: list[float] = []  # per-turn ratios of the alternating runs
        if against_raw and judged:
            # Diagnosis: the server's part alone (one verifier, hashed once, untimed).
            prehashed = await raw_load(dsn, _prehashed_sql(), concurrency=concurrency,
                                       seconds=seconds)
            await drop_roles(dsn)
        label = ", ".join([f"c={concurrency}", *(f"{k}={v.strip(chr(34))}"
                                                 for k, v in options.items())]) + site.suffix
        bench.log(f"{NAME}: broker HTTP issue, {label}"
                  + (" and raw asyncpg CREATE ROLE, alternating" if against_raw else ""))
        toml, env = pg_mount(bench, max_open=concurrency, options=options, dsn=dsn)
        config = broker_config(tmp, store_url=store_url, mounts=toml,
                               name=f"broker-c{concurrency}-{len(rows)}")
        async with running(config, env) as broker, ApiClient(broker.url,
                                                             concurrency=concurrency) as api:
            async def issue(_w: int, api: ApiClient = api) -> None:
                await api.issue("pg", "bench")

            await run_load(issue, concurrency=concurrency, seconds=min(0.5, seconds))  # warm-up
            if against_raw:
                # The raw baseline does not depend on the mount's options: measured
                # here, in turns with the broker, and reused for the diagnosis runs.
                http, raws[concurrency], turns = await _alternating(
                    dsn, issue, concurrency=concurrency, seconds=seconds, segments=segments)
            else:
                http = await run_load(issue, concurrency=concurrency, seconds=seconds)
            floor = (await _serial_floor(api, min(2.0, seconds))
                     if concurrency == 1 and judged else None)
        await drop_roles(dsn)
        raw = raws[concurrency]
        if against_raw and judged:
            rows.append(Row(NAME, f"raw with a SCRAM verifier, c={concurrency}",
                            prehashed.rate, "/s", raw.rate,
                            note="diagnosis: verifier hashed untimed; the server checks it"))
        notes = [site.note] if against_raw else []
        extra: dict[str, object] = {"ops": http.ok, "raw_ops": raw.ok}
        if len(turns) > 1:
            # One figure hides the drift: the spread of the turns tells a miss by
            # noise from a miss by a margin.
            notes.append(f"turns {min(turns):.2f}-{max(turns):.2f}")
            extra["turn_ratios"] = [round(t, 3) for t in turns]
        if http.errors:
            notes.append(f"{http.errors} errors: {http.first_error}")
        if raw.errors:
            notes.append(f"raw: {raw.errors} errors: {raw.first_error}")
        rows += [
            Row(NAME, f"issue rate, {label}", http.rate, "/s", raw.rate,
                TARGET if against_raw and judged else None, note="; ".join(notes),
                extra=extra),
            Row(NAME, f"issue p50, {label}", http.p(0.5), "ms", raw.p(0.5)),
            Row(NAME, f"issue p99, {label}", http.p(0.99), "ms", raw.p(0.99)),
        ]
        if floor is not None:
            noop, health = floor
            # At 0.85 x raw the broker may add raw_p50 x (1/0.85 - 1) to a call.
            budget = raw.p(0.5) * (1 / 0.85 - 1)
            rows += [
                Row(NAME, "budget the target leaves the broker, c=1", budget, "ms",
                    note="diagnosis: raw p50 x (1/0.85 - 1)"),
                Row(NAME, "added by the broker, p50, c=1", http.p(0.5) - raw.p(0.5), "ms",
                    budget, note="diagnosis: issue p50 - raw p50, against the budget"),
                Row(NAME, "no-op issue p50, same broker, c=1", noop, "ms", budget,
                    note="diagnosis: HTTP, two durable commits, two audit lines, no backend"),
                Row(NAME, "HTTP round trip p50 (sys/health), c=1", health, "ms", budget,
                    note="diagnosis: the floor of any call"),
            ]
    return rows


async def _alternating(
    dsn: str,
    issue: Callable[[int], Awaitable[None]],
    *,
    concurrency: int,
    seconds: float,
    segments: int,
) -> tuple[LoadResult, LoadResult, list[float]]:
    """The broker's issues and raw CREATE ROLEs, ``segments`` turns each, order flipping.

    Returns (broker, raw, ratios): each side the sum of its segments, and the
    broker/raw rate ratio of each turn (how far the machine's drift moves the
    ratio within one run). Roles are dropped after every segment (untimed), so
    both sides see the same catalog.
    """
    broker_parts: list[LoadResult] = []
    raw_parts: list[LoadResult] = []
    part = seconds / segments
    for n in range(segments):
        for side in (("raw", "broker") if n % 2 == 0 else ("broker", "raw")):
            if side == "raw":
                raw_parts.append(await raw_load(
                    dsn, lambda _i: create_role_sql(f"{ROLE_PREFIX}raw-{secrets.token_hex(8)}"),
                    concurrency=concurrency, seconds=part))
            else:
                broker_parts.append(await run_load(issue, concurrency=concurrency,
                                                   seconds=part))
            await drop_roles(dsn)
    ratios = [b.rate / r.rate for b, r in zip(broker_parts, raw_parts, strict=True) if r.rate]
    return LoadResult.merge(broker_parts), LoadResult.merge(raw_parts), ratios


async def _serial_floor(api: ApiClient, seconds: float) -> tuple[float, float]:
    """p50 of a no-op issue and of ``/v1/sys/health`` on the same broker at c=1 (ms).

    What the broker costs a single caller before any backend work: the part of
    the c=1 ratio no plugin change can recover.
    """
    async def noop(_w: int) -> None:
        await api.issue("bench", "r")

    async def health(_w: int) -> None:
        resp = await api.http.request("GET", "/v1/sys/health")
        if resp.status != 200:
            raise RuntimeError(f"health: HTTP {resp.status}")

    results = []
    for op in (noop, health):
        await run_load(op, concurrency=1, seconds=min(0.5, seconds))  # warm-up
        results.append((await run_load(op, concurrency=1, seconds=seconds)).p(0.5))
    return results[0], results[1]
