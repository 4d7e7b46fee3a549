"""Profile a bench broker under load: py-spy records the server while the bench drives it.

    python tests/bench/profile_broker.py --op issue [--store sqlite|postgresql]
        [--seconds 10] [--concurrency 32] [--rate 200] [--gil] [--workers N] [--out /tmp/prof]
    python tests/bench/profile_broker.py --op pg-issue --concurrency 8

``pg-issue`` issues PostgreSQL roles through the bench's ``postgres`` mount
(the local server, or ``BROKER_TEST_POSTGRES_DSN``), as ``broker bench``'s
pg-issue scenario does, and drops them afterwards.

Writes ``OUT.collapsed`` (py-spy raw stacks, for flamegraph tools) and prints
the hottest functions by self and by inclusive samples, plus the CPU time the
server and this client each used (a client pegging its core would cap the
figures, not the broker). py-spy is a profiling tool, not a project
dependency: ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from broker.bench.harness import (
    ApiClient,
    Bench,
    broker_config,
    create_root_token,
    run_load,
    running,
)
from broker.bench.pg import drop_roles, pg_mount

__all__ = ["main"]


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread of ``pid`` (tid -> user + system), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def summarize(collapsed: Path, top: int = 25) -> str:
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        count = int(count_s)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_count[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    out = [f"{total} samples", "", "self:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_count.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top * 2)]
    return "\n".join(out)


async def run(args: argparse.Namespace) -> None:
    from broker.bench.noop import register

    register()
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    bench = Bench(workdir=tmp, pg_dsn=os.environ.get(
        "BROKER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"))
    try:
        if args.store == "sqlite":
            url = f"sqlite:///{tmp / 'broker.db'}"
        else:
            url = await bench.fresh_database("broker_bench_profile")
        await create_root_token(url)
        toml, env = pg_mount(bench, max_open=args.concurrency) if args.op == "pg-issue" else ("", {})
        config = broker_config(tmp, store_url=url, mounts=toml, workers=args.workers)
        async with running(config, env) as broker, \
                ApiClient(broker.url, concurrency=args.concurrency) as api:
            ids: list[str] = []

            async def issue(_w: int) -> None:
                ids.append(await api.issue("bench", "r"))

            async def renew(_w: int) -> None:
                await api.renew(random.choice(ids))

            async def revoke(_w: int) -> None:
                await api.revoke(ids.pop())

            async def pg_issue(_w: int) -> None:
                await api.issue("pg", "bench")

            ops = {"issue": issue, "renew": renew, "revoke": revoke, "pg-issue": pg_issue}
            await run_load(pg_issue if args.op == "pg-issue" else issue,
                           concurrency=args.concurrency,
                           seconds=args.seconds + 2 if args.op in ("renew", "revoke") else 1)
            spy = await asyncio.create_subprocess_exec(
                shutil.which("py-spy") or "py-spy", "record", "-p", str(broker.pid), "-d",
                str(int(args.seconds)), "-r", str(args.rate), "-f", "raw", "-o", f"{args.out}.collapsed",
                *(["--gil"] if args.gil else []),
                *(["--subprocesses"] if args.workers > 1 else []), "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.STDOUT)
            pids = broker.pids()
            threads0 = {pid: thread_cpu(pid) for pid in pids}
            cpu0, own0, t0 = (broker.cpu_seconds() or 0.0), time.process_time(), time.perf_counter()
            result = await run_load(ops[args.op], concurrency=args.concurrency,
                                    seconds=args.seconds)
            wall = time.perf_counter() - t0
            server_cpu = ((broker.cpu_seconds() or 0.0) - cpu0) / wall
            client_cpu = (time.process_time() - own0) / wall
            threads1 = {pid: thread_cpu(pid) for pid in pids}
            calls = result.rate * wall
            await asyncio.wait_for(spy.wait(), 60)
        print(f"{args.op}: {result.rate:.0f}/s p50 {result.p(0.5):.1f} ms p99 "
              f"{result.p(0.99):.1f} ms; server CPU {100 * server_cpu:.0f}%, "
              f"client CPU {100 * client_cpu:.0f}% of one core")
        # Which thread the CPU goes to: a process's event loop (tid = pid) or another thread.
        for pid, threads in threads1.items():
            for tid, spent in sorted(threads.items(), key=lambda kv: -kv[1]):
                used = spent - threads0[pid].get(tid, 0.0)
                if used > 0:
                    name = f"event loop {pid}" if tid == pid else f"thread {tid} of {pid}"
                    print(f"  {name}: {1e6 * used / calls:.0f} µs CPU per call")
        print(summarize(Path(f"{args.out}.collapsed")))
    finally:
        if args.op == "pg-issue" and bench.pg_dsn is not None:
            await drop_roles(bench.pg_dsn)
        if args.store != "sqlite":
            await bench.drop_database("broker_bench_profile")
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--op", choices=["issue", "renew", "revoke", "pg-issue"],
                        default="issue")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    parser.add_argument("--workers", type=int, default=1,
                        help="[server] workers; py-spy then follows the worker processes")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "broker-profile"))
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
