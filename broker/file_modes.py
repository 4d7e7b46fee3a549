"""Start-up (and reload) check of who else may read the files that hold the broker's secrets.

The SQLite store holds token hashes and lease metadata; the audit log holds who
did what; the TLS key is the server's identity. Readable by a group or by every
user on the machine, they leak; writable by every user, the store and the audit
log can be forged. Each such file gets one log line naming it, its mode and the
fix (``chmod 600 PATH``): a WARNING, or an ERROR for a store or audit file anyone
may write. The broker never refuses to start over a mode (a file shared with a
group on purpose, by a backup agent or a log shipper, must not stop it); ``ssh``
refuses, we only say it.

Checked elsewhere, so not here: the audit HMAC key's group/other bits
(broker/audit.py warns when it loads the key; here only an ERROR when anyone may
write it) and a mount's ``password_file`` (broker/config.py warns each time the
config is loaded, a reload included). The files the broker creates itself are
created owner-only (0600, their directory 0700), so these lines only ever name
files made by someone else, or chmod'ed since.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from broker.config import Config

__all__ = ["SecretFile", "check_file_modes", "secret_files"]

log = logging.getLogger("broker")

#: group and other permission bits: none of them belongs on a secret file.
_SHARED = 0o077


@dataclass(frozen=True)
class SecretFile:
    """A file the broker reads or writes secrets in, and what is at stake."""

    path: str
    #: what it is, for the log line ("lease store", "audit log", ...).
    what: str
    #: the config key that names it (``storage.url``), so the operator finds it.
    key: str
    #: world-writable is an ERROR (anyone may forge it), else a WARNING.
    forgeable: bool = False
    #: group/other read bits are warned about elsewhere: only world-writable is said here.
    write_only: bool = False


def _sqlite_path(url: str) -> str | None:
    if not url.startswith("sqlite:"):
        return None
    from broker.store.sqlite import SQLiteStore

    path = SQLiteStore.from_url(url).path
    return None if path == ":memory:" else path


def secret_files(config: Config, *, shared: bool = True) -> list[SecretFile]:
    """The secret files ``config`` names. ``shared``: also those every worker shares
    (store, keys); without it only this process's own audit log (``[server] workers``:
    one audit file per worker, the rest said once, by worker 1)."""
    files = [SecretFile(config.audit.path, "audit log", "audit.path", forgeable=True)]
    if not shared:
        return files
    db = _sqlite_path(config.storage.url)
    if db is not None:
        # SQLite gives -wal and -shm the database's mode, but an old one may differ.
        files += [SecretFile(db + suffix, "lease store", "storage.url", forgeable=True)
                  for suffix in ("", "-wal", "-shm")]
    files.append(SecretFile(config.audit.hmac_key_file, "audit HMAC key",
                            "audit.hmac_key_file", forgeable=True, write_only=True))
    if config.server.tls_key_file:
        files.append(SecretFile(config.server.tls_key_file, "TLS private key",
                                "server.tls_key_file"))
    return files


def check_file_modes(files: Iterable[SecretFile], *, when: str = "") -> int:
    """Log one line per file that others than its owner may read or change; returns how
    many. A missing file is skipped (the broker creates it owner-only, or opening it
    says what is wrong). ``when``: a prefix for the line, e.g. ``"reload: "``."""
    problems = 0
    for file in files:
        try:
            mode = os.stat(file.path).st_mode
        except OSError:
            continue
        message = _problem(file, mode)
        if message is None:
            continue
        problems += 1
        level = logging.ERROR if file.forgeable and mode & stat.S_IWOTH else logging.WARNING
        log.log(level, "%s%s %s (%s) is %s (%04o): %s (chmod 600 %s)", when, file.what,
                file.path, file.key, stat.filemode(mode), stat.S_IMODE(mode), message,
                file.path)
    return problems


def _problem(file: SecretFile, mode: int) -> str | None:
    """What is wrong with ``mode`` for ``file``, in words; None if nothing is."""
    if mode & stat.S_IWOTH:
        return "any user on this machine may change it"
    if file.write_only or not mode & _SHARED:
        return None
    return "others than its owner may read or change it"
