"""Several processes opening a fresh SQLite store at once: every open succeeds.

Switching a new file to WAL needs an exclusive lock, and where two connections
race for it SQLite answers "database is locked" at once instead of calling the
busy handler. With ``[server] workers = 2`` on a new store, one worker died at
start-up now and then (CI saw it) and was restarted by the supervisor; two
replicas starting together could hit it too. Before the fix this test's opens
failed in about one round in ten.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from broker.store.sqlite_schema import connect

ROUNDS = 150
PROCESSES = 6


def _open(path: str, barrier: multiprocessing.synchronize.Barrier,
          results: multiprocessing.Queue[str]) -> None:
    barrier.wait()  # all at once, as workers forked together do
    try:
        connect(path, writer=True).close()
        results.put("ok")
    except Exception as exc:
        results.put(repr(exc))


def test_processes_opening_a_new_store_together_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    failures: list[str] = []
    for n in range(ROUNDS):
        path = os.path.join(tmp_path, f"broker-{n}.db")
        barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(path, barrier, results))
                 for _ in range(PROCESSES)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=30) for _ in procs]
        for proc in procs:
            proc.join(30)
        failures += [o for o in outcomes if o != "ok"]
    assert failures == []
