"""Scenario ``pg-issue``: issuing PostgreSQL roles through the broker vs raw asyncpg DDL.

The broker side is ``POST /v1/pg/creds/bench`` against a broker process (SQLite
store, durable commits) whose ``postgres`` mount has as many admin connections
as there are clients. The baseline runs the same creation statement (the
plugin's default ``CREATE ROLE ... LOGIN PASSWORD ... VALID UNTIL ...``) on an
asyncpg pool of the same size, one statement per call. Roles are dropped after
each run so every run starts with the same catalog. The judged runs use the
mount's default ``serialize_ddl = "auto"`` (no DDL lock for this template).
Unjudged diagnosis: the statement in the plugin's former transaction shape
(BEGIN, advisory lock, statement, COMMIT) without the broker, and the broker at
c=8 with ``serialize_ddl = false`` and ``= true`` (what the lock costs).
"""

from __future__ import annotations

import secrets

import asyncpg

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
from plugins.postgres import _DDL_LOCK_KEY

__all__ = ["run"]

NAME = "pg-issue"
TARGET = Target("ratio>=", 0.85, ">= 0.85 x raw")


async def _plugin_transaction_load(dsn: str, concurrency: int, seconds: float) -> LoadResult:
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    try:
        async def op(_w: int) -> None:
            sql = create_role_sql(f"{ROLE_PREFIX}tx-{secrets.token_hex(8)}")
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _DDL_LOCK_KEY)
                await conn.execute(sql)

        return await run_load(op, concurrency=concurrency, seconds=seconds)
    finally:
        await pool.close()


async def run(bench: Bench) -> list[Row]:
    if bench.pg_dsn is None:
        return [Row(NAME, "PostgreSQL backend", None, skipped=True,
                    note="no PostgreSQL (--postgres-dsn)")]
    seconds = 0.25 if bench.quick else 5.0
    rows: list[Row] = []
    tmp = bench.subdir(NAME)
    store_url = f"sqlite:///{tmp / 'broker.db'}"
    await create_root_token(store_url)
    await drop_roles(bench.pg_dsn)
    runs: list[tuple[int, bool | None]] = [(1, None), (8, None)] + (
        [] if bench.quick else [(8, False), (8, True)])
    for concurrency, serialize in runs:
        if serialize is None:  # the raw baseline does not depend on the plugin's setting
            bench.log(f"{NAME}: raw asyncpg CREATE ROLE, c={concurrency}")
            raw = await raw_load(
                bench.pg_dsn,
                lambda _i: create_role_sql(f"{ROLE_PREFIX}raw-{secrets.token_hex(8)}"),
                concurrency=concurrency, seconds=seconds)
            await drop_roles(bench.pg_dsn)
            # Diagnosis: the plugin's former transaction shape (BEGIN, advisory
            # lock, CREATE ROLE, COMMIT: four round trips), without the broker.
            plugin_tx = await _plugin_transaction_load(bench.pg_dsn, concurrency, seconds)
            await drop_roles(bench.pg_dsn)
            rows.append(Row(NAME, f"raw in the plugin's transaction, c={concurrency}",
                            plugin_tx.rate, "/s", raw.rate,
                            note="diagnosis: BEGIN, DDL lock, statement, COMMIT"))
        label = f"c={concurrency}" + (
            "" if serialize is None else f", serialize_ddl={str(serialize).lower()}")
        bench.log(f"{NAME}: broker HTTP issue, {label}")
        toml, env = pg_mount(bench, max_open=concurrency, serialize_ddl=serialize)
        config = broker_config(tmp, store_url=store_url, mounts=toml,
                               name=f"broker-c{concurrency}-{serialize}")
        async with running(config, env) as broker, ApiClient(broker.url,
                                                             concurrency=concurrency) as api:
            async def issue(_w: int, api: ApiClient = api) -> None:
                await api.issue("pg", "bench")

            await run_load(issue, concurrency=concurrency, seconds=min(0.5, seconds))  # warm-up
            http = await run_load(issue, concurrency=concurrency, seconds=seconds)
        await drop_roles(bench.pg_dsn)
        note = f"{http.errors} errors: {http.first_error}" if http.errors else ""
        if raw.errors:
            note += f" raw: {raw.errors} errors: {raw.first_error}"
        rows += [
            # serialize_ddl=false/true are a diagnosis (what the lock costs), not the default.
            Row(NAME, f"issue rate, {label}", http.rate, "/s", raw.rate,
                TARGET if serialize is None else None, note=note.strip(),
                extra={"ops": http.ok, "raw_ops": raw.ok}),
            Row(NAME, f"issue p50, {label}", http.p(0.5), "ms", raw.p(0.5)),
            Row(NAME, f"issue p99, {label}", http.p(0.99), "ms", raw.p(0.99)),
        ]
    return rows
