"""Lease stores: SQLite (embedded default) and PostgreSQL (shared by replicas)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from broker.store.base import LeaseStore

__all__ = ["LeaseStore", "open_store", "redact_url"]


def redact_url(url: str) -> str:
    """``url`` without its password (``user:***@host``), fit for a log, banner or error."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def open_store(url: str) -> LeaseStore:
    """Build (not yet open) the store named by ``url``: ``sqlite:///path`` or ``postgresql://``."""
    if url.startswith("sqlite:"):
        from broker.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if url.startswith(("postgresql://", "postgres://")):
        from broker.store.postgres import PostgresStore

        return PostgresStore.from_url(url)
    raise ValueError(f"unsupported storage url {redact_url(url)!r}: "
                     "use sqlite:///PATH or postgresql://...")
