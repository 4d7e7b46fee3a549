"""The SQLite lease store's schema and connections: migrations, WAL, durability.

What creates, upgrades and opens the database file lives here, so a schema
change reads on its own, apart from the queries in sqlite.py (as pg_schema.py
does for PostgreSQL). Migrations run under ``BEGIN IMMEDIATE``, so two brokers
opening one file together migrate one after the other; a database migrated by
a newer broker is refused, not used.
"""

from __future__ import annotations

import os
import sqlite3
import time

__all__ = ["MIGRATIONS", "StoreSchemaError", "connect", "migrate"]


class StoreSchemaError(RuntimeError):
    """The database was written by a newer broker than this one."""

    @classmethod
    def check(cls, current: int, known: int) -> None:
        """Raise unless a database at schema ``current`` is one a broker knowing
        ``known`` migrations may open (both stores ask this before migrating)."""
        if current > known:
            raise cls(f"the lease database has schema version {current} but this broker "
                      f"knows only up to {known}: run a newer broker (or restore an older "
                      "backup)")


#: Schema migrations; version N is ``MIGRATIONS[N - 1]``. Append, never edit.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            mount TEXT NOT NULL,
            role TEXT NOT NULL,
            owner TEXT NOT NULL,
            issue_time REAL NOT NULL,
            expire_time REAL NOT NULL,
            max_expire_time REAL NOT NULL,
            renewable INTEGER NOT NULL,
            state TEXT NOT NULL,
            last_renewal REAL,
            revoke_attempts INTEGER NOT NULL DEFAULT 0,
            revoke_reason TEXT,
            ended_at REAL,
            due_at REAL,
            revocation TEXT NOT NULL DEFAULT '{}',
            metadata TEXT NOT NULL DEFAULT '{}',
            last_error TEXT
        )""",
        "CREATE INDEX leases_due ON leases (due_at) WHERE due_at IS NOT NULL",
        "CREATE INDEX leases_state ON leases (state, issue_time)",
        "CREATE INDEX leases_owner ON leases (owner)",
        "CREATE INDEX leases_ended ON leases (ended_at) WHERE ended_at IS NOT NULL",
        """CREATE TABLE tokens (
            accessor TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            policies TEXT NOT NULL,
            created REAL NOT NULL,
            expire_time REAL,
            display_name TEXT NOT NULL DEFAULT '',
            metadata TEXT NOT NULL DEFAULT '{}',
            parent TEXT,
            state TEXT NOT NULL,
            max_expire_time REAL,
            renewable INTEGER NOT NULL,
            ended_at REAL
        )""",
        "CREATE INDEX tokens_parent ON tokens (parent) WHERE parent IS NOT NULL",
        """CREATE INDEX tokens_expiry ON tokens (expire_time)
            WHERE state = 'active' AND expire_time IS NOT NULL""",
    ),
    (
        # Revoke rules (base.py), as in the PostgreSQL store; owners and metadata
        # are JSON text (owners NULL: any owner).
        """CREATE TABLE revoke_rules (
            id TEXT PRIMARY KEY,
            prefix TEXT NOT NULL,
            prefix_end TEXT,
            owners TEXT,
            metadata TEXT NOT NULL DEFAULT '{}',
            reason TEXT NOT NULL,
            created_at REAL NOT NULL,
            expanded_to TEXT NOT NULL DEFAULT '',
            claimed_by TEXT,
            claim_until REAL NOT NULL
        )""",
    ),
    (
        # The TTL a token was created with, so renew-self without an increment
        # extends by it (as Vault does) instead of by the ever longer
        # expire_time - created. Rows from before stay NULL (TokenManager.renew).
        "ALTER TABLE tokens ADD COLUMN creation_ttl INTEGER",
    ),
    (
        # Who holds a revoking lease's claim (claim_due, queue_revoke), as in the
        # PostgreSQL store: a late ending or failure from a claimer whose claim
        # was taken over must not override the new holder (fail_revoke).
        "ALTER TABLE leases ADD COLUMN claimed_by TEXT",
    ),
    (
        # The token purge (purge_ended_tokens) finds ended tokens by age; active
        # ones, nearly all reads, are kept out of the index.
        "CREATE INDEX tokens_ended ON tokens (ended_at) WHERE state <> 'active'",
    ),
    (
        # A revoke over many leases marks the matching pending rows (issues in
        # flight) with its reason; activate refuses a marked row (base.py).
        "ALTER TABLE leases ADD COLUMN revoke_requested TEXT",
    ),
    (
        # JWTs that logged in to a single_use role (record_jwt_use), by auth method and
        # the SHA-256 of their jti; kept until the JWT could not log in anyway.
        """CREATE TABLE used_jwts (
            method TEXT NOT NULL,
            jti_hash TEXT NOT NULL,
            used_at REAL NOT NULL,
            valid_until REAL NOT NULL,
            accessor TEXT NOT NULL,
            PRIMARY KEY (method, jti_hash)
        )""",
        "CREATE INDEX used_jwts_valid_until ON used_jwts (valid_until)",
        # The path that created a token (auth/NAME/login); NULL: auth/token/create.
        "ALTER TABLE tokens ADD COLUMN path TEXT",
    ),
    (
        # Requests a token may still make (Vault's num_uses; TokenStore.use_token):
        # 0 no limit (every earlier token), -1 used up.
        "ALTER TABLE tokens ADD COLUMN num_uses INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # A periodic token's period in seconds (Vault's period; TokenManager.renew
        # sets the TTL back to it): 0 for every earlier token, none of them periodic.
        "ALTER TABLE tokens ADD COLUMN period INTEGER NOT NULL DEFAULT 0",
    ),
]

def migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")  # two brokers starting at once migrate one after the other
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        StoreSchemaError.check(current, len(MIGRATIONS))
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


#: how long a first open waits for another process switching the file to WAL
#: (the same as the connection's busy_timeout).
_WAL_SWITCH_WAIT = 10.0


def _set_wal(conn: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode = WAL``, waiting while another process holds the lock.

    Switching a new file to WAL takes an exclusive lock, and SQLite answers
    "database is locked" at once instead of calling the busy handler: two
    workers (or replicas) opening a fresh store together failed one of them
    at start-up, to be restarted by the supervisor, if at all.
    """
    deadline = time.monotonic() + _WAL_SWITCH_WAIT
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)  # in the store's own thread, before it serves anything


def connect(path: str, *, writer: bool) -> sqlite3.Connection:
    if writer and path != ":memory:":
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        # The store holds token hashes and lease metadata: owner-only from the
        # start (SQLite gives its -wal and -shm files the database's mode).
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, sqlite3 adds none of its own.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA foreign_keys = ON")
        if writer:
            _set_wal(conn)
            # FULL: every COMMIT is fsync'd before it returns. Never weaken this: a lease
            # row must be on disk before the credential it tracks leaves the broker.
            conn.execute("PRAGMA synchronous = FULL")
            migrate(conn)
        else:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn
