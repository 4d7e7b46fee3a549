"""Write leases straight into a store's tables, and read outcomes back.

This is a bench, not the store API: a million rows go in with one
``executemany`` in one transaction (SQLite) or ``COPY`` (PostgreSQL), into the
schema the store itself created (the store is opened once first, which runs
its migrations).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from broker.bench.harness import create_root_token

__all__ = ["Outcome", "count_ended", "outcomes", "seed_leases", "set_due"]

_COLS = (
    "id", "mount", "role", "owner", "issue_time", "expire_time", "max_expire_time", "renewable",
    "state", "last_renewal", "revoke_attempts", "revoke_reason", "ended_at", "due_at",
    "revocation", "metadata", "last_error",
)
_CHUNK = 50_000


def _sqlite_path(url: str) -> str:
    path = url[len("sqlite://"):]
    return path[1:] if path.startswith("//") else path


def _rows(
    n: int, mount: str, role: str, expire: Callable[[int], float], username: Callable[[int], str],
    now: float,
) -> Iterator[tuple[Any, ...]]:
    revoke_prefix = f"{mount}/creds/{role}/"
    meta = json.dumps({"bench": "seed"})
    for i in range(n):
        exp = expire(i)
        yield (
            f"{revoke_prefix}{i:08d}{secrets.token_hex(8)}", mount, role, "bench-root",
            now, exp, exp + 86400, True, "active", None, 0, None, None, exp,
            json.dumps({"username": username(i)}), meta, None,
        )


def _seed_sqlite(path: str, rows: Iterator[tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            f"INSERT INTO leases ({', '.join(_COLS)}) VALUES ({', '.join('?' * len(_COLS))})",
            ((*r[:7], int(r[7]), *r[8:]) for r in rows),
        )
        conn.execute("COMMIT")
        # A checkpoint now, so the broker under test does not pay for it at start-up.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
    finally:
        conn.close()


async def _seed_postgres(url: str, rows: Iterator[tuple[Any, ...]]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        batch: list[tuple[Any, ...]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= _CHUNK:
                await conn.copy_records_to_table("leases", records=batch, columns=list(_COLS))
                batch = []
        if batch:
            await conn.copy_records_to_table("leases", records=batch, columns=list(_COLS))
        await conn.execute("ANALYZE leases")
    finally:
        await conn.close()


async def seed_leases(
    store_url: str,
    n: int,
    *,
    mount: str = "bench",
    role: str = "r",
    expire: Callable[[int], float] | float,
    username: Callable[[int], str] | None = None,
) -> float:
    """Create the schema and root token, then ``n`` active leases; returns seconds taken.

    ``expire`` is one time for all (they come due together) or a function of
    the lease's index; lease ids are ``{mount}/creds/{role}/...``.
    """
    started = time.perf_counter()
    await create_root_token(store_url)
    expire_fn = expire if callable(expire) else (lambda _i, t=float(expire): t)
    name_fn = username or (lambda i: f"bench-{i}")
    rows = _rows(n, mount, role, expire_fn, name_fn, time.time())
    if n:
        if store_url.startswith("sqlite"):
            await asyncio.to_thread(_seed_sqlite, _sqlite_path(store_url), rows)
        else:
            await _seed_postgres(store_url, rows)
    return time.perf_counter() - started


@dataclass(frozen=True)
class Outcome:
    expire_time: float
    ended_at: float | None
    state: str
    username: str


def _sqlite_query(path: str, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _sqlite_write(path: str, sql: str, params: tuple[Any, ...]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(sql, params)
    finally:
        conn.close()


async def set_due(store_url: str, prefix: str, at: float) -> None:
    """Make every lease under ``prefix`` expire (come due) at ``at``; the store must be idle."""
    sql = ("UPDATE leases SET expire_time = $1, due_at = $1, max_expire_time = $2"
           " WHERE id >= $3 AND id < $4")
    params = (at, at + 86400, prefix, _upper(prefix))
    if store_url.startswith("sqlite"):
        await asyncio.to_thread(_sqlite_write, _sqlite_path(store_url),
                                sql.replace("$", "?"), params)
        return
    import asyncpg

    conn = await asyncpg.connect(store_url)
    try:
        await conn.execute(sql, *params)
    finally:
        await conn.close()


async def _query(store_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    if store_url.startswith("sqlite"):
        return await asyncio.to_thread(_sqlite_query, _sqlite_path(store_url), sql.replace(
            "$1", "?").replace("$2", "?"), params)
    import asyncpg

    conn = await asyncpg.connect(store_url)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *params)]
    finally:
        await conn.close()


def _upper(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


async def count_ended(store_url: str, prefix: str) -> tuple[int, int]:
    """(ended, total) among leases whose id starts with ``prefix``."""
    rows = await _query(
        store_url,
        "SELECT count(ended_at), count(*) FROM leases WHERE id >= $1 AND id < $2",
        prefix, _upper(prefix))
    return int(rows[0][0]), int(rows[0][1])


async def outcomes(store_url: str, prefix: str) -> list[Outcome]:
    rows = await _query(
        store_url,
        "SELECT expire_time, ended_at, state, revocation FROM leases WHERE id >= $1 AND id < $2",
        prefix, _upper(prefix))
    return [Outcome(float(r[0]), None if r[1] is None else float(r[1]), str(r[2]),
                    str(json.loads(r[3]).get("username", ""))) for r in rows]
