"""``broker audit verify``: check an audit file's hash chain (and, with the key, each HMAC).

Reads what :class:`broker.audit.AuditLog` writes, line by line: each line's
``seq`` follows the previous one, its ``prev`` is the hash of the previous
line, and with the key its ``mac`` and canonical form match. Rotated files
are checked oldest first, each one's ``prev_file`` against the last line of
the one before.
"""

from __future__ import annotations

import hmac as _hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass

from broker.audit import GENESIS, _canonical, _mac, _sha

__all__ = ["VerifyResult", "verify_file", "verify_files"]


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify_file` found."""

    ok: bool
    #: lines read: all of them when ok, else up to and including the bad one.
    lines: int
    #: 1-based number of the first line that fails, or None.
    first_bad_line: int | None
    reason: str
    #: seq and hash of the last good line: keep them elsewhere to detect truncation,
    #: and compare ``last_hash`` with the next file's ``prev_file``.
    last_seq: int = 0
    last_hash: str = GENESIS
    #: the first line's link to the previous file, if it has one.
    prev_file: str | None = None


def verify_file(path: str, key: bytes | None) -> VerifyResult:
    """Check the chain of one file line by line (streaming; fine on huge files).

    Without ``key`` only the chain is checked, so an edit of the LAST line goes
    unnoticed; with it every line's HMAC and canonical form are checked too.
    """
    seq, prev, n = 0, GENESIS, 0
    prev_file: str | None = None

    def bad(reason: str) -> VerifyResult:
        return VerifyResult(False, n, n, reason, seq, prev, prev_file)

    with open(path, "rb") as fh:
        for raw in fh:
            n += 1
            if not raw.endswith(b"\n"):
                return bad("incomplete last line (no newline): a torn write or a truncation")
            line = raw[:-1]
            try:
                obj = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                return bad("not JSON")
            if not isinstance(obj, dict):
                return bad("not a JSON object")
            if n == 1 and isinstance(obj.get("prev_file"), str):
                prev_file = obj["prev_file"]
            got = obj.get("seq")
            if type(got) is not int:
                return bad("no integer seq: not an audit record")
            if got != seq + 1:
                return bad(f"seq is {got}, expected {seq + 1}: "
                           "lines were removed, inserted or reordered")
            if obj.get("prev") != prev:
                if n == 1:
                    return bad("prev is not the genesis hash: lines before it were removed")
                return bad(f"prev does not match line {n - 1}: that line was edited, "
                           "or lines were removed, inserted or reordered")
            if key is not None:
                mac = obj.pop("mac", None)
                try:
                    body = _canonical(obj)
                    canonical = _canonical({**obj, "mac": mac})
                except ValueError:
                    return bad("not in canonical form")
                if not isinstance(mac, str) or not _hmac.compare_digest(mac, _mac(key, body)):
                    return bad("HMAC mismatch: the line was edited (or the key is wrong)")
                if canonical != line:
                    return bad("not in canonical form: the line was reformatted")
            seq, prev = got, _sha(line)
    return VerifyResult(True, n, None, "ok", seq, prev, prev_file)


def verify_files(paths: Iterable[str], key: bytes | None) -> list[tuple[str, VerifyResult]]:
    """Verify rotated files oldest first; a broken ``prev_file`` link fails that file."""
    results: list[tuple[str, VerifyResult]] = []
    last: VerifyResult | None = None
    for path in paths:
        result = verify_file(path, key)
        if (result.ok and last is not None and result.lines
                and result.prev_file != last.last_hash):
            result = VerifyResult(False, result.lines, 1,
                                  "prev_file does not match the previous file's last line",
                                  result.last_seq, result.last_hash, result.prev_file)
        results.append((path, result))
        last = result
    return results
