"""The shared lease store: PostgreSQL, so several broker replicas can use one database.

The logical schema and the ``due_at`` design are SQLite's (see base.py). What
changes with several writers:

- Claims use ``FOR UPDATE SKIP LOCKED``: concurrent sweepers on different
  replicas each take different due rows, and never wait on one another. A
  claim moves ``due_at`` to the claim's end, so the rows of a replica that
  dies mid-revocation become due again and another replica takes them.
- Cross-replica wake-ups go over LISTEN/NOTIFY on ``broker_wake``. A write
  that makes something due sooner (issue, revoke, force, requeue) is followed,
  once committed, by a NOTIFY carrying the due time (coalesced: see
  ``pg_notify.Notifier`` for why not in the same transaction). One dedicated
  connection per store listens, and reconnects with backoff when it drops.
- Migrations run under a transaction-scoped advisory lock, so replicas
  starting together migrate one after the other.

Each call is one statement in its own implicit transaction, committed before
it returns under PostgreSQL's ``synchronous_commit`` (forced back ``on`` if the
server or database default turned it off). asyncpg prepares and caches every
statement per connection.

This module holds the store itself and the SQL of every call. Beside it:
pg_schema.py (the tables and their migrations), pg_notify.py (the wake-up
NOTIFYs and the LISTEN connection), pg_url.py (the storage URL's own
parameters) and pg_guard.py (the pool wrapper that reports a lost database).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg

from broker.errors import Conflict
from broker.lease import Lease, LeaseFilter, LeaseState, Token, TokenState, check_meta_key
from broker.store import redact_url
from broker.store.base import (
    FORCE_TAKEOVER,
    Overdue,
    RevokeQueued,
    RuleChunk,
    owner_ended,
    revoked_while_issued,
)
from broker.store.pg_guard import GuardedPool
from broker.store.pg_notify import WAKE_CHANNEL, Notifier, WakeListener
from broker.store.pg_schema import MIGRATIONS, migrate
from broker.store.pg_url import DEFAULT_COMMAND_TIMEOUT, StoreParams, store_params
from broker.store.rows import lease_from_row, prefix_upper, token_from_row
from broker.store.sqlite_schema import StoreSchemaError

__all__ = ["MIGRATIONS", "WAKE_CHANNEL", "PostgresStore", "StoreParams", "StoreSchemaError",
           "store_params"]

log = logging.getLogger(__name__)

_MAX_ERROR_LEN = 2000
_LEASE_COL_NAMES = (
    "id", "mount", "role", "owner", "issue_time", "expire_time", "max_expire_time", "renewable",
    "state", "last_renewal", "revoke_attempts", "revoke_reason", "ended_at", "revocation",
    "metadata", "last_error",
)
_LEASE_COLS = ", ".join(_LEASE_COL_NAMES)
#: Columns of the tokens table (named so ruff does not take it for a hard-coded token).
_TK_COLS = (
    "accessor, token_hash, policies, created, expire_time, display_name, metadata, parent,"
    " state, max_expire_time, renewable, ended_at, creation_ttl, path, num_uses, period"
)
_REVOCABLE = "state IN ('active', 'irrevocable')"
#: Force takes over leases in retry backoff too, but not one already forced
#: (it may be in flight right now).
_FORCEABLE = (
    "(state IN ('active', 'irrevocable')"
    " OR (state = 'revoking' AND revoke_reason IS DISTINCT FROM 'force'))"
)
_DEAD_STATES = "('revoked', 'expired')"
_LIVE_STATES = "('pending', 'active', 'revoking', 'irrevocable')"
#: The states of a lease issued and not ended: what a revoke counts as matched.
_UNENDED_STATES = "('active', 'revoking', 'irrevocable')"
#: A live lease ``l`` that an unexpanded part of a revoke rule covers (base.py).
_COVERED = (
    "EXISTS (SELECT 1 FROM revoke_rules AS r WHERE l.issue_time <= r.created_at"
    " AND l.id > r.expanded_to AND l.id >= r.prefix"
    " AND (r.prefix_end IS NULL OR l.id < r.prefix_end)"
    " AND (r.owners IS NULL OR l.owner = ANY (r.owners)) AND l.metadata @> r.metadata)"
)
#: The state reads report: covered live leases are already "revoking".
_STATE = (
    f"(CASE WHEN l.state IN ('active', 'irrevocable') AND {_COVERED}"
    " THEN 'revoking' ELSE l.state END)"
)
#: _LEASE_COLS for ``FROM leases AS l``, with the state reads report.
_READ_COLS = ", ".join(f"{_STATE} AS state" if col == "state" else f"l.{col}"
                       for col in _LEASE_COL_NAMES)
#: "Now" by the database's clock, plus the slack a replica's clock may lead it by.
#: Claims test due times against the earlier of it and the caller's clock: a
#: replica whose clock runs ahead would otherwise revoke every lease early by
#: its lead, and take over other replicas' claims before they run out.
_CLOCK_SLACK = 0.5
_DB_NOW = f"(extract(epoch FROM statement_timestamp())::float8 + {_CLOCK_SLACK})"
#: Clock skew between a replica and the database worth a warning at start-up.
_SKEW_WARN = 1.0


class _StoreConnection(asyncpg.Connection):  # type: ignore[misc]  # untyped
    """A pooled store connection, released without the pool's reset query.

    asyncpg sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every release: one more round trip for every store call, which
    doubled the store's round trips and made the broker's CPU per call on this
    store twice SQLite's. The store's statements leave no session state for it
    to clear: settings are startup parameters, the only advisory lock is
    transaction-scoped, there are no cursors, and LISTEN runs on the wake
    listener's own connection, outside the pool. A connection released inside
    a transaction (a cancelled call) still gets asyncpg's ROLLBACK: that is
    not part of the reset query.
    """

    def get_reset_query(self) -> str:
        return ""


class _Args:
    """Collects query parameters and hands out their ``$n`` placeholders."""

    def __init__(self, *values: Any) -> None:
        self.values: list[Any] = list(values)

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _where(flt: LeaseFilter, args: _Args, states: Sequence[LeaseState] = (),
           state: str = "state") -> str:
    """SQL conditions for ``flt`` (joined with AND, TRUE when none); values go to ``args``.

    ``state`` is the expression ``states`` are tested against (``_STATE`` in reads).
    """
    clauses: list[str] = []
    if flt.prefix:
        clauses.append(f"id >= {args(flt.prefix)}")
        upper = prefix_upper(flt.prefix)
        if upper is not None:
            clauses.append(f"id < {args(upper)}")
    if flt.owners:
        clauses.append(f"owner = ANY({args(list(flt.owners))}::text[])")
    if flt.metadata:
        for key in flt.metadata:
            # jsonb would take any key; we keep SQLite's rule so both stores agree.
            check_meta_key(key)
        wanted = {key: str(value) for key, value in flt.metadata.items()}
        clauses.append(f"metadata @> {args(json.dumps(wanted))}::jsonb")
    if states:
        clauses.append(f"{state} = ANY({args([str(s) for s in states])}::text[])")
    return " AND ".join(clauses) or "TRUE"


def _live(reason: str) -> str:
    return _FORCEABLE if reason == "force" else _REVOCABLE


async def _rules_open(conn: Any) -> bool:
    """Whether any revoke rule is still being expanded.

    Scans and counts apply the rules (``_STATE``) only then: the overlay costs a
    subquery per row and keeps the planner off the state index (a count of 100k
    leases took 0.25 s instead of 1-15 ms). A rule committed between this check
    and the query is not seen, as if the read had run just before it.
    """
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM revoke_rules)"))


async def _state_expr(conn: Any, states: Sequence[LeaseState]) -> str:
    """The state expression a filter on ``states`` needs (no query when none)."""
    return _STATE if states and await _rules_open(conn) else "state"


async def _queue_matching(conn: Any, flt: LeaseFilter, *, reason: str, now: float) -> int:
    """queue_revoke_matching's one UPDATE, on ``conn``; returns how many it queued."""
    args = _Args(now, reason)
    cond = _where(flt, args)
    status = await conn.execute(
        f"UPDATE leases SET state = 'revoking', due_at = $1, revoke_reason = $2"
        f" WHERE {_live(reason)} AND {cond}",
        *args.values,
    )
    return _count(status)


async def _queue_counted(conn: Any, flt: LeaseFilter, *, reason: str, now: float
                        ) -> RevokeQueued:
    """_queue_matching's UPDATE, and in the same statement the matching leases not ended.

    One statement is one snapshot: the leases it queues are among those it counts,
    and the rest are the ones left as they were, already revoking. (One that a
    sweeper ends while the UPDATE waits for its row is counted there: it was being
    revoked when the revoke came.)
    """
    args = _Args(now, reason)
    cond = _where(flt, args)
    row = await conn.fetchrow(
        "WITH queued AS (UPDATE leases SET state = 'revoking', due_at = $1, revoke_reason = $2"
        f" WHERE {_live(reason)} AND {cond} RETURNING 1)"
        " SELECT (SELECT count(*) FROM queued) AS queued,"
        f" (SELECT count(*) FROM leases WHERE state IN {_UNENDED_STATES} AND {cond}) AS unended",
        *args.values,
    )
    queued = int(row["queued"])
    return RevokeQueued(queued, already_revoking=max(0, int(row["unended"]) - queued))


async def _mark_pending(conn: Any, flt: LeaseFilter, *, reason: str) -> None:
    """Mark the pending rows matching ``flt`` (issues in flight): activate refuses them.

    Run before the statement that queues the live ones, in the same transaction:
    an activation that commits in between is then seen live by that later
    statement, and one that comes after finds its row marked (base.py).
    """
    args = _Args(reason)
    await conn.execute(
        "UPDATE leases SET revoke_requested = $1"
        f" WHERE state = 'pending' AND revoke_requested IS NULL AND {_where(flt, args)}",
        *args.values)


async def _end_tokens(conn: Any, accessors: Sequence[str], *, state: str, now: float) -> int:
    """End the active tokens among ``accessors``; returns how many."""
    status = await conn.execute(
        "UPDATE tokens SET state = $1, ended_at = $2"
        " WHERE accessor = ANY($3::text[]) AND state = 'active'",
        _dead_state(state), now, list(accessors),
    )
    return _count(status)


def _count(status: str) -> int:
    """Rows changed, from a command tag such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


def _dead_state(state: LeaseState | TokenState | str) -> str:
    if str(state) not in {"revoked", "expired"}:
        raise ValueError(f"final state must be 'revoked' or 'expired', not {str(state)!r}")
    return str(state)


async def _warn_clock_skew(conn: Any) -> None:
    """Warn when this host's clock and the database's disagree.

    Lease times come from each replica's clock. Claims are never made early
    (``_DB_NOW``), but a replica whose clock lags revokes late and sets claims
    that run out early for the others: keep every host on NTP.
    """
    before = time.time()
    db_now = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
    skew = (before + time.time()) / 2 - db_now
    if abs(skew) > _SKEW_WARN:
        log.warning("this host's clock is %.1fs %s the lease database's; lease expiry and "
                    "claims between replicas assume synchronised clocks (run NTP)",
                    abs(skew), "ahead of" if skew > 0 else "behind")


class PostgresStore:
    """The LeaseStore protocol on a PostgreSQL database shared by broker replicas."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self.dsn = dsn
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.command_timeout = command_timeout
        #: tells this store's own NOTIFYs from other replicas'.
        self.origin = uuid.uuid4().hex
        self._pool: GuardedPool | None = None
        self._listener: WakeListener | None = None
        self._notifier = Notifier(self.origin)
        self._wake_callbacks: list[Callable[[float | None], None]] = []

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """``postgresql://user[:password]@host[:port]/database[?param=value...]``.

        ``pool_min_size``, ``pool_max_size`` and ``command_timeout`` (seconds) are
        the store's own parameters; any other (``sslmode``...) goes to asyncpg.
        Does no I/O.
        """
        parts = urlsplit(url)
        if parts.scheme not in {"postgresql", "postgres"}:
            raise ValueError(f"unsupported PostgreSQL url {redact_url(url)!r}: "
                             "use postgresql://USER@HOST:PORT/DATABASE")
        if not parts.path.strip("/"):
            raise ValueError(f"PostgreSQL url {redact_url(url)!r} names no database")
        try:
            params = store_params(parts.query)
        except ValueError as exc:
            raise ValueError(f"PostgreSQL url {redact_url(url)!r}: {exc}") from None
        dsn = urlunsplit(parts._replace(query=urlencode(params.rest)))
        return cls(dsn, pool_min_size=params.pool_min_size, pool_max_size=params.pool_max_size,
                   command_timeout=params.command_timeout)

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            raise RuntimeError("the PostgreSQL lease store is already open")
        settings = {"application_name": "broker"}
        conn = await asyncpg.connect(self.dsn, server_settings=settings)
        try:
            if await conn.fetchval("SELECT current_setting('synchronous_commit')") == "off":
                # A startup setting: it survives a RESET ALL (the pool sends none).
                log.warning("synchronous_commit is off for the lease database; the broker "
                            "turns it on for its own sessions (a lease must be durable)")
                settings["synchronous_commit"] = "on"
            await _warn_clock_skew(conn)
            await migrate(conn)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self.pool_min_size,
            max_size=self.pool_max_size,
            command_timeout=self.command_timeout,
            server_settings=settings,
            connection_class=_StoreConnection,
        )
        listener = WakeListener(self.dsn, settings, self.origin, self._wake_callbacks)
        try:
            await listener.start()
        except BaseException:
            await pool.close()
            raise
        self._pool, self._listener = GuardedPool(pool, timeout=self.command_timeout), listener
        self._notifier = Notifier(self.origin)
        self._notifier.start(pool)

    async def close(self) -> None:
        await self._notifier.stop()
        pool, self._pool = self._pool, None
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()
        if pool is not None:
            await pool.close()

    def add_wake_listener(self, callback: Callable[[float | None], None]) -> None:
        self._wake_callbacks.append(callback)

    @property
    def pool(self) -> GuardedPool:
        if self._pool is None:
            raise RuntimeError("the PostgreSQL lease store is not open")
        return self._pool

    @property
    def error(self) -> str | None:
        """Why the database could not be reached, until a query succeeds again."""
        return self._pool.error if self._pool is not None else None


    # -- leases: issue path ---------------------------------------------
    async def insert_pending(self, lease: Lease) -> None:
        await self.pool.execute(
            f"INSERT INTO leases ({_LEASE_COLS}, due_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
            " 'pending', $9, $10, $11, $12, $13::jsonb, $14::jsonb, $15, NULL)",
            lease.id, lease.mount, lease.role, lease.owner, lease.issue_time,
            lease.expire_time, lease.max_expire_time, lease.renewable,
            lease.last_renewal, lease.revoke_attempts, lease.revoke_reason, lease.ended_at,
            json.dumps(lease.revocation), json.dumps(dict(lease.metadata)), lease.last_error,
        )

    async def activate(
        self, lease_id: str, *, revocation: dict[str, Any], expire_time: float, renewable: bool,
        owner: str | None = None,
    ) -> None:
        sql = ("UPDATE leases SET state = 'active', revocation = $1::jsonb,"
               " expire_time = $2, renewable = $3, due_at = $2"
               " WHERE id = $4 AND state = 'pending' AND revoke_requested IS NULL")
        args: list[Any] = [json.dumps(revocation), expire_time, renewable, lease_id]
        if owner is not None:
            # FOR SHARE orders this against the token's end (an UPDATE of its row):
            # whichever comes second sees the other's commit. Without it, an
            # activation whose snapshot predates the end could commit after the
            # revoker had queued the token's leases, and stay live.
            sql += (" AND EXISTS (SELECT 1 FROM tokens WHERE accessor = $5"
                    " AND state = 'active' FOR SHARE)")
            args.append(owner)
        status = await self.pool.execute(sql, *args)
        if _count(status) != 1:
            token = None if owner is None else await self.token_by_accessor(owner)
            if owner is not None and (token is None or token.state is not TokenState.ACTIVE):
                raise owner_ended(lease_id)
            row = await self.pool.fetchrow(
                "SELECT state, revoke_requested FROM leases WHERE id = $1", lease_id)
            if row is not None and row["state"] == "pending" and row["revoke_requested"]:
                raise revoked_while_issued(lease_id, str(row["revoke_requested"]))
            # Rolled back meanwhile (stale-pending job): the credential must not be handed out.
            raise Conflict(f"lease {lease_id} is no longer pending; it cannot be activated")
        self._notifier.signal(expire_time)

    async def delete(self, lease_id: str) -> None:
        await self.pool.execute("DELETE FROM leases WHERE id = $1", lease_id)

    # -- leases: reads ----------------------------------------------------
    async def get(self, lease_id: str) -> Lease | None:
        row = await self.pool.fetchrow(f"SELECT {_READ_COLS} FROM leases AS l WHERE l.id = $1",
                                       lease_id)
        return None if row is None else lease_from_row(row)

    async def list_ids(
        self, flt: LeaseFilter, *, states: Sequence[LeaseState] = (), limit: int = 1000,
        after: str = "",
    ) -> list[str]:
        async with self.pool.acquire() as conn:
            args = _Args()
            cond = _where(flt, args, states, await _state_expr(conn, states))
            rows = await conn.fetch(
                f"SELECT id FROM leases AS l WHERE {cond} AND id > {args(after)}"
                f" ORDER BY id LIMIT {args(limit)}",
                *args.values,
            )
        return [str(row[0]) for row in rows]

    async def list_leases(
        self, flt: LeaseFilter, *, states: Sequence[LeaseState] = (), limit: int = 1000,
        after: str = "",
    ) -> list[Lease]:
        async with self.pool.acquire() as conn:
            rules = await _rules_open(conn)
            args = _Args()
            cond = _where(flt, args, states, _STATE if rules else "state")
            rows = await conn.fetch(
                f"SELECT {_READ_COLS if rules else _LEASE_COLS} FROM leases AS l"
                f" WHERE {cond} AND id > {args(after)} ORDER BY id LIMIT {args(limit)}",
                *args.values,
            )
        return [lease_from_row(row) for row in rows]

    async def count_by_state(self) -> dict[str, int]:
        async with self.pool.acquire() as conn:
            state = _STATE if await _rules_open(conn) else "state"
            rows = await conn.fetch(f"SELECT {state}, count(*) FROM leases AS l GROUP BY 1")
        counts = {str(state): 0 for state in LeaseState}
        counts.update({str(row[0]): int(row[1]) for row in rows})
        return counts

    async def count_overdue(self, *, before: float) -> dict[str, Overdue]:
        # An active lease is due at its expiry: the due_at index finds the overdue
        # ones among the few due before the cut-off; the state index the other live
        # states (few, bar a mass revoke's backlog). No live lease not overdue is read
        # (once autovacuum has analysed the table; before, the planner may scan it).
        rows = await self.pool.fetch(
            "SELECT mount, count(*), min(expire_time) FROM ("
            " SELECT mount, expire_time FROM leases WHERE due_at IS NOT NULL AND due_at < $1"
            "  AND state = 'active' AND expire_time < $1"
            " UNION ALL"
            " SELECT mount, expire_time FROM leases"
            "  WHERE state IN ('pending', 'revoking', 'irrevocable') AND expire_time < $1"
            ") AS o GROUP BY mount", before)
        return {str(row[0]): Overdue(int(row[1]), float(row[2])) for row in rows}

    async def count_matching(
        self, flt: LeaseFilter, *, states: Sequence[LeaseState] = ()
    ) -> int:
        async with self.pool.acquire() as conn:
            args = _Args()
            cond = _where(flt, args, states, await _state_expr(conn, states))
            return int(await conn.fetchval(f"SELECT count(*) FROM leases AS l WHERE {cond}",
                                           *args.values))

    # -- leases: renew --------------------------------------------------
    async def renew(self, lease_id: str, *, expire_time: float, now: float,
                    max_expire_time: float | None = None) -> bool:
        # No NOTIFY: a renewal that moves the due time earlier (a small increment, a
        # cap lowered by a reload) wakes this replica's sweeper (engine.renew), which
        # has the mount (it just renewed through it) and claims the lease. A lease a revoke
        # rule covers reads as revoking and is refused here too; a rule committed
        # meanwhile is seen (a statement's snapshot is taken when it starts).
        status = await self.pool.execute(
            "UPDATE leases AS l SET expire_time = $1, due_at = $1, last_renewal = $2,"
            " max_expire_time = coalesce($4::double precision, max_expire_time)"
            f" WHERE l.id = $3 AND l.state = 'active' AND NOT {_COVERED}",
            expire_time, now, lease_id, max_expire_time,
        )
        return _count(status) == 1

    # -- leases: revocation ----------------------------------------------
    async def queue_revoke(
        self, lease_id: str, *, reason: str, now: float, claimer: str | None = None,
        claim_until: float | None = None,
    ) -> Lease | None:
        due = now if claim_until is None else claim_until
        row = await self.pool.fetchrow(
            "UPDATE leases SET state = 'revoking', due_at = $1, revoke_reason = $2,"
            " claimed_by = $4"
            f" WHERE id = $3 AND {_REVOCABLE} RETURNING {_LEASE_COLS}",
            due, reason, lease_id, claimer if claim_until is not None else None,
        )
        if row is None:
            return None
        self._notifier.signal(due)
        return lease_from_row(row)

    async def queue_revoke_matching(self, flt: LeaseFilter, *, reason: str, now: float) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            await _mark_pending(conn, flt, reason=reason)
            count = await _queue_matching(conn, flt, reason=reason, now=now)
        if count:
            self._notifier.signal(now)
        return count

    async def queue_revoke_rule(
        self, flt: LeaseFilter, *, reason: str, now: float, inline_max: int, claimer: str,
        claim_until: float, end_tokens: str | None = None,
    ) -> RevokeQueued:
        args = _Args()
        cond = _where(flt, args)
        ended = 0
        async with self.pool.acquire() as conn, conn.transaction():
            if end_tokens is not None:
                # First, so that an activation holding a token's row FOR SHARE
                # commits before this goes on, and the queueing below (a later
                # statement, a later snapshot) sees its lease live.
                ended = await _end_tokens(conn, flt.owners, state=end_tokens, now=now)
            # Before the live leases are counted and queued (or a rule covers
            # them): see _mark_pending. A rule's expansion may pass a lease's id
            # before its issue finishes; the mark still stops it going live.
            await _mark_pending(conn, flt, reason=reason)
            live = _live(reason)
            found = await conn.fetchrow(
                f"SELECT count(*) FILTER (WHERE {live}), max(issue_time) FILTER (WHERE {live}),"
                f" count(*) FROM leases WHERE state IN {_UNENDED_STATES} AND {cond}",
                *args.values)
            matched = int(found[0])
            if matched <= inline_max:
                # Counted again as they are queued: this count's snapshot is not that one.
                queued = await _queue_counted(conn, flt, reason=reason, now=now)
            else:
                rule_id = uuid.uuid4().hex
                # The rule covers leases issued up to its time, by the issuing
                # replicas' clocks: one that runs ahead of ours may have issued
                # a lease counted above "after" now. Every counted lease must be
                # covered, so the rule's time is at least the newest issue time.
                created = now if found[1] is None else max(now, float(found[1]))
                await conn.execute(
                    "INSERT INTO revoke_rules (id, prefix, prefix_end, owners, metadata, reason,"
                    " created_at, claimed_by, claim_until)"
                    " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9)",
                    rule_id, flt.prefix, prefix_upper(flt.prefix) if flt.prefix else None,
                    list(flt.owners) if flt.owners else None,
                    json.dumps({key: str(value) for key, value in flt.metadata.items()}),
                    reason, created, claimer, claim_until,
                )
                queued = RevokeQueued(matched, rule_id,
                                      already_revoking=int(found[2]) - matched)
        if queued.queued and queued.rule_id is None:
            self._notifier.signal(now)
        return dataclasses.replace(queued, tokens_ended=ended)

    async def claim_revoke_rule(
        self, *, claimer: str, now: float, claim_until: float
    ) -> str | None:
        rule_id = await self.pool.fetchval(
            "UPDATE revoke_rules SET claimed_by = $1, claim_until = $2 WHERE id ="
            " (SELECT id FROM revoke_rules WHERE claimed_by = $1"
            f"  OR claim_until <= least($3, {_DB_NOW})"
            "  ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
            claimer, claim_until, now,
        )
        return None if rule_id is None else str(rule_id)

    async def expand_revoke_rule(
        self, rule_id: str, *, claimer: str, now: float, limit: int, claim_until: float
    ) -> RuleChunk | None:
        async with self.pool.acquire() as conn, conn.transaction():
            # The row lock serialises steps: a replica that took the rule over
            # meanwhile waits here for this step, then goes on from its end.
            rule = await conn.fetchrow(
                "SELECT prefix, owners, metadata::text AS metadata, reason, created_at,"
                " expanded_to FROM revoke_rules WHERE id = $1 AND claimed_by = $2 FOR UPDATE",
                rule_id, claimer,
            )
            if rule is None:
                return None
            flt = LeaseFilter(prefix=rule["prefix"], owners=tuple(rule["owners"] or ()),
                              metadata=json.loads(rule["metadata"]))
            reason = str(rule["reason"])

            def covered(args: _Args) -> str:
                return (f"{_live(reason)} AND {_where(flt, args)}"
                        f" AND issue_time <= {args(rule['created_at'])}"
                        f" AND id > {args(rule['expanded_to'])}")

            # Where this step ends: the limit-th covered lease (None: past the last).
            args = _Args()
            cond = covered(args)
            end = await conn.fetchval(
                f"SELECT id FROM leases WHERE {cond} ORDER BY id"
                f" OFFSET {args(limit - 1)} LIMIT 1", *args.values)
            # One UPDATE over the id range, not the ids found above: a row that
            # changed meanwhile is checked again on its newest version.
            args = _Args(now, reason)
            cond = covered(args)
            if end is not None:
                cond += f" AND id <= {args(end)}"
            status = await conn.execute(
                f"UPDATE leases SET state = 'revoking', due_at = $1, revoke_reason = $2"
                f" WHERE {cond}", *args.values)
            if end is None:
                await conn.execute("DELETE FROM revoke_rules WHERE id = $1", rule_id)
            else:
                await conn.execute(
                    "UPDATE revoke_rules SET expanded_to = $1, claim_until = $2 WHERE id = $3",
                    end, claim_until, rule_id)
        count = _count(status)
        if count:
            self._notifier.signal(now)
        return RuleChunk(count, done=end is None)

    async def release_revoke_rules(self, *, claimer: str) -> None:
        await self.pool.execute(
            "UPDATE revoke_rules SET claimed_by = NULL, claim_until = 0 WHERE claimed_by = $1",
            claimer)

    async def next_due(self, *, mounts: Collection[str] | None = None) -> float | None:
        if mounts is None:
            due = await self.pool.fetchval(
                "SELECT due_at FROM leases WHERE due_at IS NOT NULL ORDER BY due_at LIMIT 1")
        else:
            due = await self.pool.fetchval(
                "SELECT due_at FROM leases WHERE due_at IS NOT NULL AND mount = ANY($1::text[])"
                " ORDER BY due_at LIMIT 1", list(mounts))
        return None if due is None else float(due)

    async def claim_due(
        self, *, now: float, limit: int, claimer: str, claim_timeout: float,
        mounts: Collection[str] | None = None,
    ) -> list[Lease]:
        if limit <= 0:
            return []
        args: list[Any] = [now + claim_timeout, claimer, now, limit]
        served = ""
        if mounts is not None:
            # Leases of a mount this replica lacks are left to one that has it
            # (revoking them here could only fail); forced ones only for a while.
            args.append(list(mounts))
            served = (" AND (mount = ANY($5::text[]) OR (revoke_reason = 'force'"
                      f" AND due_at <= least($3, {_DB_NOW}) - {FORCE_TAKEOVER}))")
        # least(): "due" by the caller's clock AND the database's (see _DB_NOW).
        # SKIP LOCKED: a row another replica is claiming right now is left to it,
        # and the scan goes on to the next due row instead of waiting.
        # MATERIALIZED: the locking SELECT runs exactly once; were the planner to
        # rescan it (say, inside a join), rows we already locked would come back
        # and the statement would claim more than ``limit``.
        rows = await self.pool.fetch(
            "WITH c AS MATERIALIZED (SELECT id, due_at FROM leases"
            f"  WHERE due_at IS NOT NULL AND due_at <= least($3, {_DB_NOW})"
            f"  AND state IN ('active', 'revoking'){served}"
            "  ORDER BY due_at, id LIMIT $4 FOR UPDATE SKIP LOCKED)"
            " UPDATE leases AS l SET state = 'revoking', due_at = $1, claimed_by = $2,"
            " revoke_reason = coalesce(l.revoke_reason, 'expire')"
            " FROM c WHERE l.id = c.id RETURNING c.due_at AS claimed_due,"
            f" {', '.join('l.' + col for col in _LEASE_COL_NAMES)}",
            *args,
        )
        rows = sorted(rows, key=lambda row: (row["claimed_due"], row["id"]))
        return [lease_from_row(row) for row in rows]

    async def release_claim(self, lease_id: str, *, claimer: str, due_at: float) -> bool:
        status = await self.pool.execute(
            "UPDATE leases SET claimed_by = NULL, due_at = $1"
            " WHERE id = $2 AND state = 'revoking' AND claimed_by = $3",
            due_at, lease_id, claimer)
        if _count(status) != 1:
            return False
        self._notifier.signal(due_at)  # a replica that has the mount takes it
        return True

    async def unserved_mounts(
        self, mounts: Collection[str], *, due_by: float | None = None
    ) -> dict[str, int]:
        if due_by is None:
            rows = await self.pool.fetch(
                f"SELECT mount, count(*) FROM leases WHERE state IN {_LIVE_STATES}"
                " AND mount <> ALL($1::text[]) GROUP BY mount", list(mounts))
        else:
            rows = await self.pool.fetch(
                "SELECT mount, count(*) FROM leases WHERE due_at IS NOT NULL AND due_at <= $2"
                " AND mount <> ALL($1::text[]) GROUP BY mount", list(mounts), due_by)
        return {str(row[0]): int(row[1]) for row in rows}

    async def finish_revoke(self, lease_id: str, *, state: LeaseState, now: float) -> None:
        # Any live state may end here: a forced revocation finishes an irrevocable lease.
        await self.pool.execute(
            f"UPDATE leases SET state = $1, ended_at = $2, due_at = NULL"
            f" WHERE id = $3 AND state NOT IN {_DEAD_STATES} AND state != 'pending'",
            _dead_state(state), now, lease_id,
        )

    async def finish_revoke_many(
        self, items: Sequence[tuple[str, LeaseState]], *, now: float,
        claimer: str | None = None,
    ) -> None:
        if not items:
            return
        args: list[object] = [
            [lease_id for lease_id, _ in items], [_dead_state(state) for _, state in items], now]
        # The claim test is made again on the newest row version (READ COMMITTED):
        # a replica that took the claim over meanwhile keeps it.
        held = ""
        if claimer is not None:
            args.append(claimer)
            held = " AND l.claimed_by = $4"
        # One statement, one commit (one WAL flush) for the whole batch.
        await self.pool.execute(
            "UPDATE leases AS l SET state = e.state, ended_at = $3, due_at = NULL"
            " FROM unnest($1::text[], $2::text[]) AS e(id, state)"
            f" WHERE l.id = e.id AND l.state = 'revoking'{held}",
            *args,
        )

    async def fail_revoke(
        self, lease_id: str, *, error: str, next_attempt: float | None, now: float,
        claimer: str | None = None,
    ) -> int:
        """Returns the attempts so far, or 0 when the lease was no longer revoking
        or (with ``claimer``) is claimed by someone else."""
        state = "irrevocable" if next_attempt is None else "revoking"
        # PostgreSQL text cannot hold NUL; a backend's message might.
        args: list[object] = [
            error[:_MAX_ERROR_LEN].replace("\x00", ""), state, next_attempt, lease_id]
        held = ""
        if claimer is not None:
            args.append(claimer)
            held = " AND claimed_by = $5"
        attempts = await self.pool.fetchval(
            "UPDATE leases SET revoke_attempts = revoke_attempts + 1, last_error = $1,"
            f" state = $2, due_at = $3 WHERE id = $4 AND state = 'revoking'{held}"
            " RETURNING revoke_attempts",
            *args,
        )
        return 0 if attempts is None else int(attempts)

    async def requeue_irrevocable(self, *, now: float, limit: int,
                                  mounts: Collection[str] | None = None) -> int:
        # Fewest attempts first: a retried lease gains one, so a limit smaller than
        # the backlog still gets round to every lease in turn. The outer state test
        # is checked again on the latest row version, so two replicas running this
        # job at once never requeue a lease the other already requeued and claimed.
        args: list[Any] = [now, limit]
        served = ""
        if mounts is not None:
            args.append(list(mounts))
            served = " AND mount = ANY($3::text[])"
        status = await self.pool.execute(
            "WITH c AS MATERIALIZED (SELECT id FROM leases WHERE state = 'irrevocable'"
            f"{served} ORDER BY revoke_attempts, issue_time LIMIT $2 FOR UPDATE SKIP LOCKED)"
            " UPDATE leases AS l SET state = 'revoking', due_at = $1 FROM c"
            " WHERE l.id = c.id AND l.state = 'irrevocable'",
            *args,
        )
        count = _count(status)
        if count:
            self._notifier.signal(now)
        return count

    async def stale_pending(self, *, before: float, limit: int,
                            mounts: Collection[str] | None = None) -> list[Lease]:
        args: list[Any] = [before, limit]
        served = ""
        if mounts is not None:
            args.append(list(mounts))
            served = " AND mount = ANY($3::text[])"
        rows = await self.pool.fetch(
            f"SELECT {_LEASE_COLS} FROM leases WHERE state = 'pending' AND issue_time < $1"
            f"{served} ORDER BY issue_time LIMIT $2",
            *args,
        )
        return [lease_from_row(row) for row in rows]

    async def purge_tombstones(self, *, before: float, limit: int) -> int:
        status = await self.pool.execute(
            "WITH c AS MATERIALIZED (SELECT id FROM leases"
            f"  WHERE ended_at IS NOT NULL AND ended_at < $1 AND state IN {_DEAD_STATES}"
            "  ORDER BY ended_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            " DELETE FROM leases AS l USING c WHERE l.id = c.id",
            before, limit,
        )
        return _count(status)

    async def purge_ended_tokens(self, *, before: float, limit: int) -> int:
        status = await self.pool.execute(
            "WITH c AS MATERIALIZED (SELECT accessor FROM tokens"
            "  WHERE state <> 'active' AND ended_at < $1"
            "  ORDER BY ended_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            " DELETE FROM tokens AS t USING c WHERE t.accessor = c.accessor",
            before, limit,
        )
        return _count(status)

    # -- tokens ----------------------------------------------------------
    async def insert_token(self, token: Token) -> None:
        await self.pool.execute(
            f"INSERT INTO tokens ({_TK_COLS}) VALUES"
            " ($1, $2, $3::jsonb, $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12, $13, $14, $15,"
            " $16)",
            token.accessor, token.token_hash, json.dumps(list(token.policies)), token.created,
            token.expire_time, token.display_name, json.dumps(dict(token.metadata)),
            token.parent, str(token.state), token.max_expire_time, token.renewable,
            token.ended_at, token.creation_ttl, token.path or None, token.num_uses,
            token.period,
        )

    async def use_token(self, accessor: str) -> int | None:
        # One statement: a concurrent use (any replica) waits on the row lock, then sees
        # the count this one left, so the uses add up whatever the interleaving.
        value = await self.pool.fetchval(
            "UPDATE tokens SET num_uses = CASE WHEN num_uses = 1 THEN -1 ELSE num_uses - 1 END"
            " WHERE accessor = $1 AND num_uses > 0 AND state = 'active' RETURNING num_uses",
            accessor,
        )
        return None if value is None else int(value)

    async def token_by_hash(self, token_hash: str) -> Token | None:
        row = await self.pool.fetchrow(f"SELECT {_TK_COLS} FROM tokens WHERE token_hash = $1",
                                       token_hash)
        return None if row is None else token_from_row(row)

    async def token_by_accessor(self, accessor: str) -> Token | None:
        row = await self.pool.fetchrow(f"SELECT {_TK_COLS} FROM tokens WHERE accessor = $1",
                                       accessor)
        return None if row is None else token_from_row(row)

    async def child_tokens(self, accessor: str) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT accessor FROM tokens WHERE parent = $1 AND state = 'active'"
            " ORDER BY accessor",
            accessor,
        )
        return [str(row[0]) for row in rows]

    async def end_token(self, accessor: str, *, state: str, now: float) -> bool:
        return await _end_tokens(self.pool, (accessor,), state=state, now=now) == 1

    async def renew_token(self, accessor: str, *, expire_time: float) -> bool:
        status = await self.pool.execute(
            "UPDATE tokens SET expire_time = $1 WHERE accessor = $2 AND state = 'active'",
            expire_time, accessor,
        )
        return _count(status) == 1

    async def expired_tokens(self, *, now: float, limit: int) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT accessor FROM tokens WHERE state = 'active' AND expire_time IS NOT NULL"
            " AND expire_time <= $1 ORDER BY expire_time LIMIT $2",
            now, limit,
        )
        return [str(row[0]) for row in rows]

    async def spent_tokens(self, *, limit: int) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT accessor FROM tokens WHERE state = 'active' AND num_uses < 0 LIMIT $1",
            limit,
        )
        return [str(row[0]) for row in rows]

    async def live_token_accessors(self, *, now: float, limit: int,
                                   after: str = "") -> list[str]:
        rows = await self.pool.fetch(
            "SELECT accessor FROM tokens WHERE state = 'active' AND accessor > $1"
            " AND (expire_time IS NULL OR expire_time > $2) ORDER BY accessor LIMIT $3",
            after, now, limit,
        )
        return [str(row[0]) for row in rows]

    async def delete_tokens_by_display_name(self, display_name: str) -> int:
        status = await self.pool.execute("DELETE FROM tokens WHERE display_name = $1",
                                         display_name)
        return _count(status)

    # -- single-use JWTs -------------------------------------------------
    async def record_jwt_use(self, method: str, jti_hash: str, *, accessor: str,
                             until: float, now: float) -> str | None:
        # One statement: a concurrent insert of the same key (another replica) makes
        # this one wait for it and then do nothing, so exactly one counts a row.
        row = await self.pool.fetchrow(
            "WITH ins AS (INSERT INTO used_jwts (method, jti_hash, used_at, valid_until, accessor)"
            "  VALUES ($1, $2, $3, $4, $5) ON CONFLICT (method, jti_hash) DO UPDATE SET"
            "  used_at = EXCLUDED.used_at, valid_until = EXCLUDED.valid_until,"
            "  accessor = EXCLUDED.accessor WHERE used_jwts.valid_until < $3 RETURNING 1)"
            " SELECT (SELECT count(*) FROM ins) AS recorded, (SELECT accessor FROM used_jwts"
            "  WHERE method = $1 AND jti_hash = $2) AS earlier",
            method, jti_hash, now, until, accessor,
        )
        assert row is not None
        if row["recorded"]:
            return None
        # The statement's snapshot may predate the winner's commit: then unknown.
        return str(row["earlier"] or "")

    async def forget_jwt_use(self, method: str, jti_hash: str, *, accessor: str) -> None:
        await self.pool.execute(
            "DELETE FROM used_jwts WHERE method = $1 AND jti_hash = $2 AND accessor = $3",
            method, jti_hash, accessor)

    async def purge_used_jwts(self, *, before: float, limit: int) -> int:
        status = await self.pool.execute(
            "WITH c AS MATERIALIZED (SELECT method, jti_hash FROM used_jwts"
            "  WHERE valid_until < $1 ORDER BY valid_until LIMIT $2 FOR UPDATE SKIP LOCKED)"
            " DELETE FROM used_jwts AS u USING c"
            " WHERE u.method = c.method AND u.jti_hash = c.jti_hash",
            before, limit,
        )
        return _count(status)
