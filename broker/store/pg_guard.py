"""The PostgreSQL lease store's pool, with a lost database reported as such.

When the store's database goes away (a primary restarting or failing over,
the network to it cut), every query fails with whatever asyncpg or the
socket raised: a refused connection, a connection closed mid-query, "the
database system is shutting down". Left alone, the API answered those as
500 "internal error"; they are an outage, not a bug: callers should retry,
and load balancers should send traffic to a replica that can still reach
the store. So this wrapper turns them into
:class:`broker.errors.StoreUnavailable` (HTTP 503) and remembers the last
one for ``/v1/sys/health``: until any query succeeds again after a lost
connection, and until a commit goes through after a timeout. A server that
stopped answering in time may still answer reads: a primary left waiting
for a synchronous standby that is gone serves every SELECT and never
finishes a COMMIT, so after a timeout a probe commits a transaction id
every second until one goes through. The probe's transaction first takes the
lock every write on ``leases`` and ``tokens`` takes: with only those tables
locked (``LOCK TABLE leases IN ACCESS EXCLUSIVE MODE`` in another session) a
bare commit went through while every request timed out, and health flapped.

A call's ``timeout`` (the store's ``command_timeout``) covers the wait for a
pooled connection as well as the statement: asyncpg's own timeout starts only
once a connection is in hand, so when the database stops finishing statements
every connection is busy until its own timeout and the callers queued behind
them answered after two, three... timeouts, long after a client such as hvac
had given up. A wait that uses up the budget is a TimeoutError like any other.
Inside an HTTP request a call has less: what is left of the request's store
budget (broker/store/deadline.py), so that all the store calls of one request
answer within one ``command_timeout``, not one each; a call on
:meth:`GuardedPool.acquire` is then bounded as a whole, its statements included.

Only connection-level failures are translated. A query the server rejected
(a constraint, a syntax error) is a bug or a conflict and keeps its type.

The log: a serving broker's periodic jobs attach their
:class:`broker.periodic.StoreOutage` as ``outage``. The pool then tells it of
every failure (it logs the start with the reason, then once a minute; the end
once a job goes through and ``error`` is clear) and that a write commits again
after a timeout (the end line says so), and writes no line of its own: both
wrote a start and an end line for each outage (day-2 QA). Without one (a CLI
command on the store), the pool says the start and the end itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol

import asyncpg

from broker.errors import StoreUnavailable
from broker.store.deadline import Budget, current_budget

__all__ = ["GuardedPool", "OutageLog"]

log = logging.getLogger(__name__)

#: What a lost or refused database looks like from the client side.
_LOST = (
    OSError,  # refused, reset, unreachable
    TimeoutError,  # command_timeout: the server stopped answering
    asyncpg.ConnectionDoesNotExistError,  # closed in the middle of a query
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57P01 admin shutdown, 57P03 starting up
    asyncpg.exceptions.InsufficientResourcesError,  # 53xxx: disk full, too many connections
)


#: A transaction that writes nothing but still commits: taking a transaction id
#: makes PostgreSQL write a commit record, which waits for the disk and for
#: synchronous standbys like any lease write.
_COMMIT_PROBE = "SELECT txid_current()"
#: The same, first taking the lock every lease or token write takes (ROW EXCLUSIVE,
#: what an INSERT, UPDATE or DELETE takes, and held only to the commit): it waits for
#: whatever stalls the requests' writes and reads on those tables (a LOCK TABLE in
#: ACCESS EXCLUSIVE, EXCLUSIVE or SHARE mode, a migration, a non-concurrent CREATE
#: INDEX), where the commit alone went through and health flapped between
#: "unreachable" and "reachable again" while every issue, renewal and revocation timed
#: out. It conflicts with no request: ROW EXCLUSIVE does not conflict with itself.
_WRITE_PROBE = f"LOCK TABLE leases, tokens IN ROW EXCLUSIVE MODE; {_COMMIT_PROBE}"


class OutageLog(Protocol):
    """What the pool tells of an outage (``broker.periodic.StoreOutage``)."""

    def lost(self, reason: str) -> None: ...

    def back(self, *, commits: bool = False) -> None: ...


def _reason(exc: BaseException) -> str:
    # The type and the driver's text: neither carries the DSN or its password.
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _spent() -> StoreUnavailable:
    """A request's store budget spent by its earlier calls: its 503, with nothing tried.

    Not an outage of its own: the call that used the budget up was one (or was slow),
    and said so; a budget spent by slow but successful calls must not flip health.
    """
    return StoreUnavailable("lease store unavailable (this request's store time is spent: "
                            "TimeoutError); retry later")


def _closed() -> StoreUnavailable:
    """A call whose connection was still being opened when the store closed."""
    return StoreUnavailable("lease store unavailable (closed while this call waited for a "
                            "connection); retry later")


class GuardedPool:
    """``acquire``, ``execute``, ``fetch``, ``fetchrow``, ``fetchval`` of an asyncpg pool.

    ``error`` is the last connection failure, or None once the store works
    again (or before any failed): after a lost connection, once any query
    went through; after a timeout, once the write probe committed.
    """

    def __init__(self, pool: Any, *, probe_interval: float = 1.0,
                 timeout: float | None = None) -> None:
        self._pool = pool
        self._probe_interval = probe_interval
        #: seconds a call may take, waiting for a connection included (None: no limit).
        self._timeout = timeout
        self._probe: asyncio.Task[None] | None = None
        #: acquires under way that may open a connection (:meth:`_acquire_within`), and the
        #: releases of connections they brought after their callers gave up: close()
        #: ends both before the pool, so that none is left running on the loop.
        self._connecting: set[asyncio.Task[Any]] = set()
        self._releasing: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.error: str | None = None
        #: where outages are told (the periodic jobs' StoreOutage); None: this pool says them.
        self.outage: OutageLog | None = None

    def _lost(self, reason: str) -> None:
        first = self.error is None
        self.error = reason
        if self.outage is not None:
            self.outage.lost(reason)
        elif first:
            log.warning("lease store unreachable: %s", reason)

    def _back(self, *, commits: bool) -> None:
        self.error = None
        if self.outage is not None:
            self.outage.back(commits=commits)
        else:
            log.warning("lease store writing again" if commits else "lease store reachable again")

    @contextmanager
    def _guard(self, limit: float | None = None) -> Iterator[None]:
        """``limit``: the seconds the call had, when in a request. A timeout after less
        than half the store's timeout is the request's budget running out (its earlier
        calls were slow, and said so if they failed), not by itself an outage: the
        next request, with a budget of its own, tells. After more, it is one."""
        try:
            yield
        except TimeoutError as exc:
            if limit is not None and self._timeout is not None and limit < self._timeout / 2:
                raise _spent() from None
            self._lost(_reason(exc))
            self._start_probe()
            raise StoreUnavailable("lease store unavailable (TimeoutError); retry later") \
                from None
        except _LOST as exc:
            self._lost(_reason(exc))
            if isinstance(exc, TimeoutError):
                self._start_probe()
            raise StoreUnavailable(
                f"lease store unavailable ({type(exc).__name__}); retry later") from None
        if self.error is not None and self._probe is None:
            self._back(commits=False)

    def _start_probe(self) -> None:
        if self._probe is None and not self._closing:
            self._probe = asyncio.create_task(self._probe_writes(), name="lease store probe")

    async def _probe_writes(self) -> None:
        """Until a commit goes through on the tables requests use; then the store is
        healthy again."""
        probe = _WRITE_PROBE
        while True:
            await asyncio.sleep(self._probe_interval)
            try:
                await self._probe_once(probe)
            except _LOST as exc:
                self._lost(_reason(exc))
                continue
            except asyncpg.UndefinedTableError:
                # Not a lease store's database (a pool of a test or a tool): the
                # commit alone says whether writes go through.
                probe = _COMMIT_PROBE
                continue
            except Exception:  # not an outage: a bug in the probe must not wedge health
                log.exception("lease store write probe failed")
            break
        self._probe = None
        self._back(commits=True)

    async def _probe_once(self, probe: str) -> None:
        """``probe`` in one transaction (a multi-statement query is one), within the
        store's timeout: a lock it waits for must fail it as it fails a request, not
        hold it forever (there is none without one).

        The statement's own timeout (asyncpg cancels it on the server); opening a
        connection is bounded by asyncpg's connect timeout, and cut short by
        :meth:`close`, which cancels and awaits this task.
        """
        async with self._pool.acquire() as conn:
            await conn.execute(probe, timeout=self._timeout)

    async def close(self) -> None:
        """Stop the probe, end the connects still under way, then close the pool.

        asyncpg's ``Pool.close()`` waits for the connections in use, not for one
        being opened: a connect left running outlived the store, and when the loop
        then ended (a broker stopping) its socket was never closed, an unraisable
        ResourceWarning at some later garbage collection (test_store_failover, CI).
        A connect cancelled and awaited closes its socket (asyncpg does that on
        cancellation); awaiting it to the end could take its whole connect timeout.
        """
        self._closing = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        while self._connecting or self._releasing:
            for task in self._connecting:
                task.cancel()
            # Releases are not cancelled: asyncpg shields them, and each is short.
            await asyncio.gather(*self._connecting, *self._releasing, return_exceptions=True)
        await self._pool.close()

    async def _acquire_within(self, limit: float) -> Any:
        """``pool.acquire()`` within ``limit`` seconds, in a task of its own that the
        caller's timeout or cancellation does not cut short: a connection it brings
        after its caller gave up goes back to the pool instead of being thrown away
        half-made, for the next call to use. :meth:`close` cancels and awaits those
        still under way."""
        if self._closing:
            raise _closed()
        task = asyncio.ensure_future(self._pool.acquire())
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(task), limit)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                raise _closed() from None  # close() ended the connect, not our caller
            task.add_done_callback(self._give_back)
            raise
        except BaseException:
            task.add_done_callback(self._give_back)
            raise

    def _give_back(self, done: asyncio.Task[Any]) -> None:
        """Release the connection an acquire brought after its caller gave up."""
        if not done.cancelled() and done.exception() is None:
            release = asyncio.ensure_future(self._pool.release(done.result()))
            self._releasing.add(release)
            release.add_done_callback(self._releasing.discard)

    async def _get(self, limit: float | None) -> Any:
        """A pooled connection; the wait for one bounded by ``limit`` seconds.

        ``asyncio.timeout`` rather than asyncpg's ``acquire(timeout=)``, which wraps
        every acquire in ``wait_for`` (a task per store call: +17 to +28 % of the
        broker's CPU per call on this store in the bench) and then applies the
        timeout to the release too.
        """
        pool = self._pool
        if limit is None:
            return await pool.acquire()
        if pool.get_idle_size() == 0 and pool.get_size() < pool.get_max_size():
            # This acquire may open a connection: it is left to finish (a connection
            # it brings late goes back to the pool), in a task close() can end. (A
            # task only here: a busy pool at its size opens none.)
            return await self._acquire_within(limit)
        async with asyncio.timeout(limit):
            return await pool.acquire()

    def _begin(self, now: float) -> tuple[Budget | None, float | None]:
        """The request's store budget this call draws on (None: not in a request, or
        no timeout), and the seconds the call may take (None: no limit).

        With a budget, the call has begun on it: :meth:`Budget.end` must follow.
        """
        timeout = self._timeout
        if timeout is not None and (budget := current_budget()) is not None:
            return budget, budget.begin(timeout, now)
        return None, timeout

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        # Covers the queries run on the connection too: they raise through here.
        # Each of those has the connection's own command_timeout; in a request
        # the whole block also ends with what is left of the request's budget.
        loop = asyncio.get_running_loop()
        budget, left = self._begin(loop.time())
        if budget is None or left is None:
            with self._guard():
                conn = await self._get(left)
                try:
                    yield conn
                finally:
                    await self._pool.release(conn)
            return
        try:
            if left <= 0:
                raise _spent()
            with self._guard(left):
                started = loop.time()
                conn = await self._get(left)
                try:
                    async with asyncio.timeout(left - (loop.time() - started)):
                        yield conn
                finally:
                    await self._pool.release(conn)  # asyncpg shields the release
        finally:
            budget.end(loop.time())

    async def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One statement on a pooled connection, within one budget for both."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget, limit = self._begin(started)
        try:
            if limit is not None and limit <= 0:
                raise _spent()
            with self._guard(limit):
                conn = await self._get(limit)
                try:
                    if limit is not None and "timeout" not in kwargs:
                        left = limit - (loop.time() - started)
                        if left <= 0:
                            raise TimeoutError
                        kwargs = {**kwargs, "timeout": left}
                    return await getattr(conn, method)(*args, **kwargs)
                finally:
                    await self._pool.release(conn)
        finally:
            if budget is not None:
                budget.end(loop.time())

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call("execute", args, kwargs)

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call("fetch", args, kwargs)

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call("fetchrow", args, kwargs)

    async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call("fetchval", args, kwargs)
