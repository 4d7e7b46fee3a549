"""What the audit log hides before a line is signed: secrets, token accessors, and
anything that looks like a credential.

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
In a text field (a path, an error) a credential anywhere inside is hidden
(:func:`scrub`).

The same helpers serve the rest of the broker: :func:`shown` for a name an error
or a log line quotes, :func:`scrub` for the command line's messages,
:func:`redact` for debug logs and error messages.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from broker.audit_macs import _canonical, _is_mac, _mac

__all__ = [
    "ACCESSOR_KEYS",
    "SECRET_KEYS",
    "AuditRedactor",
    "is_secret_name",
    "looks_like_credential",
    "redact",
    "scrub",
    "shown",
]

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

_REDACTED = "[redacted]"

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


# What the audit writer does with a field, by its name (see AuditRedactor). Not 0:
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


class AuditRedactor:
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

