"""Scenario ``revoke-prefix``: one call revoking 100,000 leases.

100,000 active leases under ``bench/creds/r/`` (no-op backend) are written
straight into the store and a broker process is started. Measured: how long
``PUT /v1/sys/leases/revoke-prefix/bench/creds/r/`` takes to answer (it only
queues), then how long until every lease has ended, with progress on stderr.
On SQLite and, when there is one, on a PostgreSQL store.
"""

from __future__ import annotations

import time

from broker.bench.expiry import wait_all_ended
from broker.bench.harness import ApiClient, Bench, broker_config, running
from broker.bench.report import Row, Target
from broker.bench.seed import seed_leases

__all__ = ["run"]

NAME = "revoke-prefix"
FULL_LEASES = 100_000
RETURN_TARGET = Target("<=", 1.0, "< 1 s")
ALL_TARGET = Target("<=", 60.0, "<= 60 s")
PREFIX = "bench/creds/r/"


async def run(bench: Bench) -> list[Row]:
    n = 1_000 if bench.quick else FULL_LEASES
    rows: list[Row] = []
    for store in bench.stores(NAME, rows):
        tmp = bench.subdir(f"{NAME}-{store}")
        url = await bench.empty_store(store, tmp, "broker_bench_prefix")
        bench.log(f"{NAME}: seeding {n:,} leases ({store})")
        await seed_leases(url, n, expire=time.time() + 86400)
        note = ""
        async with running(broker_config(tmp, store_url=url)) as broker, \
                ApiClient(broker.url, concurrency=1) as api:
            started = time.perf_counter()
            body = await api.revoke_prefix(PREFIX)
            returned = time.perf_counter() - started
            queued = int(body.get("data", {}).get("queued", 0))
            if queued != n:
                note = f"queued {queued} of {n}"
            bench.log(f"{NAME}: call returned in {returned:.2f}s, {queued:,} queued")
            progress: list[tuple[float, int]] = []
            ended = await wait_all_ended(bench, url, PREFIX, n, time.time() + 300,
                                         f"{NAME} {store}", progress)
            done = time.perf_counter() - started
            rss = broker.peak_rss_mb()
        if ended < n:
            note = (note + "; " if note else "") + f"{n - ended} not revoked after 300 s"
        if store == "postgresql":
            await bench.drop_database("broker_bench_prefix")
        rows += [
            Row(NAME, f"call returns, {store}, {n:,} leases", returned, "s", None, RETURN_TARGET),
            Row(NAME, f"all revoked, {store}, {n:,} leases", done if ended >= n else None, "s",
                None, ALL_TARGET, note=note, extra={"progress": progress}),
            Row(NAME, f"revocations/s, {store}", ended / done if done else None, "/s"),
            Row(NAME, f"broker peak RSS, {store}", rss, "MB"),
        ]
    return rows
