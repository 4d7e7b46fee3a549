"""Write a mount's ``password_file`` after ``rotate-root``, so the next start (or
reload) reads the secret the server now holds.

The file is replaced whole (a new file beside it, flushed to disk, renamed over
the old), so a reader never sees half a password and a crash leaves either the
old file or the new one. The new file keeps the old one's permission bits (at
most 0600 if it was wider: it holds an admin password).
"""

from __future__ import annotations

import os
import secrets
import stat

__all__ = ["replace_password_file"]


def replace_password_file(path: str, secret: str) -> None:
    """Put ``secret`` (and a newline) in ``path`` atomically; OSError if it cannot.

    A symbolic link is followed: the file it points to is the one replaced, and
    the link stays a link.
    """
    path = os.path.realpath(path)
    mode = stat.S_IMODE(os.stat(path).st_mode) & 0o600 or 0o600
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; make it exact
            os.write(fd, secret.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # The rename itself is durable only once the directory is.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
