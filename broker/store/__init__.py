"""Lease stores: SQLite (embedded default) and PostgreSQL (shared by replicas)."""

from __future__ import annotations

from urllib.parse import unquote_plus, urlsplit, urlunsplit

from broker.store.base import LeaseStore

__all__ = ["LeaseStore", "open_store", "redact_url"]


#: Query parameters of a store URL that hold a secret (libpq's and asyncpg's names).
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def redact_url(url: str) -> str:
    """``url`` without its password (``user:***@host``, ``?password=***``), fit for a
    log, banner or error."""
    parts = urlsplit(url)
    if parts.password is None and not any(
            _secret_param(field.partition("=")[0]) for field in parts.query.split("&")):
        return url  # as written: urlunsplit would drop an empty netloc (sqlite:////path)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        # Split by hand, not parse_qsl: the rest of the query must come back as written.
        fields = [field.split("=", 1) for field in parts.query.split("&")]
        parts = parts._replace(query="&".join(
            f"{field[0]}=***" if len(field) == 2 and _secret_param(field[0]) else "=".join(field)
            for field in fields))
    return urlunsplit(parts)


def _secret_param(name: str) -> bool:
    return unquote_plus(name).strip().lower() in _SECRET_PARAMS


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
