"""The lease engine: issue, renew, look up and revoke, with the crash-safety protocol.

Issue: pick username and password, durably write a ``pending`` row, ask the
backend, then mark it ``active``. A crash between the two writes leaves a
pending row that the stale-pending job rolls back (an idempotent delete in the
backend), so no credential ever exists that the store does not know about.

Revocation never happens inline in a request: every path (expiry, revoke,
revoke-prefix, token cascade, force) moves leases to ``revoking`` in the
store and the sweeper's workers carry it out. A request that wants to wait
(``sync``) waits for the worker's outcome.

Two parts live beside this module, as base classes of ``LeaseEngine``:
broker/mounts.py (building, probing, reloading the mounts) and
broker/revocation.py (carrying out the sweeper's claimed revocations and
recording their outcome).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from broker.audit import AuditLog, event, shown
from broker.backend import (
    BackendError,
    DeleteUserRequest,
    NewUserRequest,
    NewUserResponse,
    RenewUserRequest,
    RoleSpec,
    StagedUser,
)
from broker.config import Config
from broker.endings import EndingRecorder
from broker.errors import (
    BackendUnavailable,
    BadRequest,
    DeadLease,
    ServiceUnavailable,
    StoreUnavailable,
    UnknownLease,
)
from broker.lease import (
    DEAD_STATES,
    Lease,
    LeaseFilter,
    LeaseState,
    Token,
    TokenState,
    issue_ttl,
    new_lease_id,
    renew_expiry,
    renewal_capped,
)
from broker.middleware import MountRuntime
from broker.mounts import MountSet
from broker.revocation import ISSUED_BY, RevokeOutcome, Revoker, lease_ref
from broker.store.base import FORCE_TAKEOVER, LeaseStore, RevokeQueued
from broker.store.deadline import joined
from broker.templating import generate_password, render_username
from broker.timefmt import rfc3339_seconds

__all__ = ["EndingRecorder", "Issued", "LeaseEngine", "MountNotServed", "RecordIssue",
           "RevokeOutcome", "lease_ref"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Issued:
    lease: Lease
    data: Mapping[str, Any]
    warnings: list[str]


#: Writes an issue's audit line: the lease, and the data block the caller gets.
RecordIssue = Callable[[Lease, Mapping[str, Any]], Awaitable[None]]


#: How often a request waiting for a revocation asks the store whether it is done.
REVOKE_POLL = 0.5
#: How long a revoke of a lease whose mount this replica lacks waits for a replica that
#: has the mount to end it (shared stores only), as a forced one waits (FORCE_TAKEOVER).
UNSERVED_WAIT = FORCE_TAKEOVER


class MountNotServed(ServiceUnavailable):
    """A revoke or renew of a lease whose mount this replica does not have (503).

    Revoke: the lease is queued (revoking), for a replica that has the mount, or
    this one once the mount is added back; revoke-force ends it without the
    backend. Renew: nothing changes. 503 rather than 400 or 404: the request is
    sound, and a replica that has the mount carries it out, as it does for an
    issue whose backend is unreachable here.
    """

    def __init__(self, lease: Lease, *, waited: float = 0.0, op: str = "revoke") -> None:
        if op == "renew":
            super().__init__(
                f"lease {lease.id} is not renewed: mount {lease.mount!r} is not configured "
                f"on this replica; renew it through a replica that has the mount (or add the "
                f"mount back here); the lease is unchanged")
            return
        within = f" (none ended it within {waited:g}s)" if waited > 0 else ""
        super().__init__(
            f"lease {lease.id} is not revoked: mount {lease.mount!r} is not configured on "
            f"this replica; the revocation is queued for a replica that has the mount"
            f"{within} (or add the mount back here), or end the lease without a backend "
            f"call with sys/leases/revoke-force/{lease.id}")


def _no_wake(at: float | None) -> None:
    """Until a sweeper is attached, wake-ups go nowhere."""


#: A revoke matching at most this many leases queues them in the answering write
#: itself; more are answered with a revoke rule, expanded in the background.
RULE_INLINE_MAX = 1000
#: Leases one revoke-rule expansion step queues (one transaction, ~50 ms on PostgreSQL).
RULE_CHUNK = 5000

def _created(lease: Lease, resp: NewUserResponse, max_expire: float, plugin: str) -> None:
    """Fill in what the backend said about the credential it made; the lease goes active.

    The revocation data also records the plugin that made it (``ISSUED_BY``): a
    mount's plugin may change across a restart, and another plugin must never be
    handed this one's revocation data (see Revoker.revoke_claimed).
    """
    if resp.expiration is not None:
        lease.expire_time = min(resp.expiration.timestamp(), max_expire)
    if resp.renewable is not None:
        lease.renewable = resp.renewable
    lease.revocation = {"username": lease.username, **dict(resp.revocation), ISSUED_BY: plugin}
    lease.state = LeaseState.ACTIVE


def _outlives_lease(lease: Lease, resp: NewUserResponse, role: RoleSpec, token: Token
                    ) -> str | None:
    """The warning for a credential the backend made to outlive its lease, if it did.

    The lease takes the backend's expiry (AWS's 900 s minimum) only up to its
    cap: the role's max_ttl or the token's expiry. The client must know its
    lease says less than its credential lives.
    """
    if resp.expiration is None:
        return None
    left = resp.expiration.timestamp() - lease.expire_time
    if left <= 1:
        return None
    by_token = (token.expire_time is not None
                and lease.max_expire_time < lease.issue_time + role.max_ttl)
    cap = "its token's expiry" if by_token else f"the role's max_ttl ({role.max_ttl}s)"
    return (f"the lease is capped at {cap} and ends {int(left)}s before the credential's own "
            "expiry: unless the backend can cut the credential off when the lease ends, it "
            "stays valid until then")


#: "it cannot be ...": the lease operations' past participles.
_PAST = {"lookup": "looked up", "revoke": "revoked", "renew": "renewed"}


def _created_nothing(outcome: object) -> bool:
    """Whether a backend call's outcome (result or exception) certainly made no user."""
    return isinstance(outcome, BackendError) and outcome.created_nothing


def _issue_failed(runtime: MountRuntime, role: RoleSpec, exc: BackendError) -> Exception:
    """The API error for a backend that could not create a credential."""
    if exc.retryable:
        return BackendUnavailable(f"mount {runtime.name!r}: {exc}")
    return BadRequest(f"mount {runtime.name!r} role {role.name!r}: {exc}")


class LeaseEngine(MountSet, Revoker):
    def __init__(
        self,
        store: LeaseStore,
        audit: AuditLog,
        config: Config,
        *,
        node_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.audit = audit
        self.config = config
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.clock = clock
        self.mounts: dict[str, MountRuntime] = {}
        #: set by the sweeper: called when a lease becomes due earlier than expected.
        self.wake: Callable[[float | None], None] = _no_wake
        #: hands a lease this engine claimed itself to its sweeper (Sweeper.adopt).
        self.adopt: Callable[[Lease, float], None] | None = None
        self._waiters: dict[str, list[asyncio.Future[RevokeOutcome]]] = {}
        self._inflight_issues = 0
        self._issues_idle = asyncio.Event()
        self._issues_idle.set()
        self.accepting = True
        self._endings = EndingRecorder(store, clock, claimer=self.node_id)
        #: per mount, the password_file content that failed to verify (not tried again)
        #: and the last problem logged about the file (logged once).
        self._refused_secrets: dict[str, str] = {}
        #: held while mounts are swapped (a reload, a password file followed)
        self._mounts_lock = asyncio.Lock()
        self._password_file_notes: dict[str, str] = {}
        self.rule_inline_max = RULE_INLINE_MAX
        self.rule_chunk = RULE_CHUNK
        self._rules_task: asyncio.Task[int] | None = None
        self._rules_again = False

    async def close(self) -> None:
        """Write the endings backends have already confirmed, and close the backends.

        Those endings are written however short the shutdown grace was. A hung
        store write may hold shutdown back only as long as a backend call may
        take (``backend_timeout``): the leases then stay claimed in the store
        and are revoked again once the claim runs out. The backends close
        meanwhile (they are done with those leases), so this adds no time to
        the worst case of a shutdown. So does handing over the revoke rules
        this replica was expanding (also bounded by ``backend_timeout``).
        """
        limit = self.leases_cfg.backend_timeout

        async def endings() -> None:
            if not await self._endings.drain(limit):
                log.warning("lease endings still unwritten after %ss; those leases stay "
                            "claimed and are revoked again once the claim runs out", limit)

        await asyncio.gather(self._stop_rules(limit), endings(),
                             *(m.close() for m in self.mounts.values()))

    # -- issue ---------------------------------------------------------------
    async def issue(
        self,
        mount_name: str,
        role_name: str,
        *,
        token: Token,
        ttl: int | None = None,
        request: Mapping[str, Any] | None = None,
        record: RecordIssue | None = None,
        kind: str = "creds",
    ) -> Issued:
        """Create a user in the backend and the lease that tracks it.

        ``kind``: the path asked on (``creds``; ``sts`` for Vault's AWS path),
        which the lease id carries, as in Vault (``aws/sts/ROLE/...``).

        ``record`` writes the issue's audit line once the lease and the data
        are known and before the caller can answer. Through a staging backend
        it runs beside the backend's COMMIT and the lease's activation, while
        the event loop would otherwise wait for them (at c=1 that took the
        line's CPU off the answer's path); otherwise after the activation. If
        it fails, the lease is revoked and its error raised: a credential
        nobody can trace must not exist. If the COMMIT or the activation fails
        after the line was written, the issue is undone as always and the
        ``rollback`` line that follows names the same lease and request.
        """
        if not self.accepting:
            raise BackendUnavailable("broker is shutting down")
        runtime = self.mount(mount_name)
        role = self.role(mount_name, role_name)
        # Never a reconnection per request (nor one queued behind another's): an
        # unhealthy mount answers 503 at once, tried again in the background.
        if not runtime.healthy and not await runtime.usable():
            raise BackendUnavailable(f"mount {mount_name!r} is unavailable: {runtime.error}")
        self._inflight_issues += 1
        self._issues_idle.clear()
        try:
            return await self._issue(runtime, role, token, ttl, request or {}, record, kind)
        finally:
            self._inflight_issues -= 1
            if self._inflight_issues == 0:
                self._issues_idle.set()

    async def _issue(
        self,
        runtime: MountRuntime,
        role: RoleSpec,
        token: Token,
        ttl: int | None,
        request: Mapping[str, Any],
        record: RecordIssue | None,
        kind: str = "creds",
    ) -> Issued:
        warnings: list[str] = []
        now = self.clock()
        lease_ttl = issue_ttl(ttl, role.default_ttl, role.max_ttl)
        if ttl and ttl > role.max_ttl:
            warnings.append(
                f"ttl {ttl}s is longer than the role's max_ttl; capped at {role.max_ttl}s")
        max_expire = now + role.max_ttl
        # A lease never outlives the token that created it. A periodic token's
        # expiry moves with each renewal and it has no end but its explicit_max_ttl:
        # as in Vault, its leases keep their own TTL (capped at that end only) and
        # are revoked with the token if it is not renewed in time (token expiry job).
        token_end = token.max_expire_time if token.period else token.expire_time
        if token_end is not None and token_end < max_expire:
            max_expire = token_end
            cut = now + lease_ttl - max_expire
            # A token made just before the lease with the same TTL (token create --ttl 1h,
            # then a 1h role) cuts a few seconds: said only when it cuts more than a
            # minute or 10% of the TTL, whichever is larger (docs/api.md).
            if cut > max(60.0, lease_ttl / 10):
                # A periodic token's is its explicit_max_ttl, which its renewals never move.
                where = ("the periodic token's explicit_max_ttl" if token.period
                         else "the token's expiry")
                warnings.append(f"lease TTL capped at {where}: "
                                f"{round(max_expire - now)}s instead of {lease_ttl}s")
        expire = min(now + lease_ttl, max_expire)
        caps = runtime.capabilities
        username = render_username(
            role.username_template,
            mount=runtime.name,
            role=role.name,
            display_name=token.display_name,
            max_length=caps.max_username_length,
            now=now,
        )
        lease = Lease(
            id=new_lease_id(runtime.name, role.name, kind),
            mount=runtime.name,
            role=role.name,
            owner=token.accessor,
            issue_time=now,
            expire_time=expire,
            max_expire_time=max_expire,
            # Renewal moves the broker's expiry even where the backend has none
            # to push (MySQL); only a backend that says so (STS) is not renewable.
            renewable=True,
            revocation={"username": username},
            metadata=dict(token.metadata),
        )
        ready = runtime.take_password()  # made ahead by a backend that hashes it
        req = NewUserRequest(
            role=role,
            username=username,
            password=ready[0] if ready else generate_password(),
            expiration=datetime.fromtimestamp(expire, UTC),
            lease_id=lease.id,
            metadata=lease.metadata,
            prepared=ready[1] if ready else {},
        )
        if runtime.stages_users:
            # None ready: stage_user prepares its own while the intent commits.
            resp = await self._issue_staged(runtime, role, lease, req, request, max_expire,
                                            record)
        else:
            resp = await self._issue_unstaged(runtime, role, lease, req, request, max_expire,
                                              prepare=ready is None)
            if record is not None:
                await self._record(lease, resp, record)
        self.wake(lease.expire_time)
        warnings.extend(resp.warnings)
        outlives = _outlives_lease(lease, resp, role, token)
        if outlives:
            warnings.append(outlives)
        return Issued(lease=lease, data=dict(resp.data), warnings=warnings)

    async def _issue_unstaged(
        self,
        runtime: MountRuntime,
        role: RoleSpec,
        lease: Lease,
        req: NewUserRequest,
        request: Mapping[str, Any],
        max_expire: float,
        *,
        prepare: bool,
    ) -> NewUserResponse:
        """Intent, then ``new_user``, then activation: one after the other."""
        # Crash safety: the intent is durable before the backend creates anything.
        if prepare and runtime.prepares_passwords:
            # None was ready: prepare this one while the intent commits.
            prepared, _ = await asyncio.gather(runtime.prepare_password(req.password),
                                               joined(self.store.insert_pending(lease)))
            req = replace(req, prepared=prepared or {})
        else:
            await self.store.insert_pending(lease)
        try:
            resp = await runtime.new_user(req)
        except BackendError as exc:
            await self._rollback(lease, role, reason=str(exc), request=request,
                                 backend=not exc.created_nothing)
            raise _issue_failed(runtime, role, exc) from None
        except BaseException:
            # Cancelled mid-call (client gone, shutdown): the user may exist; undo it.
            await asyncio.shield(joined(
                self._rollback(lease, role, reason="cancelled", request=request)))
            raise
        _created(lease, resp, max_expire, runtime.spec.plugin)
        try:
            await self.store.activate(
                lease.id,
                revocation=lease.revocation,
                expire_time=lease.expire_time,
                renewable=lease.renewable,
                owner=lease.owner,  # not if its token was revoked meanwhile
            )
        except BaseException:
            # The row is gone or not pending any more (rolled back meanwhile) or the
            # store failed: the user exists but no live row tracks it. Undo it now;
            # if that fails too, the pending row (if any) is retried by the job.
            await asyncio.shield(joined(self._rollback(lease, role, reason="activate failed",
                                                       request=request)))
            raise
        return resp

    async def _record(self, lease: Lease, resp: NewUserResponse, record: RecordIssue) -> None:
        """Write the issue's audit line; if that fails, revoke the live lease and raise."""
        try:
            await record(lease, resp.data)
        except Exception:
            await asyncio.shield(self._revoke_untraced(lease))
            raise

    async def _revoke_untraced(self, lease: Lease) -> None:
        """Queue the revocation of a lease whose issue line could not be written.

        Fail-closed: a credential nobody can trace must not exist. If even the
        queueing fails, the lease stays live in the store and ends at its expiry.
        """
        try:
            await self.revoke(lease, reason="revoke", wait=0)
        except Exception as exc:  # already failing: the caller raises the audit error
            log.warning("could not queue %s for revocation after its issue line failed: %s",
                        lease.id, exc)

    async def _issue_staged(
        self,
        runtime: MountRuntime,
        role: RoleSpec,
        lease: Lease,
        req: NewUserRequest,
        request: Mapping[str, Any],
        max_expire: float,
        record: RecordIssue | None,
    ) -> NewUserResponse:
        """Issue through a ``StagingBackend``: three overlaps where the plain path has none.

        The intent commits while the backend runs its statements, and the
        backend's COMMIT runs with the lease's activation and the issue's
        audit line (``record``). Crash safety holds:
        the backend commits only after the intent is durable (a crash before
        that leaves no credential; after it, a pending row the stale-pending
        job rolls back, or an active one whose revocation finds nothing), and
        the caller gets the credential only once both commits are done.
        """
        intent = asyncio.ensure_future(joined(self.store.insert_pending(lease)))
        staged: StagedUser | None = None
        try:
            staged = await runtime.stage_user(req)
            await asyncio.shield(intent)
        except BaseException as exc:
            intent_error = await asyncio.shield(joined(self._undo_issue(
                lease, role, request, intent, staged,
                reason=str(exc) if isinstance(exc, BackendError) else "cancelled",
                backend=not _created_nothing(exc))))
            if isinstance(exc, Exception) and intent_error not in (None, exc):
                raise intent_error from None  # the store failed: nothing was recorded
            if isinstance(exc, BackendError):
                raise _issue_failed(runtime, role, exc) from None
            raise
        _created(lease, staged.response, max_expire, runtime.spec.plugin)
        try:
            results = await asyncio.gather(
                staged.commit(),  # first: its statement goes out before the others start
                joined(self.store.activate(lease.id, revocation=lease.revocation,
                                           expire_time=lease.expire_time,
                                           renewable=lease.renewable, owner=lease.owner)),
                *([record(lease, staged.response.data)] if record is not None else []),
                return_exceptions=True,
            )
        except BaseException:
            # Cancelled: so were both commits, and the user may exist; undo it.
            await asyncio.shield(joined(self._undo_issue(lease, role, request, intent, None,
                                                         reason="cancelled")))
            raise
        failure = next((r for r in results[:2] if isinstance(r, BaseException)), None)
        if failure is not None:
            # Either side failed: the user may exist with no live row, or the row
            # may be active for a user that never committed. Undo both.
            await asyncio.shield(joined(self._undo_issue(
                lease, role, request, intent, None,
                reason=str(failure) if isinstance(failure, BackendError) else "activate failed",
                # The COMMIT refused: no user. (Activated meanwhile: the row goes.)
                backend=not _created_nothing(results[0]))))
            if isinstance(results[0], BackendError):
                raise _issue_failed(runtime, role, results[0]) from None
            raise failure
        if len(results) > 2 and isinstance(results[2], BaseException):
            # The credential exists but its line is not written: revoke it.
            await asyncio.shield(self._revoke_untraced(lease))
            raise results[2]
        return staged.response

    async def _undo_issue(
        self,
        lease: Lease,
        role: RoleSpec,
        request: Mapping[str, Any],
        intent: asyncio.Future[None],
        staged: StagedUser | None,
        *,
        reason: str,
        backend: bool = True,
    ) -> BaseException | None:
        """Undo a staged issue that failed; returns the intent's error, if it had one.

        The staged user is aborted first (it never existed), then the intent is
        waited for, so that the rollback's delete of the row comes after its
        insert; a row that never got written needs no rollback.

        If the rollback fails, a row that is still pending is the stale-pending
        job's; one that went active (its activation ran with the backend's
        failed COMMIT) is queued for revocation, so the sweeper retries it with
        backoff instead of leaving it to its expiry.
        """
        if staged is not None:
            await staged.abort()
        try:
            await intent
        except BaseException as exc:  # returned: the caller decides
            return exc
        if not await self._rollback(lease, role, reason=reason, request=request,
                                    backend=backend):
            try:
                current = await self.store.get(lease.id)
                if current is not None and current.state is LeaseState.ACTIVE:
                    await self.revoke(current, reason="revoke", wait=0)
            except Exception as exc:  # already failing: the row then waits for its expiry
                log.warning("could not queue %s for revocation after a failed rollback: %s",
                            lease.id, exc)
        return None

    async def _rollback(
        self, lease: Lease, role: RoleSpec | None, *, reason: str, request: Mapping[str, Any],
        backend: bool = True,
    ) -> bool:
        """Undo an interrupted issue: delete the user in the backend, then the row.

        ``backend=False``: the backend said it created nothing, so only the row
        goes. Deleting "our" user then would delete whoever has that name (an
        account that was there before, another lease's user).
        """
        runtime = self.mounts.get(lease.mount)
        try:
            if backend and runtime is None:
                raise BackendError(f"mount {lease.mount!r} is not configured")
            if backend and runtime is not None:
                await runtime.delete_user(
                    DeleteUserRequest(role=role, username=lease.username,
                                      revocation=lease.revocation, reason="rollback",
                                      lease_id=lease.id)
                )
        except BackendError as exc:
            # Leave the pending row: the stale-pending job tries again later.
            log.warning("rollback of %s failed, will retry: %s", lease.id, exc)
            await self._audit_quietly(event("rollback", outcome="error", lease=lease_ref(lease),
                                            error=str(exc), request=dict(request) or None))
            return False
        await self.store.delete(lease.id)
        await self._audit_quietly(event("rollback", lease=lease_ref(lease), reason=reason,
                                        user_deleted=backend, request=dict(request) or None))
        return True

    async def rollback_stale_pending(self, *, older_than: float | None = None) -> int:
        """Roll back pending rows older than ``older_than`` seconds (default pending_timeout)."""
        age = self.leases_cfg.pending_timeout if older_than is None else older_than
        before = self.clock() - age
        done = 0
        while True:
            # Not those of a mount this replica lacks: the backend's user cannot be
            # deleted from here (a replica that has the mount rolls them back).
            rows = await self.store.stale_pending(before=before, limit=200,
                                                  mounts=self.served_mounts())
            if not rows:
                return done
            progressed = False
            for lease in rows:
                runtime = self.mounts.get(lease.mount)
                role = runtime.spec.roles.get(lease.role) if runtime else None
                if await self._rollback(lease, role, reason="stale pending", request={}):
                    done += 1
                    progressed = True
            if not progressed:
                return done

    # -- lookup / renew ------------------------------------------------------
    async def get_live(self, lease_id: str, *, caller: Token, op: str) -> Lease:
        """The lease, or NotFound; a dead one is audited as a reuse attempt and refused."""
        if not lease_id or not isinstance(lease_id, str):
            raise BadRequest("missing lease_id")
        lease = await self.store.get(lease_id)
        if lease is None or lease.state is LeaseState.PENDING:
            raise UnknownLease(f"invalid lease: {shown(lease_id)} is not known")
        if lease.state in DEAD_STATES:
            await self.audit.write(event(
                "reuse_attempt", outcome="denied", operation=op, lease=lease_ref(lease),
                lease_state=lease.state.value, caller=caller.accessor,
                original_owner=lease.owner,
            ))
            raise DeadLease(f"lease {lease_id} is {lease.state.value}; "
                            f"it cannot be {_PAST.get(op, op + 'ed')}")
        return lease

    async def renew(self, lease: Lease, increment: int | None) -> tuple[Lease, list[str]]:
        """Push the lease's expiry (and the backend's); returns it and the answer's warnings."""
        if lease.state is not LeaseState.ACTIVE:
            raise BadRequest(f"lease {lease.id} is {lease.state.value}; it cannot be renewed")
        runtime = self.mounts.get(lease.mount)
        if runtime is None:  # removed by a reload: as for a revoke, 503 (not 404)
            raise MountNotServed(lease, op="renew")
        # The running config's role: a reload may have changed it since the issue.
        # (A lease whose role was removed renews by [leases] default_ttl up to the
        # max expiry it was issued with, and nothing is sent to the backend.)
        role = runtime.spec.roles.get(lease.role)
        default_ttl = role.default_ttl if role else self.leases_cfg.default_ttl
        now = self.clock()
        new_cap = None
        why = ""
        lowered = self._config_cap(lease, role) if role is not None else None
        if lowered is not None:
            new_cap, why = lowered  # past it: renew_expiry refuses, saying why
            lease.max_expire_time = new_cap
        elif now + (increment or default_ttl) > lease.max_expire_time and role is not None:
            new_cap, why = await self._token_cap(lease, role.max_ttl)
            if new_cap is not None:
                lease.max_expire_time = new_cap
        expire = renew_expiry(lease, increment, default_ttl, now, why=why)
        capped = renewal_capped(lease, increment, default_ttl, now, why=why)
        if runtime.capabilities.can_renew and role is not None:
            if not runtime.healthy and not await runtime.usable():
                raise BackendUnavailable(f"mount {lease.mount!r} is unavailable: "
                                         f"{runtime.error}")
            try:
                resp = await runtime.renew_user(RenewUserRequest(
                    role=role, username=lease.username, revocation=lease.revocation,
                    expiration=datetime.fromtimestamp(expire, UTC)))
            except BackendError as exc:
                raise BackendUnavailable(f"mount {lease.mount!r}: renew failed: {exc}") from None
            if resp.expiration is not None:
                expire = min(expire, resp.expiration.timestamp())
        if not await self.store.renew(lease.id, expire_time=expire, now=now,
                                      max_expire_time=new_cap):
            raise BadRequest(f"lease {lease.id} is no longer active")
        lease.expire_time, lease.last_renewal = expire, now
        self.wake(expire)  # a renewal may shorten the lease: due before the sweeper's next look
        return lease, [capped] if capped else []

    def _config_cap(self, lease: Lease, role: RoleSpec) -> tuple[float, str] | None:
        """The sooner max expiry the running config gives a lease, and why; None
        unless a reload lowered the role's ``max_ttl`` (or ``[leases] max_ttl``)
        below the one the lease was issued with.

        As Vault's ``framework.CalculateTTL`` does on every renewal, the limit is
        the role's (and the system's) max TTL as configured now, counted from
        the lease's issue time. It is written with the renewal, so a lookup
        shows it; a later reload that raises max_ttl again lets a renewal that
        asks for more move it back up (``_token_cap``), up to the new limit and
        the token's expiry.
        """
        system = self.leases_cfg.max_ttl
        if role.max_ttl <= system:
            limit, why = role.max_ttl, f"the role's max_ttl is now {role.max_ttl}s"
        else:  # not after a config check, which keeps a role's max_ttl within it
            limit, why = system, f"[leases] max_ttl is now {system}s"
        cap = lease.issue_time + limit
        if cap >= lease.max_expire_time - 0.001:
            return None
        return cap, (f"{why} (counted from the lease's issue time), less than when the "
                     "lease was issued")

    async def _token_cap(self, lease: Lease, role_max_ttl: int) -> tuple[float | None, str]:
        """A later max expiry for a lease its token's expiry capped at issue, if the
        token has been renewed since (None when the cap stays), and what to tell a
        renewal the token's cap holds back ("" when the role's max_ttl is the cap).

        At issue the cap is the sooner of issue time + the role's max_ttl and
        the token's expiry ("a lease never outlives its token"). Renewing the
        token moves its expiry, so a lease capped by it may follow, up to its
        role's max_ttl; otherwise a long CI job that keeps its token alive
        would still lose its credentials at the token's first expiry. Read
        only on a renewal that asks past the cap, so other renewals cost
        nothing more. A periodic token's leases are capped only at its
        explicit_max_ttl (``_issue``), which no renewal of the token moves: the
        hint says so rather than "renew the token first", which cannot help.
        """
        role_cap = lease.issue_time + role_max_ttl
        if lease.max_expire_time >= role_cap:
            return None, ""  # capped by the role, not the token
        token = await self.store.token_by_accessor(lease.owner)
        new_cap = None
        if token is not None and token.state is TokenState.ACTIVE:
            # (An ended token's leases are being revoked with it: the cap stays.)
            end = token.max_expire_time if token.period else token.expire_time
            cap = role_cap if end is None else min(role_cap, end)
            new_cap = cap if cap > lease.max_expire_time else None
        if (new_cap or lease.max_expire_time) >= role_cap - 0.5:
            return new_cap, ""  # the token's renewals let it reach the role's max_ttl
        if token is not None and token.period and token.max_expire_time is not None:
            return new_cap, (
                "the limit is the explicit_max_ttl of the periodic token that owns the "
                f"lease (it ends at {rfc3339_seconds(token.max_expire_time)}), not the "
                "role's max_ttl: no renewal of the token moves it, so a longer lease "
                "needs a new token")
        return new_cap, ("the limit is the expiry of the token that owns the lease, not the "
                         "role's max_ttl: renew the token first")

    # -- revocation ------------------------------------------------------------
    async def revoke(self, lease: Lease, *, reason: str = "revoke", wait: float = 30.0
                     ) -> RevokeOutcome:
        """Queue one lease for revocation and wait (up to ``wait``s) for the first attempt.

        A lease of a mount this replica lacks is queued for a replica that has it;
        :class:`MountNotServed` (503) once none has ended it within ``UNSERVED_WAIT``
        (at once when no other process shares the store).
        """
        served = lease.mount in self.mounts
        asked = wait > 0  # sync=false asks for no wait: queued is its answer (202)
        if not served:
            wait = min(wait, self._unserved_wait())
        outcome = await self._revoke(lease, reason=reason, wait=wait)
        if not served and asked and not outcome.done:
            raise MountNotServed(lease, waited=wait)
        return outcome

    def _unserved_wait(self) -> float:
        """How long a revoke of a mount this replica lacks waits for one that has it."""
        # Any store but SQLite is shared (postgresql:// and postgres:// alike), and so is
        # SQLite under several workers.
        shared = (not self.config.storage.url.startswith("sqlite:")
                  or self.config.server.workers > 1)
        return UNSERVED_WAIT if shared else 0.0

    async def _revoke(self, lease: Lease, *, reason: str, wait: float) -> RevokeOutcome:
        fut: asyncio.Future[RevokeOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(lease.id, []).append(fut)
        try:
            # Queued and claimed by us in one write: our sweeper revokes it now,
            # and no other worker or replica takes it before the claim runs out.
            now = self.clock()
            claim_until = now + self.leases_cfg.claim_timeout
            # A lease of a mount this replica lacks is queued for a replica that
            # has it (no claim): the caller waits for its ending in the store.
            claims = self.adopt is not None and lease.mount in self.mounts
            queued = await self.store.queue_revoke(
                lease.id, reason=reason, now=now, claimer=self.node_id,
                claim_until=claim_until if claims else None)
            if queued is None:
                current = await self.store.get(lease.id)
                state = current.state.value if current else "gone"
                if current is None:
                    raise UnknownLease(f"invalid lease: {lease.id} is not known")
                if current.state is not LeaseState.REVOKING:
                    raise DeadLease(f"lease {lease.id} is {state}; it cannot be revoked")
                self.wake(None)  # queued already, perhaps by someone else
            elif claims and self.adopt is not None:
                self.adopt(queued, claim_until)
            else:
                self.wake(None)
            return await self._await_revocation(lease.id, fut, wait)
        finally:
            waiters = self._waiters.get(lease.id, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._waiters.pop(lease.id, None)

    async def revoke_matching(self, flt: LeaseFilter, *, force: bool = False) -> RevokeQueued:
        """Queue every live lease matching ``flt``; returns how many (``queued``), and how
        many matching leases were left to the revocation already under way
        (``already_revoking``), counted by the store in the same statement.

        The answer does not wait for 100,000 row updates: past
        ``rule_inline_max`` leases the store writes one revoke rule (see
        broker/store/base.py) and this replica expands it in the background.
        Either way, once this returns the leases read as revoking and cannot
        be renewed.
        """
        reason = "force" if force else ("prefix" if flt.prefix else "selector")
        return await self._queue_rule(flt, reason=reason)

    async def _queue_rule(self, flt: LeaseFilter, *, reason: str,
                          end_tokens: str | None = None) -> RevokeQueued:
        now = self.clock()
        queued = await self.store.queue_revoke_rule(
            flt, reason=reason, now=now, inline_max=self.rule_inline_max,
            claimer=self.node_id, claim_until=now + self.leases_cfg.claim_timeout,
            end_tokens=end_tokens)
        if queued.rule_id is not None:
            self.kick_revoke_rules()
        elif queued.queued:
            self.wake(None)
        return queued

    def kick_revoke_rules(self) -> asyncio.Task[int]:
        """Make sure the expander runs (again); returns its task.

        The task raises StoreUnavailable when the store cannot be reached: the
        periodic job awaits it and reports the outage; a kick from a request,
        which nobody awaits, leaves it to that job.
        """
        self._rules_again = True
        if self._rules_task is None or self._rules_task.done():
            self._rules_task = asyncio.create_task(self._expand_rules(),
                                                   name="broker-revoke-rules")
            self._rules_task.add_done_callback(_retrieve)
        return self._rules_task

    async def expand_revoke_rules(self) -> int:
        """Expand every revoke rule this replica can claim: its own, and those
        of replicas whose claim ran out (the periodic job). Returns leases queued."""
        return await asyncio.shield(self.kick_revoke_rules())

    async def _expand_rules(self) -> int:
        total = 0
        try:
            while self._rules_again:
                self._rules_again = False
                while True:
                    now = self.clock()
                    rule_id = await self.store.claim_revoke_rule(
                        claimer=self.node_id, now=now,
                        claim_until=now + self.leases_cfg.claim_timeout)
                    if rule_id is None:
                        break
                    total += await self._expand_rule(rule_id)
        except StoreUnavailable:
            # An outage, not a bug: no traceback every 5 s while it lasts; the
            # periodic job says it once (broker/periodic.py) and tries again.
            raise
        except Exception:
            # The claim stays ours until it runs out; the periodic job tries again.
            log.exception("expanding revoke rules (retried by the periodic job)")
        return total

    async def _expand_rule(self, rule_id: str) -> int:
        total = 0
        while True:
            now = self.clock()
            step = await self.store.expand_revoke_rule(
                rule_id, claimer=self.node_id, now=now, limit=self.rule_chunk,
                claim_until=now + self.leases_cfg.claim_timeout)
            if step is None:  # taken over by another replica: it carries on
                return total
            total += step.queued
            if step.queued:
                self.wake(None)
            if step.done:
                return total

    async def _stop_rules(self, limit: float) -> None:
        """Stop expanding and hand this replica's rules over at once (within ``limit`` s)."""
        task, self._rules_task = self._rules_task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            async with asyncio.timeout(limit):
                await self.store.release_revoke_rules(claimer=self.node_id)
        except Exception as exc:  # they become claimable when the claim runs out
            log.warning("could not release revoke rules (%s: %s)", type(exc).__name__, exc)

    async def wait_drained(self, flt: LeaseFilter, timeout: float) -> int:
        """Wait until no lease matching ``flt`` is still revoking; returns how many still are.

        Leases a revoke rule covers count as revoking (the store reports them so)
        until they have ended, expanded or not.
        """
        deadline = time.monotonic() + timeout
        pause = 0.2
        while True:
            left = await self.store.count_matching(flt, states=(LeaseState.REVOKING,))
            if left == 0 or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(pause)
            # A count over 100k rows is not free: poll less often as the wait grows.
            pause = min(pause * 1.5, 1.0)

    async def end_tokens(self, accessors: list[str], *, state: TokenState) -> tuple[int, int]:
        """End the active tokens among ``accessors`` and queue every live lease
        they own, in one store write (a crash cannot leave a token ended and its
        leases live). Returns (tokens ended, leases queued)."""
        if not accessors:
            return 0, 0
        queued = await self._queue_rule(LeaseFilter(owners=tuple(accessors)),
                                        reason="selector", end_tokens=state.value)
        return queued.tokens_ended, queued.queued

    async def _await_revocation(self, lease_id: str, fut: asyncio.Future[RevokeOutcome],
                                wait: float) -> RevokeOutcome:
        """Our sweeper's outcome for the lease, or the store's word that it ended.

        Another worker's or replica's sweeper may claim the queued lease before
        ours does: then no outcome arrives here, so the store is asked every
        REVOKE_POLL seconds whether the lease has reached a final state.
        """
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return RevokeOutcome(done=False, error="revocation still in progress",
                                     pending=True)
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout=min(left, REVOKE_POLL))
            except TimeoutError:
                current = await self.store.get(lease_id)
                if current is None or current.state in DEAD_STATES:
                    return RevokeOutcome(done=True)

    async def wait_issues_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._issues_idle.wait(), timeout=timeout)
            return True
        except TimeoutError:
            return False

def _retrieve(task: asyncio.Task[int]) -> None:
    """Mark the task's exception as seen: asyncio would log an unawaited one as an error."""
    if not task.cancelled():
        task.exception()


def new_request_id() -> str:
    return str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))
