"""PostgreSQL pieces of the bench: the mount under test and the raw asyncpg baselines."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg

from broker.bench.harness import Bench, Exhausted, LoadResult, run_load
from broker.templating import format_expiration, generate_password, render
from plugins._sql import escape_identifier
from plugins.postgres import DEFAULT_CREATION_STATEMENTS

__all__ = [
    "PASSWORD_ENV",
    "ROLE_PREFIX",
    "create_role_sql",
    "create_roles",
    "drop_roles",
    "least_privilege_admin",
    "pg_available",
    "pg_mount",
    "raw_load",
]

#: Every role the bench creates starts with this, so cleanup finds them all (and only them).
ROLE_PREFIX = "bnch-"
PASSWORD_ENV = "BROKER_BENCH_PG_PASSWORD"  # noqa: S105 - the name of a variable


async def pg_available(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def pg_mount(bench: Bench, *, max_open: int = 8, options: Mapping[str, str] | None = None,
             dsn: str | None = None) -> tuple[str, dict[str, str]]:
    """TOML of mount ``pg`` (role ``bench``) on the bench's server, and the env it needs.

    ``options``: more mount keys, as TOML values (``{"serialize_ddl": "false"}``);
    by default the plugin's defaults. ``dsn``: the admin to connect as, if not
    the bench's own (see :func:`least_privilege_admin`).

    The plugin refuses a password inside connection_url: one in the DSN goes
    through ``password_env`` instead.
    """
    dsn = dsn or bench.pg_dsn
    assert dsn is not None
    parts = urlsplit(dsn)
    env: dict[str, str] = {}
    secret_line = ""
    if parts.password is not None:
        env[PASSWORD_ENV] = unquote(parts.password)
        secret_line = f'password_env = "{PASSWORD_ENV}"'
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username}@{host}")
    url = urlunsplit(parts._replace(query=""))
    option_lines = "\n".join(f"{key} = {value}" for key, value in (options or {}).items())
    toml = f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{url}"
max_open_connections = {max_open}
{option_lines}
{secret_line}

[mounts.pg.roles.bench]
default_ttl = "1h"
max_ttl = "24h"
username_template = "{ROLE_PREFIX}{{{{random 16}}}}"
"""
    return toml, env


@asynccontextmanager
async def least_privilege_admin(dsn: str) -> AsyncIterator[str]:
    """A mount admin as docs/plugins.md tells operators to make one; yields its DSN.

    ``CREATEROLE`` and ``pg_signal_backend``, no superuser: its revocations
    take the extra ``GRANT "{{name}}" TO CURRENT_USER`` step a superuser's
    skip. Created through ``dsn`` (a superuser), dropped on the way out; named
    with ROLE_PREFIX so an interrupted bench's cleanup finds it. Roles it is
    to revoke must be created through the yielded DSN (on PostgreSQL 16 a
    CREATEROLE admin manages only the roles it made).
    """
    name, password = _role_name("lp-admin"), generate_password()
    who = f'"{escape_identifier(name)}"'
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE ROLE {who} LOGIN CREATEROLE PASSWORD '{password}';"
                           f"GRANT pg_signal_backend TO {who}")
        parts = urlsplit(dsn)
        host = parts.netloc.rpartition("@")[2]
        yield urlunsplit(parts._replace(
            netloc=f"{quote(name, safe='')}:{quote(password, safe='')}@{host}"))
    finally:
        try:
            await conn.execute(f"DROP ROLE IF EXISTS {who}")
        finally:
            await conn.close()


def create_role_sql(name: str, password: str | None = None) -> str:
    """The default creation statement with ``password`` (a new plaintext one by default)."""
    expiration = format_expiration(datetime.now(UTC) + timedelta(hours=1))
    return render(DEFAULT_CREATION_STATEMENTS[0],
                  {"name": name, "password": password or generate_password(),
                   "expiration": expiration})


def _role_name(tag: str) -> str:
    return f"{ROLE_PREFIX}{tag}-{secrets.token_hex(6)}"


async def raw_load(
    dsn: str,
    statement: Callable[[int], str | None],
    *,
    concurrency: int,
    seconds: float,
    max_ops: int | None = None,
) -> LoadResult:
    """Run ``statement(i)`` on a pool of ``concurrency`` connections, one per worker.

    ``statement`` returning None ends that worker (nothing left to do).
    """
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    counter = iter(range(10**9))
    try:
        async def op(_worker: int) -> None:
            sql = statement(next(counter))
            if sql is None:
                raise Exhausted
            async with pool.acquire() as conn:
                await conn.execute(sql)

        return await run_load(op, concurrency=concurrency, seconds=seconds, max_ops=max_ops)
    finally:
        await pool.close()


async def create_roles(dsn: str, tag: str, n: int, *, concurrency: int = 8) -> list[str]:
    names = [_role_name(tag) for _ in range(n)]
    result = await raw_load(dsn, lambda i: create_role_sql(names[i]) if i < n else None,
                            concurrency=concurrency, seconds=3600, max_ops=n)
    if result.errors:
        raise RuntimeError(f"creating bench roles failed: {result.first_error}")
    return names


async def drop_roles(dsn: str, *, like: str = ROLE_PREFIX, concurrency: int = 4) -> int:
    """Drop every role whose name starts with ``like``; returns how many."""
    conn = await asyncpg.connect(dsn)
    try:
        names = [r[0] for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)", like)]
    finally:
        await conn.close()
    if not names:
        return 0

    def stmt(i: int) -> str | None:
        if i >= len(names):
            return None
        return 'DROP ROLE IF EXISTS "{}"'.format(names[i].replace('"', '""'))

    await raw_load(dsn, stmt, concurrency=concurrency, seconds=3600, max_ops=len(names))
    return len(names)


async def count_roles(dsn: str, like: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)", like))
    finally:
        await conn.close()


async def timed(aw: Awaitable[Any]) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await aw
    return loop.time() - t0
