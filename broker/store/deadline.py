"""One lease-store budget per HTTP request.

A store's ``command_timeout`` promises a client its 503 within that time when
the store stalls (a primary waiting for a lost synchronous standby, a hung
disk, a lock nobody lets go). A request makes several store calls (the token,
the intent, the activation, a rollback's delete), and when each waited its own
full timeout the client heard after two or three of them, past hvac's 30 s.
So every store call made on behalf of one request draws on one budget: the
store's ``command_timeout``, less what the request's earlier store calls took.
Once it is spent, the next call fails at once with the 503 a timeout gives.

Only time spent inside store calls counts, not the request's wall clock: a
request that first waits for a slow backend (a CREATE ROLE, up to the mount's
``backend_timeout``) must not then find its store budget gone. Store calls of
one request that overlap (:func:`joined` tasks) count once, as wall time.

The budget belongs to the task that entered :func:`request_budget` (the
request's handler). Tasks created meanwhile copy the context, and with it the
budget, but do not use it: a revocation worker, a rule's expansion or a batch
of endings that a request started serves others too and lives on after it,
so it keeps each call's full timeout. A task the request only runs its own
work in (a ``gather`` branch, a ``shield``-ed rollback) opts in with
:func:`joined`.

The PostgreSQL store bounds every call by the budget (pg_guard.py), the
SQLite store its writes (sqlite_writer.py). SQLite reads have no timeout and
are not counted: a primary-key lookup runs on the event loop's own thread,
where nothing could interrupt it, and takes microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = ["Budget", "apart", "current_budget", "joined", "request_budget"]

T = TypeVar("T")


class Budget:
    """The store time one request has used: closed calls in ``spent``, plus the
    open interval while any of its calls is under way."""

    __slots__ = ("_busy", "_since", "joined", "owner", "spent")

    def __init__(self, owner: asyncio.Task[Any] | None) -> None:
        self.owner = owner
        #: tasks that run part of the request's own work (:func:`joined`).
        self.joined: set[asyncio.Task[Any]] = set()
        #: seconds spent in store calls that have ended (while none was under way).
        self.spent = 0.0
        self._busy = 0
        self._since = 0.0

    def left(self, timeout: float, now: float) -> float:
        """Seconds of ``timeout`` not yet used at ``now`` (<= 0: spent)."""
        return timeout - self.spent - (now - self._since if self._busy else 0.0)

    def begin(self, timeout: float, now: float) -> float:
        """A store call starts at ``now``: the seconds it may take (<= 0: none left).

        Every ``begin`` is paired with an :meth:`end`, even when nothing is left.
        """
        left = self.left(timeout, now)
        if not self._busy:
            self._since = now
        self._busy += 1
        return left

    def end(self, now: float) -> None:
        """A store call begun before has ended at ``now``: its time is spent."""
        self._busy -= 1
        if not self._busy:
            self.spent += now - self._since


_CURRENT: ContextVar[Budget | None] = ContextVar("broker_store_budget", default=None)


class request_budget:
    """Store calls the current task makes inside share one budget (the HTTP middleware).

    A class, not a ``@contextmanager`` generator: it is entered for every request.
    """

    __slots__ = ("_token",)

    def __enter__(self) -> Budget:
        budget = Budget(asyncio.current_task())
        self._token = _CURRENT.set(budget)
        return budget

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._token)


def current_budget() -> Budget | None:
    """The budget the running task's store calls draw on; None: each has its full timeout.

    None in a task the request created but did not join, whose context holds
    the request's budget all the same (contextvars are copied into new tasks).
    """
    budget = _CURRENT.get()
    if budget is None:
        return None
    task = asyncio.current_task()
    if task is budget.owner or task in budget.joined:
        return budget
    return None


def joined(aw: Awaitable[T]) -> Awaitable[T]:
    """``aw``, to run in a task of its own that still draws on the calling request's budget.

    For work the request waits for, e.g. ``asyncio.shield(joined(rollback()))``
    or a branch of ``gather``. The budget is taken here, in the caller's task,
    and only if that task may use it (the request's own, or one it joined): a
    task the request merely created cannot hand it on. Outside a request (or
    from such a task) it is ``aw`` unchanged.
    """
    budget = current_budget()
    if budget is None:
        return aw

    async def run() -> T:
        task = asyncio.current_task()
        if task is None or task is budget.owner:  # awaited directly, not in a task
            return await aw
        budget.joined.add(task)
        try:
            return await aw
        finally:
            budget.joined.discard(task)

    return run()


async def apart(aw: Awaitable[T]) -> T:
    """``aw`` with each store call's full timeout, whatever the request's budget has left.

    For clean-up that must not fail merely because the request's budget was spent by
    the very stall it cleans up after (a single-use JWT's record when its login
    failed): run in a task of its own that does not join the budget.
    """

    async def run() -> T:
        return await aw

    # Shielded: a request cancelled meanwhile (its client gone) must not cut the
    # clean-up short.
    return await asyncio.shield(asyncio.ensure_future(run()))
