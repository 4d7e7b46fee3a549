"""AuditLog: chained, HMAC'd JSON lines; verification; redaction; fail-closed writes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    event,
    load_key,
    redact,
)
from broker.audit_verify import verify_file, verify_files
from broker.errors import ServiceUnavailable

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def paths(tmp_path: Path) -> tuple[str, str]:
    return str(tmp_path / "logs" / "audit.jsonl"), str(tmp_path / "audit.key")


def lines(path: str) -> list[bytes]:
    return Path(path).read_bytes().splitlines()


def records(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]


def sha(line: bytes) -> str:
    return "sha256:" + hashlib.sha256(line).hexdigest()


async def write_n(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await log.write(event("issue", lease={"id": f"pg/creds/ro/{i}"}, n=i))


def rewrite(path: str, new_lines: list[bytes]) -> None:
    Path(path).write_bytes(b"".join(line + b"\n" for line in new_lines))


# Small synchronous file helpers: the tests poke at files on a local tmp dir.
def put(path: str, data: bytes, mode: str = "wb") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as fh:
        fh.write(data)


def size_of(path: str) -> int:
    return os.path.getsize(path)


def exists(path: str) -> bool:
    return os.path.exists(path)


@contextlib.contextmanager
def read_only_dir(path: str) -> Iterator[None]:
    """Make ``path`` unwritable for real: chmod for users, the immutable flag for root."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", path], capture_output=True
        ).returncode:
            pytest.skip("running as root and cannot set the immutable flag here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
    else:
        os.chmod(path, 0o500)
        try:
            yield
        finally:
            os.chmod(path, 0o700)


# --------------------------------------------------------------------------- keys


async def test_key_file_is_created_0600_and_reused(paths: tuple[str, str]) -> None:
    """create_key writes a 32-byte random key with mode 0600; the next open uses the same key."""
    log_path, key_path = paths
    log = await AuditLog.open(log_path, key_path, create_key=True)
    await log.close()
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    key = load_key(key_path)
    assert len(key) == 32
    again = await AuditLog.open(log_path, key_path)
    assert again.hmac("x") == "hmac-sha256:" + hmac.new(key, b"x", "sha256").hexdigest()
    await again.close()


async def test_missing_key_without_create_is_an_error(paths: tuple[str, str]) -> None:
    """Without create_key a missing key file refuses to open (503-class error), naming the file."""
    log_path, key_path = paths
    with pytest.raises(AuditError, match=r"audit\.key"):
        await AuditLog.open(log_path, key_path)
    assert not exists(key_path)


async def test_short_key_is_rejected(paths: tuple[str, str]) -> None:
    """A key file shorter than 16 bytes is refused rather than used."""
    log_path, key_path = paths
    put(key_path, b"abc\n")
    with pytest.raises(AuditError, match="too short"):
        await AuditLog.open(log_path, key_path)


def test_load_key_accepts_hex_and_raw(tmp_path: Path) -> None:
    """A key file may hold hex text (openssl rand -hex 32) or the raw bytes."""
    raw = os.urandom(32)
    (tmp_path / "raw").write_bytes(raw)
    (tmp_path / "hex").write_text(raw.hex() + "\n")
    assert load_key(str(tmp_path / "raw")) == raw
    assert load_key(str(tmp_path / "hex")) == raw


def test_audit_error_is_a_503() -> None:
    """The API turns an audit failure into 503 Service Unavailable."""
    assert issubclass(AuditError, ServiceUnavailable)
    assert AuditError.status == 503


# --------------------------------------------------------------------------- format


async def test_line_format(alog: AuditLog, paths: tuple[str, str]) -> None:
    """Lines are compact sorted JSON with time, seq, genesis prev and an HMAC of the rest."""
    await alog.write({"type": "admin", "b": 1, "a": [1, 2]})
    [line] = lines(paths[0])
    rec = json.loads(line)
    assert line == json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    assert rec["seq"] == 1 and rec["prev"] == GENESIS
    assert TIME_RE.match(rec["time"])
    mac = rec.pop("mac")
    body = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    key = load_key(paths[1])
    # Line macs have a key of their own, derived from the audit key (no value HMAC is one).
    line_key = hmac.new(key, b"broker audit line mac", "sha256").digest()
    assert mac == "hmac-sha256-line:" + hmac.new(line_key, body, "sha256").hexdigest()


async def test_prev_is_hash_of_previous_line(alog: AuditLog, paths: tuple[str, str]) -> None:
    """Each line's prev is the sha256 of the previous line's bytes."""
    await write_n(alog, 3)
    raw = lines(paths[0])
    recs = [json.loads(x) for x in raw]
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[1]["prev"] == sha(raw[0]) and recs[2]["prev"] == sha(raw[1])


async def test_caller_time_and_reserved_fields(alog: AuditLog, paths: tuple[str, str]) -> None:
    """A caller's time is kept; seq/prev/mac it passes are replaced, never trusted."""
    await alog.write({"type": "x", "time": "2020-01-01T00:00:00.000000Z", "seq": 99,
                      "prev": "sha256:forged", "mac": "hmac-sha256:forged"})
    [rec] = records(paths[0])
    assert rec["time"] == "2020-01-01T00:00:00.000000Z"
    assert rec["seq"] == 1 and rec["prev"] == GENESIS and rec["mac"] != "hmac-sha256:forged"
    assert verify_file(paths[0], load_key(paths[1])).ok


async def test_unusual_values_round_trip(alog: AuditLog, paths: tuple[str, str]) -> None:
    """Non-JSON types, non-string keys, NaN and non-ASCII still give verifiable lines."""
    odd: dict[Any, Any] = {"type": "x", "when": alog, 1: "int key", "f": float("nan"),
                           "s": ("a", "b"), "u": "żółw ☃"}
    await alog.write(odd)
    assert verify_file(paths[0], load_key(paths[1])).ok
    [rec] = records(paths[0])
    assert rec["1"] == "int key" and rec["f"] == "nan" and rec["u"] == "żółw ☃"


def test_event_helper_shape() -> None:
    """event() builds type/outcome/time plus the given blocks and drops None fields."""
    ev = event("issue", auth={"accessor": "a"}, lease={"id": "pg/creds/ro/x"}, error=None)
    assert ev["type"] == "issue" and ev["outcome"] == "ok"
    assert TIME_RE.match(ev["time"])
    assert ev["auth"] == {"accessor": "a"} and "error" not in ev
    assert event("revoke_failed", outcome="error", error="boom")["outcome"] == "error"


# --------------------------------------------------------------------------- redaction


async def test_redaction_is_recursive(alog: AuditLog, paths: tuple[str, str]) -> None:
    """Secrets at any depth, in dicts and lists, reach disk only as their HMAC."""
    secrets_ = {"password": "hunter2-pw", "secret_key": "AKIA-SECRET", "Token": "s.tok",
                "jwt": "eyJhbGciOi.jwt", "client_token": "ct-123", "private_key": "-----BEGIN"}
    ev: dict[str, Any] = {
        "type": "issue",
        "data": {"username": "v-ro-1", "password": secrets_["password"],
                 "nested": [{"secret_key": secrets_["secret_key"]},
                            [{"Token": secrets_["Token"]}]]},
        "auth": {"jwt": secrets_["jwt"], "client_token": secrets_["client_token"]},
        "private_key": secrets_["private_key"],
        "security_token": {"structured": "value-xyz"},
    }
    await alog.write(ev)
    text = b"\n".join(lines(paths[0])).decode()
    for value in [*secrets_.values(), "value-xyz"]:
        assert value not in text
    [rec] = records(paths[0])
    assert rec["data"]["password"] == alog.hmac("hunter2-pw")
    assert rec["data"]["nested"][0]["secret_key"] == alog.hmac("AKIA-SECRET")
    assert rec["data"]["nested"][1][0]["Token"] == alog.hmac("s.tok")
    assert rec["auth"]["jwt"] == alog.hmac("eyJhbGciOi.jwt")
    assert rec["security_token"].startswith("hmac-sha256:")
    assert rec["data"]["username"] == "v-ro-1"
    assert ev["data"]["password"] == "hunter2-pw"  # the caller's object is untouched


def test_redact_function() -> None:
    """redact() hides with an HMAC under a key, '[redacted]' without, and is idempotent."""
    obj = {"a": [{"password": "p"}], "token": None, "keep": "x"}
    plain = redact(obj)
    assert plain == {"a": [{"password": "[redacted]"}], "token": None, "keep": "x"}
    key = b"k" * 32
    once = redact(obj, key)
    assert once["a"][0]["password"] == "hmac-sha256:" + hmac.new(key, b"p", "sha256").hexdigest()
    assert redact(once, key) == once


def test_hmac_depends_on_key() -> None:
    """The same token under two keys gives two different HMACs."""
    assert redact({"token": "t"}, b"a" * 32) != redact({"token": "t"}, b"b" * 32)


# --------------------------------------------------------------------------- chain across opens


async def test_chain_continues_across_reopen(paths: tuple[str, str]) -> None:
    """After close and open, seq and prev continue from the file's last line."""
    log = await AuditLog.open(*paths, create_key=True)
    await write_n(log, 3)
    await log.close()
    log = await AuditLog.open(*paths)
    await write_n(log, 2, start=3)
    await log.close()
    recs = records(paths[0])
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    result = verify_file(paths[0], load_key(paths[1]))
    assert result.ok and result.lines == 5 and result.last_seq == 5


async def test_open_reads_only_the_tail(paths: tuple[str, str]) -> None:
    """Open continues from the last line without parsing the rest (a huge bad head is ignored)."""
    log = await AuditLog.open(*paths, create_key=True)
    await write_n(log, 2)
    await log.close()
    body = b"\n".join(lines(paths[0])) + b"\n"
    put(paths[0], b"x" * 5_000_000 + b"\n" + body)
    log = await AuditLog.open(*paths)
    await write_n(log, 1)
    await log.close()
    assert records_tail(paths[0])["seq"] == 3


def records_tail(path: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(lines(path)[-1])
    return result


async def test_torn_last_line_is_cut_on_open(paths: tuple[str, str]) -> None:
    """A partial line left by a crash is cut off on open and the chain goes on cleanly."""
    log = await AuditLog.open(*paths, create_key=True)
    await write_n(log, 2)
    await log.close()
    put(paths[0], b'{"seq":3,"type":"iss', "ab")
    log = await AuditLog.open(*paths)
    await write_n(log, 1)
    await log.close()
    assert [r["seq"] for r in records(paths[0])] == [1, 2, 3]
    assert verify_file(paths[0], load_key(paths[1])).ok


async def test_foreign_last_line_refuses_to_open(paths: tuple[str, str]) -> None:
    """A file whose last line is not an audit record is not silently continued."""
    put(paths[0], b"hello world\n")
    with pytest.raises(AuditError, match="move the file aside"):
        await AuditLog.open(*paths, create_key=True)


async def test_file_of_another_key_is_set_aside_on_open(paths: tuple[str, str],
                                                      tmp_path: Path) -> None:
    """After a key change the old file is moved aside whole and a new, linked one starts.

    Continuing it mixed two keys in one file, which then verified with neither.
    """
    log = await AuditLog.open(*paths, create_key=True)
    await write_n(log, 3)
    await log.close()
    old_key = load_key(paths[1])
    old_last = lines(paths[0])[-1]
    os.unlink(paths[1])
    log = await AuditLog.open(*paths, create_key=True)  # a new key
    await write_n(log, 2, start=3)
    await log.close()
    new_key = load_key(paths[1])
    [aside] = [p for p in Path(paths[0]).parent.iterdir() if p.name.endswith(".other-key")]
    assert aside.name.startswith("audit.jsonl.")
    assert [r["n"] for r in records(str(aside))] == [0, 1, 2]
    assert verify_file(str(aside), old_key).ok
    recs = records(paths[0])
    assert [r["seq"] for r in recs] == [1, 2] and recs[0]["prev_file"] == sha(old_last)
    assert verify_file(paths[0], new_key).ok
    assert all(r.ok for _, r in verify_files([str(aside), paths[0]], None))  # the link holds


async def test_reopen_with_the_same_key_continues_without_setting_aside(
    paths: tuple[str, str]
) -> None:
    """A restart with the same key continues the file: nothing is moved."""
    for start in (0, 2):
        log = await AuditLog.open(*paths, create_key=True)
        await write_n(log, 2, start=start)
        await log.close()
    assert sorted(os.listdir(os.path.dirname(paths[0]))) == ["audit.jsonl"]
    assert [r["seq"] for r in records(paths[0])] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- verify


@pytest.fixture
async def five(paths: tuple[str, str]) -> tuple[str, bytes, list[bytes]]:
    log = await AuditLog.open(*paths, create_key=True)
    await write_n(log, 5)
    await log.close()
    return paths[0], load_key(paths[1]), lines(paths[0])


def edit(line: bytes, **changes: Any) -> bytes:
    rec = json.loads(line)
    rec.update(changes)
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()


def test_verify_ok(five: tuple[str, bytes, list[bytes]]) -> None:
    """An untouched file verifies with and without the key."""
    path, key, _ = five
    for k in (key, None):
        result = verify_file(path, k)
        assert result.ok and result.lines == 5 and result.first_bad_line is None
        assert result.last_hash == sha(lines(path)[-1])


def test_verify_detects_edited_line(five: tuple[str, bytes, list[bytes]]) -> None:
    """An edited middle line fails its HMAC with the key, and the next line's prev without."""
    path, key, raw = five
    raw[2] = edit(raw[2], outcome="denied")
    rewrite(path, raw)
    assert verify_file(path, key).first_bad_line == 3
    result = verify_file(path, None)
    assert not result.ok and result.first_bad_line == 4 and "line 3" in result.reason


def test_verify_detects_deleted_line(five: tuple[str, bytes, list[bytes]]) -> None:
    """A removed line shows up as a seq gap at the line that follows it."""
    path, key, raw = five
    del raw[1]
    rewrite(path, raw)
    for k in (key, None):
        result = verify_file(path, k)
        assert not result.ok and result.first_bad_line == 2 and "seq" in result.reason


def test_verify_detects_reordered_lines(five: tuple[str, bytes, list[bytes]]) -> None:
    """Two swapped lines break seq order at the first of them."""
    path, key, raw = five
    raw[1], raw[2] = raw[2], raw[1]
    rewrite(path, raw)
    assert verify_file(path, key).first_bad_line == 2


def test_verify_detects_inserted_line(five: tuple[str, bytes, list[bytes]]) -> None:
    """A forged line with plausible seq and prev fails its HMAC; without key the next line fails."""
    path, key, raw = five
    forged = edit(raw[2], seq=3, prev=sha(raw[1]), type="forged")
    raw.insert(2, forged)
    rewrite(path, raw)
    result = verify_file(path, key)
    assert result.first_bad_line == 3 and "HMAC" in result.reason
    assert verify_file(path, None).first_bad_line == 4


def test_verify_detects_last_line_edit_with_key(five: tuple[str, bytes, list[bytes]]) -> None:
    """Only the HMAC protects the last line: caught with the key, invisible without it."""
    path, key, raw = five
    raw[-1] = edit(raw[-1], outcome="ok-edited")
    rewrite(path, raw)
    result = verify_file(path, key)
    assert not result.ok and result.first_bad_line == 5 and "HMAC" in result.reason
    assert verify_file(path, None).ok


def test_verify_detects_reformatted_last_line(five: tuple[str, bytes, list[bytes]]) -> None:
    """Same content, different bytes (e.g. a duplicated key) is caught with the key."""
    path, key, raw = five
    raw[-1] = raw[-1][:-1] + b',"outcome":"ok"}'
    rewrite(path, raw)
    assert verify_file(path, key).first_bad_line == 5


def test_verify_detects_non_json_line(five: tuple[str, bytes, list[bytes]]) -> None:
    """A line that is not JSON is reported with its number."""
    path, key, raw = five
    raw[3] = b"not json at all"
    rewrite(path, raw)
    result = verify_file(path, key)
    assert result.first_bad_line == 4 and result.reason == "not JSON"


def test_verify_detects_removed_head(five: tuple[str, bytes, list[bytes]]) -> None:
    """Dropping the first lines leaves a first line whose prev is not genesis."""
    path, _, raw = five
    rewrite(path, raw[2:])
    result = verify_file(path, None)
    assert result.first_bad_line == 1


def test_verify_detects_torn_last_line(five: tuple[str, bytes, list[bytes]]) -> None:
    """A last line without newline is reported as incomplete."""
    path, key, raw = five
    Path(path).write_bytes(b"\n".join(raw))
    result = verify_file(path, key)
    assert result.first_bad_line == 5 and "incomplete" in result.reason


def test_verify_with_wrong_key_fails(five: tuple[str, bytes, list[bytes]]) -> None:
    """A different key fails the first line's HMAC."""
    path, _, _ = five
    assert verify_file(path, b"w" * 32).first_bad_line == 1


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("fsync", [False, True])
async def test_concurrent_writes_form_one_chain(paths: tuple[str, str], fsync: bool) -> None:
    """200 concurrent writers all land, each once, in one valid chain."""
    log = await AuditLog.open(*paths, create_key=True, fsync=fsync)
    await asyncio.gather(*(log.write(event("renew", n=i)) for i in range(200)))
    await log.close()
    recs = records(paths[0])
    assert [r["seq"] for r in recs] == list(range(1, 201))
    assert sorted(r["n"] for r in recs) == list(range(200))
    assert verify_file(paths[0], load_key(paths[1])).ok


async def test_lines_of_one_loop_iteration_share_one_write(
    paths: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines queued in the same loop iteration reach the file in one write() system call."""
    log = await AuditLog.open(*paths, create_key=True)
    real_write = os.write
    audit_fd = os.stat(paths[0])  # count only writes to the log, not the loop's own
    sizes: list[int] = []

    def counting_write(fd: int, data: Any) -> int:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (audit_fd.st_dev, audit_fd.st_ino):
            sizes.append(len(data))
        return real_write(fd, data)

    # os.write is one function for the whole process: patched here, seen everywhere.
    monkeypatch.setattr("broker.audit.os.write", counting_write)
    await asyncio.gather(*(log.write(event("renew", n=i)) for i in range(30)))
    await log.write(event("renew", n=30))  # alone in its iteration: its own write
    monkeypatch.undo()
    await log.close()
    assert len(sizes) == 2, sizes
    assert [r["n"] for r in records(paths[0])] == list(range(31))
    assert verify_file(paths[0], load_key(paths[1])).ok


@pytest.mark.parametrize("fsync", [False, True])
async def test_cancelled_writer_does_not_break_chain(paths: tuple[str, str], fsync: bool) -> None:
    """Cancelling writers mid-flight leaves a valid chain and a working log."""
    log = await AuditLog.open(*paths, create_key=True, fsync=fsync)
    tasks = [asyncio.create_task(log.write(event("renew", n=i))) for i in range(50)]
    await asyncio.sleep(0)
    for t in tasks[10:30]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await log.write(event("renew", n=999))
    await log.close()
    assert verify_file(paths[0], load_key(paths[1])).ok
    assert records_tail(paths[0])["n"] == 999


# --------------------------------------------------------------------------- fail-closed


async def test_write_after_close_raises(alog: AuditLog) -> None:
    """A closed log refuses writes with AuditError and reports unhealthy."""
    await alog.close()
    assert not alog.healthy
    with pytest.raises(AuditError, match="closed"):
        await alog.write(event("issue"))


async def test_close_flushes_queued_writes(paths: tuple[str, str]) -> None:
    """Lines queued behind an fsync when close() is called are still written."""
    log = await AuditLog.open(*paths, create_key=True, fsync=True)
    writes = [asyncio.create_task(log.write(event("renew", n=i))) for i in range(20)]
    await asyncio.sleep(0)
    await log.close()
    await asyncio.gather(*writes)
    assert len(records(paths[0])) == 20


async def test_unwritable_directory_after_removal_raises(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """File removed and directory read-only: the write fails closed, then recovers with a link."""
    log_path = paths[0]
    await write_n(alog, 2)
    old_last = lines(log_path)[-1]
    moved = log_path + ".1"
    os.rename(log_path, moved)
    with read_only_dir(os.path.dirname(log_path)):
        with pytest.raises(AuditError, match="refused"):
            await alog.write(event("issue"))
        assert not alog.healthy
    await alog.write(event("issue", n="after"))
    assert alog.healthy
    [rec] = records(log_path)
    assert rec["seq"] == 1 and rec["prev"] == GENESIS and rec["prev_file"] == sha(old_last)
    key = load_key(paths[1])
    assert all(r.ok for _, r in verify_files([moved, log_path], key))


async def test_disk_full_raises(paths: tuple[str, str]) -> None:
    """ENOSPC (a /dev/full log) fails the write with AuditError."""
    if not exists("/dev/full"):
        pytest.skip("no /dev/full")
    log = await AuditLog.open("/dev/full", paths[1], create_key=True)
    with pytest.raises(AuditError, match="No space left"):
        await log.write(event("issue"))
    assert not log.healthy
    await log.close()


async def test_partial_write_is_cut_back(alog: AuditLog, paths: tuple[str, str]) -> None:
    """A write cut short by a file size limit leaves no partial line; later writes chain on."""
    await write_n(alog, 2)
    size = size_of(paths[0])
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))
    try:
        with pytest.raises(AuditError, match="too large"):
            await alog.write(event("issue", padding="p" * 200))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert size_of(paths[0]) == size
    await write_n(alog, 1, start=2)
    assert [r["seq"] for r in records(paths[0])] == [1, 2, 3]
    assert verify_file(paths[0], load_key(paths[1])).ok


async def test_log_recovers_by_itself_after_a_failure(paths: tuple[str, str]) -> None:
    """Once writable again, the log writes an audit_resumed line itself and is healthy.

    Health must not wait for a request to succeed: a load balancer that
    drains on health 503 would never send one.
    """
    log = await AuditLog.open(*paths, create_key=True, probe_interval=0.05)
    await write_n(log, 2)
    size = size_of(paths[0])
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        with pytest.raises(AuditError, match="too large"):
            await log.write(event("issue"))
        await asyncio.sleep(0.3)  # several probes, all failing
        assert not log.healthy and size_of(paths[0]) == size
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    for _ in range(100):
        if log.healthy:
            break
        await asyncio.sleep(0.02)
    assert log.healthy and log.last_error is None
    await log.close()
    recs = records(paths[0])
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[-1]["action"] == "audit_resumed" and recs[-1]["failed_with"] == "File too large"
    assert verify_file(paths[0], load_key(paths[1])).ok


async def test_close_stops_the_recovery_probe(paths: tuple[str, str]) -> None:
    """A log closed while failing schedules nothing more and writes nothing more."""
    if not exists("/dev/full"):
        pytest.skip("no /dev/full")
    log = await AuditLog.open("/dev/full", paths[1], create_key=True, probe_interval=0.01)
    with pytest.raises(AuditError):
        await log.write(event("issue"))
    await log.close()
    await asyncio.sleep(0.05)
    assert log._probe_timer is None and log._probe_task is None


# --------------------------------------------------------------------------- rotation


async def test_moved_file_starts_linked_chain(alog: AuditLog, paths: tuple[str, str]) -> None:
    """After logrotate moves the file, the next line starts a new file linked to the old one."""
    log_path = paths[0]
    await write_n(alog, 3)
    os.rename(log_path, log_path + ".1")
    await write_n(alog, 2, start=3)
    old, new = records(log_path + ".1"), records(log_path)
    assert [r["seq"] for r in old] == [1, 2, 3] and [r["seq"] for r in new] == [1, 2]
    assert new[0]["prev_file"] == sha(lines(log_path + ".1")[-1])
    assert "prev_file" not in new[1]
    key = load_key(paths[1])
    assert all(r.ok for _, r in verify_files([log_path + ".1", log_path], key))
    # A file from elsewhere in the sequence breaks the link.
    other = str(Path(log_path).with_name("other.jsonl"))
    shutil.copy(log_path + ".1", other)
    results = verify_files([log_path + ".1", other], key)
    assert not results[1][1].ok and "prev_file" in results[1][1].reason


async def test_reopen_same_file_continues(alog: AuditLog, paths: tuple[str, str]) -> None:
    """reopen() on an unrotated file continues the same chain without a link."""
    await write_n(alog, 2)
    await alog.reopen()
    await write_n(alog, 1, start=2)
    recs = records(paths[0])
    assert [r["seq"] for r in recs] == [1, 2, 3] and "prev_file" not in recs[2]
    assert verify_file(paths[0], load_key(paths[1])).ok


async def test_reopen_after_rotation_links(alog: AuditLog, paths: tuple[str, str]) -> None:
    """SIGHUP-style reopen after a move creates the new file and links it on its first line."""
    await write_n(alog, 2)
    os.rename(paths[0], paths[0] + ".1")
    await alog.reopen()
    assert exists(paths[0])
    await write_n(alog, 1)
    [rec] = records(paths[0])
    assert rec["prev_file"] == sha(lines(paths[0] + ".1")[-1])


async def test_truncated_under_us_starts_linked_chain(
    alog: AuditLog, paths: tuple[str, str]
) -> None:
    """copytruncate-style rotation (file emptied in place) restarts the chain with a link."""
    await write_n(alog, 2)
    last = lines(paths[0])[-1]
    os.truncate(paths[0], 0)
    await write_n(alog, 1)
    [rec] = records(paths[0])
    assert rec["seq"] == 1 and rec["prev"] == GENESIS and rec["prev_file"] == sha(last)
    assert verify_file(paths[0], load_key(paths[1])).ok


async def test_replaced_file_is_followed(alog: AuditLog, paths: tuple[str, str]) -> None:
    """logrotate 'create' (move, then a new empty file at the path) is followed at once."""
    await write_n(alog, 2)
    os.rename(paths[0], paths[0] + ".1")
    put(paths[0], b"")
    await write_n(alog, 1)
    assert len(lines(paths[0] + ".1")) == 2
    [rec] = records(paths[0])
    assert rec["seq"] == 1 and rec["prev_file"] == sha(lines(paths[0] + ".1")[-1])


def test_redaction_covers_secret_suffixes() -> None:
    """Keys ending like a secret (new_password, refresh_token) are hidden too; accessors are not."""
    from broker.audit import redact

    out = redact({"new_password": "p1", "refresh_token": "t1", "db_secret": "s1",
                  "token_accessor": "acc", "token_policies": ["a"]}, b"k" * 32)
    assert all(out[k].startswith("hmac-sha256:") for k in ("new_password", "refresh_token",
                                                           "db_secret"))
    assert out["token_accessor"] == "acc" and out["token_policies"] == ["a"]
