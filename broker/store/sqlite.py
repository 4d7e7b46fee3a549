"""The embedded lease store: one SQLite file in WAL mode, with durable group commits.

A write returns only after the COMMIT holding it is on disk; concurrent
writes share one transaction (one fsync), and reads never wait behind a
writer. How: sqlite_writer.py.

Every write operation changes rows in at most one statement (``_atomic``
makes several one unit). SQLite undoes a failed statement on its own, so one
bad operation (say a duplicate id) fails alone and the rest of its batch
still commits.

This module holds the store itself and the SQL of every call. Beside it:
sqlite_writer.py (the connections and their threads, the group-committing
writer, the flock its processes take turns under) and sqlite_schema.py (the
tables, their migrations and how a connection is opened).
"""

from __future__ import annotations

import json
import math
import sqlite3
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from broker.errors import Conflict
from broker.lease import Lease, LeaseFilter, LeaseState, Token, TokenState, check_meta_key
from broker.store.base import (
    FORCE_TAKEOVER,
    Overdue,
    RevokeQueued,
    RuleChunk,
    owner_ended,
    revoked_while_issued,
)
from broker.store.rows import lease_from_row, prefix_upper, token_from_row
from broker.store.sqlite_schema import MIGRATIONS, StoreSchemaError
from broker.store.sqlite_writer import DEFAULT_COMMAND_TIMEOUT, Op, SQLiteConnections

__all__ = ["DEFAULT_COMMAND_TIMEOUT", "MIGRATIONS", "SQLiteStore", "StoreSchemaError"]

T = TypeVar("T")

#: Operators read last_error; a backend's error essay need not be kept whole.
_MAX_ERROR_LEN = 2000
_LEASE_COLS = (
    "id, mount, role, owner, issue_time, expire_time, max_expire_time, renewable, state,"
    " last_renewal, revoke_attempts, revoke_reason, ended_at, revocation, metadata, last_error"
)
#: Columns of the tokens table (named so ruff does not take it for a hard-coded token).
_TK_COLS = (
    "accessor, token_hash, policies, created, expire_time, display_name, metadata, parent,"
    " state, max_expire_time, renewable, ended_at, creation_ttl, path, num_uses, period"
)
#: One use of a use-limited token (base.py use_token): the last leaves -1, not 0 (no limit).
_TAKE_USE = (
    "UPDATE tokens SET num_uses = CASE WHEN num_uses = 1 THEN -1 ELSE num_uses - 1 END"
    " WHERE accessor = ? AND num_uses > 0 AND state = 'active' RETURNING num_uses"
)
#: A used JWT's record: a new one, or one past its valid_until (an issuer that reused a jti).
_RECORD_JWT = (
    "INSERT INTO used_jwts (method, jti_hash, used_at, valid_until, accessor)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (method, jti_hash) DO UPDATE SET"
    " used_at = excluded.used_at, valid_until = excluded.valid_until,"
    " accessor = excluded.accessor WHERE used_jwts.valid_until < ?"
)
#: The only states in which a row may have a due_at.
_DUE_STATES = "('active', 'revoking')"
# A ``+state`` in SQL below keeps the planner off the state index where another
# index (due_at, ended_at, id range, owner) finds far fewer rows: without
# statistics it would otherwise pick the state index and scan every active lease.
_REVOCABLE_STATES = "('active', 'irrevocable')"
_DEAD_STATES = "('revoked', 'expired')"
_LIVE_STATES = "('pending', 'active', 'revoking', 'irrevocable')"
#: The states of a lease issued and not ended: what a revoke counts as matched.
_UNENDED_STATES = "('active', 'revoking', 'irrevocable')"
#: A live lease ``l`` that an unexpanded part of a revoke rule covers (base.py).
#: Metadata keys were checked by _where when the rule was made.
_COVERED = (
    "EXISTS (SELECT 1 FROM revoke_rules AS r WHERE l.issue_time <= r.created_at"
    " AND l.id > r.expanded_to AND l.id >= r.prefix"
    " AND (r.prefix_end IS NULL OR l.id < r.prefix_end)"
    " AND (r.owners IS NULL OR l.owner IN (SELECT value FROM json_each(r.owners)))"
    " AND NOT EXISTS (SELECT 1 FROM json_each(r.metadata) AS m"
    "  WHERE json_extract(l.metadata, '$.\"' || m.key || '\"') IS NOT m.value))"
)
#: The state reads report: covered live leases are already "revoking".
_STATE = (
    f"(CASE WHEN l.state IN {_REVOCABLE_STATES} AND {_COVERED}"
    " THEN 'revoking' ELSE l.state END)"
)
#: _LEASE_COLS for ``FROM leases AS l``, with the state reads report.
_READ_COLS = ", ".join(f"{_STATE} AS state" if col == "state" else f"l.{col}"
                       for col in _LEASE_COLS.replace(" ", "").split(","))


#: count_overdue's query. An active lease is due at its expiry, so the ``due_at`` index
#: finds the overdue active ones among the few due before the cut-off (``+state``: not
#: the state index, which would read every active lease); the other live states are
#: few (bar a mass revoke's backlog) and the state index finds them. ``INDEXED BY``:
#: after an ANALYZE (the broker runs none; an operator may) the planner took each of
#: the three states for a third of the table and scanned all of it instead.
_OVERDUE = (
    "SELECT mount, count(*), min(expire_time) FROM ("
    " SELECT mount, expire_time FROM leases WHERE due_at IS NOT NULL AND due_at < ?"
    "  AND +state = 'active' AND expire_time < ?"
    " UNION ALL"
    " SELECT mount, expire_time FROM leases INDEXED BY leases_state"
    "  WHERE state IN ('pending', 'revoking', 'irrevocable') AND expire_time < ?"
    ") GROUP BY mount"
)


def _state_col(flt: LeaseFilter) -> str:
    """The id range or owner index beats the state index whenever the filter has one."""
    return "+state" if flt.prefix or flt.owners else "state"


def _where(flt: LeaseFilter, states: Sequence[LeaseState] = (), state: str = ""
           ) -> tuple[str, list[Any]]:
    """SQL conditions (joined with AND, "1" when none) and their parameters.

    ``state`` is the expression ``states`` are tested against (``_STATE`` in reads).
    """
    clauses: list[str] = []
    params: list[Any] = []
    if flt.prefix:
        clauses.append("id >= ?")
        params.append(flt.prefix)
        upper = prefix_upper(flt.prefix)
        if upper is not None:
            clauses.append("id < ?")
            params.append(upper)
    if flt.owners:
        # One parameter however many owners: no limit on bound variables to hit.
        clauses.append("owner IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(flt.owners)))
    for key, value in flt.metadata.items():
        check_meta_key(key)
        clauses.append("json_extract(metadata, ?) = ?")
        params.extend([f'$."{key}"', str(value)])
    if states:
        clauses.append(f"{state or _state_col(flt)} IN ({', '.join('?' * len(states))})")
        params.extend(str(s) for s in states)
    return " AND ".join(clauses) or "1", params


def _live(flt: LeaseFilter, reason: str) -> str:
    """The states a revoke for ``reason`` takes leases from."""
    state = _state_col(flt)
    live = f"{state} IN {_REVOCABLE_STATES}"
    if reason == "force":
        # Force also takes over leases stuck in retry backoff; one already
        # forced is left alone (it may be in flight right now).
        live = f"({live} OR ({state} = 'revoking' AND revoke_reason IS NOT 'force'))"
    return live


def _queue_matching(flt: LeaseFilter, reason: str, now: float) -> Op[int]:
    """queue_revoke_matching's one UPDATE."""
    cond, params = _where(flt)
    return _rowcount(
        f"UPDATE leases SET state = 'revoking', due_at = ?, revoke_reason = ?"
        f" WHERE {_live(flt, reason)} AND {cond}",
        [now, reason, *params],
    )


def _mark_pending(flt: LeaseFilter, reason: str) -> Op[int]:
    """Mark the pending rows matching ``flt`` (issues in flight): activate refuses them."""
    cond, params = _where(flt)
    return _rowcount(
        "UPDATE leases SET revoke_requested = ?"
        f" WHERE state = 'pending' AND revoke_requested IS NULL AND {cond}",
        [reason, *params],
    )


def _mounts_in(mounts: Collection[str]) -> tuple[str, str]:
    """A condition on ``mount`` being one of ``mounts`` and its one parameter."""
    return "mount IN (SELECT value FROM json_each(?))", json.dumps(sorted(mounts))


def _end_tokens(accessors: Sequence[str], state: str, now: float) -> Op[int]:
    """End the active tokens among ``accessors``; how many."""
    # One parameter however large the token tree, as _where's owner filter.
    return _rowcount(
        "UPDATE tokens SET state = ?, ended_at = ?"
        " WHERE accessor IN (SELECT value FROM json_each(?)) AND state = 'active'",
        [_dead_state(state), now, json.dumps(list(accessors))],
    )


def _atomic(op: Op[T]) -> Op[T]:
    """``op`` (several statements) as one unit inside the writer's batch transaction."""

    def run(conn: sqlite3.Connection) -> T:
        conn.execute("SAVEPOINT op")
        try:
            result = op(conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            raise
        conn.execute("RELEASE op")
        return result

    return run


def _rows_by_rules(query: Callable[[bool], tuple[str, Sequence[Any]]], needed: bool = True,
                   ) -> Op[list[sqlite3.Row]]:
    """The rows of ``query(rules_open)``: scans and counts apply the revoke rules
    (``_STATE``) only while one is being expanded (and only when ``needed``), as
    the overlay costs a subquery per row."""

    def run(conn: sqlite3.Connection) -> list[sqlite3.Row]:
        rules = needed and conn.execute(
            "SELECT EXISTS (SELECT 1 FROM revoke_rules)").fetchone()[0] == 1
        sql, params = query(rules)
        return conn.execute(sql, params).fetchall()

    return run


#: activate's condition with an owner: the token that asked is still active.
_OWNER_ACTIVE = " AND EXISTS (SELECT 1 FROM tokens WHERE accessor = ? AND state = 'active')"


def _token_active(conn: sqlite3.Connection, accessor: str) -> bool:
    row = conn.execute("SELECT state FROM tokens WHERE accessor = ?", (accessor,)).fetchone()
    return row is not None and row[0] == TokenState.ACTIVE.value


def _rowcount(sql: str, params: Sequence[Any]) -> Op[int]:
    return lambda conn: conn.execute(sql, params).rowcount


def _rows(sql: str, params: Sequence[Any]) -> Op[list[sqlite3.Row]]:
    return lambda conn: conn.execute(sql, params).fetchall()


def _dead_state(state: LeaseState | TokenState | str) -> str:
    if str(state) not in {"revoked", "expired"}:
        raise ValueError(f"final state must be 'revoked' or 'expired', not {str(state)!r}")
    return str(state)


class SQLiteStore(SQLiteConnections):
    """The LeaseStore protocol on one SQLite database file."""

    def __init__(self, path: str, *, command_timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        super().__init__(path, command_timeout=command_timeout)
        self._wake_listeners: list[Callable[[float | None], None]] = []

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        """``sqlite:///abs/path.db`` (``sqlite:////abs/path.db`` too) or ``sqlite:///:memory:``.

        ``?command_timeout=SECONDS``: how long a write may wait for its commit.
        """
        if not url.startswith("sqlite:///"):
            raise ValueError(f"unsupported SQLite url {url!r}: use sqlite:///ABSOLUTE/PATH.db")
        path, _, query = url[len("sqlite://") :].partition("?")
        params = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(params) - {"command_timeout"})
        if unknown:
            raise ValueError(f"SQLite url {url!r}: unknown parameter {unknown[0]!r} "
                             "(only command_timeout)")
        try:
            timeout = float(params.get("command_timeout", DEFAULT_COMMAND_TIMEOUT))
        except ValueError:
            timeout = 0.0
        if not 0 < timeout < math.inf:
            raise ValueError(f"SQLite url {url!r}: command_timeout must be a number of "
                             "seconds > 0")
        if path == "/:memory:":
            return cls(":memory:", command_timeout=timeout)
        if path.startswith("//"):  # the four-slash spelling of an absolute path
            path = path[1:]
        if path == "/":
            raise ValueError(f"SQLite url {url!r} names no file")
        return cls(path, command_timeout=timeout)

    # -- lifecycle (open and close: SQLiteConnections) ---------------
    def add_wake_listener(self, callback: Callable[[float | None], None]) -> None:
        # One process owns the file: every change is made here and the caller
        # wakes its own sweeper, so there is nothing to report. Kept for parity.
        self._wake_listeners.append(callback)

    # -- leases: issue path ---------------------------------------------
    async def insert_pending(self, lease: Lease) -> None:
        await self._write(_rowcount(
            f"INSERT INTO leases ({_LEASE_COLS}, due_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, NULL)",
            (lease.id, lease.mount, lease.role, lease.owner, lease.issue_time,
             lease.expire_time, lease.max_expire_time, int(lease.renewable),
             lease.last_renewal, lease.revoke_attempts, lease.revoke_reason, lease.ended_at,
             json.dumps(lease.revocation), json.dumps(dict(lease.metadata)), lease.last_error),
        ))

    async def activate(
        self, lease_id: str, *, revocation: dict[str, Any], expire_time: float, renewable: bool,
        owner: str | None = None,
    ) -> None:
        sql = ("UPDATE leases SET state = 'active', revocation = ?, expire_time = ?,"
               " renewable = ?, due_at = ? WHERE id = ? AND state = 'pending'"
               " AND revoke_requested IS NULL")
        params: list[Any] = [json.dumps(revocation), expire_time, int(renewable), expire_time,
                             lease_id]
        if owner is not None:
            sql += _OWNER_ACTIVE
            params.append(owner)

        def op(conn: sqlite3.Connection) -> bool | str | None:
            """True: activated; False: the owner token is not active; a str: a revoke
            marked the pending row (its reason); None: not pending."""
            if conn.execute(sql, params).rowcount == 1:
                return True
            if owner is not None and not _token_active(conn, owner):
                return False
            row = conn.execute("SELECT state, revoke_requested FROM leases WHERE id = ?",
                               (lease_id,)).fetchone()
            if row is not None and row[0] == "pending" and row[1]:
                return str(row[1])
            return None

        outcome = await self._write(op)
        if outcome is False:
            raise owner_ended(lease_id)
        if isinstance(outcome, str):
            raise revoked_while_issued(lease_id, outcome)
        if outcome is None:
            # Rolled back meanwhile (stale-pending job): the credential must not be handed out.
            raise Conflict(f"lease {lease_id} is no longer pending; it cannot be activated")

    async def delete(self, lease_id: str) -> None:
        await self._write(_rowcount("DELETE FROM leases WHERE id = ?", (lease_id,)))

    # -- leases: reads ----------------------------------------------------
    async def get(self, lease_id: str) -> Lease | None:
        rows = await self._point_read(_rows(
            f"SELECT {_READ_COLS} FROM leases AS l WHERE l.id = ?", (lease_id,)))
        return lease_from_row(rows[0]) if rows else None

    async def list_ids(
        self, flt: LeaseFilter, *, states: Sequence[LeaseState] = (), limit: int = 1000,
        after: str = "",
    ) -> list[str]:
        def query(rules: bool) -> tuple[str, list[Any]]:
            cond, params = _where(flt, states, _STATE if rules else "")
            return (f"SELECT id FROM leases AS l WHERE {cond} AND id > ? ORDER BY id LIMIT ?",
                    [*params, after, limit])

        rows = await self._read(_rows_by_rules(query, bool(states)))
        return [row[0] for row in rows]

    async def list_leases(
        self, flt: LeaseFilter, *, states: Sequence[LeaseState] = (), limit: int = 1000,
        after: str = "",
    ) -> list[Lease]:
        def query(rules: bool) -> tuple[str, list[Any]]:
            cond, params = _where(flt, states, _STATE if rules else "")
            return (f"SELECT {_READ_COLS if rules else _LEASE_COLS} FROM leases AS l"
                    f" WHERE {cond} AND l.id > ? ORDER BY l.id LIMIT ?",
                    [*params, after, limit])

        rows = await self._read(_rows_by_rules(query))
        return [lease_from_row(row) for row in rows]

    async def count_by_state(self) -> dict[str, int]:
        rows = await self._read(_rows_by_rules(lambda rules: (
            f"SELECT {_STATE if rules else 'state'}, count(*) FROM leases AS l GROUP BY 1", [])))
        counts = {str(state): 0 for state in LeaseState}
        counts.update({row[0]: row[1] for row in rows})
        return counts

    async def count_overdue(self, *, before: float) -> dict[str, Overdue]:
        rows = await self._read(_rows(_OVERDUE, (before, before, before)))
        return {str(row[0]): Overdue(int(row[1]), float(row[2])) for row in rows}

    async def count_matching(
        self, flt: LeaseFilter, *, states: Sequence[LeaseState] = ()
    ) -> int:
        def query(rules: bool) -> tuple[str, list[Any]]:
            cond, params = _where(flt, states, _STATE if rules else "")
            return f"SELECT count(*) FROM leases AS l WHERE {cond}", params

        rows = await self._read(_rows_by_rules(query, bool(states)))
        return int(rows[0][0])

    # -- leases: renew --------------------------------------------------
    async def renew(self, lease_id: str, *, expire_time: float, now: float,
                    max_expire_time: float | None = None) -> bool:
        # A lease a revoke rule covers reads as revoking and is refused here too.
        changed = await self._write(_rowcount(
            "UPDATE leases AS l SET expire_time = ?, due_at = ?, last_renewal = ?,"
            " max_expire_time = coalesce(?, max_expire_time)"
            f" WHERE l.id = ? AND l.state = 'active' AND NOT {_COVERED}",
            (expire_time, expire_time, now, max_expire_time, lease_id),
        ))
        return changed == 1

    # -- leases: revocation ----------------------------------------------
    async def queue_revoke(
        self, lease_id: str, *, reason: str, now: float, claimer: str | None = None,
        claim_until: float | None = None,
    ) -> Lease | None:
        rows = await self._write(_rows(
            "UPDATE leases SET state = 'revoking', due_at = ?, revoke_reason = ?, claimed_by = ?"
            f" WHERE id = ? AND state IN {_REVOCABLE_STATES} RETURNING {_LEASE_COLS}",
            (now if claim_until is None else claim_until, reason,
             claimer if claim_until is not None else None, lease_id),
        ))
        return lease_from_row(rows[0]) if rows else None

    async def queue_revoke_matching(self, flt: LeaseFilter, *, reason: str, now: float) -> int:
        mark, queue = _mark_pending(flt, reason), _queue_matching(flt, reason, now)

        def write(conn: sqlite3.Connection) -> int:
            mark(conn)
            return queue(conn)

        return await self._write(_atomic(write))

    async def queue_revoke_rule(
        self, flt: LeaseFilter, *, reason: str, now: float, inline_max: int, claimer: str,
        claim_until: float, end_tokens: str | None = None,
    ) -> RevokeQueued:
        cond, params = _where(flt)
        queue = _queue_matching(flt, reason, now)
        rule_id = uuid.uuid4().hex
        end = None if end_tokens is None else _end_tokens(flt.owners, end_tokens, now)
        mark = _mark_pending(flt, reason)

        def write(conn: sqlite3.Connection) -> RevokeQueued:
            ended = 0 if end is None else end(conn)
            # Issues in flight: a rule's expansion may pass a lease's id before
            # its issue finishes; the mark still stops it going live.
            mark(conn)
            return replace(queue_leases(conn), tokens_ended=ended)

        def queue_leases(conn: sqlite3.Connection) -> RevokeQueued:
            # One count for both figures; the writer's transaction holds the database,
            # so the UPDATE below queues exactly the leases counted as matched.
            matched, unended = conn.execute(
                f"SELECT count(CASE WHEN {_live(flt, reason)} THEN 1 END), count(*)"
                f" FROM leases WHERE {_state_col(flt)} IN {_UNENDED_STATES} AND {cond}",
                params,
            ).fetchone()
            already = int(unended) - int(matched)
            if matched <= inline_max:
                return RevokeQueued(queue(conn), already_revoking=already)
            conn.execute(
                "INSERT INTO revoke_rules (id, prefix, prefix_end, owners, metadata, reason,"
                " created_at, claimed_by, claim_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rule_id, flt.prefix, prefix_upper(flt.prefix) if flt.prefix else None,
                 json.dumps(list(flt.owners)) if flt.owners else None,
                 json.dumps({key: str(value) for key, value in flt.metadata.items()}),
                 reason, now, claimer, claim_until),
            )
            return RevokeQueued(int(matched), rule_id, already_revoking=already)

        return await self._write(_atomic(write))

    async def claim_revoke_rule(
        self, *, claimer: str, now: float, claim_until: float
    ) -> str | None:
        rows = await self._write(_rows(
            "UPDATE revoke_rules SET claimed_by = ?, claim_until = ? WHERE id ="
            " (SELECT id FROM revoke_rules WHERE claimed_by = ? OR claim_until <= ?"
            "  ORDER BY created_at, id LIMIT 1) RETURNING id",
            (claimer, claim_until, claimer, now),
        ))
        return str(rows[0][0]) if rows else None

    async def expand_revoke_rule(
        self, rule_id: str, *, claimer: str, now: float, limit: int, claim_until: float
    ) -> RuleChunk | None:
        def step(conn: sqlite3.Connection) -> RuleChunk | None:
            rule = conn.execute(
                "SELECT prefix, owners, metadata, reason, created_at, expanded_to"
                " FROM revoke_rules WHERE id = ? AND claimed_by = ?", (rule_id, claimer),
            ).fetchone()
            if rule is None:
                return None
            flt = LeaseFilter(prefix=rule["prefix"],
                              owners=tuple(json.loads(rule["owners"] or "[]")),
                              metadata=json.loads(rule["metadata"]))
            reason = str(rule["reason"])
            cond, params = _where(flt)
            cond = f"{_live(flt, reason)} AND {cond} AND issue_time <= ? AND id > ?"
            params += [rule["created_at"], rule["expanded_to"]]
            # Where this step ends: the limit-th covered lease (None: past the last).
            found = conn.execute(f"SELECT id FROM leases WHERE {cond} ORDER BY id"
                                 " LIMIT 1 OFFSET ?", [*params, limit - 1]).fetchone()
            end = None if found is None else str(found[0])
            if end is not None:
                cond += " AND id <= ?"
                params.append(end)
            count = conn.execute(
                f"UPDATE leases SET state = 'revoking', due_at = ?, revoke_reason = ?"
                f" WHERE {cond}", [now, reason, *params]).rowcount
            if end is None:
                conn.execute("DELETE FROM revoke_rules WHERE id = ?", (rule_id,))
            else:
                conn.execute("UPDATE revoke_rules SET expanded_to = ?, claim_until = ?"
                             " WHERE id = ?", (end, claim_until, rule_id))
            return RuleChunk(int(count), done=end is None)

        return await self._write(_atomic(step))

    async def release_revoke_rules(self, *, claimer: str) -> None:
        await self._write(_rowcount(
            "UPDATE revoke_rules SET claimed_by = NULL, claim_until = 0 WHERE claimed_by = ?",
            (claimer,)))

    async def next_due(self, *, mounts: Collection[str] | None = None) -> float | None:
        served, params = "", []
        if mounts is not None:
            cond, param = _mounts_in(mounts)
            served, params = f" AND {cond}", [param]
        rows = await self._read(_rows(
            f"SELECT due_at FROM leases WHERE due_at IS NOT NULL{served}"
            " ORDER BY due_at LIMIT 1", params
        ))
        return float(rows[0][0]) if rows else None

    async def claim_due(
        self, *, now: float, limit: int, claimer: str, claim_timeout: float,
        mounts: Collection[str] | None = None,
    ) -> list[Lease]:
        if limit <= 0:
            return []
        served, params = "", []
        if mounts is not None:
            # Leases of a mount this process lacks are left to one that has it;
            # forced ones only for a while (base.py).
            cond, param = _mounts_in(mounts)
            served = f" AND ({cond} OR (revoke_reason = 'force' AND due_at <= ?))"
            params = [param, now - FORCE_TAKEOVER]

        def claim(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            # Both statements run inside the writer's transaction: no one else can
            # claim in between. Only the UPDATE changes anything.
            ids = [row[0] for row in conn.execute(
                f"SELECT id FROM leases WHERE due_at IS NOT NULL AND due_at <= ?"
                f" AND +state IN {_DUE_STATES}{served} ORDER BY due_at LIMIT ?",
                (now, *params, limit),
            )]
            if not ids:
                return []
            rows = conn.execute(
                "UPDATE leases SET state = 'revoking', due_at = ?, claimed_by = ?,"
                " revoke_reason = coalesce(revoke_reason, 'expire')"
                f" WHERE id IN (SELECT value FROM json_each(?)) RETURNING {_LEASE_COLS}",
                (now + claim_timeout, claimer, json.dumps(ids)),
            ).fetchall()
            order = {lease_id: n for n, lease_id in enumerate(ids)}
            return sorted(rows, key=lambda row: order[row["id"]])

        return [lease_from_row(row) for row in await self._write(claim)]

    async def release_claim(self, lease_id: str, *, claimer: str, due_at: float) -> bool:
        changed = await self._write(_rowcount(
            "UPDATE leases SET claimed_by = NULL, due_at = ?"
            " WHERE id = ? AND state = 'revoking' AND claimed_by = ?",
            (due_at, lease_id, claimer),
        ))
        return changed == 1

    async def unserved_mounts(
        self, mounts: Collection[str], *, due_by: float | None = None
    ) -> dict[str, int]:
        cond, param = _mounts_in(mounts)
        if due_by is None:
            sql = f"SELECT mount, count(*) FROM leases WHERE +state IN {_LIVE_STATES}"
            params: list[Any] = []
        else:
            sql = "SELECT mount, count(*) FROM leases WHERE due_at IS NOT NULL AND due_at <= ?"
            params = [due_by]
        rows = await self._read(_rows(f"{sql} AND NOT {cond} GROUP BY mount", [*params, param]))
        return {str(row[0]): int(row[1]) for row in rows}

    async def finish_revoke(self, lease_id: str, *, state: LeaseState, now: float) -> None:
        # Any live state may end here: a forced revocation finishes an irrevocable lease.
        await self._write(_rowcount(
            f"UPDATE leases SET state = ?, ended_at = ?, due_at = NULL"
            f" WHERE id = ? AND state NOT IN {_DEAD_STATES} AND state != 'pending'",
            (_dead_state(state), now, lease_id),
        ))

    async def finish_revoke_many(
        self, items: Sequence[tuple[str, LeaseState]], *, now: float,
        claimer: str | None = None,
    ) -> None:
        if not items:
            return
        # One statement (one write op of the group commit) whatever the batch size:
        # a JSON object {lease id: final state} joined on the primary key.
        endings = json.dumps({lease_id: _dead_state(state) for lease_id, state in items})
        params: tuple[object, ...] = (now, endings)
        held = ""
        if claimer is not None:
            params += (claimer,)
            held = " AND leases.claimed_by = ?"
        await self._write(_rowcount(
            "UPDATE leases SET state = e.value, ended_at = ?, due_at = NULL FROM json_each(?)"
            f" AS e WHERE leases.id = e.key AND leases.state = 'revoking'{held}",
            params,
        ))

    async def fail_revoke(
        self, lease_id: str, *, error: str, next_attempt: float | None, now: float,
        claimer: str | None = None,
    ) -> int:
        """Returns the attempts so far, or 0 when the lease was no longer revoking
        or (with ``claimer``) is claimed by someone else."""
        state = "irrevocable" if next_attempt is None else "revoking"
        params: tuple[object, ...] = (error[:_MAX_ERROR_LEN], state, next_attempt, lease_id)
        held = ""
        if claimer is not None:
            params += (claimer,)
            held = " AND claimed_by = ?"
        rows = await self._write(_rows(
            "UPDATE leases SET revoke_attempts = revoke_attempts + 1, last_error = ?,"
            f" state = ?, due_at = ? WHERE id = ? AND state = 'revoking'{held}"
            " RETURNING revoke_attempts",
            params,
        ))
        return int(rows[0][0]) if rows else 0

    async def requeue_irrevocable(self, *, now: float, limit: int,
                                  mounts: Collection[str] | None = None) -> int:
        # Fewest attempts first: a retried lease gains one, so a limit smaller than
        # the backlog still gets round to every lease in turn.
        served, params = "", []
        if mounts is not None:
            cond, param = _mounts_in(mounts)
            served, params = f" AND {cond}", [param]
        return await self._write(_rowcount(
            "UPDATE leases SET state = 'revoking', due_at = ? WHERE id IN"
            f" (SELECT id FROM leases WHERE state = 'irrevocable'{served}"
            "  ORDER BY revoke_attempts, issue_time LIMIT ?)",
            (now, *params, limit),
        ))

    async def stale_pending(self, *, before: float, limit: int,
                            mounts: Collection[str] | None = None) -> list[Lease]:
        served, params = "", []
        if mounts is not None:
            cond, param = _mounts_in(mounts)
            served, params = f" AND {cond}", [param]
        rows = await self._read(_rows(
            f"SELECT {_LEASE_COLS} FROM leases WHERE state = 'pending' AND issue_time < ?"
            f"{served} ORDER BY issue_time LIMIT ?",
            (before, *params, limit),
        ))
        return [lease_from_row(row) for row in rows]

    async def purge_tombstones(self, *, before: float, limit: int) -> int:
        return await self._write(_rowcount(
            "DELETE FROM leases WHERE id IN (SELECT id FROM leases"
            f" WHERE ended_at IS NOT NULL AND ended_at < ? AND +state IN {_DEAD_STATES}"
            " ORDER BY ended_at LIMIT ?)",
            (before, limit),
        ))

    async def purge_ended_tokens(self, *, before: float, limit: int) -> int:
        return await self._write(_rowcount(
            "DELETE FROM tokens WHERE accessor IN (SELECT accessor FROM tokens"
            " WHERE state <> 'active' AND ended_at < ? ORDER BY ended_at LIMIT ?)",
            (before, limit),
        ))

    # -- tokens ----------------------------------------------------------
    async def insert_token(self, token: Token) -> None:
        await self._write(_rowcount(
            f"INSERT INTO tokens ({_TK_COLS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (token.accessor, token.token_hash, json.dumps(list(token.policies)), token.created,
             token.expire_time, token.display_name, json.dumps(dict(token.metadata)),
             token.parent, str(token.state), token.max_expire_time, int(token.renewable),
             token.ended_at, token.creation_ttl, token.path or None, token.num_uses,
             token.period),
        ))

    async def use_token(self, accessor: str) -> int | None:
        # In the writer's transaction (BEGIN IMMEDIATE): other workers' uses wait for it.
        rows = await self._write(_rows(_TAKE_USE, (accessor,)))
        return int(rows[0][0]) if rows else None

    async def token_by_hash(self, token_hash: str) -> Token | None:
        rows = await self._point_read(_rows(
            f"SELECT {_TK_COLS} FROM tokens WHERE token_hash = ?", (token_hash,)
        ))
        return token_from_row(rows[0]) if rows else None

    async def token_by_accessor(self, accessor: str) -> Token | None:
        rows = await self._point_read(_rows(
            f"SELECT {_TK_COLS} FROM tokens WHERE accessor = ?", (accessor,)
        ))
        return token_from_row(rows[0]) if rows else None

    async def child_tokens(self, accessor: str) -> list[str]:
        rows = await self._read(_rows(
            "SELECT accessor FROM tokens WHERE parent = ? AND state = 'active' ORDER BY accessor",
            (accessor,),
        ))
        return [row[0] for row in rows]

    async def end_token(self, accessor: str, *, state: str, now: float) -> bool:
        return await self._write(_end_tokens((accessor,), state, now)) == 1

    async def renew_token(self, accessor: str, *, expire_time: float) -> bool:
        changed = await self._write(_rowcount(
            "UPDATE tokens SET expire_time = ? WHERE accessor = ? AND state = 'active'",
            (expire_time, accessor),
        ))
        return changed == 1

    async def expired_tokens(self, *, now: float, limit: int) -> list[str]:
        rows = await self._read(_rows(
            "SELECT accessor FROM tokens WHERE state = 'active' AND expire_time IS NOT NULL"
            " AND expire_time <= ? ORDER BY expire_time LIMIT ?",
            (now, limit),
        ))
        return [row[0] for row in rows]

    async def spent_tokens(self, *, limit: int) -> list[str]:
        rows = await self._read(_rows(
            "SELECT accessor FROM tokens WHERE state = 'active' AND num_uses < 0 LIMIT ?",
            (limit,),
        ))
        return [row[0] for row in rows]

    async def live_token_accessors(self, *, now: float, limit: int,
                                   after: str = "") -> list[str]:
        rows = await self._read(_rows(
            "SELECT accessor FROM tokens WHERE state = 'active' AND accessor > ?"
            " AND (expire_time IS NULL OR expire_time > ?) ORDER BY accessor LIMIT ?",
            (after, now, limit),
        ))
        return [row[0] for row in rows]

    async def delete_tokens_by_display_name(self, display_name: str) -> int:
        return await self._write(_rowcount(
            "DELETE FROM tokens WHERE display_name = ?", (display_name,)
        ))

    # -- single-use JWTs -------------------------------------------------
    async def record_jwt_use(self, method: str, jti_hash: str, *, accessor: str,
                             until: float, now: float) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            # The writer's transaction serialises this with every other write (other
            # processes too: BEGIN IMMEDIATE), so the key decides: one insert wins.
            if conn.execute(_RECORD_JWT, (method, jti_hash, now, until, accessor, now)).rowcount:
                return None
            row = conn.execute("SELECT accessor FROM used_jwts WHERE method = ? AND jti_hash = ?",
                               (method, jti_hash)).fetchone()
            return str(row[0]) if row else ""

        return await self._write(op)

    async def forget_jwt_use(self, method: str, jti_hash: str, *, accessor: str) -> None:
        await self._write(_rowcount(
            "DELETE FROM used_jwts WHERE method = ? AND jti_hash = ? AND accessor = ?",
            (method, jti_hash, accessor)))

    async def purge_used_jwts(self, *, before: float, limit: int) -> int:
        return await self._write(_rowcount(
            "DELETE FROM used_jwts WHERE rowid IN (SELECT rowid FROM used_jwts"
            " WHERE valid_until < ? ORDER BY valid_until LIMIT ?)", (before, limit)))
