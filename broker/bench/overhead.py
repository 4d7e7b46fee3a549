"""Scenario ``overhead``: the broker's own cost per call, with a backend that does nothing.

Issue, renew and revoke through the HTTP API at concurrency 32, on a SQLite
store (durable group commits) and on a PostgreSQL store, each with one
worker and with one worker per CPU (the targets are judged on the latter,
see ``harness.worker_counts``). The baseline is the
same store's writes for that call made directly, at the same concurrency, in
the bench process: what the HTTP path would reach if the API, auth, audit and
engine cost nothing.

- issue  = insert_pending + activate (two durable writes)
- renew  = renew (one write)
- revoke = queue_revoke + finish_revoke (the API also waits for a sweeper claim)
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable

from broker.bench.harness import (
    ApiClient,
    Bench,
    BrokerProcess,
    Exhausted,
    LoadResult,
    broker_config,
    create_root_token,
    run_load,
    running,
    worker_counts,
)
from broker.bench.report import Row, Target
from broker.lease import Lease, LeaseState, new_lease_id
from broker.store import open_store

__all__ = ["http_phases", "run"]

NAME = "overhead"
CONCURRENCY = 32
TARGETS = {
    "issue": Target(">=", 2000, ">= 2000/s"),
    "renew": Target(">=", 3000, ">= 3000/s"),
}
P99_TARGET = Target("<=", 50, "<= 50 ms")


async def http_phases(broker: BrokerProcess, seconds: float,
                       warmup: float) -> tuple[dict[str, LoadResult], dict[str, float]]:
    """Each phase's load result, and the broker's CPU microseconds per successful call.

    CPU per call is what bounds the rate on a shared 2-core machine (the load
    generator runs beside the broker), and unlike a rate it barely moves when
    the machine is noisy, so it is the figure to compare across changes.
    """
    ids: list[str] = []
    results: dict[str, LoadResult] = {}
    cpu_us: dict[str, float] = {}

    async def phase(name: str, op: Callable[[int], Awaitable[None]]) -> None:
        before = broker.cpu_seconds()
        results[name] = result = await run_load(op, concurrency=CONCURRENCY, seconds=seconds)
        after = broker.cpu_seconds()
        if before is not None and after is not None and result.ok:
            cpu_us[name] = (after - before) / result.ok * 1e6

    async with ApiClient(broker.url, concurrency=CONCURRENCY) as api:
        async def issue(_w: int) -> None:
            ids.append(await api.issue("bench", "r"))

        async def renew(_w: int) -> None:
            await api.renew(random.choice(ids))  # noqa: S311 - load pattern, not a secret

        async def revoke(_w: int) -> None:
            if not ids:
                raise Exhausted
            await api.revoke(ids.pop())

        await run_load(issue, concurrency=CONCURRENCY, seconds=warmup)
        await phase("issue", issue)
        await phase("renew", renew)
        await phase("revoke", revoke)
    return results, cpu_us


async def _store_phases(store_url: str, seconds: float) -> dict[str, LoadResult]:
    store = open_store(store_url)
    await store.open()
    ids: list[str] = []
    try:
        async def issue(_w: int) -> None:
            now = time.time()
            lease = Lease(id=new_lease_id("raw", "r"), mount="raw", role="r", owner="bench-root",
                          issue_time=now, expire_time=now + 3600, max_expire_time=now + 86400,
                          revocation={"username": "x"}, metadata={})
            await store.insert_pending(lease)
            await store.activate(lease.id, revocation={"username": "x"},
                                 expire_time=lease.expire_time, renewable=True)
            ids.append(lease.id)

        async def renew(_w: int) -> None:
            now = time.time()
            if not await store.renew(random.choice(ids), expire_time=now + 3600,  # noqa: S311
                                     now=now):
                raise RuntimeError("store renew changed nothing")

        async def revoke(_w: int) -> None:
            if not ids:
                raise Exhausted
            lease_id = ids.pop()
            now = time.time()
            if await store.queue_revoke(lease_id, reason="revoke", now=now) is None:
                raise RuntimeError("store queue_revoke found nothing")
            await store.finish_revoke(lease_id, state=LeaseState.REVOKED, now=time.time())

        results = {"issue": await run_load(issue, concurrency=CONCURRENCY, seconds=seconds)}
        results["renew"] = await run_load(renew, concurrency=CONCURRENCY, seconds=seconds)
        results["revoke"] = await run_load(revoke, concurrency=CONCURRENCY, seconds=seconds)
        return results
    finally:
        await store.close()


def _rows(store: str, http: dict[str, LoadResult], raw: dict[str, LoadResult],
          cpu_us: dict[str, float], rss: float | None, *, workers: int, judged: bool
          ) -> list[Row]:
    rows: list[Row] = []
    judged = judged and store == "sqlite"
    # One worker keeps the names of the earlier runs' rows, so their JSON compares.
    label = store if workers == 1 else f"{store}, {workers} workers"
    for op in ("issue", "renew", "revoke"):
        h, r = http[op], raw[op]
        note = f"{h.errors} errors: {h.first_error}" if h.errors else ""
        rows.append(Row(NAME, f"{op} rate, {label}, c={CONCURRENCY}", h.rate, "/s", r.rate,
                        TARGETS.get(op) if judged else None, note=note,
                        extra={"ops": h.ok, "seconds": h.seconds, "raw_ops": r.ok,
                               "workers": workers}))
        rows.append(Row(NAME, f"{op} p50, {label}", h.p(0.5), "ms", r.p(0.5)))
        rows.append(Row(NAME, f"{op} p99, {label}", h.p(0.99), "ms", r.p(0.99),
                        P99_TARGET if judged and op in TARGETS else None))
        if op in cpu_us:
            rows.append(Row(NAME, f"{op} broker CPU per call, {label}", cpu_us[op], "us"))
    if rss is not None:
        rows.append(Row(NAME, f"broker peak RSS, {label}", rss, "MB"))
    return rows


async def run(bench: Bench) -> list[Row]:
    seconds, warmup = (0.25, 0.05) if bench.quick else (5.0, 1.0)
    rows: list[Row] = []
    counts = worker_counts()
    for store in bench.stores(NAME, rows):
        runs = []
        for workers in counts:
            tmp = bench.subdir(f"{NAME}-{store}-w{workers}")
            store_url = await bench.empty_store(store, tmp, "broker_bench_overhead")
            await create_root_token(store_url)
            bench.log(f"{NAME}: {store} store, {workers} worker(s), HTTP phases "
                      f"({seconds:g}s each)")
            async with running(broker_config(tmp, store_url=store_url,
                                             workers=workers)) as broker:
                runs.append((workers, *await http_phases(broker, seconds, warmup),
                             broker.peak_rss_mb()))
        bench.log(f"{NAME}: {store} store, direct store baseline")
        raw = await _store_phases(store_url, seconds)
        for workers, http, cpu_us, rss in runs:
            rows += _rows(store, http, raw, cpu_us, rss, workers=workers,
                          judged=workers == counts[-1])
        if store == "postgresql":
            await bench.drop_database("broker_bench_overhead")
    return rows
