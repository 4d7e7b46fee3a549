"""Before/after rounds of pg-issue: raw ``CREATE ROLE``, one code tree's broker, another's.

    git worktree add /tmp/before main          # the code to compare against
    python -m tests.bench.ab_pg_issue --before /tmp/before [--after DIR] [--rounds 12] [-c 1]

The set-up of ``broker bench --scenario pg-issue``'s judged rows: a private
PostgreSQL cluster on the first half of the CPUs, this process and both
brokers (SQLite store, durable commits) on the other half. Each round runs
the raw statement, the "before" broker (``--before`` first on
``PYTHONPATH``) and this tree's broker for ``--seconds`` each, in each of
the six orders in turn (so give a multiple of 6 rounds), and drops the roles after each part. It prints each
round's broker/raw ratios and the totals. A round's ratio moves by ±0.1 on a
shared VM, so judge a change by the difference of the totals over many rounds
and by how many rounds it wins, never by one round.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import shutil
import tempfile
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

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
from broker.bench.pg_issue import pinned
from broker.bench.pgcluster import PrivateCluster
from tests.bench.issue_timeline import REPO, judged_cpus

__all__ = ["Comparison", "compare", "main"]

SIDES = ("raw", "before", "after")
#: Every order of the three, in turn: each side runs first, second and third
#: (after each other side) equally often in every six rounds. Two orders (one
#: and its reverse) left "before" always in the middle, and two brokers of the
#: same code then differed by 0.04 x raw in 12 rounds.
ORDERS = list(itertools.permutations(SIDES))


@dataclass
class Comparison:
    before: float  # x raw, all rounds together
    after: float
    wins: int  # rounds in which "after" issued faster than "before"
    rounds: int


async def compare(before: str, after: str, *, rounds: int, seconds: float,
                  concurrency: int = 1) -> Comparison:
    """The rounds on a private cluster (this process pinned meanwhile), printed as they go."""
    server_cpus, bench_cpus = judged_cpus()
    cluster = PrivateCluster.start(cpus=server_cpus, prefix="ab-pg-issue-")
    tmp = Path(tempfile.mkdtemp(prefix="ab-pg-issue-"))
    bench = Bench(tmp, pg_dsn=cluster.dsn)
    results: dict[str, list[LoadResult]] = {side: [] for side in SIDES}
    wins = 0
    try:
        with pinned(bench_cpus):
            async with AsyncExitStack() as stack:
                issuers = {}
                for side, tree in (("before", before), ("after", after)):
                    store = f"sqlite:///{tmp / side}.db"
                    await create_root_token(store)
                    toml, mount_env = pg_mount(bench, max_open=concurrency)
                    config = broker_config(tmp, store_url=store, mounts=toml, name=side)
                    broker = await stack.enter_async_context(
                        running(config, {**mount_env, "PYTHONPATH": tree}))
                    api = await stack.enter_async_context(
                        ApiClient(broker.url, concurrency=concurrency))

                    async def issue(_w: int, api: ApiClient = api) -> None:
                        await api.issue("pg", "bench")

                    issuers[side] = issue
                    await run_load(issue, concurrency=concurrency, seconds=0.5)  # warm-up
                await drop_roles(cluster.dsn)
                for n in range(rounds):
                    for side in ORDERS[n % len(ORDERS)]:
                        if side == "raw":
                            part = await raw_load(
                                cluster.dsn,
                                lambda _i: create_role_sql(
                                    f"{ROLE_PREFIX}raw-{secrets.token_hex(8)}"),
                                concurrency=concurrency, seconds=seconds)
                        else:
                            part = await run_load(issuers[side], concurrency=concurrency,
                                                  seconds=seconds)
                        results[side].append(part)
                        await drop_roles(cluster.dsn)
                    raw, old, new = (results[side][-1] for side in SIDES)
                    wins += new.rate > old.rate
                    print(f"round {n:2}: raw {raw.rate:6.1f}/s p50 {raw.p(0.5):5.2f} ms | "
                          f"before {old.rate / raw.rate:.3f} ({old.p(0.5):5.2f} ms) | "
                          f"after {new.rate / raw.rate:.3f} ({new.p(0.5):5.2f} ms)", flush=True)
    finally:
        cluster.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    total = {side: LoadResult.merge(parts) for side, parts in results.items()}
    return Comparison(total["before"].rate / total["raw"].rate,
                      total["after"].rate / total["raw"].rate, wins, rounds)


async def run(args: argparse.Namespace) -> None:
    result = await compare(args.before, args.after, rounds=args.rounds, seconds=args.seconds,
                           concurrency=args.concurrency)
    print(f"\nc={args.concurrency}: before {result.before:.3f}, after {result.after:.3f} "
          f"x raw ({result.after - result.before:+.3f}); after faster in {result.wins} of "
          f"{result.rounds} rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--before", metavar="DIR", required=True,
                        help="code tree of the 'before' broker")
    parser.add_argument("--after", metavar="DIR", default=str(REPO),
                        help="code tree of the 'after' broker (default: this one)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each part")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    args = parser.parse_args()
    for option in ("before", "after"):
        tree = Path(getattr(args, option))
        if not (tree / "broker" / "__init__.py").is_file():
            parser.error(f"--{option} {tree}: no broker package there")
        setattr(args, option, str(tree.resolve()))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
