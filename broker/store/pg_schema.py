"""The PostgreSQL lease store's schema: its migrations, and how replicas apply them.

The tables are SQLite's logical schema (base.py) in PostgreSQL's types. Only
what creates and upgrades them lives here, so a schema change reads on its own,
apart from the queries in postgres.py. Migrations run under a
transaction-scoped advisory lock, so replicas starting together migrate one
after the other; a database migrated by a newer broker is refused, not used.
"""

from __future__ import annotations

import time
from typing import Any

from broker.store.sqlite_schema import StoreSchemaError

__all__ = ["MIGRATIONS", "migrate"]

#: Schema migrations; version N is ``MIGRATIONS[N - 1]``. Append, never edit.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        # COLLATE "C": ids compare byte-wise, as in SQLite, so a prefix is the
        # range ``id >= prefix AND id < upper`` on the primary key index.
        """CREATE TABLE leases (
            id TEXT COLLATE "C" PRIMARY KEY,
            mount TEXT NOT NULL,
            role TEXT NOT NULL,
            owner TEXT NOT NULL,
            issue_time DOUBLE PRECISION NOT NULL,
            expire_time DOUBLE PRECISION NOT NULL,
            max_expire_time DOUBLE PRECISION NOT NULL,
            renewable BOOLEAN NOT NULL,
            state TEXT NOT NULL,
            last_renewal DOUBLE PRECISION,
            revoke_attempts INTEGER NOT NULL DEFAULT 0,
            revoke_reason TEXT,
            ended_at DOUBLE PRECISION,
            due_at DOUBLE PRECISION,
            claimed_by TEXT,
            revocation JSONB NOT NULL DEFAULT '{}',
            metadata JSONB NOT NULL DEFAULT '{}',
            last_error TEXT
        )""",
        # id breaks ties among rows due at the same time, in index order.
        "CREATE INDEX leases_due ON leases (due_at, id) WHERE due_at IS NOT NULL",
        "CREATE INDEX leases_state ON leases (state, issue_time)",
        "CREATE INDEX leases_owner ON leases (owner)",
        "CREATE INDEX leases_ended ON leases (ended_at) WHERE ended_at IS NOT NULL",
        # Selectors (``metadata @> '{"run_id": "42"}'``) revoke one CI run's leases.
        "CREATE INDEX leases_metadata ON leases USING gin (metadata jsonb_path_ops)",
        """CREATE TABLE tokens (
            accessor TEXT COLLATE "C" PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            policies JSONB NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            expire_time DOUBLE PRECISION,
            display_name TEXT NOT NULL DEFAULT '',
            metadata JSONB NOT NULL DEFAULT '{}',
            parent TEXT,
            state TEXT NOT NULL,
            max_expire_time DOUBLE PRECISION,
            renewable BOOLEAN NOT NULL,
            ended_at DOUBLE PRECISION
        )""",
        "CREATE INDEX tokens_parent ON tokens (parent) WHERE parent IS NOT NULL",
        "CREATE INDEX tokens_display_name ON tokens (display_name)",
        """CREATE INDEX tokens_expiry ON tokens (expire_time)
            WHERE state = 'active' AND expire_time IS NOT NULL""",
    ),
    (
        # Revoke rules (base.py): one row answers a revoke of many leases; replicas
        # expand it in chunks. Only rules not yet fully expanded are kept, so the
        # table stays tiny and the correlated checks against it stay cheap.
        # prefix_end NULL: no upper bound; owners NULL: any owner; expanded_to:
        # every covered lease with an id up to it has been queued.
        """CREATE TABLE revoke_rules (
            id TEXT COLLATE "C" PRIMARY KEY,
            prefix TEXT COLLATE "C" NOT NULL,
            prefix_end TEXT COLLATE "C",
            owners TEXT[],
            metadata JSONB NOT NULL DEFAULT '{}',
            reason TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expanded_to TEXT COLLATE "C" NOT NULL DEFAULT '',
            claimed_by TEXT,
            claim_until DOUBLE PRECISION NOT NULL
        )""",
    ),
    (
        # The TTL a token was created with, so renew-self without an increment
        # extends by it (as Vault does) instead of by the ever longer
        # expire_time - created. Rows from before stay NULL (TokenManager.renew).
        "ALTER TABLE tokens ADD COLUMN creation_ttl INTEGER",
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
            method TEXT COLLATE "C" NOT NULL,
            jti_hash TEXT COLLATE "C" NOT NULL,
            used_at DOUBLE PRECISION NOT NULL,
            valid_until DOUBLE PRECISION NOT NULL,
            accessor TEXT NOT NULL,
            PRIMARY KEY (method, jti_hash)
        )""",
        "CREATE INDEX used_jwts_valid_until ON used_jwts (valid_until)",
        # The path that created a token (auth/NAME/login); NULL: auth/token/create.
        "ALTER TABLE tokens ADD COLUMN path TEXT",
    ),
    (
        # Requests a token may still make (Vault's num_uses; use_token): 0 no limit
        # (every earlier token), -1 used up. BIGINT: Vault takes any int64.
        "ALTER TABLE tokens ADD COLUMN num_uses BIGINT NOT NULL DEFAULT 0",
    ),
    (
        # A periodic token's period in seconds (Vault's period; TokenManager.renew
        # sets the TTL back to it): 0 for every earlier token, none of them periodic.
        # BIGINT: a duration may be up to 100 years, past an INTEGER's range.
        "ALTER TABLE tokens ADD COLUMN period BIGINT NOT NULL DEFAULT 0",
    ),
]

#: pg_advisory_xact_lock key serialising migrations ("broker" in ASCII).
_MIGRATION_LOCK = 0x62726F6B6572


async def migrate(conn: Any) -> None:
    """Bring the schema on ``conn`` up to the last of MIGRATIONS (replicas take turns)."""
    async with conn.transaction():
        # Held until COMMIT: a second replica waits here, then finds nothing to do.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        current = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
        StoreSchemaError.check(current, len(MIGRATIONS))
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_version VALUES ($1, $2)", version, time.time())
