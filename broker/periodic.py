"""Periodic jobs as plain asyncio tasks: one loop per job, on the broker's event loop.

The broker used APScheduler's ``AsyncIOScheduler`` for this. Each of its
wake-ups costs ~0.5 ms of CPU (job stores, triggers, executors and events
for what is one coroutine call here), and A/B runs of pg-issue at c=1 read
0.03-0.06 x raw lower with one more 1-second job on it, against no change
with the same job as a plain loop (docs/performance.md, eleventh session).

Each job keeps APScheduler's semantics as the broker configured them: the
first run one interval after the start, then every interval measured from
the previous run's start (a fixed rate); a run still going when the next is
due delays it, never doubles it (``max_instances = 1``), and runs missed
meanwhile collapse into one (``coalesce``). :meth:`Periodic.shutdown` stops
the loops; a run under way is left to finish, as APScheduler's ``shutdown(wait=False)`` did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from broker.errors import StoreUnavailable

__all__ = ["Periodic"]

log = logging.getLogger(__name__)


class Periodic:
    """A set of named coroutine functions, each called every ``seconds``."""

    def __init__(self) -> None:
        self._jobs: list[tuple[str, Callable[[], Awaitable[None]], float]] = []
        self._loops: set[asyncio.Task[None]] = set()
        #: runs under way; held here because the loop keeps only weak references.
        self._runs: set[asyncio.Task[None]] = set()

    def add(self, name: str, fn: Callable[[], Awaitable[None]], seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"job {name!r}: interval must be positive, got {seconds}")
        self._jobs.append((name, fn, seconds))

    def start(self) -> None:
        for name, fn, seconds in self._jobs:
            task = asyncio.ensure_future(self._loop(name, fn, seconds))
            task.set_name(f"periodic {name}")
            self._loops.add(task)

    async def _loop(self, name: str, fn: Callable[[], Awaitable[None]], seconds: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + seconds
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            run = asyncio.ensure_future(fn())
            self._runs.add(run)
            run.add_done_callback(self._runs.discard)
            try:
                # Shielded: stopping the loop (shutdown) leaves this run to finish.
                await asyncio.shield(run)
            except StoreUnavailable as exc:  # logged once by the store; one line here
                log.warning("periodic job %s: %s; it runs again at its next interval",
                            name, exc)
            except Exception:  # the job's own failure must not end its schedule
                log.exception("periodic job %s failed; it runs again at its next interval",
                              name)
            due += seconds
            now = loop.time()
            if due <= now:  # overran: the runs missed meanwhile collapse into the next one
                due = now + (seconds - (now - due) % seconds)

    def shutdown(self) -> None:
        """Stop every loop; a run under way finishes on its own."""
        for task in self._loops:
            task.cancel()
        self._loops.clear()
