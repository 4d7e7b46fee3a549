"""Batched, durable recording of successful revocations (``finish_revoke_many``).

The sweeper's workers call the backend; once a ``delete_user`` has returned,
the lease's ending is recorded here, many at a time, so one commit carries
the endings of many leases (see :class:`EndingRecorder`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

from broker.lease import LeaseState
from broker.store.base import LeaseStore

__all__ = ["RECORD_BATCH", "RECORD_WRITES", "EndingRecorder"]

#: Most endings one ``finish_revoke_many`` write carries.
RECORD_BATCH = 256
#: Most ``finish_revoke_many`` writes in flight at once.
RECORD_WRITES = 4

_Batch = tuple[list[tuple[str, LeaseState]], "asyncio.Future[Exception | None]"]


class EndingRecorder:
    """Records the endings of successful revocations in batches.

    A sweeper worker's slot limits backend calls only; once ``delete_user`` has
    returned, the ending waits here and the slot goes to the next lease. The
    endings that arrive in one loop turn are written together with one
    ``finish_revoke_many`` (one statement, one commit), up to ``RECORD_BATCH``
    per write and ``RECORD_WRITES`` writes in flight; while all are busy the
    next batch gathers, so under load batches grow and when idle an ending
    waits one commit. Why not fewer, bigger writes: the time between a
    backend's delete and its durable ending is the window in which a crash
    makes another replica revoke the lease a second time, so an ending should
    not wait behind another batch's commit.

    ``record`` returns only once the ending is durable, so a waiter told
    "done" never sees it undone. A crash before that leaves the lease claimed
    in the store; it is revoked again (idempotently) once the claim runs out.

    Endings are written as ``claimer`` (the node id): a lease whose claim ran
    out and was taken over by another replica meanwhile is left to that
    replica, which revokes it again (idempotently) and records its own outcome.
    The credential is gone either way, so "done" is still the truth here.
    """

    def __init__(self, store: LeaseStore, clock: Callable[[], float],
                 claimer: str | None = None) -> None:
        self._store = store
        self._clock = clock
        self._claimer = claimer
        #: batches not yet being written: (endings, outcome: None or the write's error).
        self._open: deque[_Batch] = deque()
        self._writes: set[asyncio.Task[None]] = set()
        self._kick_scheduled = False

    async def record(self, lease_id: str, state: LeaseState) -> Exception | None:
        """Queue one ending; returns once it is committed (None) or the write failed."""
        loop = asyncio.get_running_loop()
        if not self._open or len(self._open[-1][0]) >= RECORD_BATCH:
            self._open.append(([], loop.create_future()))
        endings, outcome = self._open[-1]
        endings.append((lease_id, state))
        if not self._kick_scheduled:
            # After this loop turn: endings completing together share a write.
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        # shield: a cancelled waiter (shutdown past its grace) leaves the write to finish.
        return await asyncio.shield(outcome)

    async def record_many(self, endings: Sequence[tuple[str, LeaseState]]
                          ) -> list[Exception | None]:
        """``record`` for several endings at once (a batch revocation): one outcome each.

        The endings join the open write like single ones (spilling into the
        next when it is full), so a batch waits for at most two commits.
        """
        loop = asyncio.get_running_loop()
        # (write's outcome, how many of our endings it carries), in order.
        parts: list[tuple[asyncio.Future[Exception | None], int]] = []
        for ending in endings:
            if not self._open or len(self._open[-1][0]) >= RECORD_BATCH:
                self._open.append(([], loop.create_future()))
            batch, outcome = self._open[-1]
            batch.append(ending)
            if parts and parts[-1][0] is outcome:
                parts[-1] = (outcome, parts[-1][1] + 1)
            else:
                parts.append((outcome, 1))
        if parts and not self._kick_scheduled:
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        results: list[Exception | None] = []
        for outcome, count in parts:
            results += [await asyncio.shield(outcome)] * count
        return results

    def _kick(self) -> None:
        self._kick_scheduled = False
        while self._open and len(self._writes) < RECORD_WRITES:
            task = asyncio.create_task(self._write(self._open.popleft()),
                                       name="broker-record-endings")
            self._writes.add(task)

    async def _write(self, batch: _Batch) -> None:
        endings, outcome = batch
        error: Exception | None = RuntimeError("recording interrupted")
        try:
            await self._store.finish_revoke_many(endings, now=self._clock(),
                                                 claimer=self._claimer)
            error = None
        except Exception as exc:
            error = exc
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._writes.discard(task)
            if not outcome.done():
                outcome.set_result(error)
            self._kick()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued ending has been written (or has failed).

        False if ``timeout`` ran out first. The leases whose endings were not
        written stay claimed in the store and are revoked again (idempotently)
        once the claim runs out: at-least-once, never lost.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._open or self._writes:
            self._kick()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(set(self._writes), timeout=left)
        return True
