"""A PostgreSQL issue held open between its statements and its COMMIT (``stage_user``).

``PostgresBackend.stage_user`` runs the creation statements after a ``BEGIN``
and hands the engine a ``_StagedRole``, which holds that pooled connection
until the engine commits (once the lease's intent is durable) or aborts. A
COMMIT cut off with no known outcome reports the session's pid to the
backend (``_settle``), so the next revocation waits for it first. Apart from
``plugins.postgres`` so that module keeps to the backend itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass

import asyncpg

from broker.backend import BackendError, NewUserResponse
from plugins._pg_errors import _refused, _wrap


@dataclass(frozen=True)
class _Creation:
    """A creation transaction, rendered: what ``new_user`` and ``stage_user`` send."""

    statements: Sequence[str]
    #: every secret value in the statements, for redaction.
    secrets: Sequence[str]
    lock: bool
    custom: bool
    #: the statements commit as one transaction: a refused one made nothing.
    atomic: bool
    response: NewUserResponse


class _StagedRole:
    """A role created in an open transaction; its connection is held until commit or abort."""

    def __init__(self, pool: asyncpg.Pool, conn: asyncpg.Connection, response: NewUserResponse,
                 secret_values: Sequence[str | None], unsettled: Callable[[int], None], *,
                 atomic: bool) -> None:
        self.response = response
        self._atomic = atomic
        self._pool = pool
        self._conn: asyncpg.Connection | None = conn
        self._secrets = secret_values
        self._unsettled = unsettled
        # Read now: once the connection is lost, the pool lets go of it, and its
        # proxy answers nothing more (not even the pid).
        self._pid = conn.get_server_pid()

    async def commit(self) -> None:
        conn = self._take()
        error: BackendError | None = None
        try:
            await conn.execute("COMMIT")
        except asyncpg.PostgresError as exc:
            error = _wrap("new_user", exc, self._secrets,
                          created_nothing=self._atomic and _refused(exc))
            if _is_lost(conn):  # asyncpg's "closed in the middle of operation" (08003)
                self._cut_off(conn)
        except (asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            error = _wrap("new_user", exc, self._secrets)
            self._cut_off(conn)
        except BaseException:
            self._cut_off(conn)  # cancelled (the call's timeout, shutdown)
            await self._pool.release(conn)
            raise
        await self._pool.release(conn)
        if error is not None:
            raise error

    def _cut_off(self, conn: asyncpg.Connection) -> None:
        """Drop a connection whose COMMIT has no known outcome; revocations settle it first."""
        self._unsettled(self._pid)
        _drop(conn)

    async def abort(self) -> None:
        conn = self._take()
        try:
            await conn.execute("ROLLBACK")
        except Exception:
            _drop(conn)  # broken: a closed connection rolls its transaction back
        except BaseException:
            _drop(conn)  # cancelled: likewise, and the cancellation goes on
            await self._pool.release(conn)
            raise
        await self._pool.release(conn)

    def _take(self) -> asyncpg.Connection:
        """The held connection, once: commit and abort each end the stage."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("this staged role was already committed or aborted")
        return conn


def _drop(conn: asyncpg.Connection) -> None:
    """Terminate a pooled connection. A lost one needs nothing: the pool has let go of it
    already (asyncpg detaches it on connection loss), and its proxy would raise."""
    with suppress(asyncpg.InterfaceError):
        conn.terminate()


def _is_lost(conn: asyncpg.Connection) -> bool:
    """Whether a pooled connection was lost (closed, or already let go of by the pool)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True
