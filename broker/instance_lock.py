"""One broker per SQLite store file: an exclusive flock(2) held for the server's life.

The embedded store belongs to one broker (one process, or one supervisor and
the workers it forks). A second ``broker server`` on the same file, started
by mistake or by a service manager that restarts too early, used to open
the store before it found its port taken, and in between it rolled back the
first broker's issues in flight as crashed ones (credentials already handed
out were dropped) and wrote into the same audit log. The lock is taken
before anything is opened, so the second one now stops with one line and
touches nothing. The kernel drops it when the last holder exits, a crash
included, so it never needs clearing by hand.

The PostgreSQL store is shared by design (replicas) and takes no such lock.
"""

from __future__ import annotations

import os

try:
    import fcntl
except ImportError:  # Windows: no flock; SQLite's own locking is all there is
    fcntl = None  # type: ignore[assignment]

__all__ = ["InstanceLocked", "hold"]


class InstanceLocked(RuntimeError):
    """Another broker holds this store."""


def hold(store_url: str) -> int | None:
    """Take the store's instance lock; returns its fd (kept open: that is the lock).

    None when there is nothing to lock (a PostgreSQL or in-memory store, or no
    flock). Raises InstanceLocked if another broker holds it. The fd survives
    fork(), so forked workers share the supervisor's lock.
    """
    if fcntl is None or not store_url.startswith("sqlite:"):
        return None
    from broker.store.sqlite import SQLiteStore

    db = SQLiteStore.from_url(store_url).path
    if db == ":memory:":
        return None
    # The file itself, whatever the URL calls it: a second broker given a symlink
    # to the store (or another relative spelling) served it too (QA).
    db = os.path.realpath(db)
    path = db + "-instance.lock"
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None  # no file, so no store either: opening it says why, as it always did
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InstanceLocked(f"another broker is serving the store {db} (it holds {path}); "
                             "stop it first, or give this one its own storage.url") from None
    return fd
