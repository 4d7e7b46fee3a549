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
import time
from collections.abc import Awaitable, Callable

from broker.errors import StoreUnavailable

__all__ = ["OUTAGE_REPEAT", "Periodic", "StoreOutage"]

log = logging.getLogger(__name__)

#: Seconds between the log lines that say a store outage still lasts.
OUTAGE_REPEAT = 60.0


class StoreOutage:
    """The log's account of a lease-store outage: the one voice that tells of it.

    Every job that touches the store fails while it is down, each at its own
    interval: one line (or, before, a traceback) per failed run buried the log
    (day-2 QA). Instead: one WARNING with the error when the outage starts, one
    every ``repeat`` seconds while it lasts (saying for how long), and one INFO
    when it ends. The periodic jobs report here (:meth:`failed`, :meth:`reached`),
    and so does a store that watches its own connection (the PostgreSQL store's
    pool, broker/store/pg_guard.py: :meth:`lost`, :meth:`back`), which meets an
    outage first, on a request, and knows when writes commit again; it logs no
    start or end line of its own while it reports here (two voices said each
    twice). The end is said when a job goes through and the store agrees: a
    connection that flaps as it goes down (a query through, the next one lost)
    would otherwise read as an outage, its end and a new one within a second.
    """

    def __init__(self, *, repeat: float = OUTAGE_REPEAT,
                 clock: Callable[[], float] = time.monotonic,
                 reason: Callable[[], str | None] | None = None,
                 settled: Callable[[], bool] | None = None) -> None:
        self.repeat = repeat
        self.clock = clock
        #: the store's own word for what is wrong (``LeaseStore.error``), if it has one.
        self.reason = reason
        #: whether the store itself says it works again (``LeaseStore.error is None``):
        #: a job that only reads must not end an outage in which writes still fail.
        self.settled = settled
        #: when the outage began (None: the store is reachable, as far as we know).
        self.since: float | None = None
        self._said = 0.0
        #: the store said a write commits again during this outage (after a timeout).
        self._commits = False

    def failed(self, job: str, exc: StoreUnavailable) -> None:
        """Job ``job`` could not reach the store."""
        why = (self.reason() if self.reason is not None else None) or str(exc)
        self._lost(why, f"periodic job {job}")

    def lost(self, reason: str) -> None:
        """The store's own call failed: ``reason`` (its type and the driver's words)."""
        self._lost(reason, "lease store")

    def _lost(self, why: str, who: str) -> None:
        now = self.clock()
        if self.since is None:
            self.since = self._said = now
            log.warning("lease store unreachable (%s): the periodic jobs try again at their "
                        "intervals; said again every %gs while it lasts", why, self.repeat)
        elif now - self._said >= self.repeat:
            self._said = now
            log.warning("lease store still unreachable after %.0fs (%s)", now - self.since, why)
        else:
            log.debug("%s: %s", who, why)

    def reached(self) -> None:
        """A job that uses the store ran through: an outage, if any, is over, once the
        store itself agrees (``settled``)."""
        if self.since is not None and (self.settled is None or self.settled()):
            note = " (a write commits again)" if self._commits else ""
            log.info("lease store reachable again after %.0fs%s", self.clock() - self.since,
                     note)
            self.since, self._commits = None, False

    def back(self, *, commits: bool = False) -> None:
        """The store works again, says the store; ``commits``: after a timeout, a write
        probe committed (reads may have gone through all along). The end line waits
        for a job to go through (:meth:`reached`), and then says so."""
        if self.since is not None and commits:
            self._commits = True


class Periodic:
    """A set of named coroutine functions, each called every ``seconds``."""

    def __init__(self, *, outage: StoreOutage | None = None) -> None:
        self._jobs: list[tuple[str, Callable[[], Awaitable[None]], float, bool]] = []
        #: what the jobs' store failures and recoveries tell the log.
        self.outage = outage or StoreOutage()
        self._loops: set[asyncio.Task[None]] = set()
        #: runs under way; held here because the loop keeps only weak references.
        self._runs: set[asyncio.Task[None]] = set()

    def add(self, name: str, fn: Callable[[], Awaitable[None]], seconds: float, *,
            uses_store: bool = True) -> None:
        """Run ``fn`` every ``seconds``. ``uses_store``: every run queries the lease store,
        so one that runs through says the store is reachable (see :class:`StoreOutage`)."""
        if seconds <= 0:
            raise ValueError(f"job {name!r}: interval must be positive, got {seconds}")
        self._jobs.append((name, fn, seconds, uses_store))

    def start(self) -> None:
        for name, fn, seconds, uses_store in self._jobs:
            task = asyncio.ensure_future(self._loop(name, fn, seconds, uses_store))
            task.set_name(f"periodic {name}")
            self._loops.add(task)

    async def _loop(self, name: str, fn: Callable[[], Awaitable[None]], seconds: float,
                    uses_store: bool) -> None:
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
            except StoreUnavailable as exc:  # an outage, not a bug: no traceback
                self.outage.failed(name, exc)
            except Exception:  # the job's own failure must not end its schedule
                log.exception("periodic job %s failed; it runs again at its next interval",
                              name)
            else:
                if uses_store:
                    self.outage.reached()
            due += seconds
            now = loop.time()
            if due <= now:  # overran: the runs missed meanwhile collapse into the next one
                due = now + (seconds - (now - due) % seconds)

    def shutdown(self) -> None:
        """Stop every loop; a run under way goes on (see :meth:`finish`)."""
        for task in self._loops:
            task.cancel()
        self._loops.clear()

    async def finish(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the runs under way, then cancel the rest and
        wait for them to unwind (as long again at most). Call after :meth:`shutdown`,
        before the store and mounts close under the runs.

        A run left pending when the event loop closes is destroyed, not cancelled: a
        connection it was opening (a password-file check against a hung backend, a
        store query while the store is down) never runs its clean-up, and its socket
        stays open (a ResourceWarning at exit).
        """
        runs = set(self._runs)
        if not runs:
            return
        _, pending = await asyncio.wait(runs, timeout=grace)
        if pending:
            log.info("shutting down: cancelling %d periodic job run(s) still under way",
                     len(pending))
            for run in pending:
                run.cancel()
            await asyncio.wait(pending, timeout=grace)
        for run in runs:
            # The loops that would have logged their failures are gone: collected here,
            # so none is reported as "never retrieved".
            if run.done() and not run.cancelled():
                run.exception()
