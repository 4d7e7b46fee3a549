"""The tamper-evident, fail-closed audit log: one chained, HMAC'd JSON object per line.

Each line is compact JSON with sorted keys, and the log adds four fields:

- ``time``: UTC RFC 3339 with microseconds (``2024-05-01T12:00:00.000000Z``), if absent;
- ``seq``: 1, 2, 3, ... within one file, continuing across restarts;
- ``prev``: ``sha256:<hex>`` of the previous line's bytes (newline excluded), or
  :data:`GENESIS` on a file's first line, so an edited, removed, inserted or
  moved line breaks the chain;
- ``mac``: ``hmac-sha256-line:<hex>`` of the line serialized without ``mac``, under
  a key derived from the broker's key for line macs only, so the last line (which
  no ``prev`` covers) cannot be edited and no line can be forged without the key.

Rotation, and a file changed under the writer (moved, truncated, appended to,
replaced: an ``admin`` / ``audit_gap`` line): see :mod:`broker.audit_file`. The
canonical line, the hashes and the MACs: :mod:`broker.audit_macs`.

Secrets never reach disk: secret-named values and token accessors are written as
their HMAC, and whatever field a value comes in, one that looks like a credential
is written as ``[hidden: N characters]`` (:mod:`broker.audit_redact`): the writer
enforces it, so a field added later cannot leak a JWT a caller sent where a name
was expected.

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
import hmac as _hmac
import logging
import os
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from broker.audit_file import AuditError, AuditFile
from broker.audit_macs import (
    _LINE_MAC_PREFIX,
    _MAC_PREFIX,
    GENESIS,
    _load_or_create_key,
    hash_value,
    is_old_line_mac,
    line_key,
    line_mac_matches,
    load_key,
)
from broker.audit_macs import _canonical as _canonical
from broker.audit_macs import _line_mac as _line_mac
from broker.audit_macs import _mac as _mac
from broker.audit_macs import _sha as _sha
from broker.audit_redact import (
    ACCESSOR_KEYS,
    SECRET_KEYS,
    AuditRedactor,
    is_secret_name,
    looks_like_credential,
    redact,
    scrub,
    shown,
)

# Every name other modules import from here, kept here (the helpers moved out).
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
    "is_old_line_mac",
    "is_secret_name",
    "line_key",
    "line_mac_matches",
    "load_key",
    "looks_like_credential",
    "redact",
    "scrub",
    "shown",
]

log = logging.getLogger(__name__)

#: the standard event types (others are allowed; these are what operators grep for).
EVENT_TYPES = frozenset({
    "request", "response", "issue", "renew", "revoke", "expire", "revoke_failed",
    "irrevocable", "rollback", "reuse_attempt", "auth_failure", "policy_denied",
    "token_create", "token_revoke", "admin",
})

_RESERVED = ("seq", "prev", "mac", "prev_file", "gap", "truncated")
#: While writes fail, a line of the log's own is tried this often (seconds).
PROBE_INTERVAL = 1.0


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



def event(type: str, *, outcome: str = "ok", **fields: Any) -> dict[str, Any]:
    """The standard event shape; fields whose value is None are left out.

    Usual fields: ``auth={accessor, display_name, policies, metadata}``,
    ``request={id, path, operation, remote_addr}``, ``lease={id, mount, role, owner}``,
    ``error="..."``. See :data:`EVENT_TYPES`.
    """
    ev: dict[str, Any] = {"type": type, "outcome": outcome, "time": _now()}
    ev.update((k, v) for k, v in fields.items() if v is not None)
    return ev


# --------------------------------------------------------------------------- the log


class AuditLog(AuditFile):
    """An append-only, hash-chained audit file. Create with :meth:`open`."""

    def __init__(self, path: str, key: bytes, *, fsync: bool = False,
                 probe_interval: float = PROBE_INTERVAL, hmac_accessor: bool = True) -> None:
        super().__init__(path, key)
        # A keyed HMAC state to .copy() per value: saves re-keying on every MAC.
        self._hmac_base = _hmac.new(key, digestmod="sha256")
        self._line_hmac_base = _hmac.new(line_key(key), digestmod="sha256")
        self._redactor = AuditRedactor(self.hmac, self.hmac if hmac_accessor else None)
        # _sign serializes each record once with this stand-in for its mac and
        # then swaps it out. Random per log, so no event value can forge it.
        self._mac_stand_in = _MAC_PREFIX + secrets.token_hex(32)
        self._mac_member = b'"mac":"' + self._mac_stand_in.encode("ascii") + b'"'
        self._fsync = fsync
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

    def _error(self, what: str, exc: OSError) -> AuditError:
        return AuditError(f"audit log {self.path}: {what} ({exc.strerror or exc}); "
                          "requests are refused until it is writable")


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
