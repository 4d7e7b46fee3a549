"""Carrying out claimed revocations: the lease engine's side of the sweeper's workers.

A sweeper worker hands the engine leases it claimed (``revoke_claimed``, or
``revoke_claimed_many`` for one backend call); the backend deletes the user,
then its audit line is written, then the ending is recorded durably, and
only then are the waiting requests told. The line goes first so that a
``kill -9`` between the two leaves a lease still claimed in the store (revoked
again, idempotently, and audited again, by whoever takes the claim over)
rather than an ending the audit log never shows: revocation and its audit
line are both at-least-once. A failure is retried with jittered backoff and
becomes ``irrevocable`` after ``revoke_max_attempts``; a forced revocation
ends regardless. A lease of a mount this replica lacks is handed back to the
store for a replica that has it, no attempt counted; so is one of a mount that
is unhealthy (claimed just before its outage was seen, or revoked through the
API during it): it is due again, and the sweeper claims it once the mount is
healthy (broker/sweeper.py). A forced one is still tried, and ends whatever
the answer.

``Revoker`` is a base class of ``broker.engine.LeaseEngine``, which holds the
state it uses (store, audit log, mounts, waiting requests).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.audit import AuditLog, event
from broker.backend import BackendError, DeleteUserRequest, revokes_in_batches
from broker.config import Config, LeaseConfig
from broker.endings import EndingRecorder
from broker.lease import Lease, LeaseState
from broker.middleware import MountRuntime
from broker.store.base import LeaseStore
from broker.timefmt import rfc3339_seconds

__all__ = ["HELD_FOR_HEALTH", "ISSUED_BY", "RevokeOutcome", "Revoker", "lease_ref"]

#: The engine's logger: these lines were the engine's before the split (and still are).
log = logging.getLogger("broker.engine")


@dataclass(frozen=True)
class RevokeOutcome:
    """What one revocation attempt did, for a waiting request."""

    done: bool
    error: str | None = None
    #: the attempt failed for good: the lease went irrevocable (not queued for a retry)
    irrevocable: bool = False
    #: no attempt ended within the caller's wait (it goes on): not a failure
    pending: bool = False


#: The revocation data's record of the plugin that issued the lease (engine._created).
ISSUED_BY = "issued_by_plugin"
#: How a revocation held back for its unhealthy mount ends its error (no attempt made).
HELD_FOR_HEALTH = "the revocation waits until it is healthy again"


def _foreign_plugin(lease: Lease, runtime: MountRuntime) -> str | None:
    """The plugin that issued ``lease`` if the mount now runs another one (None: same,
    or a lease from before the plugin was recorded)."""
    issued = lease.revocation.get(ISSUED_BY)
    return str(issued) if issued and issued != runtime.spec.plugin else None


def _no_release() -> None:
    """A caller of revoke_claimed that holds no worker slot."""


def lease_ref(lease: Lease) -> dict[str, Any]:
    """The audit ``lease`` block: never the revocation data's secrets (it has none)."""
    return {
        "id": lease.id,
        "mount": lease.mount,
        "role": lease.role,
        "owner": lease.owner,
        "username": lease.username or None,
        "metadata": lease.metadata or None,
    }


class Revoker:
    """Carries out claimed revocations and records their outcome (a LeaseEngine base)."""

    store: LeaseStore
    audit: AuditLog
    config: Config
    node_id: str
    clock: Callable[[], float]
    mounts: dict[str, MountRuntime]
    _endings: EndingRecorder
    _waiters: dict[str, list[asyncio.Future[RevokeOutcome]]]

    @property
    def leases_cfg(self) -> LeaseConfig:
        return self.config.leases

    def backoff(self, attempts: int) -> float:
        """Jittered exponential backoff: base * 2^(n-1), capped, times 0.5..1."""
        cfg = self.leases_cfg
        delay = min(cfg.revoke_backoff_max,
                    cfg.revoke_backoff_base * 2.0 ** max(0, attempts - 1))
        return delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not a secret

    async def revoke_claimed(self, lease: Lease, release: Callable[[], None] = _no_release
                             ) -> None:
        """Carry out one claimed revocation (a sweeper worker). Never raises.

        ``release()`` is called as soon as the backend call has returned (or
        failed): the caller's worker slot bounds backend calls, not the wait for
        the ending's batched commit that follows.
        """
        reason = lease.revoke_reason or "expire"
        runtime = self.mounts.get(lease.mount)
        role = runtime.spec.roles.get(lease.role) if runtime else None
        now = self.clock()
        if runtime is None and reason != "force":
            # Claimed before a reload removed the mount (the sweeper claims only
            # our mounts' leases): leave it to a replica that has the mount
            # rather than fail it here and burn an attempt. A forced one ends below.
            release()
            await self._release_unserved(lease, now)
            return
        if runtime is not None and not (runtime.healthy or await runtime.usable()):
            release()
            if reason == "force":
                # Break-glass on a mount known to be down: the call could only fail,
                # after up to backend_timeout (a hung backend); the operator forcing it
                # has accepted that the backend may keep the credential. Ended now.
                await self._revoke_failed(
                    lease, reason, f"mount {lease.mount!r} is unavailable: "
                    f"{runtime.error}; the backend was not called", retryable=False)
                return
            # Unhealthy: the call could only fail (an attempt used up) or hang for
            # backend_timeout. It waits, due, for the mount to be back.
            await self._release_unhealthy(lease, runtime, now)
            return
        try:
            try:
                if runtime is None:
                    raise BackendError(f"mount {lease.mount!r} is not configured",
                                       retryable=True)
                if (issued := _foreign_plugin(lease, runtime)) is not None:
                    # Its revocation data means nothing to this plugin (or worse, the
                    # same name something else there): never handed over. For good,
                    # so it is listed as irrevocable; force ends it without a call.
                    raise BackendError(
                        f"the lease was issued by plugin {issued!r} but mount "
                        f"{lease.mount!r} now runs {runtime.spec.plugin!r}: not revoked "
                        f"through it (run the mount with {issued!r} again, or end the lease "
                        "with sys/leases/revoke-force)", retryable=False)
                done = await runtime.delete_user(DeleteUserRequest(
                    role=role, username=lease.username, revocation=lease.revocation,
                    reason=reason, lease_id=lease.id))
            finally:
                release()
        except BackendError as exc:
            await self._revoke_failed(lease, reason, str(exc), retryable=exc.retryable)
            return
        except Exception as exc:  # a store or engine bug must not kill the worker
            log.exception("revoking %s", lease.id)
            await self._revoke_failed(lease, reason, f"internal error: {type(exc).__name__}",
                                      retryable=True)
            return
        # The line before the ending (module docstring): the credential is gone now,
        # or (valid_until) the line says it is not. (getattr: a plugin returning None.)
        await self._audit_quietly(self._ended_event(lease, reason, now,
                                                    getattr(done, "valid_until", None)))
        final = LeaseState.EXPIRED if reason == "expire" else LeaseState.REVOKED
        error = await self._endings.record(lease.id, final)
        if error is not None:
            log.error("recording revocation of %s (the claim will run out and retry)",
                      lease.id, exc_info=error)
            return
        # Tell waiters only now: the ending is durable.
        self._notify(lease.id, RevokeOutcome(done=True))

    async def _release_unserved(self, lease: Lease, now: float) -> None:
        """Hand a claimed lease of a mount this replica lacks back to the store. Never raises."""
        try:
            released = await self.store.release_claim(lease.id, claimer=self.node_id,
                                                      due_at=now)
        except Exception as exc:  # the claim runs out and the lease is due again anyway
            log.warning("could not release %s (%s: %s); it is due again once the claim "
                        "runs out", lease.id, type(exc).__name__, exc)
            return
        if released:
            log.warning("lease %s left for a replica that has mount %r: the mount is not "
                        "configured here", lease.id, lease.mount)

    async def _release_unhealthy(self, lease: Lease, runtime: MountRuntime, now: float
                                 ) -> None:
        """Hand a claimed lease of an unhealthy mount back to the store, no attempt
        counted; a waiting request hears why. Never raises."""
        error = f"mount {lease.mount!r} is unavailable: {runtime.error}; {HELD_FOR_HEALTH}"
        try:
            await self.store.release_claim(lease.id, claimer=self.node_id, due_at=now)
        except Exception as exc:  # the claim runs out and the lease is due again anyway
            log.warning("could not release %s (%s: %s); it is due again once the claim "
                        "runs out", lease.id, type(exc).__name__, exc)
        else:
            # Not per lease above DEBUG: the sweeper says it once per mount and outage.
            log.debug("lease %s: %s", lease.id, error)
        self._notify(lease.id, RevokeOutcome(done=False, error=error))

    def revoke_batch_size(self, mount: str) -> int:
        """Most leases of ``mount`` one backend call revokes (the sweeper's batches)."""
        runtime = self.mounts.get(mount)
        if runtime is None or not revokes_in_batches(runtime.backend):
            return 1
        return self.leases_cfg.revoke_batch

    async def revoke_claimed_many(self, leases: Sequence[Lease],
                                  release: Callable[[], None] = _no_release) -> None:
        """``revoke_claimed`` for leases of one mount, in one backend call. Never raises.

        Each lease ends exactly as it would alone: its audit line, then its
        durable ending, then its waiters' "done"; a lease whose result is
        an error goes through ``_revoke_failed`` (retry, irrevocable, force)
        on its own, whatever became of the others.
        """
        if not leases:
            release()
            return
        runtime = self.mounts.get(leases[0].mount)
        if (runtime is None or not runtime.healthy or not revokes_in_batches(runtime.backend)
                or any(_foreign_plugin(lease, runtime) for lease in leases)):
            # Reloaded under us (or a lease of another plugin among them, or the mount
            # unhealthy: each is handed back, or forced): one call per lease, the slot
            # freed once all returned.
            left = len(leases)

            def one_done() -> None:
                nonlocal left
                left -= 1
                if left == 0:
                    release()

            await asyncio.gather(*(self.revoke_claimed(lease, _once(one_done))
                                   for lease in leases))
            return
        now = self.clock()
        reasons = [lease.revoke_reason or "expire" for lease in leases]
        errors: list[BackendError | None]
        try:
            try:
                errors = await runtime.delete_users([
                    DeleteUserRequest(role=runtime.spec.roles.get(lease.role),
                                      username=lease.username, revocation=lease.revocation,
                                      reason=reason, lease_id=lease.id)
                    for lease, reason in zip(leases, reasons, strict=True)])
            finally:
                release()
        except BackendError as exc:
            errors = [exc] * len(leases)
        except Exception as exc:  # a store or engine bug must not kill the worker
            log.exception("revoking %d leases of mount %s", len(leases), runtime.name)
            errors = [BackendError(f"internal error: {type(exc).__name__}")] * len(leases)
        failed = [(lease, reason, error) for lease, reason, error
                  in zip(leases, reasons, errors, strict=True) if error is not None]
        done = [(lease, reason) for lease, reason, error
                in zip(leases, reasons, errors, strict=True) if error is None]
        outcomes = await asyncio.gather(
            self._record_ended(done, now),
            *(self._revoke_failed(lease, reason, str(error), retryable=error.retryable)
              for lease, reason, error in failed),
            return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):  # e.g. the store down for a forced ending
                log.error("finishing a batch revocation", exc_info=outcome)

    async def _record_ended(self, done: Sequence[tuple[Lease, str]], now: float) -> None:
        """Audit revoked leases, then end them durably, then tell their waiters."""
        if not done:
            return
        # The lines first (module docstring). They go concurrently (the audit log
        # writes what queues up together in one go); straight to AuditLog.write: a
        # wrapper coroutine per lease costs.
        events = [self._ended_event(lease, reason, now) for lease, reason in done]
        outcomes = await asyncio.gather(*(self.audit.write(ev) for ev in events),
                                        return_exceptions=True)
        for ev, outcome in zip(events, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error("audit write failed for %s event: %s", ev["type"], outcome)
        results = await self._endings.record_many(
            [(lease.id, LeaseState.EXPIRED if reason == "expire" else LeaseState.REVOKED)
             for lease, reason in done])
        for (lease, _), error in zip(done, results, strict=True):
            if error is None:
                self._notify(lease.id, RevokeOutcome(done=True))
            else:
                log.error("recording revocation of %s (the claim will run out and retry)",
                          lease.id, exc_info=error)

    @staticmethod
    def _ended_event(lease: Lease, reason: str, now: float,
                     valid_until: datetime | None = None) -> dict[str, Any]:
        """The audit event of a revocation whose ending is durable.

        ``valid_until`` (DeleteUserResponse): the backend ended the lease but not
        the credential (a forced STS token). The line must not read as a clean
        revoke: outcome ``forced``, as for a forced lease whose backend call
        failed, with ``backend_revoked: false`` and when the credential dies.
        """
        if reason == "expire":
            return event("expire", lease=lease_ref(lease), reason=reason,
                         lag_seconds=round(now - lease.expire_time, 3))
        if valid_until is not None:
            return event("revoke", outcome="forced", lease=lease_ref(lease), reason=reason,
                         backend_revoked=False,
                         credential_valid_until=_rfc3339(valid_until))
        return event("revoke", lease=lease_ref(lease), reason=reason)

    async def _revoke_failed(self, lease: Lease, reason: str, error: str, *,
                             retryable: bool) -> None:
        now = self.clock()
        if reason == "force":
            # Break-glass: the operator accepted that the backend may still hold it.
            # The line first, as for any ending (module docstring).
            await self._audit_quietly(event("admin", action="revoke_force", outcome="forced",
                                            lease=lease_ref(lease), backend_revoked=False,
                                            credential_valid_until=_valid_until(lease, now),
                                            error=error))
            try:
                await self.store.finish_revoke(lease.id, state=LeaseState.REVOKED, now=now)
            except Exception:  # never raises (revoke_claimed): the claim runs out, it retries
                log.exception("recording the forced revocation of %s (the claim will run "
                              "out and retry)", lease.id)
                return
            self._notify(lease.id, RevokeOutcome(done=True, error=error))
            return
        attempts = lease.revoke_attempts + 1
        # A backend that says retrying cannot help (an STS token revoked early, a
        # broken custom statement) goes irrevocable at once: listed, and retried
        # only by the periodic irrevocable job or forced by an operator.
        give_up = not retryable or attempts >= self.leases_cfg.revoke_max_attempts
        next_attempt = None if give_up else now + self.backoff(attempts)
        try:
            recorded = await self.store.fail_revoke(
                lease.id, error=error, next_attempt=next_attempt, now=now, claimer=self.node_id)
        except Exception:
            log.exception("recording failed revocation of %s", lease.id)
        else:
            if not recorded:
                # Our claim ran out and another replica holds the lease now (or it
                # ended meanwhile): its outcome is theirs to record and report. A
                # waiter keeps following the store (_await_revocation).
                log.warning("revoking %s failed: %s; not recorded, the lease is no longer"
                            " claimed by this replica", lease.id, error)
                await self._audit_quietly(event(
                    "revoke_failed", outcome="error", lease=lease_ref(lease), reason=reason,
                    attempts=attempts, error=error, superseded=True))
                return
        if give_up:
            # Said in the server log too, not only the audit log (operations.md).
            log.error("revoking %s failed (attempt %d): %s; the lease is now irrevocable: "
                      "retried every %gs, listed by GET sys/leases/irrevocable",
                      lease.id, attempts, error, self.leases_cfg.irrevocable_retry_interval)
        else:
            log.warning("revoking %s failed (attempt %d): %s", lease.id, attempts, error)
        await self._audit_quietly(event(
            "irrevocable" if give_up else "revoke_failed", outcome="error",
            lease=lease_ref(lease), reason=reason, attempts=attempts, error=error,
            next_attempt=next_attempt))
        self._notify(lease.id, RevokeOutcome(done=False, error=error, irrevocable=give_up))

    def _notify(self, lease_id: str, outcome: RevokeOutcome) -> None:
        for fut in self._waiters.pop(lease_id, []):
            if not fut.done():
                fut.set_result(outcome)

    async def _audit_quietly(self, ev: dict[str, Any]) -> None:
        """Audit from background work: a failure is logged (there is no response to refuse)."""
        try:
            await self.audit.write(ev)
        except Exception as exc:
            log.error("audit write failed for %s event: %s", ev.get("type"), exc)


def _valid_until(lease: Lease, now: float) -> str | None:
    """When a forced lease's credential dies by itself, if its revocation data says
    (``expires_at``, the AWS STS plugin's) and that is still ahead; else None.

    The ``admin`` / ``revoke_force`` line of a forced lease whose backend call failed
    then says it, as the ``revoke`` line of a forced STS token does (``_ended_event``):
    the keys are not revoked, and work until then.
    """
    expires_at = lease.revocation.get("expires_at")
    if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
        return None
    if expires_at <= now:
        return None
    return rfc3339_seconds(expires_at)


def _rfc3339(when: datetime) -> str:
    """``when`` in UTC to the second, e.g. ``2026-01-02T03:04:05Z`` (an expiry, which
    AWS gives to the second; the audit's own ``time`` field carries microseconds)."""
    return rfc3339_seconds(when.timestamp())


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` callable any number of times, run on the first call only."""
    called = False

    def call() -> None:
        nonlocal called
        if not called:
            called = True
            fn()

    return call
