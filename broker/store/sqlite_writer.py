"""The SQLite lease store's connections and threads, and its group-committing writer.

Writes from concurrent coroutines are batched: one writer task drains a queue
of write operations and runs each batch as one transaction on the writer's own
thread, so N concurrent issues cost one fsync instead of N. A call returns only
after the COMMIT holding its write (``synchronous=FULL``): a credential never
leaves before its lease row is on disk. Several processes on one file (broker
workers) take turns writing under an flock beside it (:class:`_WriteLock`).

Reads use other connections: under WAL they see only committed data and never
wait behind a writer's fsync. Primary-key point reads (a token by hash or
accessor, a lease by id; every API call makes one or two) run on the event
loop's own thread on a read-only connection: a page-cache lookup takes
microseconds, a hop to a thread and back costs far more. Scans (lists, counts,
due and stale leases) run on a reader thread. An in-memory database
(``sqlite:///:memory:``, for tests) cannot be shared, so there all reads go
through the writer connection, between batches.

We own the threads rather than go through aiosqlite: its one thread hop per
statement (~0.1 ms) would cap throughput far below a batch run in one hop.

This is the machinery that runs operations, not the operations: sqlite.py's
``SQLiteStore`` inherits :class:`SQLiteConnections` (so a call on the
issue/renew path is no deeper than before) and adds the SQL of every call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from broker.errors import StoreUnavailable
from broker.store.deadline import current_budget
from broker.store.sqlite_schema import connect

__all__ = ["DEFAULT_COMMAND_TIMEOUT", "Op", "SQLiteConnections"]

T = TypeVar("T")
#: One operation: run on a connection's own thread (a write: inside a batch's transaction).
Op = Callable[[sqlite3.Connection], T]

#: The store's logger, whichever of its modules logs: one name for one component.
log = logging.getLogger("broker.store.sqlite")

#: Primary result codes that mean the file cannot be written now (disk full,
#: I/O error, read-only or unopenable file, locked past busy_timeout), as
#: opposed to a statement the store got wrong.
_OUTAGE_CODES = frozenset({
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_PROTOCOL,
})

#: Most operations one transaction (and one fsync) carries.
_MAX_BATCH = 512

#: Seconds a write may wait for its commit before the call answers 503: the
#: disk stalled (a hung NFS mount, a dying device) or another process holds
#: the write lock and does not let go. The PostgreSQL store's default too.
#: In an HTTP request, all its writes share that much (broker/store/deadline.py).
DEFAULT_COMMAND_TIMEOUT = 15.0


class _Thread:
    """One sqlite3 connection living on its own thread, as sqlite3 objects must."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None

    async def start(self, connect: Callable[[], sqlite3.Connection]) -> None:
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._pool, connect)

    async def run(self, op: Op[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, op)

    def _call(self, op: Op[T]) -> T:
        if self._conn is None:
            raise RuntimeError("the SQLite lease store is closed")
        return op(self._conn)

    async def stop(self) -> None:
        def close(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        try:
            if self._conn is not None:
                await self.run(close)
        finally:
            # Nothing is queued any more: the thread ends at once, no need to wait for it.
            self._pool.shutdown(wait=False)


@dataclass
class _Write:
    op: Op[Any]
    fut: asyncio.Future[Any]


def _run_batch(ops: list[Op[Any]], conn: sqlite3.Connection) -> list[tuple[bool, Any]]:
    """Run ``ops`` in one transaction; each gets (ok, result-or-exception)."""
    conn.execute("BEGIN IMMEDIATE")
    out: list[tuple[bool, Any]] = []
    try:
        for op in ops:
            try:
                out.append((True, op(conn)))
            except Exception as exc:
                if not conn.in_transaction:  # SQLite gave up the whole transaction (I/O, full)
                    raise
                out.append((False, exc))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return out


class _WriteLock:
    """An flock(2) beside the database that every writing process takes for its transactions.

    SQLite makes a second writer wait by sleeping and retrying (1, 2, 5, 10 ...
    ms); with several broker workers on one file that turned every collision
    into milliseconds of idle wait (p99 64-148 ms, two workers: see
    docs/performance.md). A blocking flock hands the lock over the moment it
    is released. Taken in the writer thread, never on the event loop. Where
    flock does not exist (Windows) SQLite's own locking is all there is.
    """

    def __init__(self, db_path: str) -> None:
        self.path = db_path + "-writer.lock"
        self._fd = -1

    def open(self) -> None:
        # An in-memory database has one connection, so nobody to take turns with.
        if fcntl is not None and not self.path.startswith(":memory:"):
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def run(self, ops: list[Op[Any]], conn: sqlite3.Connection) -> list[tuple[bool, Any]]:
        """:func:`_run_batch` under the lock."""
        if self._fd < 0:  # no flock here (open() left it unset), or :memory:
            return _run_batch(ops, conn)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            return _run_batch(ops, conn)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


class SQLiteConnections:
    """Opens and closes the store's connections and runs operations on them:
    ``_write`` (group-committed), ``_read`` (the reader thread) and
    ``_point_read`` (the event loop's thread)."""

    def __init__(self, path: str, *, command_timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        self.path = path
        self.command_timeout = command_timeout
        self._writer: _Thread | None = None
        self._reader: _Thread | None = None
        self._write_lock = _WriteLock(path)
        # Point reads, on the event loop's thread (check_same_thread stays on:
        # only the thread that opened the store may use it).
        self._point: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._error: str | None = None

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        if self._writer_task is not None:
            raise RuntimeError("the SQLite lease store is already open")
        try:
            self._writer = _Thread("sqlite-writer")
            await self._writer.start(lambda: connect(self.path, writer=True))
            self._write_lock.open()
            if self.path == ":memory:":
                self._reader = self._writer
            else:
                self._reader = _Thread("sqlite-reader")
                await self._reader.start(lambda: connect(self.path, writer=False))
                self._point = connect(self.path, writer=False)
        except BaseException:
            await self._stop_threads()
            raise
        self._queue = asyncio.Queue()  # bound to this loop: a store may be reopened in another
        self._writer_task = asyncio.create_task(self._write_loop(), name="sqlite-writer")

    async def close(self) -> None:
        task, self._writer_task = self._writer_task, None
        if task is not None:
            self._queue.put_nowait(None)  # behind every queued write: they all finish first
            await task
        await self._stop_threads()

    async def _stop_threads(self) -> None:
        reader, writer = self._reader, self._writer
        self._reader = self._writer = None
        point, self._point = self._point, None
        if point is not None:
            point.close()
        if reader is not None and reader is not writer:
            await reader.stop()
        if writer is not None:
            await writer.stop()
        self._write_lock.close()

    # -- the write path: group commit ----------------------------------------
    async def _write(self, op: Op[T]) -> T:
        if self._writer_task is None:
            raise RuntimeError("the SQLite lease store is not open")
        loop = asyncio.get_running_loop()
        # In an HTTP request, what is left of its store budget (broker/store/deadline.py):
        # all the writes of one request answer within one command_timeout.
        budget = current_budget()
        limit = self.command_timeout
        if budget is not None:
            limit = budget.begin(limit, loop.time())
        try:
            if limit <= 0:  # spent by the request's earlier calls: not even queued, and
                # no outage of its own (the call that spent it said so if it was one)
                raise StoreUnavailable(f"lease store cannot write (no commit within "
                                       f"{self.command_timeout:g}s); retry later")
            fut: asyncio.Future[T] = loop.create_future()
            self._queue.put_nowait(_Write(op, fut))
            # One timer per write rather than wait_for, which on Python 3.11 adds a
            # second future and a loop pass to every write on the issue/renew path.
            timer = loop.call_later(limit, self._expire, fut)
            try:
                return await fut
            finally:
                timer.cancel()
        finally:
            if budget is not None:
                budget.end(loop.time())

    def _expire(self, fut: asyncio.Future[Any]) -> None:
        """A write not committed in time fails with 503.

        A write still queued is then skipped; one already in the running batch
        may yet commit, which every caller copes with (as with a PostgreSQL
        COMMIT whose answer was lost: a late intent is rolled back, a late
        activation revokes nothing, a late renewal only extends).
        """
        if not fut.done():
            fut.set_exception(self._outage(f"no commit within {self.command_timeout:g}s"))

    def _outage(self, reason: str) -> StoreUnavailable:
        """Remember ``reason`` for ``/v1/sys/health`` (until a write goes through); the 503."""
        if self._error is None:
            log.error("lease store %s cannot write: %s", self.path, reason)
        self._error = reason
        return StoreUnavailable(f"lease store cannot write ({reason}); retry later")

    @property
    def error(self) -> str | None:
        """Why the last write failed as a whole (disk full, I/O error), until one succeeds."""
        return self._error

    def _unavailable(self, exc: Exception) -> Exception:
        """A failed transaction as callers should hear of it.

        A full disk, an I/O error, a file that cannot be opened or written is
        the store being unavailable (HTTP 503 with SQLite's own words, e.g.
        "database or disk is full"), not a bug (500): remembered for
        ``/v1/sys/health`` until a write goes through again. Nothing of the
        batch was written, so no lease is half-recorded.
        """
        code = getattr(exc, "sqlite_errorcode", None)
        if not isinstance(exc, sqlite3.Error) or code is None or code & 0xFF not in _OUTAGE_CODES:
            return exc
        return self._outage(str(exc))

    async def _read(self, op: Op[T]) -> T:
        if self._reader is None:
            raise RuntimeError("the SQLite lease store is not open")
        return await self._reader.run(op)

    async def _point_read(self, op: Op[T]) -> T:
        """A primary-key lookup: on this thread's own connection, no thread hop."""
        if self._point is None:  # closed, or :memory: (only the writer sees its data)
            return await self._read(op)
        return op(self._point)

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Write] = []
            item = await self._queue.get()
            while True:
                if item is None:
                    stopping = True
                    break
                if not item.fut.done():  # the caller gave up (or timed out) before it ran
                    batch.append(item)
                if len(batch) >= _MAX_BATCH or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[_Write]) -> None:
        assert self._writer is not None
        ops = [w.op for w in batch]
        try:
            outcomes = await self._writer.run(lambda conn: self._write_lock.run(ops, conn))
        except Exception as exc:  # nothing of the batch is durable: every caller hears so
            outcomes = [(False, self._unavailable(exc))] * len(batch)
        else:
            if self._error is not None:
                log.warning("lease store %s: writing again", self.path)
                self._error = None
        for write, (ok, value) in zip(batch, outcomes, strict=True):
            if write.fut.done():
                continue
            if ok:
                write.fut.set_result(value)
            else:
                write.fut.set_exception(value)
