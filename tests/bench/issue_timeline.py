"""Where one PostgreSQL issue's time goes: the steps of ``POST /v1/pg/creds/bench`` at c=1.

    python -m tests.bench.issue_timeline [--tree DIR] [--seconds 8]

Sets up what ``broker bench --scenario pg-issue`` judges: a private
PostgreSQL cluster on the first half of the CPUs, this process and a bench
broker (SQLite store, durable commits) on the other half. The broker runs with
``tests/bench/issue_trace_hooks.py`` loaded, which stamps each step of every
issue; the median stamps are printed as a timeline (ms since the request's
bytes reached the broker), with the raw ``CREATE ROLE`` p50 measured in the
same run beside it. ``--tree DIR`` runs the broker from another code tree
(a ``git worktree``), to see where a change moved time.

The stamps cost a few µs each, so the total is a little above the bench's.
What is on the critical path: everything up to ``begin_create>`` (the
statement goes out inside it), ``begin_create<`` to ``commit>``, and
the later of ``commit<``, ``activate<`` and ``audit<2`` to ``answered``;
``intent`` runs beside the server's work, and ``activate`` and the issue's
audit line (``audit>2``) beside the ``COMMIT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from broker.bench.harness import (
    ApiClient,
    Bench,
    broker_config,
    create_root_token,
    run_load,
    running,
)
from broker.bench.pg import ROLE_PREFIX, create_role_sql, drop_roles, pg_mount, raw_load
from broker.bench.pg_issue import pinned, split_cpus
from broker.bench.pgcluster import PrivateCluster

__all__ = ["Timeline", "judged_cpus", "main", "measure"]

REPO = Path(__file__).resolve().parents[2]
HOOKS = Path(__file__).resolve().with_name("issue_trace_hooks.py")


def judged_cpus() -> tuple[list[int], frozenset[int]]:
    """(PostgreSQL's CPUs, the bench's), split as the pg-issue scenario's judged runs split them."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs at least 2 CPUs: PostgreSQL gets cores of its own")
    server, bench = split_cpus(cpus)
    return server, frozenset(bench)


@dataclass
class Timeline:
    requests: int  # issues traced
    medians_ms: dict[str, float]  # step stamp -> median ms since the request's bytes arrived
    broker_p50: float  # ms, as the load generator saw it
    raw_p50: float  # ms, raw CREATE ROLE in the same run


async def measure(seconds: float, tree: str = str(REPO)) -> Timeline:
    """The traced c=1 load on a private cluster; this process is pinned meanwhile."""
    server_cpus, bench_cpus = judged_cpus()
    cluster = PrivateCluster.start(cpus=server_cpus, prefix="issue-timeline-")
    tmp = Path(tempfile.mkdtemp(prefix="issue-timeline-"))
    hooks = tmp / "hooks"
    hooks.mkdir()
    # Loaded by path: the broker's own tree (--tree) may not have the hooks.
    (hooks / "sitecustomize.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('issue_trace_hooks', {str(HOOKS)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n")
    out = tmp / "timeline.json"
    try:
        with pinned(bench_cpus):
            bench = Bench(tmp, pg_dsn=cluster.dsn)
            store = f"sqlite:///{tmp / 'broker.db'}"
            await create_root_token(store)
            toml, env = pg_mount(bench, max_open=1)
            config = broker_config(tmp, store_url=store, mounts=toml, name="traced")
            env = {**env, "BROKER_TRACE_OUT": str(out),
                   "PYTHONPATH": os.pathsep.join([str(hooks), tree])}
            async with running(config, env) as broker, ApiClient(broker.url,
                                                                 concurrency=1) as api:
                async def issue(_w: int) -> None:
                    await api.issue("pg", "bench")

                await run_load(issue, concurrency=1, seconds=0.5)  # warm-up
                http = await run_load(issue, concurrency=1, seconds=seconds)
            await drop_roles(cluster.dsn)
            raw = await raw_load(
                cluster.dsn,
                lambda _i: create_role_sql(f"{ROLE_PREFIX}raw-{secrets.token_hex(8)}"),
                concurrency=1, seconds=min(seconds, 4.0))
            await drop_roles(cluster.dsn)
    finally:
        cluster.stop()
    if not out.exists():  # written as the broker exits
        raise RuntimeError(f"no timeline: the trace hooks did not run in the broker "
                           f"(its log: {config.with_suffix('.log')})")
    traced = json.loads(out.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    return Timeline(traced["requests"], traced["medians_ms"], http.p(0.5), raw.p(0.5))


async def run(args: argparse.Namespace) -> None:
    timeline = await measure(args.seconds, args.tree or str(REPO))
    print(f"{timeline.requests} issues traced; client-side p50 {timeline.broker_p50:.2f} ms, "
          f"raw CREATE ROLE p50 {timeline.raw_p50:.2f} ms "
          f"(added: {timeline.broker_p50 - timeline.raw_p50:.2f} ms)")
    previous = 0.0
    for name, at in sorted(timeline.medians_ms.items(), key=lambda kv: kv[1]):
        print(f"  {at:8.3f} ms  (+{at - previous:6.3f})  {name}")
        previous = at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tree", metavar="DIR", help="run the broker from this code tree")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the traced load")
    args = parser.parse_args()
    if args.tree and not (Path(args.tree) / "broker" / "__init__.py").is_file():
        parser.error(f"--tree {args.tree}: no broker package there")
    if args.tree:
        args.tree = str(Path(args.tree).resolve())
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
