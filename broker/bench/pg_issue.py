"""Scenario ``pg-issue``: issuing PostgreSQL roles through the broker vs raw asyncpg DDL.

The broker side is ``POST /v1/pg/creds/bench`` against a broker process (SQLite
store, durable commits) whose ``postgres`` mount has as many admin connections
as there are clients. The baseline runs the plugin's default creation statement
(``CREATE ROLE ... LOGIN PASSWORD '<plaintext>' VALID UNTIL ...``, as Vault
sends it) on an asyncpg pool of the same size, one statement per call: the
server hashes each password. The broker sends a SCRAM verifier instead, which
it hashes in its own threads on the same cores; the server still runs one
PBKDF2 per role for it (it checks a verifier against the empty password), so
the broker side does one PBKDF2 more than the raw side (plugins/_scram.py).
The judged runs alternate the two sides in segments (raw, broker, broker,
raw, ...: 5 of 1 s each), so the machine's drift lands on both; roles are
dropped after each segment so every one starts with the same catalog.
The judged runs use the mount's default ``serialize_ddl = "auto"`` (no DDL
lock for this template). Unjudged diagnosis: the raw statement with a
verifier hashed outside the timing (what the server's part costs on its own,
its empty-password check included), the broker at c=8 with ``serialize_ddl =
false`` and ``= true`` (what the lock costs) and with ``password_hashing =
"server"`` (what the verifier costs), and at c=1 the time the target
leaves the broker per call next to what a no-op issue and a bare
``/v1/sys/health`` round trip take on the same broker (its serial floor).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

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
from broker.bench.report import Row, Target
from broker.templating import generate_password
from plugins._scram import scram_verifier

__all__ = ["run"]

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


async def run(bench: Bench) -> list[Row]:
    if bench.pg_dsn is None:
        return [Row(NAME, "PostgreSQL backend", None, skipped=True,
                    note="no PostgreSQL (--postgres-dsn)")]
    dsn = bench.pg_dsn
    seconds = 0.25 if bench.quick else 5.0
    segments = 1 if bench.quick else SEGMENTS
    rows: list[Row] = []
    tmp = bench.subdir(NAME)
    store_url = f"sqlite:///{tmp / 'broker.db'}"
    await create_root_token(store_url)
    await drop_roles(dsn)
    # (concurrency, mount options): the default mount is judged; the others are a
    # diagnosis: what the DDL lock costs, and what the SCRAM verifier costs.
    runs: list[tuple[int, dict[str, str]]] = [(1, {}), (8, {})] + ([] if bench.quick else [
        (8, {"serialize_ddl": "false"}), (8, {"serialize_ddl": "true"}),
        (8, {"password_hashing": '"server"'})])
    raws: dict[int, LoadResult] = {}
    for concurrency, options in runs:
        judged = not options
        if judged:
            # Diagnosis: the server's part alone (one verifier, hashed once, untimed).
            prehashed = await raw_load(dsn, _prehashed_sql(), concurrency=concurrency,
                                       seconds=seconds)
            await drop_roles(dsn)
        label = ", ".join([f"c={concurrency}", *(f"{k}={v.strip(chr(34))}"
                                                 for k, v in options.items())])
        bench.log(f"{NAME}: broker HTTP issue, {label}"
                  + (" and raw asyncpg CREATE ROLE, alternating" if judged else ""))
        toml, env = pg_mount(bench, max_open=concurrency, options=options)
        config = broker_config(tmp, store_url=store_url, mounts=toml,
                               name=f"broker-c{concurrency}-{len(rows)}")
        async with running(config, env) as broker, ApiClient(broker.url,
                                                             concurrency=concurrency) as api:
            async def issue(_w: int, api: ApiClient = api) -> None:
                await api.issue("pg", "bench")

            await run_load(issue, concurrency=concurrency, seconds=min(0.5, seconds))  # warm-up
            if judged:
                # The raw baseline does not depend on the mount's options: measured
                # here, in turns with the broker, and reused for the diagnosis runs.
                http, raws[concurrency] = await _alternating(
                    dsn, issue, concurrency=concurrency, seconds=seconds, segments=segments)
            else:
                http = await run_load(issue, concurrency=concurrency, seconds=seconds)
            floor = (await _serial_floor(api, min(2.0, seconds))
                     if concurrency == 1 else None)
        await drop_roles(dsn)
        raw = raws[concurrency]
        if judged:
            rows.append(Row(NAME, f"raw with a SCRAM verifier, c={concurrency}",
                            prehashed.rate, "/s", raw.rate,
                            note="diagnosis: verifier hashed untimed; the server checks it"))
        note = f"{http.errors} errors: {http.first_error}" if http.errors else ""
        if raw.errors:
            note += f" raw: {raw.errors} errors: {raw.first_error}"
        rows += [
            Row(NAME, f"issue rate, {label}", http.rate, "/s", raw.rate,
                TARGET if judged else None, note=note.strip(),
                extra={"ops": http.ok, "raw_ops": raw.ok}),
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
) -> tuple[LoadResult, LoadResult]:
    """The broker's issues and raw CREATE ROLEs, ``segments`` turns each, order flipping.

    Returns (broker, raw), each the sum of its segments. Roles are dropped
    after every segment (untimed), so both sides see the same catalog.
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
    return LoadResult.merge(broker_parts), LoadResult.merge(raw_parts)


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
