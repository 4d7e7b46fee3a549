"""``/v1/sys/metrics`` over ``[server] workers``: every worker's figures, whichever answers.

Each worker is a process with counters of its own (backend calls, sweeper
load), and the kernel hands a scrape to whichever worker it likes. Answering
with one worker's counters would make them jump between two series on every
scrape, which graphs and ``rate()`` read as resets. So the supervisor maps one
anonymous shared memory region before it forks (every worker inherits it,
restarted ones too), each worker writes a JSON snapshot of its own figures
into its slot once a second and right before it answers a scrape, and the
answer adds up all the slots. Another worker's figures are therefore up to a
second old. A worker that is restarted (same number, new process) carries on
the counts its slot last held, so the sums never go down, as Prometheus's
multi-process mode keeps a dead worker's counters; only the counts of the
last second before it died are lost.

A slot is ``[sequence u64][length u32][JSON]``. The writer makes the sequence
odd, writes, and makes it even again; a reader that sees an odd sequence, or
a different one after reading, reads again (a seqlock: no lock a dead worker
could leave held).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.state import BrokerState

__all__ = ["PUBLISH_INTERVAL", "SLOT_BYTES", "StatsBoard", "merge", "publish_own", "snapshot"]

#: Room for one worker's snapshot: ~100 bytes per mount and operation.
SLOT_BYTES = 256 * 1024
#: How often a worker publishes its snapshot (seconds).
PUBLISH_INTERVAL = 1.0
_HEADER = struct.Struct("<QI")
_READ_TRIES = 100


class SnapshotTooLarge(ValueError):
    pass


class StatsBoard:
    """One slot per worker in memory shared by the supervisor and its workers."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        # fileno -1: an anonymous MAP_SHARED mapping, shared with every child forked later.
        self._map = mmap.mmap(-1, workers * SLOT_BYTES)
        #: In a worker (each has its own copy of this object): the counters its
        #: earlier processes published, which it carries on (publish_own).
        self.carried: dict[str, Any] | None = None

    def publish(self, worker: int, figures: Mapping[str, Any]) -> None:
        """Write ``figures`` into ``worker``'s slot (only that worker writes it)."""
        data = json.dumps(figures, separators=(",", ":")).encode()
        if len(data) > SLOT_BYTES - _HEADER.size:
            raise SnapshotTooLarge(f"worker {worker}: {len(data)} bytes of metrics do not fit "
                                   f"in {SLOT_BYTES}")
        base = self._base(worker)
        sequence, _ = _HEADER.unpack_from(self._map, base)
        writing = sequence + 1 if sequence % 2 == 0 else sequence  # odd: being written
        _HEADER.pack_into(self._map, base, writing, 0)
        self._map[base + _HEADER.size:base + _HEADER.size + len(data)] = data
        _HEADER.pack_into(self._map, base, writing + 1, len(data))

    def read(self, worker: int) -> dict[str, Any] | None:
        """``worker``'s last snapshot; None if it has published none (or is mid-write for long)."""
        base = self._base(worker)
        for _ in range(_READ_TRIES):
            before, length = _HEADER.unpack_from(self._map, base)
            if before == 0:
                return None
            if before % 2 == 0:
                data = self._map[base + _HEADER.size:base + _HEADER.size + length]
                after, _ = _HEADER.unpack_from(self._map, base)
                if after == before:
                    figures: dict[str, Any] = json.loads(data)
                    return figures
            time.sleep(0)  # let the writer (another process) finish
        return None

    def heartbeat(self, worker: int, pid: int) -> float | None:
        """The ``time.monotonic()`` of process ``pid``'s last publish as ``worker``, if any."""
        figures = self.read(worker)
        if figures is None or figures.get("pid") != pid:
            return None  # not yet published by this process (its slot holds a predecessor's)
        beat = figures.get("beat")
        return float(beat) if isinstance(beat, int | float) else None

    def snapshots(self) -> dict[int, dict[str, Any]]:
        """Every worker's last snapshot, by worker number."""
        found = {n: self.read(n) for n in range(1, self.workers + 1)}
        return {n: figures for n, figures in found.items() if figures is not None}

    def close(self) -> None:
        self._map.close()

    def _base(self, worker: int) -> int:
        if not 1 <= worker <= self.workers:
            raise ValueError(f"no worker {worker} (1..{self.workers})")
        return (worker - 1) * SLOT_BYTES


def snapshot(state: BrokerState) -> dict[str, Any]:
    """This process's own figures: what it has counted since it started."""
    return {
        "pid": os.getpid(),
        "started": state.started,
        "published": time.time(),
        # The supervisor's stall watchdog (broker/workers.py): CLOCK_MONOTONIC is
        # one clock for every process on the host and does not jump with NTP.
        "beat": time.monotonic(),
        "sweeper_busy": state.sweeper.busy,
        "sweeper_dropped_claims": state.sweeper.dropped_claims,
        "backends": {
            name: {op: {"calls": s.calls, "errors": s.errors,
                        "total_seconds": s.total_seconds, "max_seconds": s.max_seconds}
                   for op, s in m.stats.items()}
            for name, m in state.engine.mounts.items()
        },
    }


def publish_own(state: BrokerState) -> dict[str, Any]:
    """Publish this worker's figures to the board (if there is one); returns them.

    On a board, the counters include what earlier processes of the same
    worker number published (``StatsBoard.carried``); ``sweeper_busy``, a
    level rather than a count, is this process's alone.
    """
    own = snapshot(state)
    board, worker = state.stats_board, state.worker
    if board is None or worker is None:
        return own
    if board.carried is None:
        last = board.read(worker)
        board.carried = ({"sweeper_busy": 0,
                          "sweeper_dropped_claims": last["sweeper_dropped_claims"],
                          "backends": last["backends"]}
                         if last is not None and last["pid"] != own["pid"] else {})
    figures = {**own, **merge([board.carried, own])} if board.carried else own
    try:
        board.publish(worker, figures)
    except SnapshotTooLarge:
        # Thousands of mounts: the sums go without this worker's backend
        # calls rather than without the worker.
        board.publish(worker, {**figures, "backends": {}})
    return figures


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of several workers' snapshots (``max_seconds``: the largest)."""
    total: dict[str, Any] = {"sweeper_busy": 0, "sweeper_dropped_claims": 0, "backends": {}}
    for figures in snapshots:
        total["sweeper_busy"] += figures["sweeper_busy"]
        total["sweeper_dropped_claims"] += figures["sweeper_dropped_claims"]
        for mount, ops in figures["backends"].items():
            into = total["backends"].setdefault(mount, {})
            for op, s in ops.items():
                acc = into.setdefault(op, {"calls": 0, "errors": 0, "total_seconds": 0.0,
                                           "max_seconds": 0.0})
                acc["calls"] += s["calls"]
                acc["errors"] += s["errors"]
                acc["total_seconds"] += s["total_seconds"]
                acc["max_seconds"] = max(acc["max_seconds"], s["max_seconds"])
    return total
