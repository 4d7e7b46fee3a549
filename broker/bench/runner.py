"""``broker bench``: run the chosen scenarios, print the table, write ``--json``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from broker.bench.harness import Bench
from broker.bench.noop import register
from broker.bench.report import Row, format_table, machine_info, write_json
from broker.event_loop import loop_factory
from broker.event_loop import resolve as resolve_loop

__all__ = ["DEFAULT_PG_DSN", "SCENARIOS", "add_arguments", "main", "run_bench"]

#: scenario name -> module (each has ``async def run(bench) -> list[Row]``), in run order.
SCENARIOS: dict[str, str] = {
    "overhead": "broker.bench.overhead",
    "pg-issue": "broker.bench.pg_issue",
    "expiry": "broker.bench.expiry",
    "startup": "broker.bench.startup",
    "revoke-prefix": "broker.bench.revoke_prefix",
    "ha": "broker.bench.ha",
}
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help=f"run only these (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks the bench runs, measures nothing")
    parser.add_argument("--postgres-dsn", metavar="DSN",
                        help="admin DSN of a PostgreSQL server for the pg-issue, store and HA "
                        f"scenarios (default: $BROKER_BENCH_POSTGRES_DSN or {DEFAULT_PG_DSN})")
    parser.add_argument("--leases", type=int, default=None, metavar="N",
                        help="leases expiring at once in the expiry and HA scenarios "
                        "(default 10000)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (configs, stores, server logs)")


async def run_bench(bench: Bench, names: Sequence[str]) -> list[Row]:
    from broker.bench.pg import drop_roles, pg_available

    if bench.pg_dsn is not None and not await pg_available(bench.pg_dsn):
        bench.log(f"bench: PostgreSQL at {bench.pg_dsn} is not reachable; "
                  "its scenarios are skipped")
        bench.pg_dsn = None
    rows: list[Row] = []
    try:
        for name in names:
            module = importlib.import_module(SCENARIOS[name])
            started = time.perf_counter()
            bench.log(f"== {name}")
            try:
                rows += await module.run(bench)
            except Exception as exc:
                bench.log(traceback.format_exc())
                rows.append(Row(name, "scenario failed", None,
                                note=f"{type(exc).__name__}: {exc}"[:300]))
            bench.log(f"== {name}: {time.perf_counter() - started:.1f}s")
    finally:
        if bench.pg_dsn is not None:
            await drop_roles(bench.pg_dsn)
    return rows


def main(args: argparse.Namespace) -> int:
    """Run what ``args`` asks for; exit 0 when every judged row passed, 1 otherwise."""
    register()  # the no-op plugin must be known to config loading in this process too
    unknown = [n for n in args.scenario or [] if n not in SCENARIOS]
    if unknown:
        print(f"broker: error: unknown scenario {', '.join(unknown)}; "
              f"choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    names = [n for n in SCENARIOS if not args.scenario or n in args.scenario]
    dsn = args.postgres_dsn or os.environ.get("BROKER_BENCH_POSTGRES_DSN") or DEFAULT_PG_DSN
    workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    leases = args.leases or (200 if args.quick else 10_000)
    bench = Bench(workdir=workdir, quick=args.quick, pg_dsn=dsn, leases=leases)
    try:
        # The load generator on uvloop too, where it is installed: cheaper per call.
        with asyncio.Runner(loop_factory=loop_factory(resolve_loop("auto"))) as runner:
            rows = runner.run(run_bench(bench, names))
    finally:
        if args.keep:
            print(f"bench: work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info()
    print(f"broker bench{' (--quick: sizes too small to mean anything)' if args.quick else ''}"
          f" on {machine['cpus']} CPU(s), {machine['cpu_model']}, {machine['memory_gb']} GB")
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows, quick=args.quick, machine=machine)
    failed = [r for r in rows if r.status == "MISS" or r.metric == "scenario failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m broker.bench.runner")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
