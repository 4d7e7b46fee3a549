"""``broker audit verify``: check an audit file's hash chain (and, with the key, each HMAC).

Reads what :class:`broker.audit.AuditLog` writes, line by line: each line's
``seq`` follows the previous one, its ``prev`` is the hash of the previous
line, and with the key its ``mac`` and canonical form match. Rotated files
are checked oldest first, each one's ``prev_file`` against the last line of
the one before; after a file that failed, that link cannot be judged, and the
next file gets its own chain's result with a note saying so.

A line carrying ``gap`` (the writer's ``admin`` / ``audit_gap`` line: it found
the file changed under it, lines cut off or bytes added by someone else) fails
the file at that line. A first line carrying ``truncated`` (the file was
truncated to 0 bytes in place, e.g. by logrotate ``copytruncate``) does not:
the file's own chain is whole, and :func:`verify_files` checks its link to
the copy; :attr:`VerifyResult.note` says so.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker.audit_macs import GENESIS, _canonical, _sha, is_old_line_mac, line_mac_matches

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
    #: something an ok file's reader should know (a truncation in place), or None.
    note: str | None = None
    #: the first line's ``truncated`` (``{"seq", "bytes"}``): the file was emptied in place.
    truncated: dict[str, Any] | None = None
    #: a line with a line-key mac was read (the files after this one may hold no other).
    new_format: bool = False


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def _gap_reason(gap: Any) -> str:
    """One line on what the writer found when it wrote an ``audit_gap`` line."""
    if not isinstance(gap, dict):
        return "the broker recorded a gap before this line: lines were removed or added"
    kind = gap.get("kind")
    es, fs = _int(gap.get("expected_seq")), _int(gap.get("found_seq"))
    eb, fb = _int(gap.get("expected_bytes")), _int(gap.get("found_bytes"))
    wrote = f"it had written up to seq {es} ({eb} bytes)"
    if kind == "appended":
        return (f"the broker found {fb} bytes where {wrote}: lines were added by someone "
                "else before this line")
    if kind == "replaced":
        return (f"the broker found the file replaced ({fb} bytes, last seq {fs}) where "
                f"{wrote}: lines were removed or the file was swapped before this line")
    if es is not None and fs is not None and es > fs:
        missing = f"{es - fs} line(s) removed before this line (seq {fs + 1}..{es})"
    else:
        missing = "lines were removed before this line"
    return f"the broker found the file cut to {fb} bytes where {wrote}: {missing}"


def verify_file(path: str, key: bytes | None, *, new_format: bool = False) -> VerifyResult:
    """Check the chain of one file line by line (streaming; fine on huge files).

    Without ``key`` only the chain is checked, so an edit of the LAST line goes
    unnoticed; with it every line's HMAC and canonical form are checked too.
    """
    seq, prev, n = 0, GENESIS, 0
    # True once a line with a line-key mac was read, here or (the argument) in an
    # earlier file: no old-format mac may come after one (line_mac_matches).
    prev_file: str | None = None
    truncated: dict[str, Any] | None = None

    def bad(reason: str) -> VerifyResult:
        return VerifyResult(False, n, n, reason, seq, prev, prev_file, None, truncated,
                            new_format)

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
            if n == 1 and isinstance(obj.get("truncated"), dict):
                truncated = obj["truncated"]
            if "gap" in obj:
                # Before the seq check: say why the chain breaks, as the writer saw it.
                return bad(_gap_reason(obj["gap"]))
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
                if not line_mac_matches(key, mac, body, old_format=not new_format):
                    if new_format and is_old_line_mac(mac):
                        return bad("an old-format mac (a value HMAC, as sys/audit-hash "
                                   "makes) after lines with line macs: a forged line")
                    return bad("HMAC mismatch: the line was edited (or the key is wrong)")
                new_format = new_format or not is_old_line_mac(mac)
                if canonical != line:
                    return bad("not in canonical form: the line was reformatted")
            seq, prev = got, _sha(line)
    note = None
    if truncated is not None:
        note = (f"line 1: the file was truncated to 0 bytes in place after seq "
                f"{_int(truncated.get('seq'))} (copytruncate?); verify it after the file "
                "before it to check that no line was lost")
    return VerifyResult(True, n, None, "ok", seq, prev, prev_file, note, truncated, new_format)


def verify_files(paths: Iterable[str], key: bytes | None) -> list[tuple[str, VerifyResult]]:
    """Verify rotated files oldest first; a broken ``prev_file`` link fails that file.

    After a file whose own chain failed, the next one's link cannot be judged
    (the failed file's last good line need not be its last line): that file gets
    its own chain's result, with a :attr:`VerifyResult.note` saying its link was
    not checked. (After a file that failed only by its own link, its chain is
    whole up to its last line, and the next link is checked as usual.)
    """
    results: list[tuple[str, VerifyResult]] = []
    last: VerifyResult | None = None  # the previous file's own chain
    last_path = ""
    seen_new = False
    for path in paths:
        # After a file with new-format lines, a file of old-format ones is forged.
        chain = result = verify_file(path, key, new_format=seen_new)
        seen_new = seen_new or chain.new_format
        if result.ok and last is not None and not last.ok and result.lines:
            note = (f"its link to {last_path} (prev_file) was not checked: that file "
                    "failed verification")
            if result.note:
                note = f"{result.note}; {note}"
            result = dataclasses.replace(result, note=note)
        elif (result.ok and last is not None and result.lines
                and result.prev_file != last.last_hash):
            reason = "prev_file does not match the previous file's last line"
            cut = _int((result.truncated or {}).get("seq"))
            if cut is not None and cut > last.last_seq:
                reason += (f" (seq {last.last_seq}): the file was truncated in place after "
                           f"seq {cut}; seq {last.last_seq + 1}..{cut} were lost")
            result = VerifyResult(False, result.lines, 1, reason, result.last_seq,
                                  result.last_hash, result.prev_file, None, result.truncated,
                                  result.new_format)
        results.append((path, result))
        last, last_path = chain, path
    return results
