"""The expiry sweeper: event-driven, store-driven, bounded, fair across mounts.

It keeps no per-lease timers. It asks the store for the earliest ``due_at``,
sleeps until then or until woken (a new lease expiring sooner, a revoke
queued), claims due leases in batches, and hands them to a bounded pool of
workers. Per-mount queues served round-robin, with a per-mount cap, keep one
slow or dead backend from starving the others.

Those caps bound backend calls only. A worker is handed a ``release``
callback and calls it once its backend call has returned; the slot then goes
to the next lease while the worker waits for its ending to be recorded (the
engine writes endings in batches, see ``broker.endings.EndingRecorder``). So a
mount's revocations are not limited to ``per_mount_workers`` per commit.

A mount whose backend revokes in batches (``batch_size(mount) > 1``, see
``broker.backend.BatchRevoker``) has up to that many queued leases handed to
one worker, one backend call for all of them; the caps then count batch calls.
A batch is one turn of its mount in the round-robin, so fairness across mounts
is kept. The claim check below is made for each lease of a batch.

A claim lasts ``claim_timeout``; after that another replica may take the
lease. So a queued lease is started only while its revocation can still finish
inside the claim (``backend_timeout`` before it runs out); one that waited too
long is dropped from the queue and claimed again later, by whichever replica
gets there first. Without that check, a replica behind on a slow backend would
revoke leases another replica had already taken over.

A replica claims only leases of the mounts it has (``mounts``): during a
rolling config change one replica may lack a mount the others have, and its
revocations of that mount's leases could only fail and burn their attempts.
Leases of a mount no one here has are left in the store; the sweeper says so
in the log once per mount (how many at start, how many due later on).

Of the mounts it has, it claims only those that are healthy (``ready``): a
revocation sent to a mount known to be down could only fail, using up one of
the lease's attempts, and against a backend that hangs it held a worker for
``backend_timeout``, each in turn, while leases of healthy mounts waited. The
unhealthy mount's due leases stay due in the store, no attempt counted, and
are claimed as soon as the mount is healthy again: while any mount is held
back the sweeper looks at their health (in memory) every ``_HELD_POLL``
seconds. It says so in the log once per outage, with how many are due, and
again when they resume; the mount's own outage lines say why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence

from broker.config import LeaseConfig
from broker.errors import StoreUnavailable
from broker.lease import Lease
from broker.store.base import FORCE_TAKEOVER, LeaseStore

__all__ = ["Sweeper"]

#: Carries out claimed revocations: (leases, release), release called once the
#: backend call is over.
Revoke = Callable[[Lease, Callable[[], None]], Awaitable[None]]
RevokeMany = Callable[[Sequence[Lease], Callable[[], None]], Awaitable[None]]

log = logging.getLogger(__name__)

#: When a claim comes back empty although something is due (another replica
#: is claiming it right now), wait at least this long before asking again;
#: doubled up to _IDLE_BACKOFF_MAX while it stays so. It stays so when this
#: replica's clock runs ahead of the store's: the store claims nothing before
#: it is due by its own clock (broker/store/postgres.py), and polling every
#: 50 ms for the whole lead would be two queries per 50 ms for nothing.
_IDLE_BACKOFF = 0.05
_IDLE_BACKOFF_MAX = 1.0
#: The longest the sweeper sleeps without looking at the store.
_MAX_SLEEP = 30.0
#: How often the sweeper looks for due leases of mounts it does not have (or that are
#: unhealthy).
_UNSERVED_CHECK = 60.0
#: While a mount's revocations are held back (unhealthy), how often the sweeper looks
#: whether it is healthy again: an in-memory check, no store query.
_HELD_POLL = 0.5
#: While a held-back mount has not been reported yet (none of its leases was due when
#: it was last looked at), how often its due leases are counted again: its line comes
#: as they fall due, not up to _UNSERVED_CHECK later.
_HELD_NOTE_CHECK = 2.0


class Sweeper:
    def __init__(
        self,
        store: LeaseStore,
        revoke: Revoke,
        config: LeaseConfig,
        *,
        node_id: str,
        clock: Callable[[], float] = time.time,
        revoke_many: RevokeMany | None = None,
        batch_size: Callable[[str], int] | None = None,
        mounts: Callable[[], Collection[str]] | None = None,
        ready: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.store = store
        self.revoke = revoke
        self.revoke_many = revoke_many
        #: per mount: most leases one backend call takes (1: one call per lease).
        self.batch_size = batch_size or _one
        self.config = config
        self.node_id = node_id
        self.clock = clock
        self._wakeup = asyncio.Event()
        #: per mount: (lease, when our claim on it runs out).
        self._queues: dict[str, deque[tuple[Lease, float]]] = {}
        #: per mount: backend calls in flight (the per-mount cap).
        self._inflight: dict[str, int] = {}
        #: backend calls in flight on all mounts (the global cap).
        self._calling = 0
        #: every worker, from its backend call until its ending is recorded.
        self._tasks: set[asyncio.Task[None]] = set()
        #: leases held by those workers (a batch worker holds several).
        self._working = 0
        self._rr: deque[str] = deque()
        self._next_wake: float | None = None
        self._stopping = False
        #: queued leases given up because their claim ran short (see module doc).
        self.dropped_claims = 0
        self._main: asyncio.Task[None] | None = None
        self._pump_soon = False
        #: the current wait after an empty claim of something due (see _IDLE_BACKOFF).
        self._idle_backoff = _IDLE_BACKOFF
        #: the mounts this replica has (None: claim every lease).
        self.mounts = mounts
        #: of those, the ones whose leases it revokes now: healthy (None: all of them).
        self.ready = ready
        #: mounts it has whose revocations wait for them to be healthy (see module doc).
        self._held: frozenset[str] = frozenset()
        #: of those, the ones whose waiting leases the log was told of.
        self._held_noted: set[str] = set()
        #: mounts whose due leases were reported as left for another replica.
        self._unserved_noted: set[str] = set()
        self._unserved_next = 0.0
        self._unserved_task: asyncio.Task[None] | None = None
        #: when to claim again for a forced revocation of a mount we lack (see wake).
        self._force_look: float | None = None

    # -- public ---------------------------------------------------------------
    def wake(self, at: float | None = None) -> None:
        """Something may be due earlier than planned (``at``), or right now (None)."""
        if self.mounts is not None and (at is None or at <= self.clock()):
            # A revoke was queued: if it is a forced one of a mount we lack, it is
            # ours to take once FORCE_TAKEOVER has passed; look again then.
            self._force_look = self.clock() + FORCE_TAKEOVER + 0.05
        if at is None or self._next_wake is None or at < self._next_wake:
            self._wakeup.set()

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name="broker-sweeper")
        if self.mounts is not None:
            # In the background: a count over the whole store, not worth a delay.
            self._unserved_task = asyncio.create_task(self._note_unserved_at_start(),
                                                      name="broker-sweeper-unserved")

    async def stop(self, grace: float) -> None:
        """Stop claiming; let in-flight revocations finish within ``grace``, then cancel.

        Leases still queued locally keep their claim in the store and become
        due again when it runs out, so nothing is lost.
        """
        self._stopping = True
        self._wakeup.set()
        if self._unserved_task is not None:
            self._unserved_task.cancel()
            await asyncio.gather(self._unserved_task, return_exceptions=True)
        if self._main is not None:
            await asyncio.gather(self._main, return_exceptions=True)
        self._queues.clear()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def busy(self) -> int:
        return self._working + sum(len(q) for q in self._queues.values())

    # -- loop -----------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                # The store said so once already ("lease store unreachable"): a
                # traceback a second while it is down would bury the log.
                log.debug("sweeper: %s; retrying in 1s", exc)
                await self._sleep(1.0)
            except Exception:
                # Never let the sweeper die.
                log.exception("sweeper iteration failed; retrying in 1s")
                await self._sleep(1.0)

    async def _tick(self) -> None:
        self._wakeup.clear()
        if self._force_look is not None and self.clock() >= self._force_look:
            self._force_look = None  # this tick's claim looks
        room = self.config.sweeper_batch * 2 - self.busy
        claimed: list[Lease] = []
        mounts = self._claimable()
        if mounts is not None and self.clock() >= self._unserved_next:
            await self._note_unserved(mounts)
        if room > 0:
            claimed_at = self.clock()
            claimed = await self.store.claim_due(
                now=claimed_at,
                limit=min(room, self.config.sweeper_batch),
                claimer=self.node_id,
                claim_timeout=self.config.claim_timeout,
                mounts=mounts,
            )
            for lease in claimed:
                self._enqueue(lease, claimed_at + self.config.claim_timeout)
            self._pump()
            if len(claimed) == min(room, self.config.sweeper_batch):
                await asyncio.sleep(0)  # more may be due: claim again, let workers run
                return
        due = await self.store.next_due(mounts=mounts)
        now = self.clock()
        if room <= 0:
            timeout: float | None = None  # full: a finishing worker wakes us
        elif due is None:
            timeout = None
        elif due <= now:
            timeout = 0.0 if claimed else self._idle_backoff
        else:
            timeout = due - now
        if due is not None and due <= now and not claimed and room > 0:
            self._idle_backoff = min(self._idle_backoff * 2, _IDLE_BACKOFF_MAX)
        else:
            self._idle_backoff = _IDLE_BACKOFF
        # Never sleep unbounded: with several replicas a wake-up can be lost (a
        # replica dying between its commit and its NOTIFY); a periodic look at
        # the store bounds how late such a lease can be.
        timeout = _MAX_SLEEP if timeout is None else min(timeout, _MAX_SLEEP)
        if self._held - self._held_noted:  # a held mount to report as its leases fall due
            timeout = max(0.0, min(timeout, self._unserved_next - now))
        if self._force_look is not None:
            timeout = max(0.0, min(timeout, self._force_look - now))
        self._next_wake = now + timeout
        await self._sleep(timeout)
        self._next_wake = None

    def _claimable(self) -> tuple[str, ...] | None:
        """The mounts whose due leases this tick claims (None: all); notes held-back
        mounts coming and going (see module doc)."""
        if self.mounts is None:
            return None
        have = frozenset(self.mounts())
        ready = have if self.ready is None else have & frozenset(self.ready())
        held = have - ready
        if held - self._held:
            self._unserved_next = 0.0  # newly held: count their due leases now
        for mount in sorted(self._held_noted - held):
            self._held_noted.discard(mount)
            if mount in have:
                log.info("mount %r is healthy again: revoking its due leases", mount)
        self._held = held
        return tuple(sorted(ready))

    async def _note_unserved(self, ready: Collection[str]) -> None:
        """Log, once per mount, due leases of mounts this replica does not have, and (once
        per outage) those of its mounts that wait for them to be healthy again."""
        now = self.clock()
        self._unserved_next = now + _UNSERVED_CHECK
        self._unserved_noted -= set(ready) | self._held  # configured again: news if gone
        due = await self.store.unserved_mounts(ready, due_by=now)
        for mount, count in sorted(due.items()):
            if mount in self._held:
                if mount not in self._held_noted:
                    self._held_noted.add(mount)
                    log.warning("%d due lease(s) of mount %r wait for it to be healthy again: "
                                "their revocations are not sent to it while it is unhealthy "
                                "(no attempt is counted); they go once it is back", count, mount)
                continue
            if mount not in self._unserved_noted:
                self._unserved_noted.add(mount)
                log.warning("%d due lease(s) of mount %r are left for a replica that has it: "
                            "the mount is not configured here (add it back, or end them with "
                            "sys/leases/revoke-force/%s/)", count, mount, mount)
        if self._held - self._held_noted:
            self._unserved_next = now + _HELD_NOTE_CHECK

    async def _note_unserved_at_start(self) -> None:
        """Log the live leases of mounts this replica does not have (once, at start)."""
        assert self.mounts is not None
        try:
            live = await self.store.unserved_mounts(tuple(self.mounts()))
        except Exception as exc:  # the due check will say it later
            log.debug("counting leases of unconfigured mounts failed: %s", exc)
            return
        for mount, count in sorted(live.items()):
            log.warning("mount %r is not configured on this replica but %d lease(s) of it are "
                        "live in the store; this replica does not revoke them (a replica that "
                        "has the mount does; or end them with sys/leases/revoke-force/%s/)",
                        mount, count, mount)

    async def _sleep(self, timeout: float | None) -> None:
        """Until woken or ``timeout``; sooner when a held-back mount is healthy again."""
        if timeout is not None and timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + timeout
        while True:
            step = None if until is None else until - loop.time()
            if self._held:
                step = _HELD_POLL if step is None else min(step, _HELD_POLL)
            if step is not None and step <= 0:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=step)
                return
            except TimeoutError:
                pass
            if until is not None and loop.time() >= until:
                return
            if self._held_ready():
                return

    def _held_ready(self) -> bool:
        """Whether a mount whose revocations are held back is healthy again."""
        return (self.ready is not None and bool(self._held)
                and not self._held.isdisjoint(self.ready()))

    # -- workers ----------------------------------------------------------------
    def adopt(self, lease: Lease, claim_ends: float) -> None:
        """Revoke a lease the caller claimed itself (``queue_revoke`` with a claim).

        It joins its mount's queue like a claimed lease, under the same caps, so
        an API revoke is carried out here rather than by whichever worker or
        replica polls first, and the request waiting for it hears the outcome.
        """
        if self._main is None or self._stopping:
            return  # not running: the claim runs out and the lease is claimed again
        self._enqueue(lease, claim_ends)
        if not self._pump_soon:
            # Once this loop iteration is over: revokes that were committed
            # together (one group commit) are adopted together and can share
            # one backend call, as a claim of them all would have.
            self._pump_soon = True
            asyncio.get_running_loop().call_soon(self._pump_adopted)

    def _pump_adopted(self) -> None:
        self._pump_soon = False
        if not self._stopping:
            self._pump()

    def _enqueue(self, lease: Lease, claim_ends: float) -> None:
        queue = self._queues.get(lease.mount)
        if queue is None:
            queue = self._queues[lease.mount] = deque()
            self._rr.append(lease.mount)
        queue.append((lease, claim_ends))

    def _pump(self) -> None:
        """Start workers round-robin over mounts, within the global and per-mount caps."""
        idle_rounds = 0
        while self._calling < self.config.revoke_workers and self._rr and idle_rounds < len(
            self._rr
        ):
            mount = self._rr[0]
            self._rr.rotate(-1)
            queue = self._queues.get(mount)
            if not queue:
                self._queues.pop(mount, None)
                self._rr.remove(mount)
                idle_rounds = 0
                continue
            if self._inflight.get(mount, 0) >= self.config.per_mount_workers:
                idle_rounds += 1
                continue
            idle_rounds = 0
            batch = self._take(queue, self.batch_size(mount) if self.revoke_many else 1)
            if not batch:
                continue  # every lease taken had waited past its claim
            self._inflight[mount] = self._inflight.get(mount, 0) + 1
            self._calling += 1
            self._working += len(batch)
            task = asyncio.create_task(self._work(mount, batch),
                                       name=f"revoke {batch[0].id} (+{len(batch) - 1})")
            self._tasks.add(task)

    def _take(self, queue: deque[tuple[Lease, float]], most: int) -> list[Lease]:
        """Up to ``most`` leases off ``queue`` whose revocation still fits in their claim."""
        batch: list[Lease] = []
        deadline = self.clock() + self.config.backend_timeout
        while queue and len(batch) < most:
            lease, claim_ends = queue.popleft()
            if deadline >= claim_ends:
                # Too late to finish inside our claim: leave it to the next claim.
                self.dropped_claims += 1
                log.debug("lease %s waited past its claim; left for a new claim", lease.id)
                continue
            batch.append(lease)
        return batch

    def _releaser(self, mount: str) -> Callable[[], None]:
        """The worker's ``release``: its backend call is over, the slots go to the next."""
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._inflight[mount] -= 1
            self._calling -= 1
            if not self._stopping:
                self._pump()

        return release

    async def _work(self, mount: str, batch: list[Lease]) -> None:
        release = self._releaser(mount)
        try:
            if len(batch) == 1:
                await self.revoke(batch[0], release)
            else:
                assert self.revoke_many is not None
                await self.revoke_many(batch, release)
        finally:
            release()  # a revoke that returned or failed without calling it
            self._working -= len(batch)
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
            if not self._stopping:
                self._wakeup.set()  # room to claim more


def _one(_mount: str) -> int:
    return 1
