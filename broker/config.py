"""Load and validate the one TOML config file into typed objects.

Every error names the file, the dotted key and what is wrong, in one line, and
the daemon does not start (or, on SIGHUP, keeps its old config).
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import json
import logging
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.auth.jwt_config import AuthConfigError, JWTMethodConfig, parse_jwt_methods
from broker.backend import MountSpec, PluginConfigError, RoleSpec, load_plugin
from broker.durations import format_duration, parse_duration
from broker.event_loop import unknown as unknown_event_loop
from broker.templating import template_names

log = logging.getLogger(__name__)

__all__ = [
    "MAX_REVOKE_BATCH",
    "AuditConfig",
    "Config",
    "ConfigError",
    "LeaseConfig",
    "ServerConfig",
    "StorageConfig",
    "TokenConfig",
    "dev_config_path",
    "did_you_mean",
    "is_loopback",
    "load_audit_config",
    "load_config",
    "parse_listen",
    "read_secret_file",
    "tls_pair_problem",
]

CAPABILITIES = frozenset({"create", "read", "update", "delete", "list", "sudo", "deny"})
_ROLE_COMMON = {
    "creation_statements",
    "renew_statements",
    "revocation_statements",
    "rollback_statements",
    "username_template",
    "default_ttl",
    "max_ttl",
}
_STATEMENT_VARS = {"name", "password", "expiration", "database", "username"}
#: ``[auth.TYPE]`` sections the broker has an auth method for.
AUTH_TYPES = frozenset({"jwt"})
#: Mount and role names are URL path segments (``/v1/MOUNT/creds/ROLE``) and
#: parts of lease ids: characters that need no escaping anywhere.
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
#: ``[leases]`` keys the sweeper and the job schedule read once, at start.
_LEASES_AT_START = ("sweeper_batch", "revoke_workers", "per_mount_workers", "revoke_batch",
                    "claim_timeout", "irrevocable_retry_interval", "tombstone_retention")


class ConfigError(Exception):
    """``FILE: KEY: what is wrong`` - one line."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        self.source = source
        self.key = key
        self.message = message


#: More server processes than this only fight over the store's write lock.
MAX_WORKERS = 64
#: The shortest non-zero ``worker_stall_timeout`` (seconds).
MIN_STALL_TIMEOUT = 3
#: The smallest ``max_request_size`` (bytes): below it even a revoke body is refused (413).
MIN_REQUEST_SIZE = 1024


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8200
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: request bodies larger than this answer 413.
    max_request_size: int = 1024 * 1024
    #: on SIGTERM, how long in-flight issues and revocations may take.
    shutdown_grace: int = 30
    #: "auto" (uvloop where installed), "uvloop" or "asyncio"; see broker/event_loop.py.
    event_loop: str = "auto"
    #: server processes sharing the listener and the store (broker/workers.py).
    workers: int = 1
    #: with workers > 1: a worker whose event loop has not run for this long
    #: (seconds) is killed and restarted; 0 turns the watchdog off.
    worker_stall_timeout: int = 30
    #: a connection with no request in progress (idle between requests, or one
    #: that has not finished sending a request's headers) is closed after this
    #: many seconds (aiohttp's keep-alive timeout; its own default is an hour).
    idle_timeout: int = 75

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


@dataclass(frozen=True)
class StorageConfig:
    url: str = "sqlite:///var/lib/broker/broker.db"


@dataclass(frozen=True)
class AuditConfig:
    path: str = "/var/log/broker/audit.jsonl"
    hmac_key_file: str = "/etc/broker/audit.key"
    #: fsync every line (slower; survives power loss, not only a crash).
    fsync: bool = False
    #: write token accessors as HMACs (Vault's hmac_accessor); false: in clear.
    hmac_accessor: bool = True


@dataclass(frozen=True)
class TokenConfig:
    """``[tokens]``: limits on the tokens the broker hands out."""

    #: Vault's system max TTL: no token made by auth/token/create(-orphan) lives
    #: longer, renewals included, and it is the TTL of one created without a ttl.
    #: Only a root token created without a ttl is unlimited.
    max_ttl: int = 768 * 3600


#: the largest ``[leases] revoke_batch``: one batch is one backend transaction.
MAX_REVOKE_BATCH = 1000


@dataclass(frozen=True)
class LeaseConfig:
    """``[leases]``: engine-wide limits and the revocation retry policy."""

    #: used when a role sets no default_ttl / max_ttl.
    default_ttl: int = 3600
    max_ttl: int = 86400
    #: failed revocations retry with jittered exponential backoff, then go irrevocable.
    revoke_max_attempts: int = 6
    revoke_backoff_base: float = 1.0
    revoke_backoff_max: float = 300.0
    #: how often irrevocable leases get one more try.
    irrevocable_retry_interval: int = 3600
    #: dead leases stay as tombstones this long, so reuse is recognised.
    tombstone_retention: int = 7 * 86400
    #: a pending row older than this is an interrupted issue: rolled back.
    pending_timeout: int = 120
    #: how long a sweeper's claim on a lease lasts before another may take it.
    claim_timeout: int = 60
    sweeper_batch: int = 500
    revoke_workers: int = 16
    #: at most this many concurrent revocations against one mount (fairness).
    per_mount_workers: int = 8
    #: most leases of one mount revoked by one backend call, for backends that
    #: revoke in batches (postgres, default statements); 1 = one call per lease.
    #: The worker caps above then count batch calls.
    revoke_batch: int = 32
    #: a backend call taking longer than this fails (and is retried).
    backend_timeout: float = 30.0


@dataclass(frozen=True)
class Config:
    source: str
    server: ServerConfig
    storage: StorageConfig
    audit: AuditConfig
    leases: LeaseConfig
    mounts: Mapping[str, MountSpec]
    #: policy name -> path pattern -> capabilities.
    policies: Mapping[str, Mapping[str, tuple[str, ...]]]
    #: ``[auth.*]`` sections, validated by the auth methods that use them.
    auth: Mapping[str, Any] = field(default_factory=dict)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    #: the settings a SIGHUP does not apply, as this file gave them (dotted key ->
    #: value), so a reload can warn about the ones changed since. Kept from the
    #: file even when --dev or --listen override what runs. Not in repr: it
    #: repeats server, storage, audit and leases.
    restart_only: Mapping[str, Any] = field(default_factory=dict, repr=False)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:8200"`` / ``"[::1]:8200"`` -> (host, port); ValueError if malformed."""
    host, sep, port = value.rpartition(":")
    # isascii: "²".isdigit() is true, but int() refuses it.
    if not sep or not (port.isascii() and port.isdigit()) or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return host, int(port)


def dev_config_path() -> Path:
    """The embedded ``config/dev.toml``: from the wheel's data, else the source tree."""
    packaged = resources.files("broker").joinpath("data/dev.toml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "config" / "dev.toml"


class _Reader:
    """Pulls typed values out of one TOML table, naming the dotted key on error."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any]) -> None:
        self.source, self.prefix, self.table = source, prefix, table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), message)

    def get(self, name: str, typ: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.error(name, f"expected {want}, got {type(value).__name__} {value!r}")
        return value

    def duration(self, name: str, default: int, *, minimum: int = 0) -> int:
        """Whole seconds; ``minimum`` refuses values that would make the broker unusable."""
        value = self.get(name, (str, int), None)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None
        if seconds < minimum:
            # Show what the user wrote, not the parsed number.
            raise self.error(name, f"must be at least {format_duration(minimum)}, got {value!r}")
        return seconds

    def count(self, name: str, default: int, *, minimum: int) -> int:
        """An integer of at least ``minimum`` (sizes, batch sizes, workers)."""
        value: int = self.get(name, int, default)
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name, (list, str), [])
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(v, str) for v in items):
            raise self.error(name, "expected a list of strings")
        return tuple(items)

    def reject_unknown(self, allowed: set[str] | None = None) -> None:
        known = self.used if allowed is None else allowed
        for name in self.table:
            if name not in known:
                hint = did_you_mean(name, known)
                raise self.error(name, f"unknown key ({hint})" if hint else "unknown key")


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    """``did you mean KEY?`` for the allowed key closest to a wrong ``name``, or "".

    The same suggestion the [auth.jwt] keys get (broker/auth/jwt_config.py).
    """
    close = difflib.get_close_matches(name, sorted(set(allowed) - {name}), n=1)
    return f"did you mean {close[0]}?" if close else ""


#: keys of ``[mounts.NAME]`` the loader reads itself (the plugin gets all but the first
#: four too): what a mistyped mount key may have meant, whatever the plugin says.
_MOUNT_COMMON = frozenset({"plugin", "roles", "password_file", "password_env",
                           "connection_url"})


def _plugin_message(exc: PluginConfigError, given: Collection[str],
                    common: Collection[str]) -> str:
    """The plugin's message, plus a did-you-mean when it refused a key the table has
    as unknown (``creation_statement`` for ``creation_statements``)."""
    name = exc.key.rsplit(".", 1)[-1]
    if (name not in given or name in exc.known or "unknown" not in exc.message
            or "did you mean" in exc.message):
        return exc.message
    hint = did_you_mean(name, [*common, *exc.known])
    return f"{exc.message} ({hint})" if hint else exc.message


def load_config(path: str | os.PathLike[str], *, check_tls: bool = True) -> Config:
    """Read and validate ``path``; raise ConfigError naming file, key and problem.

    ``check_tls=False`` skips loading the TLS pair: a SIGHUP reload keeps the
    running listener and checks a renewed pair itself, so a half-written
    certificate must not also reject unrelated config changes.
    """
    source, raw = _read_toml(path)
    base = Path(source).resolve().parent
    return _build(source, raw, base, check_tls=check_tls)


def load_audit_config(path: str | os.PathLike[str]) -> AuditConfig:
    """Only the ``[audit]`` table of ``path``, checked as :func:`load_config` checks it.

    For offline tools (``broker audit hash --config``): they need the key file, not
    the mounts' admin passwords or the TLS pair the rest of the file names.
    """
    source, raw = _read_toml(path)
    top = _Reader(source, "", raw)
    return _audit(_Reader(source, "audit", _table(top, "audit")), Path(source).resolve().parent)


def _read_toml(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """The parsed file; ConfigError naming the file when it cannot be read or parsed."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            return source, tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except PermissionError:
        raise ConfigError(source, "", "permission denied reading the file") from None
    except IsADirectoryError:
        raise ConfigError(source, "", "is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 by definition; say where, not the undecodable bytes.
        raise ConfigError(source, "", f"not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {exc}") from None


def _path(base: Path, value: str) -> str:
    # Relative paths in a config file are relative to the file, not the cwd.
    expanded = os.path.expandvars(os.path.expanduser(value))
    return str((base / expanded) if not os.path.isabs(expanded) else Path(expanded))


def _build(source: str, raw: Mapping[str, Any], base: Path, *, check_tls: bool) -> Config:
    top = _Reader(source, "", raw)
    sections = {"server", "storage", "audit", "leases", "tokens", "mounts", "policies", "auth"}
    for name in raw:
        if name not in sections:
            hint = did_you_mean(name, sections)
            raise top.error(name, f"unknown section ({hint})" if hint else "unknown section")
    server = _server(_Reader(source, "server", _table(top, "server")), base, check_tls=check_tls)
    storage = _storage(_Reader(source, "storage", _table(top, "storage")), base)
    if server.workers > 1 and storage.url == "sqlite:///:memory:":
        raise ConfigError(source, "server.workers",
                          "an in-memory store cannot be shared: use 1 worker or a store file")
    audit = _audit(_Reader(source, "audit", _table(top, "audit")), base)
    leases = _leases(_Reader(source, "leases", _table(top, "leases")))
    tokens = _tokens(_Reader(source, "tokens", _table(top, "tokens")))
    mounts = {
        name: _mount(source, name, table, leases, base)
        for name, table in _table(top, "mounts").items()
    }
    policies = _policies(source, _table(top, "policies"))
    auth = _table(top, "auth")
    _check_auth_types(source, auth)
    try:
        # Checked now so a bad [auth.jwt.NAME] names its key; kept raw in Config.auth.
        methods = parse_jwt_methods(auth.get("jwt"), policies=policies.keys())
    except AuthConfigError as exc:
        raise ConfigError(source, f"auth.{exc.key}", exc.message) from None
    _check_login_ttls(source, methods, auth.get("jwt") or {}, tokens)
    return Config(source, server, storage, audit, leases, mounts, policies, auth, tokens,
                  restart_only=_restart_only(server, storage, audit, leases))


def _restart_only(server: ServerConfig, storage: StorageConfig, audit: AuditConfig,
                  leases: LeaseConfig) -> dict[str, Any]:
    """What a reload keeps as it was at start (docs/operations.md), by the key a file sets."""
    values: dict[str, Any] = {"server.listen": (server.host, server.port)}
    values.update((f"server.{f.name}", getattr(server, f.name)) for f in fields(server)
                  if f.name not in {"host", "port"})
    values["storage.url"] = storage.url
    values.update((f"audit.{f.name}", getattr(audit, f.name)) for f in fields(audit))
    values.update((f"leases.{name}", getattr(leases, name)) for name in _LEASES_AT_START)
    return values


def _check_auth_types(source: str, auth: Mapping[str, Any]) -> None:
    """An ``[auth.TYPE]`` the broker does not know is refused: a typo (``[auth.jtw.github]``)
    would otherwise switch the login off without a word."""
    for name in auth:
        if name in AUTH_TYPES:
            continue
        close = difflib.get_close_matches(name, AUTH_TYPES, n=1)
        hint = f"did you mean auth.{close[0]}?" if close else \
            f"known: {', '.join(sorted(AUTH_TYPES))}"
        raise ConfigError(source, f"auth.{_key_part(name)}", f"unknown auth method type ({hint})")


def _key_part(name: str) -> str:
    """``name`` as one part of a dotted key, quoted as TOML does when it is not a bare key."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name, ensure_ascii=False)


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a mount or role name, or None."""
    if not _SAFE_NAME.fullmatch(name) or name in {".", ".."}:
        return "must be one URL path segment: letters, digits, '-', '_' and '.' only " \
               "(not '.' or '..')"
    return None


def _table(reader: _Reader, name: str) -> dict[str, Any]:
    value: dict[str, Any] = reader.get(name, dict, {})
    return value


def _server(r: _Reader, base: Path, *, check_tls: bool) -> ServerConfig:
    listen = r.get("listen", str, "127.0.0.1:8200")
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise r.error("listen", str(exc)) from None
    cert = r.get("tls_cert_file", str)
    key = r.get("tls_key_file", str)
    if bool(cert) != bool(key):
        raise r.error("tls_key_file" if cert else "tls_cert_file", "set both TLS files or neither")
    for name, value in (("tls_cert_file", cert), ("tls_key_file", key)):
        if value and not os.path.isfile(_path(base, value)):
            raise r.error(name, f"file not found: {_path(base, value)}")
    if cert and key and check_tls:
        _check_tls_pair(r, _path(base, cert), _path(base, key))
    if not cert and not is_loopback(host):
        raise r.error(
            "listen",
            f"{listen} is not a loopback address: set tls_cert_file and tls_key_file "
            "(plain HTTP is only allowed on 127.0.0.1/::1)",
        )
    size = r.count("max_request_size", 1024 * 1024, minimum=MIN_REQUEST_SIZE)
    # 0 is a valid choice: on SIGTERM, cancel in-flight work at once.
    grace = r.duration("shutdown_grace", 30)
    event_loop = r.get("event_loop", str, "auto")
    if problem := unknown_event_loop(event_loop):
        raise r.error("event_loop", problem)
    workers = r.get("workers", int, 1)
    if not 1 <= workers <= MAX_WORKERS:
        raise r.error("workers", f"must be between 1 and {MAX_WORKERS}, got {workers}")
    stall = r.duration("worker_stall_timeout", 30)
    if 0 < stall < MIN_STALL_TIMEOUT:
        # Beats come once a second and a busy loop may run them late: a
        # shorter limit would kill workers that are only loaded.
        raise r.error("worker_stall_timeout",
                      f"must be 0 (off) or at least {MIN_STALL_TIMEOUT}s, got {stall}s")
    idle = r.duration("idle_timeout", 75)
    if idle < 1:
        raise r.error("idle_timeout", "must be at least 1s")
    r.reject_unknown()
    return ServerConfig(
        host=host,
        port=port,
        tls_cert_file=_path(base, cert) if cert else None,
        tls_key_file=_path(base, key) if key else None,
        max_request_size=size,
        shutdown_grace=grace,
        event_loop=event_loop,
        workers=workers,
        worker_stall_timeout=stall,
        idle_timeout=idle,
    )


def _check_tls_pair(r: _Reader, cert: str, key: str) -> None:
    """Load the pair as the server will, so a bad file fails here naming its key,
    not at start-up as ``[SSL] PEM lib`` with neither file nor key."""
    problem = tls_pair_problem(cert, key)
    if problem is not None:
        raise r.error(*problem)


def tls_pair_problem(cert: str, key: str) -> tuple[str, str] | None:
    """Why the pair at ``cert`` and ``key`` cannot serve TLS, as (config key, reason), or None.

    Loads it as the server does, into a scratch context. The reason names the
    file and what is wrong with it (OpenSSL's reason code), never its content:
    no key material reaches a log line or an error.
    """
    try:
        text = Path(cert).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        return "tls_cert_file", f"cannot read {cert}: {exc.strerror or exc}"
    if "-----BEGIN CERTIFICATE-----" not in text:
        return "tls_cert_file", f"{cert} is not a PEM certificate"
    try:
        # The certificates alone first: a damaged certificate is the certificate's
        # fault, not the key's (load_cert_chain says neither).
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        return "tls_cert_file", f"{cert} is not a valid PEM certificate ({_ssl_reason(exc)})"
    except OSError as exc:
        return "tls_cert_file", f"cannot read {cert}: {exc.strerror or exc}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The password callback stops OpenSSL prompting on the terminal for an
        # encrypted key: the server cannot type one either.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        return "tls_key_file", (f"{key} is not an unencrypted PEM private key matching "
                                f"tls_cert_file {cert} ({_ssl_reason(exc)})")
    except OSError as exc:
        return "tls_key_file", f"cannot read {key}: {exc.strerror or exc}"
    return None


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code (``KEY_VALUES_MISMATCH``), not its message: a code
    names the problem and carries nothing of the file."""
    return str(exc.reason or exc.__class__.__name__)


def _storage(r: _Reader, base: Path) -> StorageConfig:
    url = r.get("url", str, "sqlite:////var/lib/broker/broker.db")
    if url.startswith("sqlite:///"):
        # sqlite:///relative.db is relative to the config file; sqlite:////abs is absolute.
        path, mark, query = url[len("sqlite:///") :].partition("?")
        if not path or path.endswith("/") or (path != ":memory:"
                                               and os.path.isdir(_path(base, path))):
            # Else the config's own directory (or another) became the store file,
            # and the start failed later with IsADirectoryError.
            raise r.error("url", "names a directory, not a database file: use "
                                 "sqlite:///FILE (relative to this config file) or "
                                 "sqlite:////ABSOLUTE/FILE")
        if path != ":memory:":
            url = "sqlite:///" + _path(base, path) + mark + query
        _check_sqlite_url(r, url)
    elif url.startswith(("postgresql://", "postgres://")):
        _check_url(r, "url", url)
        _check_postgres_url(r, url)
    else:
        # Never the URL itself: it may carry a password.
        raise r.error("url", f"expected sqlite:///PATH or postgresql://..., "
                             f"got {_scheme_of(url)}")
    r.reject_unknown()
    return StorageConfig(url=url)


def _scheme_of(url: str) -> str:
    """``'mysql://...'`` for an error message: the scheme only, never user or password."""
    scheme, sep, _ = url.partition("://")
    if sep and scheme.isascii() and scheme.replace("+", "").isalnum():
        return f"'{scheme}://...'"
    return "something that is not a URL"


def _check_url(r: _Reader, name: str, url: str) -> None:
    """Refuse a URL that urllib cannot take apart (``[::1`` without ``]``, port
    ``99999``), naming the key but not echoing the URL, which may hold a password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise r.error(name, "malformed URL (check the host and its [IPv6] brackets)") from None
    try:
        parts.port  # noqa: B018 - the property raises on a malformed port
    except ValueError:
        # Not echoed either: in "user:secret/db" (host forgotten) the "port" is the password.
        raise r.error(name, "malformed URL: the port is not a number up to 65535") from None


def _check_postgres_url(r: _Reader, url: str) -> None:
    """What the PostgreSQL store would refuse when it opens, refused now under
    ``storage.url``: no database, or a bad ``pool_min_size``/``pool_max_size``/
    ``command_timeout``. Parameters it does not know are left to asyncpg."""
    from broker.store.postgres import store_params  # imports asyncpg: only when needed

    parts = urlsplit(url)  # _check_url made sure this works
    if not parts.path.strip("/"):
        raise r.error("url", "names no database: use postgresql://USER@HOST:PORT/DATABASE")
    try:
        store_params(parts.query)
    except ValueError as exc:  # names the parameter, never the URL (it may hold a password)
        raise r.error("url", f"{exc}") from None


def _check_sqlite_url(r: _Reader, url: str) -> None:
    """The SQLite store's own check of its URL (``?command_timeout=``), at load time.
    Does no I/O; an SQLite URL holds a path, no password."""
    from broker.store.sqlite import SQLiteStore

    try:
        SQLiteStore.from_url(url)
    except ValueError as exc:
        raise r.error("url", str(exc)) from None


def _audit(r: _Reader, base: Path) -> AuditConfig:
    path = r.get("path", str, "/var/log/broker/audit.jsonl")
    key = r.get("hmac_key_file", str, "/etc/broker/audit.key")
    fsync = r.get("fsync", bool, False)
    hmac_accessor = r.get("hmac_accessor", bool, True)
    r.reject_unknown()
    return AuditConfig(path=_path(base, path), hmac_key_file=_path(base, key), fsync=fsync,
                       hmac_accessor=hmac_accessor)


def _leases(r: _Reader) -> LeaseConfig:
    d = LeaseConfig()
    # Minimums: a 0s TTL issues leases dead on arrival, a 0s backend_timeout
    # fails every backend call, a 0s interval or backoff retries in a busy loop.
    cfg = LeaseConfig(
        default_ttl=r.duration("default_ttl", d.default_ttl, minimum=1),
        max_ttl=r.duration("max_ttl", d.max_ttl, minimum=1),
        revoke_max_attempts=r.count("revoke_max_attempts", d.revoke_max_attempts, minimum=1),
        revoke_backoff_base=float(
            r.duration("revoke_backoff_base", int(d.revoke_backoff_base), minimum=1)),
        revoke_backoff_max=float(
            r.duration("revoke_backoff_max", int(d.revoke_backoff_max), minimum=1)),
        irrevocable_retry_interval=r.duration(
            "irrevocable_retry_interval", d.irrevocable_retry_interval, minimum=1
        ),
        tombstone_retention=r.duration("tombstone_retention", d.tombstone_retention, minimum=1),
        pending_timeout=r.duration("pending_timeout", d.pending_timeout, minimum=1),
        claim_timeout=r.duration("claim_timeout", d.claim_timeout, minimum=1),
        sweeper_batch=r.count("sweeper_batch", d.sweeper_batch, minimum=1),
        revoke_workers=r.count("revoke_workers", d.revoke_workers, minimum=1),
        per_mount_workers=r.count("per_mount_workers", d.per_mount_workers, minimum=1),
        revoke_batch=r.get("revoke_batch", int, d.revoke_batch),
        backend_timeout=float(r.duration("backend_timeout", int(d.backend_timeout), minimum=1)),
    )
    r.reject_unknown()
    if cfg.default_ttl > cfg.max_ttl:
        raise r.error("default_ttl", "must not be longer than max_ttl")
    if cfg.revoke_backoff_max < cfg.revoke_backoff_base:
        raise r.error("revoke_backoff_max", "must not be shorter than revoke_backoff_base")
    if not 1 <= cfg.revoke_batch <= MAX_REVOKE_BATCH:
        raise r.error("revoke_batch", f"must be between 1 (one backend call per lease) "
                                      f"and {MAX_REVOKE_BATCH}")
    if cfg.claim_timeout <= cfg.backend_timeout:
        raise r.error("claim_timeout", "must be longer than backend_timeout")
    if cfg.pending_timeout <= cfg.backend_timeout:
        # Otherwise the stale-pending job could roll back an issue still in flight.
        raise r.error("pending_timeout", "must be longer than backend_timeout")
    return cfg


def _tokens(r: _Reader) -> TokenConfig:
    d = TokenConfig()
    cfg = TokenConfig(max_ttl=r.duration("max_ttl", d.max_ttl, minimum=1))
    r.reject_unknown()
    return cfg


def _check_login_ttls(source: str, methods: Mapping[str, JWTMethodConfig],
                      raw: Mapping[str, Any], tokens: TokenConfig) -> None:
    """No JWT login token may outlive ``[tokens] max_ttl``, renewals included,
    but a periodic role's (``token_period``), whose period must fit under it.

    The login takes its TTL and cap from the role; a role whose ``token_max_ttl``
    is 0 (no cap) or longer than the ceiling would hand out tokens renewable
    past it. Refused here, naming the role's key, rather than capped in silence.
    A periodic role's tokens live on while renewed, as Vault's periodic tokens
    (and the broker's, from auth/token/create): the ceiling caps their period,
    not their life, and their ``token_explicit_max_ttl`` is not cut to it.
    """
    limit = format_duration(tokens.max_ttl)
    for name, method in methods.items():
        for role in method.roles.values():
            prefix = f"auth.jwt.{name}.roles.{role.name}"
            if role.token_period:
                if role.token_period > tokens.max_ttl:
                    raise ConfigError(source, f"{prefix}.token_period",
                                      f"{format_duration(role.token_period)} is longer than "
                                      f"tokens.max_ttl ({limit}), which caps a periodic "
                                      f"token's period; set at most {limit}")
                continue
            if role.token_ttl > tokens.max_ttl:
                raise ConfigError(source, f"{prefix}.token_ttl",
                                  f"longer than tokens.max_ttl ({limit})")
            cap = role.token_cap
            if cap is None:
                raise ConfigError(source, f"{prefix}.token_max_ttl",
                                  f"0 (no limit) would let login tokens be renewed past "
                                  f"tokens.max_ttl ({limit}); set at most {limit}")
            if cap > tokens.max_ttl:
                # Every cap the role sets is too long: name token_max_ttl if it is one.
                key, value = (("token_max_ttl", role.token_max_ttl) if role.token_max_ttl
                              else ("token_explicit_max_ttl", cap))
                table = raw.get(name, {}).get("roles", {}).get(role.name, {})
                given = "" if key in table else " (the default)"
                raise ConfigError(source, f"{prefix}.{key}",
                                  f"{format_duration(value)}{given} is longer than "
                                  f"tokens.max_ttl ({limit}); set at most {limit}")


def read_secret_file(path: str) -> str:
    """A ``password_file``'s secret: its content without the trailing newline.

    OSError if it cannot be read, or (errno EILSEQ) is not UTF-8 text: every
    caller handles one error type, and ``strerror`` says what is wrong.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Where, never what: the bytes are (part of) a password.
        raise OSError(errno.EILSEQ, f"not UTF-8 text (byte {exc.start})", path) from None
    return text.rstrip("\r\n")


def _warn_if_shared(r: _Reader, path: str) -> None:
    """Warn (as ssh refuses) when others than the owner may read or write a secret file.

    A warning, not an error: a file shared with a group on purpose (a secrets
    agent writing it) must not stop the broker; the files the broker writes
    itself (rotate-root) are always owner-only.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # just read it: a race with a rename, the next load says more
    if mode & 0o077:
        log.warning("%s: %s: %s is %s: others than its owner may read or change the "
                    "admin password (chmod 600 %s)", r.source, r.key("password_file"), path,
                    stat.filemode(mode), path)


def _secret(r: _Reader, base: Path) -> tuple[str | None, str | None]:
    """The mount's secret and the file it came from (None for password_env or none)."""
    pfile = r.get("password_file", str)
    penv = r.get("password_env", str)
    for name, value, what in (("password_file", pfile, "file"),
                              ("password_env", penv, "environment variable")):
        if value is not None and not value.strip():
            # Ignored, it would load the mount with no admin secret at all.
            raise r.error(name, f"is empty: name the {what} that holds the admin password, "
                                "or remove the key")
    if pfile and penv:
        raise r.error("password_env", "set password_file or password_env, not both")
    if "password" in r.table:
        raise r.error(
            "password",
            "inline passwords are not allowed; use password_file or password_env",
        )
    if pfile:
        pfile = _path(base, pfile)  # relative to the config file, like every other path
        try:
            secret = read_secret_file(pfile)
        except OSError as exc:
            raise r.error("password_file", f"cannot read {pfile}: {exc.strerror or exc}") from None
        if not secret.strip():
            # Else the mount started with no admin password and the backend
            # refused it with an error that named neither the file nor the key.
            raise r.error("password_file", f"{pfile} is empty: it must hold the admin password")
        _warn_if_shared(r, pfile)
        return secret, pfile
    if penv:
        value = os.environ.get(penv)
        if value is None:
            raise r.error("password_env", f"environment variable {penv} is not set")
        if not value.strip():
            raise r.error("password_env", f"environment variable {penv} is empty: it must "
                                          "hold the admin password")
        return value, None
    return None, None


def _mount(
    source: str, name: str, table: Any, leases: LeaseConfig, base: Path
) -> MountSpec:
    prefix = f"mounts.{_key_part(name)}"
    if not isinstance(table, dict):
        raise ConfigError(source, prefix, "expected a table")
    if problem := _name_problem(name):
        raise ConfigError(source, prefix, f"mount name {problem}")
    if name in {"sys", "auth"}:
        raise ConfigError(source, prefix, "sys and auth are built-in paths, not mount names")
    r = _Reader(source, prefix, table)
    plugin = r.get("plugin", str)
    if not plugin:
        raise r.error("plugin", "missing (e.g. plugin = \"postgres\")")
    try:
        factory = load_plugin(plugin)
    except KeyError as exc:
        raise r.error("plugin", str(exc.args[0])) from None
    secret, secret_file = _secret(r, base)
    url = r.get("connection_url", str)
    if url:
        _check_url(r, "connection_url", url)
    if url and urlsplit(url).password:
        raise r.error(
            "connection_url",
            "must not contain a password; use password_file or password_env",
        )
    roles_raw = r.get("roles", dict, {})
    options = {k: v for k, v in table.items() if k not in {"plugin", "roles", "password_file",
                                                         "password_env"}}
    roles = {
        role: _role(source, f"{prefix}.roles.{_key_part(role)}", role, rtable, leases)
        for role, rtable in roles_raw.items()
    }
    mount = MountSpec(name=name, plugin=plugin, roles=roles, secret=secret,
                      secret_file=secret_file, options=options, source=source)
    for role_spec in roles.values():
        try:
            factory.validate_role(role_spec)
        except PluginConfigError as exc:
            # Plugins may name the key inside the role or the whole "roles.R.key".
            key = exc.key if exc.key.startswith("roles.") else f"roles.{role_spec.name}.{exc.key}"
            message = _plugin_message(exc, role_spec.options, _ROLE_COMMON)
            raise ConfigError(source, f"{prefix}.{key}", message) from None
    try:
        factory.from_config(mount)
    except PluginConfigError as exc:
        raise ConfigError(source, f"{prefix}.{exc.key}",
                          _plugin_message(exc, options, _MOUNT_COMMON)) from None
    return mount


def _role(source: str, prefix: str, name: str, table: Any, leases: LeaseConfig) -> RoleSpec:
    if not isinstance(table, dict):
        raise ConfigError(source, prefix, "expected a table")
    if problem := _name_problem(name):
        raise ConfigError(source, prefix, f"role name {problem}")
    r = _Reader(source, prefix, table)
    # A 0s TTL would issue leases that are dead on arrival.
    default_ttl = r.duration("default_ttl", leases.default_ttl, minimum=1)
    max_ttl = r.duration("max_ttl", max(leases.max_ttl, default_ttl), minimum=1)
    if max_ttl > leases.max_ttl:
        raise r.error("max_ttl", f"longer than [leases] max_ttl ({leases.max_ttl}s)")
    if default_ttl > max_ttl:
        raise r.error("default_ttl", f"longer than max_ttl ({max_ttl}s)")
    statements = {}
    for key in ("creation_statements", "renew_statements", "revocation_statements",
                "rollback_statements"):
        statements[key] = r.strings(key)
        for stmt in statements[key]:
            unknown = template_names(stmt) - _STATEMENT_VARS
            if unknown:
                raise r.error(key, f"unknown template variable(s): {', '.join(sorted(unknown))}")
    template = r.get("username_template", str)
    if template is not None:
        unknown = template_names(template) - {"mount", "role", "display_name", "random",
                                              "unix_time"}
        if unknown:
            raise r.error("username_template", f"unknown variable(s): {', '.join(sorted(unknown))}")
    options = {k: v for k, v in table.items() if k not in _ROLE_COMMON}
    return RoleSpec(
        name=name,
        default_ttl=default_ttl,
        max_ttl=max_ttl,
        creation_statements=statements["creation_statements"],
        renew_statements=statements["renew_statements"],
        revocation_statements=statements["revocation_statements"],
        rollback_statements=statements["rollback_statements"],
        username_template=template,
        options=options,
    )


def _policies(source: str, table: Mapping[str, Any]) -> dict[str, dict[str, tuple[str, ...]]]:
    policies: dict[str, dict[str, tuple[str, ...]]] = {}
    for name, rules in table.items():
        prefix = f"policies.{name}"
        if name == "root":
            raise ConfigError(source, prefix, "'root' is built in and cannot be redefined")
        if not isinstance(rules, dict):
            raise ConfigError(source, prefix, "expected a table of path = [capabilities]")
        parsed: dict[str, tuple[str, ...]] = {}
        for path, caps in rules.items():
            key = f'{prefix}."{path}"'
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise ConfigError(source, key, "expected a list of capabilities")
            bad = [c for c in caps if c not in CAPABILITIES]
            if bad:
                raise ConfigError(
                    source, key,
                    f"unknown capability {bad[0]!r}; use {', '.join(sorted(CAPABILITIES))}",
                )
            if "*" in path[:-1]:
                raise ConfigError(source, key, "'*' is only allowed at the end of a path")
            parsed[path.lstrip("/")] = tuple(caps)
        policies[name] = parsed
    return policies
