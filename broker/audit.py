"""The tamper-evident, fail-closed audit log: one chained, HMAC'd JSON object per line.

Each line is compact JSON with sorted keys, and the log adds four fields:

- ``time``: UTC RFC 3339 with microseconds (``2024-05-01T12:00:00.000000Z``), if absent;
- ``seq``: 1, 2, 3, ... within one file, continuing across restarts;
- ``prev``: ``sha256:<hex>`` of the previous line's bytes (newline excluded), or
  :data:`GENESIS` on a file's first line, so an edited, removed, inserted or
  moved line breaks the chain;
- ``mac``: ``hmac-sha256:<hex>`` of the line serialized without ``mac``, under the
  broker's key, so the last line (which no ``prev`` covers) cannot be edited and
  no line can be forged without the key.

A file that starts after rotation (moved away, deleted, or truncated to 0
bytes under us, or a SIGHUP :meth:`AuditLog.reopen` onto a new file) carries
``prev_file``: the hash of the old file's last line, linking the files. A file
truncated to 0 bytes in place (logrotate ``copytruncate``) also starts a new
chain, whose first line carries ``truncated``: ``{"seq", "bytes"}`` of what the
writer had written to it; ``verify`` of the copy and the new file checks the link.

The writer remembers the size, ``seq`` and hash of what it wrote. When the file
it writes changes in a way its own writes do not explain, it does not continue
from whatever line is now last: it logs an error and writes an ``admin`` /
``audit_gap`` line that continues ITS chain (``seq`` and ``prev`` of the last
line it wrote, which may no longer be in the file) and carries ``gap``:
``{"kind", "expected_seq", "expected_prev", "expected_bytes", "found_bytes",
"found_seq"}``, on which ``broker audit verify`` fails. Kinds: ``truncated``
(the file shrank but not to 0: lines were cut off its end), ``appended``
(bytes that are not lines signed with our key continuing our chain were
added; a second broker process with the key, such as ``broker operator init``,
may append chained lines), ``replaced`` (another non-empty file that does not
end with our last line was put at the path, e.g. ``sed -i``). Removing lines
from the end of a file while no broker runs is still invisible in that file
alone; compare ``last_seq`` / ``last_hash`` of
:func:`broker.audit_verify.verify_file` with a copy kept elsewhere.

Secrets never reach disk: every value under a key in :data:`SECRET_KEYS`, at any
depth, is replaced by its HMAC (see :func:`redact`), so equal tokens can still
be correlated across lines by whoever holds the key. Token accessors too (as
Vault's ``hmac_accessor``, on by default): an accessor lets its holder look up
and revoke its token, so a reader of the log must not get it. Every value under
a key in :data:`ACCESSOR_KEYS` (or ending in ``_accessor``), outside a
``metadata`` map (the caller's own names), is written as its HMAC, the same
``hmac-sha256:...`` that ``broker audit hash`` and ``sys/audit-hash/file``
compute. And whatever field a value comes in, one that looks like a credential
(see :func:`looks_like_credential`) is written as ``[hidden: N characters]``:
the writer enforces it, so a field added later cannot leak a JWT a caller sent
where a name was expected.

Fail-closed: :meth:`AuditLog.write` returns only after its line was handed to
the kernel (and fsync'd when configured); otherwise it raises
:class:`AuditError`, which the API answers with 503. The first failure is
logged (``audit write failed``), and from then on the log tries a line of
its own every :data:`PROBE_INTERVAL` seconds (``admin`` / ``audit_resumed``)
until one is written: health must turn green again when the disk is back
even if nothing else writes (a load balancer that drains on health 503 sends
no request that could). Concurrent writers are
group-committed: a line is queued, and one callback per event-loop iteration
writes every line queued so far in one ``write()`` (one ``stat`` for rotation,
one lock), so the lines of all requests handled in the same iteration share a
system call, and an fsync is shared by all lines that arrived while the
previous one ran.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac as _hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from broker.errors import ServiceUnavailable

__all__ = [
    "ACCESSOR_KEYS",
    "EVENT_TYPES",
    "GENESIS",
    "PROBE_INTERVAL",
    "SECRET_KEYS",
    "AuditError",
    "AuditLog",
    "event",
    "hash_value",
    "is_secret_name",
    "load_key",
    "looks_like_credential",
    "redact",
    "shown",
]

log = logging.getLogger(__name__)

#: ``prev`` of the first line of every file.
GENESIS = "sha256:" + "0" * 64

#: values under these keys (case-insensitive, at any depth) are written as HMACs.
SECRET_KEYS = frozenset({
    "password", "secret_key", "security_token", "client_token", "token", "secret",
    "jwt", "private_key",
    # the same secrets under the names other layers use for them
    "secret_access_key", "session_token", "client_secret", "authorization", "x-vault-token",
})

#: values under these keys (case-insensitive, or any key ending in ``_accessor``) are
#: token accessors: written as HMACs unless ``[audit] hmac_accessor = false``. Not
#: inside a ``metadata`` map, whose keys are the caller's (a claim named ``owner``).
ACCESSOR_KEYS = frozenset({
    "accessor", "accessors", "token_accessor", "owner", "original_owner", "caller", "target",
})

#: the standard event types (others are allowed; these are what operators grep for).
EVENT_TYPES = frozenset({
    "request", "response", "issue", "renew", "revoke", "expire", "revoke_failed",
    "irrevocable", "rollback", "reuse_attempt", "auth_failure", "policy_denied",
    "token_create", "token_revoke", "admin",
})

_MAC_PREFIX = "hmac-sha256:"
_RESERVED = ("seq", "prev", "mac", "prev_file", "gap", "truncated")
_REDACTED = "[redacted]"
_MIN_KEY_BYTES = 16
_MAX_LINE = 16 * 1024 * 1024  # the tail scan on open gives up beyond this
_CHUNK = 64 * 1024
#: Bytes appended by someone else that are read to check they are our chain's lines.
_MAX_FOREIGN = 1024 * 1024
#: While writes fail, a line of the log's own is tried this often (seconds).
PROBE_INTERVAL = 1.0


class AuditError(ServiceUnavailable):
    """The audit line could not be written: the request must not proceed (503)."""


# --------------------------------------------------------------------------- helpers


_second_cache: tuple[int, str] = (-1, "")


def _now() -> str:
    """Now as RFC 3339 UTC with microseconds and Z: ``2026-01-02T03:04:05.678901Z``.

    The same text as ``datetime.now(UTC).isoformat(timespec="microseconds")``
    with Z for "+00:00", but the date and time of day are formatted once per
    second: every audit line carries one, and datetime formatting was a few
    percent of a request's CPU.
    """
    global _second_cache
    now = time.time()
    sec = int(now)
    micros = round((now - sec) * 1_000_000)
    if micros == 1_000_000:
        sec, micros = sec + 1, 0
    cached_sec, text = _second_cache
    if sec != cached_sec:
        text = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache = (sec, text)
    return f"{text}.{micros:06d}Z"


# One serialization for writing and verifying; default=str makes odd types
# (datetime, UUID, enums) strings, which then round-trip byte-identically. One
# encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=str,
)


def _canonical(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("ascii")


def _sha(line: bytes) -> str:
    return "sha256:" + hashlib.sha256(line).hexdigest()


def _mac(key: bytes, data: bytes) -> str:
    return _MAC_PREFIX + _hmac.digest(key, data, "sha256").hex()


#: A line's ``mac``: an HMAC under a key derived from the audit key for line macs only,
#: so that no value HMAC (a redacted secret, ``sys/audit-hash``, ``broker audit hash``)
#: is ever a valid line mac: whoever can get values hashed cannot sign a line with it.
#: Lines written before had a plain value HMAC as their mac (:func:`line_mac_matches`).
_LINE_MAC_PREFIX = "hmac-sha256-line:"
_LINE_KEY_LABEL = b"broker audit line mac"


def line_key(key: bytes) -> bytes:
    """The key line macs are made with, derived from the audit key."""
    return _hmac.digest(key, _LINE_KEY_LABEL, "sha256")


def _line_mac(key: bytes, data: bytes) -> str:
    """The ``mac`` of a line whose body (the line without ``mac``) is ``data``."""
    return _LINE_MAC_PREFIX + _hmac.digest(line_key(key), data, "sha256").hex()


def line_mac_matches(key: bytes, mac: object, body: bytes, *, old_format: bool) -> bool:
    """Whether ``mac`` is the line mac of ``body`` under the audit key ``key``.

    ``old_format``: also accept the mac lines had before line macs got a key of their
    own (a value HMAC of the body). Only where no new-format line came before: a value
    HMAC is what anyone allowed to call ``sys/audit-hash`` can have made, so an old
    mac after a new one is a forgery.
    """
    if not isinstance(mac, str):
        return False
    if mac.startswith(_LINE_MAC_PREFIX):
        return _hmac.compare_digest(mac, _line_mac(key, body))
    return old_format and _hmac.compare_digest(mac, _mac(key, body))


def is_old_line_mac(mac: object) -> bool:
    """Whether ``mac`` has the format of a line written before line macs had their key."""
    return isinstance(mac, str) and mac.startswith(_MAC_PREFIX)


def _is_mac(value: str) -> bool:
    return (
        len(value) == len(_MAC_PREFIX) + 64
        and value.startswith(_MAC_PREFIX)
        and all(c in "0123456789abcdef" for c in value[len(_MAC_PREFIX):])
    )


_SCALARS = (str, int, bool, type(None))


#: Suffixes that mark a secret whatever the prefix (``new_password``,
#: ``admin_password``, ``refresh_token``): a new field name must not leak.
_SECRET_SUFFIXES = ("password", "_secret", "secret_key", "_token", "private_key")


#: How a credential starts whatever field it was sent in: a JWT, a broker token,
#: Vault tokens. A caller that swaps two arguments (hvac's ``jwt_login(role, jwt)``)
#: must not get its secret written, or echoed, where the other one is shown.
_CREDENTIAL_PREFIXES = ("eyJ", "brk.", "hvs.", "hvb.", "s.")


def is_secret_name(name: str) -> bool:
    """Whether a field called ``name`` holds a secret (written as an HMAC)."""
    return _is_secret_key(name)


def looks_like_credential(value: str) -> bool:
    """Whether ``value`` starts like a credential (a JWT, a broker or Vault token)."""
    return value.startswith(_CREDENTIAL_PREFIXES) and _credential_shape(value)


def _credential_shape(value: str) -> bool:
    """For a value with a credential's prefix: False for a name that merely starts with
    ``s.`` (a user ``s.jones``): a legacy Vault token is ``s.`` and 24 letters/digits."""
    return not value.startswith("s.") or (len(value) == 26 and value[2:].isalnum())


def _hidden(value: str) -> str:
    return f"[hidden: {len(value)} characters]"


def shown(value: str) -> str:
    """``value`` as a log line or an error may show a name the caller sent: itself, or
    ``[hidden: N characters]`` when it looks like a credential (or is too long to be
    a name)."""
    if looks_like_credential(value) or len(value) > 256:
        return _hidden(value)
    return scrub(value)  # a name with a token inside (pg/creds/<token>)


@functools.lru_cache(maxsize=4096)
def _is_secret_key(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_KEYS or lowered.endswith(_SECRET_SUFFIXES)


# What the audit writer does with a field, by its name (see _AuditRedactor). Not 0:
# ``_ROLES.get(name) or _field_role(name)`` is the lookup.
_PLAIN, _SECRET, _ACCESSOR, _USER_MAP, _TEXT = 1, 2, 3, 4, 5
#: Fields that hold text built from what a caller sent (a URL path, an error that
#: quotes a name): a credential inside them, not only at their start, is hidden.
_TEXT_KEYS = frozenset({"path", "paths", "prefix", "error", "checked_path"})
#: A credential inside a text: a JWT, a broker token, a Vault token.
_CREDENTIAL_IN_TEXT = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|brk\.[A-Za-z0-9_-]{16,}|hv[sb]\.[A-Za-z0-9_-]{16,}"
    r"|(?<![A-Za-z0-9_.-])s\.[A-Za-z0-9]{24}(?![A-Za-z0-9_-])")


def scrub(text: str) -> str:
    """``text`` with every credential in it (a JWT, a broker or Vault token) written as
    ``[hidden: N characters]``: for a path or a message that may quote what a caller sent
    (``pg/creds/<a token pasted as the role>``, ``no role '<it>' on mount 'pg'``)."""
    if "." not in text:  # every credential shape has one: most texts stop here
        return text
    return _CREDENTIAL_IN_TEXT.sub(lambda m: _hidden(m.group(0)), text)
#: name -> role, filled as names are met; a plain dict (not lru_cache): one lookup per
#: field of every line. Bounded: metadata keys are the callers' and may be many.
_ROLES: dict[str, int] = {}
_MAX_CACHED = 4096


def _field_role(name: str) -> int:
    lowered = name.lower()
    if _is_secret_key(name):
        role = _SECRET
    elif lowered in ACCESSOR_KEYS or lowered.endswith("_accessor"):
        role = _ACCESSOR
    elif lowered == "metadata":
        role = _USER_MAP
    elif lowered in _TEXT_KEYS:
        role = _TEXT
    else:
        role = _PLAIN
    if len(_ROLES) >= _MAX_CACHED:
        _ROLES.clear()
    _ROLES[name] = role
    return role


def _walk(obj: Any, hide: Callable[[str], str]) -> Any:
    """Copy ``obj`` into JSON-safe shapes, hiding secrets (the caller's object is untouched)."""
    # Exact type checks first: this runs on every field of every line, and
    # isinstance against the ABCs is several times slower.
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if kind is dict or isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            name = k if type(k) is str else str(k)
            if v is not None and _is_secret_key(name):
                if isinstance(v, str):
                    # Already an HMAC (a caller pre-redacted it): keep, so redaction is idempotent.
                    out[name] = v if _is_mac(v) else hide(v)
                else:
                    out[name] = hide(_canonical(_walk(v, hide)).decode("ascii"))
            else:
                out[name] = v if type(v) in _SCALARS else _walk(v, hide)
        return out
    if kind is list or isinstance(obj, list | tuple | set | frozenset):
        return [_walk(v, hide) for v in obj]
    if kind is float and not math.isfinite(obj):
        return str(obj)
    return obj


class _AuditRedactor:
    """What the audit writer does to an event before it is signed: a copy with

    - every secret-named value (:data:`SECRET_KEYS`) as its HMAC, as :func:`redact`;
    - every accessor (:data:`ACCESSOR_KEYS`) as its HMAC, or as it is when
      ``accessor`` is None (``hmac_accessor = false``): a broker-made id, not screened;
    - every other string that looks like a credential (:func:`looks_like_credential`)
      as ``[hidden: N characters]``, whatever its field: a caller cannot forget it.

    One pass over the event, exact type checks first: it runs on every audit line.
    """

    __slots__ = ("_accessor", "_macs", "_secret")

    def __init__(self, secret: Callable[[str], str],
                 accessor: Callable[[str], str] | None) -> None:
        self._secret = secret
        self._accessor = accessor
        # accessor -> its HMAC: a token's accessor is on each of its lines, often twice
        # (auth.accessor, lease.owner). Not a secret the process does not hold anyway.
        self._macs: dict[str, str] = {}

    def walk(self, obj: Any, ids: bool = True) -> Any:
        """``ids``: accessor-named keys hold accessors here (not inside ``metadata``)."""
        kind = type(obj)
        if kind is str:
            return (_hidden(obj) if obj.startswith(_CREDENTIAL_PREFIXES)
                    and _credential_shape(obj) else obj)
        if kind is dict or isinstance(obj, Mapping):
            out: dict[str, Any] = {}
            roles = _ROLES
            for k, v in obj.items():
                name = k if type(k) is str else str(k)
                role = roles.get(name) or _field_role(name)
                vkind = type(v)
                if role == _PLAIN or v is None:
                    # The common case first, inline: most fields of most lines.
                    if vkind is str:
                        out[name] = (_hidden(v) if v.startswith(_CREDENTIAL_PREFIXES)
                                     and _credential_shape(v) else v)
                    elif v is None or vkind is int or vkind is bool:
                        out[name] = v
                    else:
                        out[name] = self.walk(v, ids)
                else:
                    out[name] = self._member(role, v, ids)
            return out
        if kind in _SCALARS:
            return obj
        if kind is list or isinstance(obj, list | tuple | set | frozenset):
            return [self.walk(v, ids) for v in obj]
        if kind is float and not math.isfinite(obj):
            return str(obj)
        return obj

    def _member(self, role: int, value: Any, ids: bool) -> Any:
        """A member named as a secret, an accessor or metadata, whose value is not None."""
        if role == _SECRET:
            if type(value) is str:
                return value if _is_mac(value) else self._secret(value)
            return self._secret(_canonical(_walk(value, self._secret)).decode("ascii"))
        if role == _ACCESSOR and ids:
            if type(value) is str:
                return self._accessor_value(value)
            if type(value) in (list, tuple):
                return [self._accessor_value(v) if type(v) is str else self.walk(v, ids)
                        for v in value]
            return self.walk(value, ids)
        if role == _TEXT:
            if type(value) is str:
                return _hidden(value) if looks_like_credential(value) else scrub(value)
            if type(value) in (list, tuple):  # paths=[...]
                return [self._member(_TEXT, v, ids) if type(v) is str else self.walk(v, ids)
                        for v in value]
        # Inside metadata the names are the caller's: "owner" there is no accessor.
        return self.walk(value, False) if role == _USER_MAP else self.walk(value, ids)

    def _accessor_value(self, value: str) -> str:
        if self._accessor is None or not value:
            return value
        mac = self._macs.get(value)
        if mac is None:
            if _is_mac(value):  # already written as one (a caller pre-redacted it)
                return value
            mac = self._accessor(value)
            if len(self._macs) >= _MAX_CACHED:
                self._macs.clear()
            self._macs[value] = mac
        return mac


def redact(obj: Any, key: bytes | None = None) -> Any:
    """A copy of ``obj`` with every secret-named value (see SECRET_KEYS) hidden, recursively.

    With ``key`` a secret becomes ``hmac-sha256:<hex>`` (what the audit log writes);
    without, ``[redacted]`` (for debug logs and error messages).
    """
    if key is None:
        return _walk(obj, lambda _v: _REDACTED)
    return _walk(obj, lambda v: _mac(key, v.encode("utf-8", "surrogatepass")))


def hash_value(key: bytes, value: str) -> str:
    """What the audit log writes for the secret ``value`` (``hmac-sha256:<hex>``).

    Vault's ``sys/audit-hash``: grep the log for it to find a known token's lines.
    """
    return _mac(key, value.encode("utf-8", "surrogatepass"))


def event(type: str, *, outcome: str = "ok", **fields: Any) -> dict[str, Any]:
    """The standard event shape; fields whose value is None are left out.

    Usual fields: ``auth={accessor, display_name, policies, metadata}``,
    ``request={id, path, operation, remote_addr}``, ``lease={id, mount, role, owner}``,
    ``error="..."``. See :data:`EVENT_TYPES`.
    """
    ev: dict[str, Any] = {"type": type, "outcome": outcome, "time": _now()}
    ev.update((k, v) for k, v in fields.items() if v is not None)
    return ev


# --------------------------------------------------------------------------- keys


def load_key(path: str) -> bytes:
    """Read an HMAC key file: hex text (``openssl rand -hex 32``) or raw bytes.

    Raises OSError when unreadable, ValueError when shorter than 16 bytes.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    text = data.strip()
    key = data
    if len(text) % 2 == 0 and len(text) >= 2 * _MIN_KEY_BYTES:
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = data  # not hex: raw key bytes
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"key is too short ({len(key)} bytes); use at least 32 random bytes")
    return key


def _load_or_create_key(path: str, create: bool) -> bytes:
    try:
        key = load_key(path)
    except FileNotFoundError:
        if not create:
            raise
    else:
        if os.stat(path).st_mode & 0o077:
            log.warning("audit key file %s is readable by group/others; chmod 600 it", path)
        return key
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    key = secrets.token_bytes(32)
    # Written whole under a private name, then linked into place: a process
    # starting at the same moment (broker workers) either sees no key or a
    # whole one, never an empty file, and the first link wins for everyone.
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow the mode; make it exact
            os.write(fd, key.hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_key(path)  # another process created it first: use theirs
    finally:
        os.unlink(tmp)
    log.info("created audit HMAC key %s", path)
    return key


# --------------------------------------------------------------------------- the log


class AuditLog:
    """An append-only, hash-chained audit file. Create with :meth:`open`."""

    def __init__(self, path: str, key: bytes, *, fsync: bool = False,
                 probe_interval: float = PROBE_INTERVAL, hmac_accessor: bool = True) -> None:
        self.path = path
        self._key = key
        # A keyed HMAC state to .copy() per value: saves re-keying on every MAC.
        self._hmac_base = _hmac.new(key, digestmod="sha256")
        self._line_hmac_base = _hmac.new(line_key(key), digestmod="sha256")
        self._redactor = _AuditRedactor(self.hmac, self.hmac if hmac_accessor else None)
        # _sign serializes each record once with this stand-in for its mac and
        # then swaps it out. Random per log, so no event value can forge it.
        self._mac_stand_in = _MAC_PREFIX + secrets.token_hex(32)
        self._mac_member = b'"mac":"' + self._mac_stand_in.encode("ascii") + b'"'
        self._fsync = fsync
        self._fd = -1
        self._ident: tuple[int, int] = (0, 0)
        self._size = 0  # bytes of complete lines in the file, as far as we know
        self._dirty = False  # a failed write left a partial line past _size
        self._seq = 0
        self._prev = GENESIS
        self._link: str | None = None  # prev_file for the next line (first of a new file)
        # ``truncated`` for the first line of a chain restarted after a truncation to 0.
        self._truncated: dict[str, int] | None = None
        # ``gap`` of the audit_gap line to write first: the file changed under us.
        self._gap: dict[str, Any] | None = None
        self._newline_first = False  # the file ends in foreign bytes without a newline
        self._lock = asyncio.Lock()
        self._queue: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flush_soon = False  # a _start_flush callback is scheduled
        self._flushes: set[asyncio.Task[None]] = set()
        self._closed = False
        self._ok = True
        self.last_error: str | None = None
        # While unhealthy: the timer for the next probe line, or the probe writing it.
        self._probe_interval = probe_interval
        self._probe_timer: asyncio.TimerHandle | None = None
        self._probe_task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    async def open(
        cls, path: str, hmac_key_file: str, *, fsync: bool = False, create_key: bool = False,
        probe_interval: float = PROBE_INTERVAL, hmac_accessor: bool = True,
    ) -> AuditLog:
        """Open (or create) the log at ``path``, continuing the chain of its last line.

        ``hmac_accessor=False`` writes token accessors as they are (``[audit] hmac_accessor``).
        """
        try:
            key = await asyncio.to_thread(_load_or_create_key, hmac_key_file, create_key)
        except FileNotFoundError:
            raise AuditError(
                f"audit key file {hmac_key_file} not found; create it "
                f"(openssl rand -hex 32 > {hmac_key_file}; chmod 600) or allow create_key"
            ) from None
        except OSError as exc:
            raise AuditError(
                f"audit key file {hmac_key_file}: cannot read it ({exc.strerror or exc})"
            ) from None
        except ValueError as exc:
            raise AuditError(f"audit key file {hmac_key_file}: {exc}") from None
        self = cls(path, key, fsync=fsync, probe_interval=probe_interval,
                   hmac_accessor=hmac_accessor)
        try:
            # A file written under another key is set aside, not continued:
            # "keep the old key to verify old logs" must hold after a key change.
            await asyncio.to_thread(functools.partial(self._switch, None, set_aside=True))
        except OSError as exc:
            raise self._error("cannot open", exc) from None
        return self

    async def close(self) -> None:
        """Write what is queued, then close; later writes raise AuditError."""
        async with self._lock:
            if self._closed:
                return
            if self._queue:
                batch, self._queue = self._queue, []
                await self._flush(batch)
            self._closed = True
            if self._probe_timer is not None:
                self._probe_timer.cancel()
                self._probe_timer = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    async def reopen(self) -> None:
        """Reopen the path (SIGHUP after log rotation).

        An existing non-empty file continues its own chain; a new or empty one
        starts a fresh chain whose first line links to the old file (``prev_file``).
        The file still in use, or a non-empty one that does not end with the last
        line this log wrote, is checked as before a write (see :meth:`_check_file`):
        a reopen does not hide a gap. Raises AuditError if the path cannot be
        opened; the old file stays in use.
        """
        async with self._lock:
            if self._closed:
                raise AuditError(f"audit log {self.path}: closed")
            try:
                await asyncio.to_thread(self._reopen)
            except OSError as exc:
                raise self._error("cannot reopen", exc) from None

    @property
    def healthy(self) -> bool:
        """False when closed or when the last write failed (until one succeeds)."""
        return self._ok and not self._closed

    def hmac(self, value: str) -> str:
        """``hmac-sha256:<hex>`` of ``value`` under the broker's audit key."""
        return self._mac_of(value.encode("utf-8", "surrogatepass"))

    def _mac_of(self, data: bytes) -> str:
        """:func:`_mac` under this log's key, from the keyed state (same bytes)."""
        h = self._hmac_base.copy()
        h.update(data)
        return _MAC_PREFIX + h.hexdigest()

    def _line_mac_of(self, body: bytes) -> str:
        """:func:`_line_mac` under this log's key, from the keyed state (same bytes)."""
        h = self._line_hmac_base.copy()
        h.update(body)
        return _LINE_MAC_PREFIX + h.hexdigest()

    def redact(self, obj: Any) -> Any:
        """What :meth:`write` writes of ``obj``: :func:`redact` under this log's key, with
        accessors HMAC'd (unless ``hmac_accessor`` is off) and credential-like values
        hidden in every field."""
        return self._redactor.walk(obj)

    # -- writing --------------------------------------------------------------------

    async def write(self, event: Mapping[str, Any]) -> None:
        """Append one event; returns once written (and fsync'd if configured).

        Raises AuditError when the line could not be written: the caller must not
        go on as if the action had been recorded.
        """
        if self._closed:
            raise AuditError(f"audit log {self.path}: closed")
        record = self.redact(event)
        for name in _RESERVED:
            record.pop(name, None)
        if "time" not in record:  # not setdefault: that would format a time for nothing
            record["time"] = _now()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.append((record, fut))
        if not self._flush_soon:
            # Every line queued until the loop gets round to this callback goes
            # out in the same write(): one stat, one write, one lock per batch.
            self._flush_soon = True
            loop.call_soon(self._start_flush)
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()  # cancelled while queued: the line may still be written
            elif not fut.cancelled():
                fut.exception()  # mark retrieved; we raised it above if it was ours

    def _start_flush(self) -> None:
        self._flush_soon = False
        if not self._queue:
            return
        if self._fsync or self._lock.locked():
            # fsync awaits a thread, and a holder of the lock (an fsync'ing flush,
            # reopen, close) must finish first: flush in a task, under the lock.
            task = asyncio.ensure_future(self._flush_queued())
            self._flushes.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._flushes.discard)
            return
        # No fsync and nobody inside the lock: the flush never awaits, so it
        # cannot interleave with anything the lock guards. No Task needed.
        batch, self._queue = self._queue, []
        try:
            self._written(self._write_lines(batch))
        except AuditError as exc:
            self._fail(batch, exc)

    async def _flush_queued(self) -> None:
        async with self._lock:
            # A flush that held the lock (fsync) may have taken our lines already.
            if self._queue:
                batch, self._queue = self._queue, []
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        """Write one batch under the lock; resolve every future in it, whatever happens."""
        try:
            written = self._write_lines(batch)
            if self._fsync and written:
                try:
                    # fsync a duplicate so a concurrent close() cannot pull the fd away.
                    await asyncio.to_thread(_fsync_and_close, os.dup(self._fd))
                except OSError as exc:
                    raise self._failed(self._error("cannot write", exc),
                                       exc.strerror or str(exc)) from None
            self._written(written)
        except AuditError as exc:
            self._fail(batch, exc)
        finally:
            for _, fut in batch:
                if not fut.done():  # cancelled mid-fsync: not known to be durable
                    fut.set_exception(AuditError(f"audit log {self.path}: write interrupted"))

    def _write_lines(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]
                     ) -> list[asyncio.Future[None]]:
        """:meth:`_commit`, with a failure turned into AuditError and the log marked unhealthy."""
        if self._closed:
            raise AuditError(f"audit log {self.path}: closed")
        try:
            return self._commit(batch)
        except OSError as exc:
            raise self._failed(self._error("cannot write", exc), exc.strerror or str(exc)) from None
        except AuditError as exc:
            raise self._failed(exc, str(exc)) from None

    def _failed(self, exc: AuditError, detail: str) -> AuditError:
        if self._ok:
            # Once per outage, not once per refused request.
            log.error("audit write failed: %s", exc)
        self._ok = False
        self.last_error = detail
        self._schedule_probe()
        return exc

    def _written(self, written: list[asyncio.Future[None]]) -> None:
        if not self._ok:
            log.warning("audit log %s is writable again (it failed with: %s)",
                        self.path, self.last_error)
        self._ok = True
        self.last_error = None
        for fut in written:
            if not fut.done():
                fut.set_result(None)

    def _schedule_probe(self) -> None:
        """Try a line of our own in a while, unless one is already on its way."""
        if self._closed or self._probe_timer is not None or self._probe_task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (a thread): the next write tries again
            return
        self._probe_timer = loop.call_later(self._probe_interval, self._start_probe)

    def _start_probe(self) -> None:
        self._probe_timer = None
        if self._closed or self._ok:
            return
        self._probe_task = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        """Write the line that records the log's return; on failure, try again later."""
        try:
            if not self._ok:
                await self.write(event("admin", action="audit_resumed",
                                       failed_with=self.last_error))
        except AuditError:
            pass  # still failing: _failed logged nothing new; retried below
        finally:
            self._probe_task = None
            if not self._ok:
                self._schedule_probe()

    @staticmethod
    def _fail(batch: list[tuple[dict[str, Any], asyncio.Future[None]]], exc: AuditError) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(AuditError(str(exc)))

    def _commit(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]
                ) -> list[asyncio.Future[None]]:
        """Chain, sign and write the batch in one write(); runs on the loop, never awaits."""
        self._check_file()
        seq, prev, link = self._seq, self._prev, self._link
        truncated = self._truncated
        lines: list[bytes] = []
        written: list[asyncio.Future[None]] = []
        if self._gap is not None:
            # Before anything else: the line that makes the gap visible to verify.
            marker = event("admin", outcome="error", action="audit_gap", gap=self._gap,
                           seq=seq + 1, prev=prev, prev_file=link, truncated=truncated)
            line = self._sign(marker)
            seq, prev, link, truncated = seq + 1, _sha(line), None, None
            lines.append(line)
        for record, fut in batch:
            record["seq"] = seq + 1
            record["prev"] = prev
            if link is not None:
                record["prev_file"] = link
            if truncated is not None:
                record["truncated"] = truncated
            try:
                line = self._sign(record)
            except (TypeError, ValueError) as exc:
                # One malformed event must not sink the batch; it does not take a seq.
                if not fut.done():
                    fut.set_exception(AuditError(f"audit event cannot be serialized: {exc}"))
                continue
            seq, prev, link, truncated = seq + 1, _sha(line), None, None
            lines.append(line)
            written.append(fut)
        if not lines:
            return written
        data = b"\n".join(lines) + b"\n"
        if self._newline_first:
            data = b"\n" + data  # end the foreign bytes' line: ours start on a boundary
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
        except OSError:
            if done:
                # Disk full mid-line: cut the partial line so the chain stays parseable.
                self._dirty = True
                self._repair()
            raise
        self._size += len(data)
        self._seq, self._prev, self._link = seq, prev, None
        self._truncated = self._gap = None
        self._newline_first = False
        return written

    def _sign(self, record: dict[str, Any]) -> bytes:
        """The canonical line with ``mac`` over the line without it, in one serialization.

        Keys are sorted, so the line is the members before "mac", then mac,
        then the rest. Serializing the record with a stand-in mac member (a
        random value no event can contain) gives the line's shape; the bytes
        without that member (and one comma next to it) are exactly the record
        without mac, which is what the MAC covers.
        """
        record["mac"] = self._mac_stand_in
        try:
            line = _canonical(record)
        finally:
            del record["mac"]
        start = line.index(self._mac_member)
        end = start + len(self._mac_member)
        if line[start - 1:start] == b",":
            body = line[:start - 1] + line[end:]
        elif line[end:end + 1] == b",":
            body = line[:start] + line[end + 1:]
        else:
            body = line[:start] + line[end:]
        mac = b'"mac":"' + self._line_mac_of(body).encode("ascii") + b'"'
        return line[:start] + mac + line[end:]

    def _repair(self) -> None:
        try:
            os.ftruncate(self._fd, self._size)
            self._dirty = False
        except OSError as exc:
            log.error("audit log %s: cannot cut a partial line: %s", self.path, exc.strerror)

    def _check_file(self) -> None:
        """Follow rotation, and notice a file changed under us (see the module docstring).

        Moved or deleted: a new file and chain. Truncated to 0 bytes in place
        (``copytruncate``): a new chain. Any other size than what we wrote: an
        ``audit_gap`` line, unless all that was added are lines signed with our
        key that continue our chain (another broker process with the key).
        """
        if self._fd < 0:
            raise OSError(9, "audit file is not open")
        if self._dirty:
            os.ftruncate(self._fd, self._size)  # still failing -> OSError -> AuditError
            self._dirty = False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self._ident:
            log.warning("audit log %s was moved or deleted; starting a new file", self.path)
            self._switch(self._chain_link())
            return
        if stat.S_ISREG(st.st_mode) and st.st_size != self._size:
            self._changed_in_place(st.st_size)

    def _reopen(self) -> None:
        """:meth:`reopen` in a thread: the file in use is only checked, another one adopted."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if self._fd >= 0 and st is not None and (st.st_dev, st.st_ino) == self._ident:
            # Still our file: reading its tail again would adopt whatever is last now.
            if self._dirty:
                os.ftruncate(self._fd, self._size)
                self._dirty = False
            if stat.S_ISREG(st.st_mode) and st.st_size != self._size:
                self._changed_in_place(st.st_size)
            return
        self._switch(self._chain_link())

    def _changed_in_place(self, size: int) -> None:
        """The file we have open is ``size`` bytes, not the ``_size`` we wrote."""
        expected = {"expected_seq": self._seq, "expected_prev": self._prev,
                    "expected_bytes": self._size, "found_bytes": size}
        if size == 0:
            # logrotate copytruncate (or a wipe): a new chain linked to the last
            # line we wrote, its first line saying what was cut.
            log.warning("audit log %s was truncated to 0 bytes under us (%d bytes, seq %d "
                        "written); starting a new chain linked to its last line",
                        self.path, self._size, self._seq)
            if self._seq:
                self._truncated = {"seq": self._seq, "bytes": self._size}
            self._link = self._chain_link()
            self._seq, self._prev, self._size = 0, GENESIS, 0
            self._newline_first = False
            return
        if size > self._size and self._adopt_appended(size):
            return
        self._newline_first = False
        if size > self._size:
            kind, found_seq = "appended", None
            self._newline_first = os.pread(self._fd, 1, size - 1) != b"\n"
        else:
            kind = "truncated"
            found_seq, size = self._cut_to_line(size)
        self._note_gap({"kind": kind, **expected, "found_seq": found_seq}, size)

    def _note_gap(self, gap: dict[str, Any], size: int) -> None:
        """Write an ``audit_gap`` line next, continuing our own chain after ``size`` bytes."""
        if self._gap is not None:
            gap["earlier"] = self._gap  # not written yet: keep what was found before
        log.error("audit log %s was changed under us (%s: %d bytes written up to seq %d, "
                  "found %d bytes); lines may have been removed or forged. Writing an "
                  "audit_gap line; `broker audit verify` will fail there",
                  self.path, gap["kind"], gap["expected_bytes"], gap["expected_seq"],
                  gap["found_bytes"])
        self._gap = gap
        self._size = size

    def _cut_to_line(self, size: int) -> tuple[int | None, int]:
        """(seq of the last line or None, size) after cutting a partial last line."""
        try:
            seq, _hash, size, _signed = self._read_tail(self._fd, size)
        except AuditError:  # the last line is no record of ours, or far too long
            size = os.fstat(self._fd).st_size
            self._newline_first = size > 0 and os.pread(self._fd, 1, size - 1) != b"\n"
            return None, size
        return (seq or None), size

    def _adopt_appended(self, size: int) -> bool:
        """True (and adopted) if the bytes past ``_size`` are whole lines signed with
        our key that continue our chain: another broker process (``broker operator
        init`` while the server runs) wrote them."""
        if size - self._size > _MAX_FOREIGN:
            return False
        data = os.pread(self._fd, size - self._size, self._size)
        if not data.endswith(b"\n") or len(data) != size - self._size:
            return False
        seq, prev, link = self._seq, self._prev, self._link
        for line in data[:-1].split(b"\n"):
            try:
                obj = json.loads(line)
                mac = obj.pop("mac")
                ok = (type(obj.get("seq")) is int and obj["seq"] == seq + 1
                      and obj.get("prev") == prev and obj.get("prev_file") == link
                      and line_mac_matches(self._key, mac, _canonical(obj),
                                           old_format=False))
            except (ValueError, TypeError, KeyError, AttributeError):
                ok = False
            if not ok:
                return False
            seq, prev, link = seq + 1, _sha(line), None
        log.info("audit log %s: %d chained line(s) appended by another writer with our key; "
                 "continuing after them", self.path, seq - self._seq)
        self._seq, self._prev, self._link, self._size = seq, prev, None, size
        self._truncated = None
        return True

    def _chain_link(self) -> str | None:
        # An old file with no line of its own passes on the link it was given.
        return self._prev if self._seq else self._link

    def _switch(self, link: str | None, *, set_aside: bool = False) -> None:
        """Open the path and adopt it; the old fd is closed only once that worked.

        With ``set_aside`` (start-up), a file whose last line is not signed
        with our key is renamed (see :meth:`_set_aside`) and a new one started.
        """
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            seq, prev, size, signed = self._read_tail(
                fd, st.st_size if stat.S_ISREG(st.st_mode) else 0)
            if not signed and set_aside:
                self._set_aside()
        except BaseException:
            os.close(fd)
            raise
        if not signed:
            if set_aside:
                os.close(fd)
                self._switch(prev)  # a new file, linked to the one set aside
                return
            self._warn_unsigned()
        replaced = self._fd >= 0 and size > 0 and (seq, prev) != (self._seq, self._prev)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._ident, self._dirty = fd, (st.st_dev, st.st_ino), False
        if replaced:
            # A non-empty file that does not end with the last line we wrote
            # (``sed -i`` cutting lines, a file swapped in): adopting its last
            # line would hide what is missing. Our chain goes on, after a gap line.
            self._newline_first = False
            self._note_gap({"kind": "replaced", "expected_seq": self._seq,
                            "expected_prev": self._prev, "expected_bytes": self._size,
                            "found_bytes": size, "found_seq": seq}, size)
            return
        self._seq, self._prev, self._size = seq, prev, size
        self._link = link if size == 0 else None
        if size:
            self._truncated = None

    def _set_aside(self) -> None:
        """Rename the file at the path: its lines are signed with another key.

        Lines under two keys in one file could be verified with neither (the
        old key fails at the first new line, the new key at the first line).
        The file keeps its chain; ``verify --key-file OLD`` checks it.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = f"{self.path}.{stamp}.other-key"
        n = 1
        while os.path.lexists(aside):
            n += 1
            aside = f"{self.path}.{stamp}-{n}.other-key"
        os.rename(self.path, aside)
        log.warning("audit log %s: its last line is not signed with the configured HMAC key "
                    "(the key was changed, or the line was edited); moved it to %s (verify it "
                    "with the key it was written with) and starting a new file linked to it",
                    self.path, aside)

    def _warn_unsigned(self) -> None:
        log.warning("audit log %s: the last line's HMAC does not match the key "
                    "(edited line or changed key); run `broker audit verify`", self.path)

    def _read_tail(self, fd: int, size: int) -> tuple[int, str, int, bool]:
        """(seq, hash, size, signed) of the last complete line, reading only the file's end.

        ``signed``: that line's HMAC is ours (True for an empty file).

        A torn last line (crash or disk full mid-write; never acknowledged to
        anyone) is cut off so that new lines start on a line boundary.
        """
        pos, buf, newlines = size, b"", 0
        while pos > 0 and newlines < 2:
            step = min(_CHUNK, pos)
            pos -= step
            chunk = os.pread(fd, step, pos)
            newlines += chunk.count(b"\n")
            buf = chunk + buf
            if len(buf) > _MAX_LINE and newlines < 2:
                raise AuditError(f"audit log {self.path}: last line longer than {_MAX_LINE} "
                                 "bytes; move the file aside")
        last_nl = buf.rfind(b"\n")
        torn = len(buf) - last_nl - 1
        if torn:
            log.warning("audit log %s: cutting a torn last line (%d bytes)", self.path, torn)
            os.ftruncate(fd, size - torn)
            size -= torn
        if last_nl < 0:
            return 0, GENESIS, size, True
        line = buf[buf.rfind(b"\n", 0, last_nl) + 1 : last_nl]
        try:
            obj = json.loads(line)
            seq = obj["seq"]
            if type(seq) is not int or seq < 1:
                raise ValueError
        except (ValueError, TypeError, KeyError):
            raise AuditError(
                f"audit log {self.path}: its last line is not a broker audit record; "
                "move the file aside to start a new one"
            ) from None
        mac = obj.pop("mac", None)
        try:
            # The last line may be from before line macs had their own key.
            mac_ok = line_mac_matches(self._key, mac, _canonical(obj), old_format=True)
        except ValueError:
            mac_ok = False
        return seq, _sha(line), size, mac_ok

    def _error(self, what: str, exc: OSError) -> AuditError:
        return AuditError(f"audit log {self.path}: {what} ({exc.strerror or exc}); "
                          "requests are refused until it is writable")


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
