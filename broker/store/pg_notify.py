"""Cross-replica wake-ups for the PostgreSQL lease store: LISTEN/NOTIFY on ``broker_wake``.

A write that makes a lease due sooner (issue, revoke, force, requeue) must
wake the sweepers of the other replicas, which would otherwise sleep until
the next due time they knew of. :class:`Notifier` sends those NOTIFYs once the
write has committed, coalesced (its docstring says why not in the write's own
transaction); :class:`WakeListener` LISTENs on one dedicated connection per
store, outside the pool, and reconnects with backoff when it drops. This is
connection supervision and task plumbing rather than queries over leases,
so it lives apart from postgres.py, which only starts, signals and stops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

__all__ = ["WAKE_CHANNEL", "Notifier", "WakeListener"]

#: The store's logger, whichever of its modules logs: one name for one component.
log = logging.getLogger("broker.store.postgres")

#: The NOTIFY channel for cross-replica wake-ups. Payload: "<origin> <due time>".
WAKE_CHANNEL = "broker_wake"
#: Listener: how often an idle connection is checked, and the reconnect backoff.
_KEEPALIVE = 30.0
_RECONNECT_FIRST, _RECONNECT_MAX = 0.5, 30.0


class Notifier:
    """Sends this store's wake-ups: after the write's commit, coalesced.

    Why not NOTIFY inside the write's own transaction: PostgreSQL serialises
    the commits of every notifying transaction in the database on one lock,
    so a NOTIFY in each activate halves issue throughput here and makes every
    replica's issues queue behind one another. Instead at most one NOTIFY per
    store is in flight; signals arriving meanwhile are folded into the next one,
    which carries the earliest due time. It is sent only once the write has
    committed, so a woken replica always finds the row.
    """

    def __init__(self, origin: str) -> None:
        self._origin = origin
        self._pool: Any = None
        self._pending: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, pool: Any) -> None:
        self._pool = pool

    def signal(self, at: float) -> None:
        if self._pool is None:
            return
        self._pending = at if self._pending is None else min(self._pending, at)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._send(), name="pg-wake-notify")

    async def _send(self) -> None:
        while self._pending is not None and self._pool is not None:
            at, self._pending = self._pending, None
            try:
                await self._pool.execute("SELECT pg_notify($1, $2)", WAKE_CHANNEL,
                                         f"{self._origin} {at!r}")
            except Exception as exc:
                # Only a delay: other replicas find the lease when they next look.
                log.warning("could not send a lease store wake-up (%s: %s)",
                            type(exc).__name__, exc)

    async def stop(self) -> None:
        """Send what is still pending (briefly), then stop."""
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._pool = None
        self._task = None


class WakeListener:
    """LISTENs on one dedicated connection, and keeps it alive.

    A dropped connection is found by asyncpg's termination callback or by a
    periodic ping; it is reconnected with exponential backoff, and every
    callback then gets ``None``: notifications sent meanwhile are lost.
    """

    def __init__(
        self,
        dsn: str,
        settings: dict[str, str],
        origin: str,
        callbacks: list[Callable[[float | None], None]],
        *,
        keepalive: float = _KEEPALIVE,
    ) -> None:
        self._dsn = dsn
        self._settings = settings
        self._origin = origin
        self._callbacks = callbacks
        self._keepalive = keepalive
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: how many times the connection was re-established (for tests and metrics).
        self.reconnects = 0

    @property
    def backend_pid(self) -> int | None:
        conn = self._conn
        return None if conn is None or conn.is_closed() else int(conn.get_server_pid())

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._supervise(), name="pg-wake-listener")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._drop()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._dsn, server_settings=self._settings)
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(WAKE_CHANNEL, self._on_notify)
        except BaseException:
            await conn.close()
            raise
        self._conn, self._lost = conn, lost

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=5)
            except Exception:
                conn.terminate()

    async def _supervise(self) -> None:
        while True:
            await self._until_lost()
            await self._drop()
            log.warning("lease store wake-up listener lost its connection; reconnecting")
            delay = _RECONNECT_FIRST
            while True:
                try:
                    await self._connect()
                    break
                except Exception as exc:  # the server may be down for a while: keep trying
                    log.warning("lease store wake-up listener cannot reconnect (%s: %s); "
                                "retrying in %.1fs", type(exc).__name__, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX)
            self.reconnects += 1
            log.info("lease store wake-up listener reconnected")
            self._fire(None)  # a notification may have been sent while we were away

    async def _until_lost(self) -> None:
        """Return once the connection is gone: closed by the server, or not answering."""
        while not self._lost.is_set():
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=self._keepalive)
            except TimeoutError:
                try:
                    # A half-open TCP connection (peer gone, no RST) only shows on use.
                    await self._conn.execute("SELECT 1", timeout=10)
                except Exception:
                    return

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, due = payload.partition(" ")
        if origin == self._origin:
            return  # our own write: the caller woke its sweeper already
        try:
            at: float | None = float(due)
        except ValueError:
            at = None
        self._fire(at)

    def _fire(self, at: float | None) -> None:
        for callback in list(self._callbacks):
            try:
                callback(at)
            except Exception:
                log.exception("lease store wake-up listener callback failed")
