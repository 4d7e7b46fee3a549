"""The audit log's cryptography: the canonical line, the chain hash, value HMACs, line
macs, and the key file they are made with.

What :class:`broker.audit.AuditLog` writes and :mod:`broker.audit_verify` checks, so
both read the same definitions. A value HMAC (``hmac-sha256:<hex>``) is what a secret
is written as, and what ``broker audit hash`` and ``sys/audit-hash`` compute; a line's
``mac`` is an HMAC under a key derived from the audit key for line macs only
(:func:`line_key`), so that no value HMAC is ever a valid line mac.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import json
import logging
import os
import secrets
from typing import Any

__all__ = [
    "GENESIS",
    "hash_value",
    "is_old_line_mac",
    "line_key",
    "line_mac_matches",
    "load_key",
]

#: The audit log's logger: these lines were broker.audit's before the split (and still are).
log = logging.getLogger("broker.audit")

#: ``prev`` of the first line of every file.
GENESIS = "sha256:" + "0" * 64

_MAC_PREFIX = "hmac-sha256:"
_MIN_KEY_BYTES = 16


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



def hash_value(key: bytes, value: str) -> str:
    """What the audit log writes for the secret ``value`` (``hmac-sha256:<hex>``).

    Vault's ``sys/audit-hash``: grep the log for it to find a known token's lines.
    """
    return _mac(key, value.encode("utf-8", "surrogatepass"))


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
