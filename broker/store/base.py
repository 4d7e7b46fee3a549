"""The LeaseStore protocol: the one durable source of truth for leases and tokens.

Design points every implementation keeps:

- Each lease row has a ``due_at`` column: for an active lease its expiry, for a
  lease being revoked the time of its next attempt, or the end of its claim
  while a sweeper holds it. Dead, pending and irrevocable leases have none.
  One index on ``due_at`` makes "what is due next" cheap, and a claim is just
  moving ``due_at`` forward: a replica that dies mid-revocation leaves the row
  due again when its claim runs out, for another to pick up.
- Nothing loads all leases: every query is bounded by a ``limit`` or answered
  by an index. Start-up cost must not grow with the number of leases.
- A write returns only once it is durable (committed, fsync'd per the store's
  durability setting): a credential never leaves before its lease row is safe.
- Several broker replicas may share one store (PostgreSQL). Claims keep them
  from revoking a lease twice; wake listeners tell each replica's sweeper when
  another one made something due earlier than it planned for.
- A revoke over many leases (revoke-prefix, revoke-by, a token's leases) is
  answered by writing one *revoke rule* (the filter and the time it was made)
  instead of rewriting every matching row; replicas expand it into per-lease
  ``revoking`` rows in chunks, claiming it the way they claim leases. Until a
  chunk has reached a lease, every read shows a live lease the rule covers as
  ``revoking`` and ``renew`` refuses it, so callers see what they saw when the
  rows were rewritten at once. A rule covers the live leases that match its
  filter and were issued at or before its time (by the brokers' clocks).
- A revoke over many leases also covers the issues in flight: the leases it
  matches that are still ``pending`` are marked in the same write (column
  ``revoke_requested``, not part of ``Lease``), and ``activate`` refuses a
  marked row, so the issue is undone like any failed activation. The revoke
  never deletes the backend's user of a pending lease itself: the backend's
  CREATE may not have committed yet.
- Replicas may be configured with different mounts for a while (a rolling
  config change). A replica claims only the due leases of the mounts it has
  (``claim_due``'s ``mounts``), so a lease of a mount it lacks is left for a
  replica that has it instead of failing there and burning its attempts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from broker.errors import PermissionDenied
from broker.lease import Lease, LeaseFilter, LeaseState, Token

__all__ = ["FORCE_TAKEOVER", "LeaseStore", "Overdue", "RevokeQueued", "RuleChunk",
           "owner_ended", "revoked_while_issued"]

#: Seconds a forced revocation of a mount a replica lacks waits for a replica
#: that has the mount (which tries the backend first) before the replica takes
#: it anyway (``claim_due``): forcing is how an operator ends the leases of a
#: mount no replica has any more.
FORCE_TAKEOVER = 5.0


def owner_ended(lease_id: str) -> PermissionDenied:
    """``activate``'s error when the token that asked for the lease is no longer active."""
    return PermissionDenied(f"permission denied: the token was revoked or expired while lease "
                            f"{lease_id} was being issued; the credential is not handed out")


def revoked_while_issued(lease_id: str, reason: str) -> PermissionDenied:
    """``activate``'s error when a revoke (prefix, selector, force) covered the lease
    while it was still pending."""
    return PermissionDenied(f"permission denied: lease {lease_id} was revoked ({reason}) "
                            f"while it was being issued; the credential is not handed out")


@dataclass(frozen=True)
class RevokeQueued:
    """What ``queue_revoke_rule`` did."""

    #: live leases the revoke covers (counted when it was made).
    queued: int
    #: the rule left to expand, or None when the leases were queued at once.
    rule_id: str | None = None
    #: tokens ended by the same write (``end_tokens``).
    tokens_ended: int = 0
    #: matching leases not ended yet that the revoke left as they were: being revoked
    #: already (under any reason; with "force", under "force" only). Counted with
    #: ``queued``, in the same statement as the leases were queued (or the rule made),
    #: so the two add up to the matching leases not ended yet at that moment.
    already_revoking: int = 0


@dataclass(frozen=True)
class RuleChunk:
    """What one ``expand_revoke_rule`` step did."""

    #: leases moved to ``revoking`` by this step.
    queued: int
    #: the rule is fully expanded (and gone).
    done: bool


@dataclass(frozen=True)
class Overdue:
    """What ``count_overdue`` found for one mount."""

    #: live leases of the mount whose expiry is before the cut-off.
    count: int
    #: the earliest expiry among them (Unix seconds): how long the oldest is overdue.
    oldest_expire_time: float


class LeaseStore(Protocol):
    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        """Connect, create or migrate the schema (versioned), enable WAL etc."""

    async def close(self) -> None: ...

    @property
    def error(self) -> str | None:
        """Why the store's database cannot be reached now, else None (``/v1/sys/health``).

        While it is set, operations raise ``broker.errors.StoreUnavailable``
        (HTTP 503); it clears once the store works again (the next write that
        commits; on PostgreSQL after a lost connection, any query)."""

    def add_wake_listener(self, callback: Callable[[float | None], None]) -> None:
        """Call ``callback(due_time)`` when ANOTHER replica made a lease due at
        ``due_time`` (a lease issued, a revoke queued), or ``callback(None)`` when
        anything may have become due (e.g. notifications may have been missed
        while reconnecting). Called on the event loop; it must not block. Changes
        made through this store object are not reported: the caller knows them.
        A store that no other process shares never calls it."""

    # -- leases: issue path ---------------------------------------------
    async def insert_pending(self, lease: Lease) -> None:
        """Durably write a ``pending`` row (before the backend is asked)."""

    async def activate(
        self,
        lease_id: str,
        *,
        revocation: dict[str, Any],
        expire_time: float,
        renewable: bool,
        owner: str | None = None,
    ) -> None:
        """pending -> active; ``due_at`` = expire_time.

        Raises ``broker.errors.Conflict`` when the row is no longer pending (rolled
        back meanwhile, or gone): the credential must then not be handed out.
        Raises ``broker.errors.PermissionDenied`` (``revoked_while_issued``) when
        a revoke over many leases marked the pending row (``revoke_requested``):
        the issue is undone like any failed activation, and the stale-pending
        job rolls the row back if the issuer died.

        With ``owner`` (a token accessor), only while that token is active, in
        the same write: else ``broker.errors.PermissionDenied``. Revoking a
        token ends it first and then queues its live leases, so a lease still
        pending then is never queued; this check is what keeps it from going
        live afterwards. Checked in the write (not before it), so the token's
        end and the activation are ordered: one of the two sees the other."""

    async def delete(self, lease_id: str) -> None:
        """Remove a row entirely (a rolled-back pending lease, after the backend confirmed)."""

    # -- leases: reads ----------------------------------------------------
    async def get(self, lease_id: str) -> Lease | None: ...

    async def list_ids(
        self,
        flt: LeaseFilter,
        *,
        states: Sequence[LeaseState] = (),
        limit: int = 1000,
        after: str = "",
    ) -> list[str]:
        """Lease ids matching ``flt`` (and ``states`` when given), sorted, > ``after``."""

    async def list_leases(
        self,
        flt: LeaseFilter,
        *,
        states: Sequence[LeaseState] = (),
        limit: int = 1000,
        after: str = "",
    ) -> list[Lease]:
        """Like list_ids but whole rows (for irrevocable listings, CLI tables)."""

    async def count_by_state(self) -> dict[str, int]: ...

    async def count_overdue(self, *, before: float) -> dict[str, Overdue]:
        """Live leases (pending, active, revoking, irrevocable) whose ``expire_time`` is
        before ``before``, per mount (a mount with none is left out): credentials that
        should be dead and may not be, whatever kept them (a mount held back while
        unhealthy, retries, a sweeper behind, an interrupted issue not rolled back).

        Never reads the live leases that are not overdue: active ones from the
        ``due_at`` index (an active lease is due at its expiry), the other live
        states from the state index (few, but for a mass revoke's backlog)."""

    async def count_matching(
        self, flt: LeaseFilter, *, states: Sequence[LeaseState] = ()
    ) -> int: ...

    # -- leases: renew --------------------------------------------------
    async def renew(self, lease_id: str, *, expire_time: float, now: float,
                    max_expire_time: float | None = None) -> bool:
        """Set a new expiry on an ACTIVE lease (and due_at); False if it is not active
        or a revoke rule covers it. ``max_expire_time`` also moves its cap (a
        cap that was its token's expiry, after the token was renewed)."""

    # -- leases: revocation ----------------------------------------------
    async def queue_revoke(
        self, lease_id: str, *, reason: str, now: float, claimer: str | None = None,
        claim_until: float | None = None,
    ) -> Lease | None:
        """active/irrevocable -> revoking, due now, unclaimed. Returns the row as
        updated, or None when the lease is not in a revocable state.

        With ``claimer`` and ``claim_until`` the lease is claimed in the same
        write, as ``claim_due`` would (the row records ``claimer`` as holder):
        the caller revokes it itself, and no other sweeper takes it before
        ``claim_until``. Without ``claim_until`` the row is held by no one."""

    async def queue_revoke_matching(
        self, flt: LeaseFilter, *, reason: str, now: float
    ) -> int:
        """The same for every active/irrevocable lease matching ``flt``, in one
        statement (fast for 100k rows). Returns how many were queued.

        In the same write, the matching ``pending`` rows (issues in flight) are
        marked ``revoke_requested``: ``activate`` then refuses them. They are
        not counted.

        With ``reason == "force"`` leases already ``revoking`` under another reason
        (say, waiting in retry backoff) are taken over too: reason "force", due
        now. Other reasons leave revoking leases as they are."""

    async def queue_revoke_rule(
        self, flt: LeaseFilter, *, reason: str, now: float, inline_max: int, claimer: str,
        claim_until: float, end_tokens: str | None = None,
    ) -> RevokeQueued:
        """Revoke every live lease matching ``flt`` (``reason`` as in
        queue_revoke_matching), in one durable write that does not grow with
        the number of leases.

        Counts the matching live leases; up to ``inline_max`` are queued at once
        (as queue_revoke_matching). The statement that queues them (or the count
        that makes the rule) also counts the matching leases left as they are,
        already revoking (``RevokeQueued.already_revoking``), so that the two
        figures are one snapshot's. More are covered by a revoke rule made at
        ``now``, claimed by ``claimer`` until ``claim_until``, for
        ``expand_revoke_rule`` to queue in chunks. From the moment this returns,
        reads show the covered leases as ``revoking`` and ``renew`` refuses them.
        Either way the matching ``pending`` rows are marked in the same write, as
        in queue_revoke_matching: a lease in flight then never goes live, however
        far the rule's expansion has got when its issue finishes.

        With ``end_tokens`` ("revoked" or "expired"), the active tokens among
        ``flt.owners`` are ended first, at ``now``, in the same write. A crash
        then cannot leave a token ended and its leases live; and since a lease
        goes live only while its token is active (``activate``), no lease of
        theirs can go live after the write without being covered by it.
        """

    async def claim_revoke_rule(
        self, *, claimer: str, now: float, claim_until: float
    ) -> str | None:
        """Claim the oldest rule that is ``claimer``'s already or whose claim has
        run out (a replica died mid-expansion); None when there is none."""

    async def expand_revoke_rule(
        self, rule_id: str, *, claimer: str, now: float, limit: int, claim_until: float
    ) -> RuleChunk | None:
        """One step, one transaction: queue (due ``now``) the next ``limit`` live
        leases the rule covers, in id order, record how far it got and extend the
        claim to ``claim_until``; the last step deletes the rule. None when the
        rule is gone or claimed by someone else (they carry on from where this
        claimer's last committed step got to)."""

    async def release_revoke_rules(self, *, claimer: str) -> None:
        """Give up ``claimer``'s rules at once (shutting down): others may claim them."""

    async def next_due(self, *, mounts: Collection[str] | None = None) -> float | None:
        """The smallest ``due_at`` (of leases of ``mounts``, when given), or None
        when nothing is due ever."""

    async def claim_due(
        self, *, now: float, limit: int, claimer: str, claim_timeout: float,
        mounts: Collection[str] | None = None,
    ) -> list[Lease]:
        """Atomically claim up to ``limit`` rows with ``due_at <= now``, oldest first:
        active ones become ``revoking`` with reason "expire"; every claimed row
        gets ``due_at = now + claim_timeout`` so no one else takes it meanwhile,
        and records ``claimer`` as its holder (see ``fail_revoke``). Two
        concurrent callers never get the same row.

        With ``mounts`` (the mounts the claiming replica has), only rows of those
        mounts, plus forced revocations of other mounts once they have been due
        for ``FORCE_TAKEOVER`` seconds (no replica with the mount took them)."""

    async def release_claim(self, lease_id: str, *, claimer: str, due_at: float) -> bool:
        """Give up ``claimer``'s claim on a revoking lease without counting an
        attempt: it stays ``revoking``, unclaimed, due at ``due_at``, for a replica
        that has its mount. False when the claim is not ``claimer``'s (any more)."""

    async def unserved_mounts(
        self, mounts: Collection[str], *, due_by: float | None = None
    ) -> dict[str, int]:
        """Live (pending, active, revoking, irrevocable) leases of mounts not in
        ``mounts``, counted per mount; with ``due_by``, only those due by then
        (answered from the ``due_at`` index)."""

    async def finish_revoke(self, lease_id: str, *, state: LeaseState, now: float) -> None:
        """revoking -> revoked/expired tombstone; ``ended_at`` = now, ``due_at`` = NULL."""

    async def finish_revoke_many(
        self, items: Sequence[tuple[str, LeaseState]], *, now: float,
        claimer: str | None = None,
    ) -> None:
        """End many revocations in one durable write: each ``(lease_id, state)`` row
        that is still ``revoking`` becomes ``state`` (revoked/expired) with
        ``ended_at`` = now, ``due_at`` = NULL; any other row is left alone. The
        sweeper's workers record successful revocations this way, so one commit
        carries many endings instead of one each.

        With ``claimer``, only rows whose claim ``claimer`` holds (the last
        ``claim_due`` or claiming ``queue_revoke`` was its) are ended: a replica
        whose claim ran out and was taken over leaves the row to the new holder,
        who revokes it again (idempotently) and records the outcome. A row held
        by no one (queued without a claim) is left alone too. None: no claim
        check, for callers that do not claim (the bench, tests)."""

    async def fail_revoke(
        self,
        lease_id: str,
        *,
        error: str,
        next_attempt: float | None,
        now: float,
        claimer: str | None = None,
    ) -> int:
        """Record a failed attempt (attempts += 1, last_error). ``next_attempt`` set:
        stays revoking, due then. None: becomes irrevocable. Returns attempts, or
        0 when nothing was recorded: the lease was no longer revoking, or (with
        ``claimer``) its claim is not ``claimer``'s, as in ``finish_revoke_many``
        (a late failure never overrides the new holder's claim)."""

    async def requeue_irrevocable(self, *, now: float, limit: int,
                                  mounts: Collection[str] | None = None) -> int:
        """irrevocable -> revoking due now (one more try each); of ``mounts``, when given."""

    async def stale_pending(self, *, before: float, limit: int,
                            mounts: Collection[str] | None = None) -> list[Lease]:
        """Pending rows issued before ``before`` (of ``mounts``, when given):
        interrupted issues to roll back, marked ``revoke_requested`` or not."""

    async def purge_tombstones(self, *, before: float, limit: int) -> int:
        """Delete revoked/expired rows that ended before ``before``."""

    # -- tokens ----------------------------------------------------------
    async def insert_token(self, token: Token) -> None:
        """Store a new token, every field of it (``period`` included: 0 not periodic)."""

    async def token_by_hash(self, token_hash: str) -> Token | None: ...

    async def token_by_accessor(self, accessor: str) -> Token | None: ...

    async def child_tokens(self, accessor: str) -> list[str]:
        """Accessors of active tokens whose parent is ``accessor``."""

    async def end_token(self, accessor: str, *, state: str, now: float) -> bool:
        """active -> revoked/expired; False if it was not active."""

    async def purge_ended_tokens(self, *, before: float, limit: int) -> int:
        """Delete up to ``limit`` revoked/expired tokens that ended before ``before``,
        oldest first; returns how many. A later use of one is an unknown token
        (403, not a ``reuse_attempt``); its leases, owner names and children
        are not touched (a child whose parent is gone reads as an orphan)."""

    async def renew_token(self, accessor: str, *, expire_time: float) -> bool: ...

    async def use_token(self, accessor: str) -> int | None:
        """Take one use of the use-limited token ``accessor`` (``num_uses`` > 0); returns
        the uses left after it, -1 when it was the last one (0 means "no limit"). None:
        the token has none left, is not active, or has no limit (nothing to take).

        One conditional write, so of any number of concurrent uses, on every worker and
        replica sharing the store, no more succeed than the token had uses.
        """

    async def expired_tokens(self, *, now: float, limit: int) -> list[str]:
        """Accessors of active tokens whose expire_time has passed."""

    async def spent_tokens(self, *, limit: int) -> list[str]:
        """Accessors of active tokens whose last use was taken (``num_uses`` -1): the
        request that took it revokes the token as it ends, unless it could not (a
        crash, a store or audit outage); the token-expiry job ends those."""

    async def live_token_accessors(self, *, now: float, limit: int,
                                   after: str = "") -> list[str]:
        """Accessors of active tokens not yet expired at ``now``, sorted, after ``after``
        (``LIST auth/token/accessors``)."""

    async def delete_tokens_by_display_name(self, display_name: str) -> int:
        """Dev mode: forget earlier dev root tokens."""

    # -- single-use JWTs (broker/auth/jwt.py) --------------------------------
    async def record_jwt_use(self, method: str, jti_hash: str, *, accessor: str,
                             until: float, now: float) -> str | None:
        """Record that the JWT whose jti hashes to ``jti_hash`` logged in through auth
        method ``method`` (for the token ``accessor``); it could log in until ``until``.

        None: recorded, this is its first login. Else the JWT had logged in
        before (a replay): the accessor of that login's token ("" when not
        known). One durable write that fails on the duplicate key, so of any
        number of concurrent calls for one JWT, on every replica sharing the
        store, exactly one gets None. A record past its ``until`` (not yet
        purged) is taken over: an issuer that reused a jti is not refused for it.
        """

    async def forget_jwt_use(self, method: str, jti_hash: str, *, accessor: str) -> None:
        """Delete the record ``record_jwt_use`` wrote for the token ``accessor``: its login
        failed after the record (no token was made), so the JWT was not used up."""

    async def purge_used_jwts(self, *, before: float, limit: int) -> int:
        """Delete up to ``limit`` records of used JWTs whose ``until`` is before
        ``before``; returns how many."""
