"""The audit writer does not hide lines cut off (or added to) its live file.

Each test drives a real AuditLog writing a real file, changes the file under it
the way an intruder or a rotation tool would, writes more events, and runs
``broker audit verify`` (the function, and the CLI in a subprocess) on it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker.audit import GENESIS, AuditError, AuditLog, event, load_key
from broker.audit_verify import verify_file, verify_files

# The audit tests' helpers; the alog fixture is tests/unit/conftest.py's.
from tests.unit.test_audit import lines, records, sha, write_n


@pytest.fixture
def paths(tmp_path: Path) -> tuple[str, str]:
    return str(tmp_path / "audit.jsonl"), str(tmp_path / "audit.key")


def cli_verify(*argv: str) -> subprocess.CompletedProcess[str]:
    """``broker audit verify ARGV`` in a subprocess, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "broker.cli", "audit", "verify", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


# Small synchronous file helpers: the tests poke at files on a local tmp dir.
def put(path: str, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as fh:
        fh.write(data)


def copy_file(src: str, dst: str) -> None:
    put(dst, Path(src).read_bytes())


def size_of(path: str) -> int:
    return os.path.getsize(path)


def cut_last_lines(path: str, n: int) -> None:
    """Cut the last ``n`` lines off the file in place (same inode), on a line boundary."""
    data = Path(path).read_bytes()
    keep = sum(len(line) + 1 for line in data.splitlines()[:-n])
    os.truncate(path, keep)


# --------------------------------------------------------------------------- truncation


async def test_tail_cut_mid_line_is_reported_by_verify(
    alog: AuditLog, paths: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """`truncate -s -500` on the live file: the next lines carry the gap and verify fails there."""
    log_path, key_path = paths
    await write_n(alog, 10)
    before = lines(log_path)
    size = size_of(log_path)
    os.truncate(log_path, size - 500)  # mid-line, a few lines gone
    with caplog.at_level(logging.WARNING, logger="broker.audit"):
        await write_n(alog, 3, start=10)
    after = lines(log_path)
    kept = next(i for i in range(len(before)) if before[i] != after[i])  # first changed line
    assert after[:kept] == before[:kept]
    marker = json.loads(after[kept])
    assert marker["type"] == "admin" and marker["action"] == "audit_gap"
    gap = marker["gap"]
    assert gap["kind"] == "truncated"
    assert gap["expected_seq"] == 10 and gap["expected_prev"] == sha(before[-1])
    assert gap["expected_bytes"] == size and gap["found_bytes"] == size - 500
    assert gap["found_seq"] == kept
    # The marker continues the writer's own chain: the lost tail's seq and hash.
    assert marker["seq"] == 11 and marker["prev"] == sha(before[-1])
    assert [r["seq"] for r in records(log_path)][kept + 1:] == [12, 13, 14]
    assert any(r.levelno >= logging.ERROR and "changed under us" in r.getMessage()
               for r in caplog.records)

    key = load_key(key_path)
    for k in (key, None):
        result = verify_file(log_path, k)
        assert not result.ok and result.first_bad_line == kept + 1
        assert f"seq {kept + 1}..10" in result.reason and "removed" in result.reason

    proc = cli_verify("--key-file", key_path, log_path)
    assert proc.returncode == 1, proc
    [line] = proc.stdout.splitlines()
    assert line.startswith(f"{log_path}:{kept + 1}: ") and "removed" in line, line


async def test_tail_cut_on_a_line_boundary_is_reported(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """Lines cut off cleanly (the file still ends with a newline) are found just as well."""
    log_path, key_path = paths
    await write_n(alog, 6)
    cut_last_lines(log_path, 2)
    await write_n(alog, 1, start=6)
    recs = records(log_path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 7, 8]
    assert recs[4]["gap"]["found_seq"] == 4 and recs[4]["gap"]["expected_seq"] == 6
    result = verify_file(log_path, load_key(key_path))
    assert not result.ok and result.first_bad_line == 5
    assert "2 line(s) removed before this line (seq 5..6)" in result.reason


async def test_marker_cut_away_is_noticed_again(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """Cutting the marker away again is noticed again: the writer's memory is the witness."""
    log_path, key_path = paths
    await write_n(alog, 5)
    cut_last_lines(log_path, 2)
    await write_n(alog, 1, start=5)  # marker (seq 6) + event (seq 7)
    cut_last_lines(log_path, 2)  # the intruder removes the marker too
    await write_n(alog, 1, start=6)
    recs = records(log_path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 8, 9]
    assert recs[3]["gap"]["expected_seq"] == 7 and recs[3]["gap"]["found_seq"] == 3
    assert not verify_file(log_path, load_key(key_path)).ok


async def test_gap_line_outlives_a_failed_write(paths: tuple[str, str]) -> None:
    """The disk is full when the gap is found: the gap line is written once it is back."""
    log_path, key_path = paths
    log = await AuditLog.open(log_path, key_path, create_key=True, fsync=True)
    try:
        await write_n(log, 4)
        cut_last_lines(log_path, 1)
        size = size_of(log_path)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))
        try:
            with pytest.raises(AuditError, match="too large"):
                await log.write(event("issue"))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)
        assert size_of(log_path) == size  # the partial gap line was cut back
        await write_n(log, 1, start=4)
    finally:
        await log.close()
    recs = records(log_path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 5, 6]
    assert recs[3]["action"] == "audit_gap" and recs[3]["gap"]["expected_seq"] == 4
    assert [r for r in recs if "gap" in r] == [recs[3]]
    result = verify_file(log_path, load_key(key_path))
    assert not result.ok and result.first_bad_line == 4 and "(seq 4..4)" in result.reason


async def test_events_cannot_carry_gap_or_truncated(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """Only the writer sets gap / truncated: an event's own are dropped like seq and prev."""
    await alog.write(event("request", gap={"kind": "truncated"}, truncated={"seq": 9}))
    [rec] = records(paths[0])
    assert "gap" not in rec and "truncated" not in rec
    assert verify_file(paths[0], load_key(paths[1])).ok


async def test_reopen_does_not_hide_a_cut(alog: AuditLog, paths: tuple[str, str]) -> None:
    """SIGHUP (reopen) on the same, shortened file must not adopt its new last line."""
    log_path, key_path = paths
    await write_n(alog, 4)
    cut_last_lines(log_path, 1)
    await alog.reopen()
    await write_n(alog, 1, start=4)
    recs = records(log_path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 5, 6] and "gap" in recs[3]
    result = verify_file(log_path, load_key(key_path))
    assert not result.ok and result.first_bad_line == 4


async def test_file_replaced_by_a_shorter_copy_is_reported(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """`sed -i '$d'` writes a new file and renames it over the path: a new inode."""
    log_path, key_path = paths
    await write_n(alog, 5)
    tmp = log_path + ".sed"
    put(tmp, b"".join(line + b"\n" for line in lines(log_path)[:-2]))
    os.replace(tmp, log_path)
    await write_n(alog, 1, start=5)
    recs = records(log_path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 6, 7]
    assert recs[3]["gap"]["kind"] == "replaced" and recs[3]["gap"]["found_seq"] == 3
    result = verify_file(log_path, load_key(key_path))
    assert not result.ok and result.first_bad_line == 4 and "replaced" in result.reason


async def test_identical_copy_put_in_place_is_continued(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """A file swapped for an exact copy of itself lost nothing: the chain just goes on."""
    log_path, key_path = paths
    await write_n(alog, 3)
    tmp = log_path + ".copy"
    copy_file(log_path, tmp)
    os.replace(tmp, log_path)
    await write_n(alog, 2, start=3)
    assert [r["seq"] for r in records(log_path)] == [1, 2, 3, 4, 5]
    assert verify_file(log_path, load_key(key_path)).ok


# --------------------------------------------------------------------------- appends


async def test_foreign_append_is_reported_even_without_the_key(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """A line appended by someone else that chains correctly but has a forged MAC.

    With the key verify fails at the forged line's HMAC; without it the
    writer's audit_gap line (which continues its own chain) still fails it.
    """
    log_path, key_path = paths
    await write_n(alog, 3)
    last = lines(log_path)[-1]
    forged = {"type": "revoke", "outcome": "ok", "time": "2026-01-01T00:00:00.000000Z",
              "seq": 4, "prev": sha(last), "mac": "hmac-sha256:" + "0" * 64}
    put(log_path, json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n",
        "ab")
    await write_n(alog, 1, start=3)
    recs = records(log_path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 4, 5]
    marker = recs[4]
    assert marker["gap"]["kind"] == "appended" and marker["prev"] == sha(last)
    with_key = verify_file(log_path, load_key(key_path))
    assert not with_key.ok and with_key.first_bad_line == 4 and "HMAC" in with_key.reason
    chain_only = verify_file(log_path, None)
    assert not chain_only.ok and chain_only.first_bad_line == 5
    assert "added by someone else" in chain_only.reason


async def test_foreign_partial_append_keeps_lines_apart(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """Junk without a newline is kept (evidence), ended, and the log goes on writing."""
    log_path, key_path = paths
    await write_n(alog, 2)
    put(log_path, b"junk without newline", "ab")
    await write_n(alog, 1, start=2)
    raw = lines(log_path)
    assert raw[2] == b"junk without newline"
    assert [json.loads(x)["seq"] for x in raw[3:]] == [3, 4]
    assert alog.healthy
    result = verify_file(log_path, load_key(key_path))
    assert not result.ok and result.first_bad_line == 3


async def test_lines_of_another_writer_with_the_key_are_continued(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """`broker operator init` while the server runs appends a chained, signed line: no gap."""
    log_path, key_path = paths
    await write_n(alog, 2)
    other = await AuditLog.open(log_path, key_path)
    await other.write(event("admin", action="operator_init"))
    await other.close()
    await write_n(alog, 2, start=2)
    recs = records(log_path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert not any("gap" in r for r in recs)
    assert verify_file(log_path, load_key(key_path)).ok


# --------------------------------------------------------------------------- truncation to 0


async def test_copytruncate_starts_a_new_chain_that_says_so(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """copytruncate keeps working: the copy and the new file verify as a pair.

    The new file's first line says it was emptied in place (seq, bytes), and
    verify of the single file passes with a note.
    """
    log_path, key_path = paths
    key = load_key(key_path)
    await write_n(alog, 3)
    size = size_of(log_path)
    copy = log_path + ".1"
    copy_file(log_path, copy)
    os.truncate(log_path, 0)
    await write_n(alog, 2, start=3)
    first, second = records(log_path)
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert first["prev_file"] == sha(lines(copy)[-1])
    assert first["truncated"] == {"seq": 3, "bytes": size} and "truncated" not in second
    single = verify_file(log_path, key)
    assert single.ok and single.note and "truncated" in single.note
    assert all(r.ok for _, r in verify_files([copy, log_path], key))
    proc = cli_verify("--key-file", key_path, copy, log_path)
    assert proc.returncode == 0, proc


async def test_lines_lost_in_a_copytruncate_window_fail_the_pair(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """Lines written between the copy and the truncation are lost, and verify says which."""
    log_path, key_path = paths
    await write_n(alog, 3)
    copy = log_path + ".1"
    copy_file(log_path, copy)
    await write_n(alog, 2, start=3)  # seq 4, 5: only in the file about to be emptied
    os.truncate(log_path, 0)
    await write_n(alog, 1, start=5)
    results = verify_files([copy, log_path], load_key(key_path))
    assert results[0][1].ok
    bad = results[1][1]
    assert not bad.ok and bad.first_bad_line == 1
    assert "seq 4..5 were lost" in bad.reason
    proc = cli_verify("--key-file", key_path, copy, log_path)
    assert proc.returncode == 1 and f"{log_path}:1: " in proc.stdout, proc


async def test_rotation_by_rename_is_unchanged(alog: AuditLog, paths: tuple[str, str]) -> None:
    """logrotate create / rename + SIGHUP: a linked new chain, no gap, no truncated field."""
    log_path, key_path = paths
    await write_n(alog, 2)
    os.rename(log_path, log_path + ".1")
    await write_n(alog, 1, start=2)
    os.rename(log_path, log_path + ".2")
    await alog.reopen()
    await write_n(alog, 1, start=3)
    files = [log_path + ".1", log_path + ".2", log_path]
    for path in files[1:]:
        [rec] = records(path)
        assert rec["seq"] == 1 and "prev_file" in rec
        assert "truncated" not in rec and "gap" not in rec
    assert all(r.ok for _, r in verify_files(files, load_key(key_path)))
