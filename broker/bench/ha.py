"""Scenario ``ha``: two replicas on one PostgreSQL store, one SIGKILLed mid-burst.

N leases (no-op backend) are written straight into a fresh PostgreSQL store,
all due at one instant; two broker processes share the store. Each replica's
no-op backend appends every revoked username to its own file. Once about a
third of the burst is revoked, replica A gets SIGKILL; B must pick up what A
had claimed once A's claims run out (``claim_timeout``, short here).

Counted per lease: revoked once; revoked twice while both replicas were alive
(a lease claimed by two replicas at once: judged, must be 0); repeated after
the kill (A's delete had returned but A died before its ending was durable, so
B deleted again once the claim ran out: revocation is at-least-once, and such a
repeat is a no-op on every real backend, e.g. PostgreSQL's role is already
gone; reported, not judged); never (still not ended in the store at the end);
and "ended without a delete" (marked done in the store but never revoked).
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

from broker.bench.expiry import wait_all_ended
from broker.bench.harness import Bench, BrokerProcess, broker_config
from broker.bench.noop import REVOKE_LOG_ENV
from broker.bench.report import Row, Target
from broker.bench.seed import outcomes, seed_leases, set_due

__all__ = ["run"]

NAME = "ha"
ZERO = Target("<=", 0, "0")
KILL_AT = 0.3
PREFIX = "bench/creds/r/"


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _deletes(path: Path) -> list[tuple[str, float]]:
    """(username, when) of every delete the replica's no-op backend logged."""
    out = []
    for line in _lines(path):
        name, _, when = line.partition(" ")
        out.append((name, float(when)))
    return out


def _repeats(deletes: dict[str, list[tuple[str, float]]], killed_at: float | None
             ) -> tuple[int, int]:
    """(revoked twice while both were alive, repeated by B after A was killed).

    A repeat is the crash window only if the first delete was A's, made before
    the kill, and every later one is B's, made after it.
    """
    by_lease: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for replica, rows in deletes.items():
        for name, when in rows:
            by_lease[name].append((when, replica))
    alive = after_kill = 0
    for calls in by_lease.values():
        if len(calls) < 2:
            continue
        calls.sort()
        first, *later = calls
        if (killed_at is not None and first[1] == "a" and first[0] <= killed_at
                and all(r == "b" and t > killed_at for t, r in later)):
            after_kill += 1
        else:
            alive += 1
    return alive, after_kill


async def run(bench: Bench) -> list[Row]:
    if bench.pg_dsn is None:
        return [Row(NAME, "two replicas", None, skipped=True,
                    note="needs a PostgreSQL store (--postgres-dsn)")]
    n = bench.leases
    claim_timeout, backend_timeout, lead = (2, 1, 2.0) if bench.quick else (10, 5, 8.0)
    tmp = bench.subdir(NAME)
    url = await bench.fresh_database("broker_bench_ha")
    bench.log(f"{NAME}: seeding {n:,} leases in a PostgreSQL store")
    await seed_leases(url, n, expire=time.time() + 86400)
    due = time.time() + lead
    await set_due(url, PREFIX, due)
    logs = {name: tmp / f"revoked-{name}.log" for name in ("a", "b")}
    leases = {"claim_timeout": f"{claim_timeout}s", "backend_timeout": f"{backend_timeout}s"}
    replicas = {
        name: BrokerProcess(broker_config(tmp, store_url=url, leases=leases, name=name),
                            {REVOKE_LOG_ENV: str(logs[name])}).start()
        for name in ("a", "b")
    }
    note = ""
    killed_at: tuple[float, int] | None = None
    kill_time: float | None = None
    progress: list[tuple[float, int]] = []
    try:
        await asyncio.gather(*(r.wait_healthy() for r in replicas.values()))
        if time.time() > due:
            note = "replicas became healthy after the leases were due"
        # Kill A once about KILL_AT of the burst is revoked (both files, read cheaply).
        deadline = due + 60
        while time.time() < deadline:
            done = sum(len(_lines(p)) for p in logs.values())
            if done >= KILL_AT * n:
                replicas["a"].kill()
                kill_time = time.time()
                killed_at = (kill_time - due, done)
                bench.log(f"{NAME}: SIGKILL replica A at {done:,}/{n:,} revoked")
                break
            await asyncio.sleep(0.005)
        ended = await wait_all_ended(bench, url, PREFIX, n,
                                     time.time() + claim_timeout + (20 if bench.quick else 60),
                                     NAME, progress)
        finished = time.time() - due
    finally:
        for replica in replicas.values():
            await replica.stop()
    if killed_at is None:
        note = (note + "; " if note else "") + "the kill came too late (burst already over)"
    rows_out = await outcomes(url, PREFIX)
    await bench.drop_database("broker_bench_ha")
    deletes = {name: _deletes(path) for name, path in logs.items()}
    per_replica = {name: collections.Counter(n for n, _ in rows) for name, rows in deletes.items()}
    total = per_replica["a"] + per_replica["b"]
    twice, repeated = _repeats(deletes, kill_time)
    never = sum(1 for o in rows_out if o.ended_at is None)
    no_delete = sum(1 for o in rows_out if o.ended_at is not None and o.username not in total)
    once = sum(1 for c in total.values() if c == 1)
    by_a, by_b = sum(per_replica["a"].values()), sum(per_replica["b"].values())
    extra: dict[str, object] = {"killed_after_s": killed_at[0] if killed_at else None,
             "revoked_at_kill": killed_at[1] if killed_at else None,
             "by_a": by_a, "by_b": by_b,
             "progress": progress}
    return [
        Row(NAME, f"revoked once, N={n}", once, "", None, None, note=note, extra=extra),
        Row(NAME, "revoked twice, both replicas alive", twice, "", None, ZERO),
        Row(NAME, "repeated after the kill (crash window)", repeated, "",
            note="at-least-once: A died between delete and durable ending; a no-op "
                 "on a real backend"),
        Row(NAME, "never revoked", never, "", None, ZERO),
        Row(NAME, "ended without a delete", no_delete, "", None, ZERO),
        Row(NAME, "revocations by A (killed)", by_a, "", note=f"by B: {by_b}"),
        Row(NAME, f"all revoked after due (claim_timeout {claim_timeout}s)",
            finished if ended >= n else None, "s"),
    ]
