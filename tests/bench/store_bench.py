"""Lease store throughput: insert_pending + activate (one issue) from concurrent coroutines.

    python tests/bench/store_bench.py [--url sqlite:///tmp/x.db] [--workers 32] [--seconds 5]

Without ``--url`` it uses a fresh SQLite file in a temporary directory (on the
same disk as /tmp: put it where the real store lives to measure real fsyncs).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from broker.lease import Lease, new_lease_id
from broker.store import open_store
from broker.store.base import LeaseStore

__all__ = ["main"]


async def worker(store: LeaseStore, deadline: float, latencies: list[float]) -> int:
    done = 0
    while time.perf_counter() < deadline:
        now = time.time()
        lease = Lease(id=new_lease_id("pg", "bench"), mount="pg", role="bench", owner="acc-bench",
                      issue_time=now, expire_time=now + 3600, max_expire_time=now + 86400,
                      metadata={"run_id": "bench"})
        started = time.perf_counter()
        await store.insert_pending(lease)
        await store.activate(lease.id, revocation={"username": lease.id[-12:]},
                             expire_time=lease.expire_time, renewable=True)
        latencies.append(time.perf_counter() - started)
        done += 1
    return done


async def run(url: str, workers: int, seconds: float) -> None:
    store = open_store(url)
    await store.open()
    try:
        latencies: list[float] = []
        started = time.perf_counter()
        deadline = started + seconds
        counts = await asyncio.gather(*(worker(store, deadline, latencies)
                                        for _ in range(workers)))
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
    issues = sum(counts)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(f"{url}: {workers} coroutines, {issues} issues in {elapsed:.2f}s: "
          f"{issues / elapsed:.0f} issues/s ({2 * issues / elapsed:.0f} durable writes/s), "
          f"latency p50 {p50:.2f}ms p99 {p99:.2f}ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="store url (default: a temporary SQLite file)")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.workers, args.seconds))
        return
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        asyncio.run(run(f"sqlite:///{Path(tmp) / 'bench.db'}", args.workers, args.seconds))


if __name__ == "__main__":
    main()
