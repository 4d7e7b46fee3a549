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
    if parts.password is not None:  # a netloc to rebuild, so urlunsplit keeps its "//"
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    # The query by hand, in the string as written: urlunsplit would turn an empty
    # netloc (postgresql:///db?host=/tmp, sqlite:////path) into another URL.
    base, mark, rest = url.partition("?")
    if not mark:
        return url
    query, hash_mark, fragment = rest.partition("#")
    fields = [field.split("=", 1) for field in query.split("&")]
    query = "&".join(f"{field[0]}=***" if len(field) == 2 and _secret_param(field[0])
                     else "=".join(field) for field in fields)
    return f"{base}?{query}{hash_mark}{fragment}"


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
