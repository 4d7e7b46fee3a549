"""Line macs have a key of their own, so a value HMAC can never sign a line.

``sys/audit-hash`` (and the redaction of any secret-named value) hands out
``HMAC(audit key, value)``. While a line's ``mac`` was that same HMAC of the
line's body, anyone allowed to call ``sys/audit-hash`` could send the canonical
JSON of a made-up line as ``input`` and get back exactly its mac: a forged line
that ``broker audit verify`` passed. Line macs now use a key derived from the
audit key for that purpose only; lines written before keep verifying, but only
before the first line of the new format.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.audit import GENESIS, AuditLog, _canonical, _mac, _sha, event, load_key
from broker.audit_verify import verify_file, verify_files


@pytest.fixture
def paths(tmp_path: Path) -> tuple[str, str]:
    return str(tmp_path / "audit.jsonl"), str(tmp_path / "audit.key")


def _put(path: str, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as fh:
        fh.write(data)


def _last_line(path: str) -> bytes:
    return Path(path).read_bytes().splitlines()[-1]


def _records(path: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in Path(path).read_bytes().splitlines()]


def _forged_after(path: str, hmac_of: object) -> bytes:
    """A made-up ``admin`` line chained after the file's last line, signed with
    ``hmac_of(body)``: what a caller of sys/audit-hash gets for the body as input."""
    last = Path(path).read_bytes().splitlines()[-1]
    rec = {"type": "admin", "outcome": "ok", "action": "forged",
           "time": json.loads(last)["time"], "seq": json.loads(last)["seq"] + 1,
           "prev": _sha(last)}
    body = _canonical(rec)
    return _canonical({**rec, "mac": hmac_of(body.decode())}) + b"\n"


async def test_a_line_signed_with_the_audit_hash_of_its_body_fails_verify(
    paths: tuple[str, str],
) -> None:
    log = await AuditLog.open(*paths, create_key=True)
    try:
        for n in range(3):
            await log.write(event("admin", action=f"real-{n}"))
        forged = _forged_after(paths[0], log.hmac)  # log.hmac: what sys/audit-hash answers
    finally:
        await log.close()
    _put(paths[0], forged, "ab")
    result = verify_file(paths[0], load_key(paths[1]))
    assert not result.ok and result.first_bad_line == 4, result
    assert "forged" in result.reason


async def test_an_old_format_file_still_verifies_and_is_continued(
    paths: tuple[str, str],
) -> None:
    """Lines from before (mac = value HMAC of the body) verify; a broker opening such a
    file goes on with new-format lines; an old-format line after those fails."""
    log = await AuditLog.open(*paths, create_key=True)
    await log.close()
    key = load_key(paths[1])
    # Two lines as the broker wrote them before line macs had their own key.
    prev, lines = GENESIS, []
    for seq in (1, 2):
        rec = {"type": "admin", "action": f"old-{seq}", "time": "2026-12-01T00:00:00Z",
               "seq": seq, "prev": prev}
        line = _canonical({**rec, "mac": _mac(key, _canonical(rec))})
        lines.append(line)
        prev = _sha(line)
    _put(paths[0], b"".join(line + b"\n" for line in lines))
    assert verify_file(paths[0], key).ok

    log = await AuditLog.open(*paths)
    try:
        await log.write(event("admin", action="new"))
    finally:
        await log.close()
    recs = _records(paths[0])
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert str(recs[2]["mac"]).startswith("hmac-sha256-line:")
    assert verify_file(paths[0], key).ok
    assert verify_files([paths[0]], key)[0][1].ok

    # An old-format mac after a new one: forged.
    _put(paths[0], _forged_after(paths[0], lambda body: _mac(key, body.encode())), "ab")
    result = verify_file(paths[0], key)
    assert not result.ok and result.first_bad_line == 4 and "forged" in result.reason


async def test_a_whole_file_of_old_format_lines_after_a_new_one_fails(
    paths: tuple[str, str], tmp_path: Path,
) -> None:
    """Rotated files: A written by the broker (new format), then a file B made entirely of
    old-format lines, each signed as sys/audit-hash would (a value HMAC of its body) and
    chained to A's last line: verify of A then B fails B (review: the check restarted
    with each file)."""
    log = await AuditLog.open(*paths, create_key=True)
    try:
        await log.write(event("admin", action="real"))
    finally:
        await log.close()
    key = load_key(paths[1])
    last = _last_line(paths[0])
    rec = {"type": "admin", "action": "forged", "time": "2026-12-04T00:00:00Z", "seq": 1,
           "prev": GENESIS, "prev_file": _sha(last)}
    forged = str(tmp_path / "b.jsonl")
    _put(forged, _canonical({**rec, "mac": _mac(key, _canonical(rec))}) + b"\n")
    assert verify_file(forged, key).ok  # alone, an old file of the old format
    [(_, a), (_, b)] = verify_files([paths[0], forged], key)
    assert a.ok and not b.ok and "forged" in b.reason, b
