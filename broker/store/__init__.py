"""Lease stores: SQLite (embedded default) and PostgreSQL (shared by replicas)."""

from __future__ import annotations

from broker.store.base import LeaseStore

__all__ = ["LeaseStore", "open_store"]


def open_store(url: str) -> LeaseStore:
    """Build (not yet open) the store named by ``url``: ``sqlite:///path`` or ``postgresql://``."""
    if url.startswith("sqlite:"):
        from broker.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if url.startswith(("postgresql://", "postgres://")):
        from broker.store.postgres import PostgresStore

        return PostgresStore.from_url(url)
    raise ValueError(f"unsupported storage url {url!r}: use sqlite:///PATH or postgresql://...")
