"""Scenario ``expiry``: N leases expiring in the same second; how late is each revoked?

No-op backend on a SQLite store: N leases (default 10,000) are written
straight into the store, all due at one instant T a few seconds ahead, and a
broker process is started. Lag = ``ended_at - expire_time`` of each lease, read
back from the store; throughput = N / (last ended_at - T).

PostgreSQL backend: the same with real roles (created raw first), so the
broker's revocation protocol (NOLOGIN, terminate sessions, REASSIGN/DROP OWNED,
DROP ROLE) runs for each; the baseline is raw ``DROP ROLE`` of as many roles at
the broker's per-mount revocation concurrency, on as many connections. A bare
``DROP ROLE`` skips every step that makes a revoked credential dead, so a
diagnosis row runs the plugin's protocol raw too (its three round trips on an
asyncpg pool, no broker) and sets the broker against it. That row runs the
protocol for one role at a time, as the plugin did before it revoked due roles
in batches (``delete_users``, ``[leases] revoke_batch``); the broker now runs
it for up to ``revoke_batch`` roles at once, so it can beat that row.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from broker.bench.harness import (
    Bench,
    BrokerProcess,
    Exhausted,
    LoadResult,
    broker_config,
    run_load,
    worker_counts,
)
from broker.bench.pg import (
    ROLE_PREFIX,
    count_roles,
    create_roles,
    drop_roles,
    least_privilege_admin,
    pg_mount,
    raw_load,
)
from broker.bench.report import Row, Target, percentile
from broker.bench.seed import count_ended, outcomes, seed_leases, set_due
from plugins.postgres import _END_SESSIONS, _TERMINATE_WAIT_MS, DEFAULT_REVOCATION_STATEMENTS

__all__ = ["run", "wait_all_ended"]

NAME = "expiry"
LAG_TARGET = Target("<=", 1.0, "<= 1 s")
PG_TARGET = Target("ratio>=", 0.85, ">= 0.85 x raw")
#: the broker's default per-mount revocation concurrency (LeaseConfig.per_mount_workers).
PER_MOUNT_WORKERS = 8


async def wait_all_ended(bench: Bench, store_url: str, prefix: str, total: int,
                         deadline: float, what: str,
                         progress: list[tuple[float, int]] | None = None) -> int:
    """Poll until every lease under ``prefix`` has ended or ``deadline``; returns how many did.

    Logs progress every few seconds; ``progress`` collects (seconds, ended) once a second.
    """
    ended = 0
    started = last_log = last_point = time.monotonic()
    while time.time() < deadline:
        ended, _ = await count_ended(store_url, prefix)
        now = time.monotonic()
        if progress is not None and (now - last_point >= 1 or ended >= total):
            progress.append((round(now - started, 2), ended))
            last_point = now
        if ended >= total:
            break
        if now - last_log >= 5:
            bench.log(f"{what}: {ended:,}/{total:,} revoked after {now - started:.0f}s")
            last_log = now
        await asyncio.sleep(0.1)
    return ended


async def _raw_protocol_load(dsn: str, names: list[str], concurrency: int) -> LoadResult:
    """The plugin's revocation protocol (PostgreSQL 14+ form) run raw: three round trips.

    NOLOGIN committed; signal the sessions and look up the oid (the bench's roles
    have none, so nothing to wait for);
    one batch with the last sweep, REASSIGN OWNED, DROP OWNED, DROP ROLE.
    """
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    counter = iter(range(10**9))
    try:
        async def op(_w: int) -> None:
            i = next(counter)
            if i >= len(names):
                raise Exhausted
            name = names[i]
            async with pool.acquire() as conn:
                await conn.execute(f'ALTER ROLE "{name}" NOLOGIN')
                row = await conn.fetchrow(_END_SESSIONS, name)
                sweep = (f"SELECT pg_terminate_backend(pid, {_TERMINATE_WAIT_MS}) "
                         f"FROM pg_stat_activity WHERE usesysid = {int(row['oid'])} "
                         "AND pid <> pg_backend_pid()")
                drop = [s.replace("{{name}}", name) for s in DEFAULT_REVOCATION_STATEMENTS]
                await conn.execute("\n;\n".join([sweep, *drop]))

        return await run_load(op, concurrency=concurrency, seconds=3600, max_ops=len(names))
    finally:
        await pool.close()


async def _burst(bench: Bench, *, tag: str, store_url: str, config_mounts: str,
                 env: dict[str, str], n: int, mount: str, role: str,
                 usernames: list[str] | None, workers: int = 1
                 ) -> tuple[list[float], float, str]:
    """Seed ``n`` leases due together, run a broker through the burst; (lags, rate, note)."""
    tmp = bench.subdir(f"{NAME}-{tag}")
    store_url = store_url.replace("{tmp}", str(tmp))
    await seed_leases(store_url, n, mount=mount, role=role, expire=time.time() + 86400,
                      username=(lambda i: usernames[i]) if usernames else None)
    prefix = f"{mount}/creds/{role}/"
    lead = 1.5 if bench.quick else 5.0
    due = time.time() + lead
    await set_due(store_url, prefix, due)
    broker = BrokerProcess(broker_config(tmp, store_url=store_url, mounts=config_mounts,
                                         workers=workers), env).start()
    note = ""
    try:
        await broker.wait_healthy()
        if time.time() > due:
            note = "broker became healthy after the leases were due"
        ended = await wait_all_ended(bench, store_url, prefix, n,
                                     due + max(60.0, n / 20), f"{NAME} {tag}")
    finally:
        await broker.stop()
    rows = await outcomes(store_url, prefix)
    lags = sorted(o.ended_at - o.expire_time for o in rows if o.ended_at is not None)
    last = max((o.ended_at for o in rows if o.ended_at is not None), default=due)
    rate = len(lags) / (last - due) if last > due else 0.0
    if ended < n:
        note = (note + "; " if note else "") + f"{n - ended} never revoked"
    return lags, rate, note


async def _least_privilege_burst(bench: Bench, n: int, raw_rate: float) -> Row:
    """The PostgreSQL burst again, revoked by docs/plugins.md's CREATEROLE admin (no superuser).

    What operators are told to run: each revocation then also makes the
    admin a member of the role (``GRANT ... TO CURRENT_USER``) before
    ``REASSIGN OWNED``. Against the same raw ``DROP ROLE`` (a superuser's).
    """
    assert bench.pg_dsn is not None
    bench.log(f"{NAME}: {n:,} PostgreSQL roles due at once, least-privilege mount admin")
    async with least_privilege_admin(bench.pg_dsn) as admin_dsn:
        names = await create_roles(admin_dsn, "explp", n)
        toml, env = pg_mount(bench, max_open=PER_MOUNT_WORKERS, dsn=admin_dsn)
        _lags, rate, note = await _burst(
            bench, tag="pg-lp", store_url="sqlite:///{tmp}/broker.db", config_mounts=toml,
            env=env, n=n, mount="pg", role="bench", usernames=names)
        left = await count_roles(bench.pg_dsn, f"{ROLE_PREFIX}explp-")
        if left:
            note = (note + "; " if note else "") + f"{left} roles still exist"
        await drop_roles(bench.pg_dsn, like=f"{ROLE_PREFIX}explp-")
    # Judged like the superuser's row: it is the setup operators are told to run.
    return Row(NAME, f"revocations/s, postgres, least-privilege admin, N={n}", rate, "/s",
               raw_rate, PG_TARGET, note=note)


def _lag_rows(tag: str, lags: list[float], rate: float | None, note: str, judged: bool
             ) -> list[Row | None]:
    return [
        Row(NAME, f"lag p50, {tag}", percentile(lags, 0.5), "s"),
        Row(NAME, f"lag p99, {tag}", percentile(lags, 0.99), "s", None,
            LAG_TARGET if judged else None, note=note),
        Row(NAME, f"lag max, {tag}", lags[-1] if lags else None, "s"),
        Row(NAME, f"revocations/s, {tag}", rate, "/s") if rate is not None else None,
    ]


async def run(bench: Bench) -> list[Row]:
    n = bench.leases
    rows: list[Row | None] = []
    counts = worker_counts()
    for workers in counts:
        bench.log(f"{NAME}: {n:,} leases due at once, no-op backend, SQLite store, "
                  f"{workers} worker(s)")
        lags, rate, note = await _burst(
            bench, tag=f"noop-w{workers}", store_url="sqlite:///{tmp}/broker.db",
            config_mounts="", env={}, n=n, mount="bench", role="r", usernames=None,
            workers=workers)
        # One worker keeps the row names of earlier runs, so their JSON compares.
        label = f"no-op, N={n}" if workers == 1 else f"no-op, {workers} workers, N={n}"
        rows += _lag_rows(label, lags, rate, note, judged=workers == counts[-1])

    if bench.pg_dsn is None:
        rows.append(Row(NAME, "PostgreSQL backend", None, skipped=True,
                        note="no PostgreSQL (--postgres-dsn)"))
        return [r for r in rows if r is not None]
    n_pg = 40 if bench.quick else min(n, 2000)
    await drop_roles(bench.pg_dsn)
    bench.log(f"{NAME}: raw DROP ROLE baseline, {n_pg:,} roles, c={PER_MOUNT_WORKERS}")
    names = await create_roles(bench.pg_dsn, "raw", n_pg)
    raw = await raw_load(
        bench.pg_dsn,
        lambda i: f'DROP ROLE "{names[i]}"' if i < len(names) else None,
        concurrency=PER_MOUNT_WORKERS, seconds=3600, max_ops=len(names))
    bench.log(f"{NAME}: the plugin's revocation protocol raw, {n_pg:,} roles")
    names = await create_roles(bench.pg_dsn, "rawp", n_pg)
    raw_protocol = await _raw_protocol_load(bench.pg_dsn, names, PER_MOUNT_WORKERS)
    bench.log(f"{NAME}: {n_pg:,} PostgreSQL roles due at once through the broker")
    names = await create_roles(bench.pg_dsn, "exp", n_pg)
    toml, env = pg_mount(bench, max_open=PER_MOUNT_WORKERS)
    lags, rate, note = await _burst(bench, tag="pg", store_url="sqlite:///{tmp}/broker.db",
                                    config_mounts=toml, env=env, n=n_pg, mount="pg",
                                    role="bench", usernames=names)
    left = await count_roles(bench.pg_dsn, names[0].rsplit("-", 1)[0])
    if left:
        note = (note + "; " if note else "") + f"{left} roles still exist"
    await drop_roles(bench.pg_dsn)
    if raw.errors:
        note = (note + "; " if note else "") + f"raw: {raw.errors} errors: {raw.first_error}"
    rows += _lag_rows(f"postgres, N={n_pg}", lags, None, "", judged=False)
    rows.append(Row(NAME, f"revocations/s, postgres, N={n_pg}", rate, "/s", raw.rate, PG_TARGET,
                    note=note))
    protocol_note = (f"{raw_protocol.errors} errors: {raw_protocol.first_error}"
                     if raw_protocol.errors else "")
    rows.append(await _least_privilege_burst(bench, n_pg, raw.rate))
    rows += [
        # Diagnosis: what the protocol costs in the database, and the broker against it.
        Row(NAME, f"raw, same protocol, postgres, N={n_pg}", raw_protocol.rate, "/s", raw.rate,
            note=("diagnosis: vs raw DROP ROLE " + protocol_note).strip()),
        Row(NAME, f"revocations/s vs raw same protocol, postgres, N={n_pg}", rate, "/s",
            raw_protocol.rate, note="diagnosis: the broker revokes in batches"),
    ]
    return [r for r in rows if r is not None]
