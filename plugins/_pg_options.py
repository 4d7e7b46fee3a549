"""The PostgreSQL mount's options, checked: what ``PostgresBackend.from_config`` builds from.

No I/O here: a wrong option is a ``PluginConfigError`` naming the key when the
config loads; the server is first reached in ``initialize``. Apart from
``plugins.postgres`` so that module keeps to the backend itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from broker.backend import MountSpec, PluginConfigError
from broker.durations import parse_duration

_MOUNT_KEYS = {"connection_url", "max_open_connections", "connect_timeout", "serialize_ddl",
               "password_hashing", "reassign_owned_to"}
# "scram-sha-256": the broker sends a SCRAM verifier, never the plaintext (plugins/_scram.py);
# "server": the plaintext goes in the statement and the server hashes it (Vault's way).
_SCRAM = "scram-sha-256"
_HASHING_MODES = (_SCRAM, "server")
_MAX_USERNAME = 63  # NAMEDATALEN - 1
_SERIALIZE_MODES = {True: True, False: False, "auto": None}


@dataclass(frozen=True)
class _MountOptions:
    """A postgres mount's checked options (``PostgresBackend``'s constructor arguments)."""

    dsn: str
    database: str
    max_open_connections: int
    connect_timeout: float
    #: True: lock every transaction; False: never; None ("auto"): see _needs_lock.
    serialize_ddl: bool | None
    password_hashing: str
    reassign_owned_to: str | None


def _mount_options(mount: MountSpec) -> _MountOptions:
    """Check the options of ``mount``; a PluginConfigError names the first wrong one."""
    opts = mount.options
    for key in opts:
        if key not in _MOUNT_KEYS:
            raise PluginConfigError(
                key, f"unknown option; expected one of {', '.join(sorted(_MOUNT_KEYS))}"
            )
    url = opts.get("connection_url")
    if not isinstance(url, str) or not url:
        raise PluginConfigError(
            "connection_url", "missing (e.g. \"postgresql://admin@db:5432/app\")"
        )
    parts = urlsplit(url)
    if parts.scheme not in {"postgresql", "postgres"}:
        raise PluginConfigError(
            "connection_url", f"expected postgresql://USER@HOST:PORT/DB, got {parts.scheme}://"
        )
    # asyncpg also takes the password from ?password= (and reads ?passfile=):
    # a secret in the URL either way, which goes to logs and config dumps.
    if parts.password or any(key.lower() in {"password", "passfile"}
                             for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        raise PluginConfigError(
            "connection_url", "must not contain a password; use password_file or password_env"
        )
    if not parts.username:
        raise PluginConfigError("connection_url", "missing the admin user (postgresql://USER@...)")
    try:
        parts.port  # noqa: B018 - property raises on a malformed port
    except ValueError:
        raise PluginConfigError("connection_url", "malformed port") from None
    database = unquote(parts.path.lstrip("/")) or unquote(parts.username)
    if any(c in database for c in "\"'\\\x00"):
        # {{database}} goes into quoted identifiers and literals alike.
        raise PluginConfigError("connection_url", "database name must not contain quotes")
    max_open = opts.get("max_open_connections", 4)
    if not isinstance(max_open, int) or isinstance(max_open, bool) or max_open < 1:
        raise PluginConfigError("max_open_connections", "expected an integer of at least 1")
    try:
        timeout = parse_duration(opts.get("connect_timeout", "10s"))
    except ValueError as exc:
        raise PluginConfigError("connect_timeout", str(exc)) from None
    if timeout < 1:
        raise PluginConfigError("connect_timeout", "must be at least 1s")
    serialize = opts.get("serialize_ddl", "auto")
    if not isinstance(serialize, (bool, str)) or serialize not in _SERIALIZE_MODES:
        raise PluginConfigError("serialize_ddl", 'expected "auto", true or false')
    hashing = opts.get("password_hashing", _SCRAM)
    if hashing not in _HASHING_MODES:
        raise PluginConfigError("password_hashing", 'expected "scram-sha-256" or "server"')
    target = opts.get("reassign_owned_to")
    if target is not None:
        target = _target_option(target, unquote(parts.username))
    return _MountOptions(
        dsn=url,
        database=database,
        max_open_connections=max_open,
        connect_timeout=float(timeout),
        serialize_ddl=_SERIALIZE_MODES[serialize],
        password_hashing=hashing,
        reassign_owned_to=target,
    )


def _target_option(target: object, admin: str) -> str:
    """The checked ``reassign_owned_to`` option: a role name (quoted wherever it is used)."""
    if not isinstance(target, str) or not target.strip():
        raise PluginConfigError("reassign_owned_to",
                                "expected a role name, e.g. \"broker_orphans\"")
    if "\x00" in target or len(target.encode()) > _MAX_USERNAME:
        raise PluginConfigError("reassign_owned_to",
                                f"not a PostgreSQL role name (at most {_MAX_USERNAME} bytes)")
    if target == "public" or target.startswith("pg_"):
        raise PluginConfigError("reassign_owned_to",
                                f"{target!r} is reserved; name a NOLOGIN role of your own")
    if target == admin:
        raise PluginConfigError("reassign_owned_to", "is the admin itself (the default); name a"
                                " NOLOGIN role without privileges, e.g. \"broker_orphans\"")
    return target
