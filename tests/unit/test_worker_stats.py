"""The shared metrics board of ``[server] workers``: real shared memory, real forks."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest

from broker.worker_stats import SLOT_BYTES, SnapshotTooLarge, StatsBoard, merge


def _figures(calls: int, seconds: float, busy: int = 0) -> dict[str, Any]:
    return {"pid": 1, "started": 100.0, "sweeper_busy": busy, "sweeper_dropped_claims": 1,
            "backends": {"pg": {"new_user": {"calls": calls, "errors": 1,
                                             "total_seconds": seconds,
                                             "max_seconds": seconds / 2}}}}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork()")
def test_a_forked_worker_publishes_and_the_parent_reads_it() -> None:
    board = StatsBoard(2)
    try:
        assert board.snapshots() == {}
        pid = os.fork()
        if pid == 0:  # the "worker": publish twice, the second replaces the first
            code = 1
            try:
                board.publish(2, _figures(1, 0.5))
                board.publish(2, _figures(7, 2.0, busy=3))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert board.snapshots() == {2: _figures(7, 2.0, busy=3)}
        board.publish(1, _figures(2, 1.0))
        assert sorted(board.snapshots()) == [1, 2]
    finally:
        board.close()


def test_a_slot_being_written_is_not_read_half_done() -> None:
    board = StatsBoard(1)
    try:
        board.publish(1, _figures(1, 0.5))
        # A writer that stopped halfway (killed mid-publish): the sequence is odd.
        sequence, length = struct.unpack_from("<QI", board._map, 0)
        struct.pack_into("<QI", board._map, 0, sequence + 1, length)
        assert board.read(1) is None
        # The next publish (the restarted worker) makes the slot whole again.
        board.publish(1, _figures(5, 1.0))
        assert board.read(1) == _figures(5, 1.0)
    finally:
        board.close()


def test_a_snapshot_too_large_for_its_slot_is_refused_whole() -> None:
    board = StatsBoard(1)
    try:
        board.publish(1, _figures(1, 0.5))
        with pytest.raises(SnapshotTooLarge):
            board.publish(1, {"backends": {"x" * SLOT_BYTES: {}}})
        assert board.read(1) == _figures(1, 0.5)  # the last whole one stays
        with pytest.raises(ValueError, match="no worker 2"):
            board.publish(2, _figures(1, 0.5))
    finally:
        board.close()


def test_merge_adds_counts_and_keeps_the_longest_call() -> None:
    second = _figures(3, 4.0, busy=2)
    second["backends"]["my"] = {"delete_user": {"calls": 1, "errors": 0,
                                                "total_seconds": 0.1, "max_seconds": 0.1}}
    total = merge([_figures(2, 1.0, busy=1), second])
    assert total == {
        "sweeper_busy": 3, "sweeper_dropped_claims": 2,
        "backends": {
            "pg": {"new_user": {"calls": 5, "errors": 2, "total_seconds": 5.0,
                                "max_seconds": 2.0}},
            "my": {"delete_user": {"calls": 1, "errors": 0, "total_seconds": 0.1,
                                   "max_seconds": 0.1}},
        },
    }


def test_a_heartbeat_is_the_current_process_s_own() -> None:
    """The stall watchdog reads a beat only from the process now holding the slot."""
    board = StatsBoard(2)
    try:
        assert board.heartbeat(1, 4242) is None  # never published
        board.publish(1, {**_figures(1, 0.5), "pid": 4241, "beat": 10.0})
        assert board.heartbeat(1, 4242) is None  # a predecessor's beat, not this process's
        board.publish(1, {**_figures(1, 0.5), "pid": 4242, "beat": 12.5})
        assert board.heartbeat(1, 4242) == 12.5
        assert board.heartbeat(2, 4242) is None
    finally:
        board.close()
