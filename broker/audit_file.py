"""The file under the audit log: following rotation, and noticing a file changed under it.

:class:`broker.audit.AuditLog` writes through :class:`AuditFile`, its base class,
which holds what the writer knows of its file (descriptor, size, ``seq`` and hash of
the last line it wrote) and checks the file against it before each write.

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
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from typing import Any

from broker.audit_macs import GENESIS, _canonical, _sha, line_mac_matches
from broker.errors import ServiceUnavailable

__all__ = ["AuditError", "AuditFile"]

#: The audit log's logger: these lines were broker.audit's before the split (and still are).
log = logging.getLogger("broker.audit")

_MAX_LINE = 16 * 1024 * 1024  # the tail scan on open gives up beyond this
_CHUNK = 64 * 1024
#: Bytes appended by someone else that are read to check they are our chain's lines.
_MAX_FOREIGN = 1024 * 1024


class AuditError(ServiceUnavailable):
    """The audit line could not be written: the request must not proceed (503)."""


class AuditFile:
    """The file state of an :class:`~broker.audit.AuditLog` and how it follows the file.

    Plain blocking code, no await: the writer calls it inside a flush
    (:meth:`broker.audit.AuditLog._commit`), or in a thread (open, reopen) while
    nothing else can write.
    """

    def __init__(self, path: str, key: bytes) -> None:
        self.path = path
        self._key = key
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
