"""The PostgreSQL lease store's pool, with a lost database reported as such.

When the store's database goes away (a primary restarting or failing over,
the network to it cut), every query fails with whatever asyncpg or the
socket raised: a refused connection, a connection closed mid-query, "the
database system is shutting down". Left alone, the API answered those as
500 "internal error"; they are an outage, not a bug: callers should retry,
and load balancers should send traffic to a replica that can still reach
the store. So this wrapper turns them into
:class:`broker.errors.StoreUnavailable` (HTTP 503) and remembers the last
one until a query succeeds again, for ``/v1/sys/health``.

Only connection-level failures are translated. A query the server rejected
(a constraint, a syntax error) is a bug or a conflict and keeps its type.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg

from broker.errors import StoreUnavailable

__all__ = ["GuardedPool"]

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


class GuardedPool:
    """``acquire``, ``execute``, ``fetch``, ``fetchrow``, ``fetchval`` of an asyncpg pool.

    ``error`` is the last connection failure, or None once a query went
    through after it (or before any failed).
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.error: str | None = None

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except _LOST as exc:
            # The type and the driver's text: neither carries the DSN or its password.
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if self.error is None:
                log.warning("lease store unreachable: %s", reason)
            self.error = reason
            raise StoreUnavailable(
                f"lease store unavailable ({type(exc).__name__}); retry later") from None
        if self.error is not None:
            log.warning("lease store reachable again")
            self.error = None

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        # Covers the queries run on the connection too: they raise through here.
        with self._guard():
            async with self._pool.acquire() as conn:
                yield conn

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        with self._guard():
            return await self._pool.execute(*args, **kwargs)

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        with self._guard():
            return await self._pool.fetch(*args, **kwargs)

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        with self._guard():
            return await self._pool.fetchrow(*args, **kwargs)

    async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
        with self._guard():
            return await self._pool.fetchval(*args, **kwargs)
