"""Periodic housekeeping (broker/periodic.py); the expiry sweeper itself is event-driven.

- stale-pending rollback: issues interrupted by a crash or a lost backend call;
- irrevocable retry: one more try for leases that gave up;
- tombstone purge: dead leases past their retention, and the records of JWTs
  that logged in to ``single_use`` roles once they could not log in anyway;
- token expiry: mark expired tokens and queue their leases (belt and braces:
  leases are already capped at their token's expiry, except a periodic token's,
  which this job ends once the token lapses);
- mount health: reconnect unhealthy backends so issuing resumes by itself;
- password files: a mount whose ``password_file`` changed (rotate-root in
  another worker or replica, an operator, a secret manager) is rebuilt with
  the new secret once it verifies;
- revoke rules: expand rules whose replica died mid-way (its claim ran out) or
  whose expansion failed; a replica expands its own rules as soon as it makes them;
- worker metrics (``[server] workers > 1``): publish this worker's figures for
  the others' ``/v1/sys/metrics`` answers (broker/worker_stats.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg

from broker.audit import event
from broker.lease import TokenState
from broker.periodic import Periodic, StoreOutage
from broker.state import BrokerState
from broker.store.base import LeaseStore
from broker.store.postgres import PostgresStore
from broker.worker_stats import PUBLISH_INTERVAL, publish_own

__all__ = ["start_jobs"]

log = logging.getLogger(__name__)

#: How often unhealthy backends are retried and healthy ones verified.
HEALTH_INTERVAL = 10
#: How often ``password_file``s are read for a changed secret (a thread reads a few bytes).
PASSWORD_FILE_INTERVAL = 1
TOKEN_SWEEP_INTERVAL = 30
PURGE_INTERVAL = 3600
#: Rows one purge statement deletes (one store write each).
PURGE_BATCH = 10000
REVOKE_RULES_INTERVAL = 5
#: Jobs whose runs may not touch the lease store: their going through says nothing of it
#: (mount health queries it only when a mount recovers).
_STORELESS = frozenset({"mount health", "password files", "worker metrics"})
#: Seconds a used JWT's record outlives the JWT (exp + leeway): a replica whose clock
#: runs this much behind the purging one still finds the record, and refuses a replay.
USED_JWT_MARGIN = 600


async def purge_ended(store: LeaseStore, *, before: float, batch: int = PURGE_BATCH,
                      jwts_before: float | None = None) -> int:
    """Delete dead leases and ended tokens that ended before ``before`` (and, with
    ``jwts_before``, used-JWT records valid until before then), batch after batch
    until none is left (one batch an hour would fall behind a busy broker).
    Returns how many rows went."""
    total = 0
    purges = [(store.purge_tombstones, before), (store.purge_ended_tokens, before)]
    if jwts_before is not None:
        purges.append((store.purge_used_jwts, jwts_before))
    for purge_batch, cutoff in purges:
        while True:
            count = await purge_batch(before=cutoff, limit=batch)
            total += count
            if count < batch:
                break
    return total


def _reported(name: str, fn: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
    """``fn``, logging what it did (a count, a summary) when that is anything.

    A failure is logged by :class:`broker.periodic.Periodic`, which keeps the schedule.
    """
    async def job() -> None:
        result = await fn()
        if result:
            log.info("%s: %s", name, result)

    return job


#: Errors that say a database cannot be reached, not that something is broken.
_UNREACHABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError, asyncpg.exceptions.CannotConnectNowError)


class _OneLineWhenUnreachable(logging.Filter):
    """asyncpg's pools log "Failed to restore the pool connection floor; retrying" with a
    traceback at each retry while their server is down (1, 2, 4 ... 60 s apart). An
    unreachable server is an outage the store and the mounts already report: the
    error goes on the line, the traceback goes. Other errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, _UNREACHABLE):
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_pool_floor_retries() -> None:
    pool_log = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, _OneLineWhenUnreachable) for f in pool_log.filters):
        pool_log.addFilter(_OneLineWhenUnreachable())


def start_jobs(state: BrokerState) -> Periodic:
    cfg = state.config.leases
    engine, store = state.engine, state.store

    async def rollback() -> int:
        return await engine.rollback_stale_pending()

    async def retry_irrevocable() -> int:
        count = await store.requeue_irrevocable(now=engine.clock(), limit=1000)
        if count:
            engine.wake(None)
        return count

    async def purge() -> int:
        now = engine.clock()
        return await purge_ended(store, before=now - cfg.tombstone_retention,
                                 jwts_before=now - USED_JWT_MARGIN)

    #: used-up tokens still active at the last run (a request may be ending one now)
    spent_before: set[str] = set()

    async def expire_tokens() -> int:
        accessors = await store.expired_tokens(now=engine.clock(), limit=1000)
        await engine.end_tokens(accessors, state=TokenState.EXPIRED)
        # Backstop: a token whose last use was taken is revoked by that request as it
        # ends; one it could not revoke (a crash, an outage) would keep its leases
        # live. Ended here once seen in two runs, so a request still running is not
        # raced.
        spent = set(await store.spent_tokens(limit=1000))
        overdue = sorted(spent & spent_before)
        spent_before.clear()
        spent_before.update(spent - set(overdue))
        if overdue:
            log.warning("ending %d used-up token(s) the request that took their last use "
                        "did not end", len(overdue))
            for accessor in overdue:  # one each: the line names the token, as the request's
                tokens, leases = await engine.end_tokens([accessor], state=TokenState.REVOKED)
                await engine.audit.write(event("token_revoke", target=accessor,
                                               reason="num_uses", action="spent_backstop",
                                               tokens=tokens, leases_queued=leases))
        return len(accessors) + len(overdue)

    outage = StoreOutage(reason=lambda: store.error, settled=lambda: store.error is None)
    if isinstance(store, PostgresStore):
        # Its pool meets an outage first (on a request) and knows when writes commit
        # again: it tells this one, the log's one voice, instead of logging its own.
        store.pool.outage = outage
    scheduler = Periodic(outage=outage)
    jobs: list[tuple[str, Callable[[], Awaitable[object]], float]] = [
        ("stale-pending rollback", rollback, max(5, cfg.pending_timeout // 2)),
        ("irrevocable retry", retry_irrevocable, cfg.irrevocable_retry_interval),
        ("tombstone purge", purge, PURGE_INTERVAL),
        ("token expiry", expire_tokens, TOKEN_SWEEP_INTERVAL),
        ("mount health", engine.check_mounts, HEALTH_INTERVAL),
        ("password files", engine.follow_password_files, PASSWORD_FILE_INTERVAL),
        ("revoke rules", engine.expand_revoke_rules, REVOKE_RULES_INTERVAL),
    ]
    if state.stats_board is not None:
        async def publish() -> None:
            publish_own(state)

        jobs.append(("worker metrics", publish, PUBLISH_INTERVAL))
    for name, fn, seconds in jobs:
        scheduler.add(name, _reported(name, fn), seconds, uses_store=name not in _STORELESS)
    _quiet_pool_floor_retries()
    scheduler.start()
    log.debug("periodic jobs: %s", "; ".join(f"{name} every {seconds:g}s"
                                              for name, _, seconds in jobs))
    return scheduler
