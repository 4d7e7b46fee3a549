"""What the audit writer itself guarantees, on real files: credential-looking values hidden
in any field, and ``broker audit verify`` over rotated files after one of them failed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.audit import AuditLog, event, load_key
from broker.audit_verify import verify_file, verify_files

pytestmark = pytest.mark.integration

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyZXBvOmFjbWUvYXBwIn0.c2lnbmF0dXJl"


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


LEGACY = "s.Ab3dEf6hIj9kLm2nOp5qRs8t"


async def test_a_credential_in_any_new_field_is_written_hidden(tmp_path: Path) -> None:
    """A JWT or token in a field no caller hides (a new one, nested, in a list) is written
    as ``[hidden: N characters]``; names, HMACs and metadata keys are left as they are."""
    path, key = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    log = await AuditLog.open(str(path), str(key), create_key=True)
    try:
        await log.write(event(
            "admin", action="some_future_action", a_new_field=JWT,
            nested={"deeper": [JWT, "brk.token-value", "plain"], "count": 3},
            role="readonly", metadata={"owner": "acme", "note": "hvs.vault-token"},
            client_token="s.vault-legacy-token",
            # a legacy Vault token is "s." and 24 letters/digits; a name like s.jones is no token
            legacy=LEGACY, actor="s.jones",
        ))
    finally:
        await log.close()
    text = path.read_text()
    for secret in (JWT, "brk.token-value", "hvs.vault-token", "s.vault-legacy-token"):
        assert secret not in text
    [rec] = _records(path)
    hidden = f"[hidden: {len(JWT)} characters]"
    assert rec["a_new_field"] == hidden
    assert rec["nested"] == {"deeper": [hidden, "[hidden: 15 characters]", "plain"], "count": 3}
    assert rec["role"] == "readonly"
    assert rec["legacy"] == "[hidden: 26 characters]" and rec["actor"] == "s.jones"
    # metadata is the caller's: its "owner" is no accessor, only the credential is hidden
    assert rec["metadata"] == {"owner": "acme", "note": "[hidden: 15 characters]"}
    # a secret-named field is still its HMAC (correlatable), not the hidden form
    assert rec["client_token"] == log.hmac("s.vault-legacy-token")
    assert verify_file(str(path), load_key(str(key))).ok


def _rotated_pair(tmp_path: Path) -> tuple[str, str, bytes]:
    """A file A of 3 lines, moved away (rotation), and the file B the real writer went on
    in (2 lines, its first linked to A's last): (A, B, key)."""
    path, key_path = tmp_path / "audit.jsonl", tmp_path / "audit.key"

    async def write() -> None:
        log = await AuditLog.open(str(path), str(key_path), create_key=True)
        try:
            for n in range(3):
                await log.write(event("admin", action="before", n=n))
            os.rename(path, f"{path}.1")
            for n in range(2):
                await log.write(event("admin", action="after", n=n))
        finally:
            await log.close()

    asyncio.run(write())
    return f"{path}.1", str(path), load_key(str(key_path))


def _edit_line(path: str, index: int, old: str, new: str) -> None:
    lines = Path(path).read_text().splitlines(keepends=True)
    assert old in lines[index]
    lines[index] = lines[index].replace(old, new)
    Path(path).write_text("".join(lines))


def test_verify_after_a_failed_file_checks_the_next_ones_chain_not_its_link(
        tmp_path: Path) -> None:
    """A tampered A fails; B, whose link to A cannot be judged, gets its own chain's
    result (ok) and a note that its link was not checked, not a false link error."""
    a, b, key = _rotated_pair(tmp_path)
    assert all(r.ok for _, r in verify_files([a, b], key))  # untouched: both ok, linked
    _edit_line(a, 1, '"action":"before"', '"action":"BEFORE"')

    (pa, ra), (pb, rb) = verify_files([a, b], key)
    assert (pa, pb) == (a, b)
    assert not ra.ok and ra.first_bad_line == 2 and "HMAC mismatch" in ra.reason
    assert rb.ok and rb.lines == 2 and rb.first_bad_line is None
    assert rb.note == (f"its link to {a} (prev_file) was not checked: that file failed "
                       "verification")
    # without the key, A fails at the next line's prev; B the same
    (_, ra), (_, rb) = verify_files([a, b], None)
    assert not ra.ok and ra.first_bad_line == 3
    assert rb.ok and rb.note is not None and "not checked" in rb.note

    out = subprocess.run([sys.executable, "-m", "broker.cli", "audit", "verify",
                          "--key-file", str(tmp_path / "audit.key"), a, b],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"{a}:2: HMAC mismatch: the line was edited (or the key is wrong)", f"{b}: ok: 2 lines"]
    assert f"note: {b}: its link to {a} (prev_file) was not checked" in out.stderr


def test_verify_after_a_failed_file_still_fails_the_next_ones_own_chain(
        tmp_path: Path) -> None:
    """After a failed A, a B with an edited line reports its own failure, not a link one;
    and a third file's link to an ok B is checked again."""
    a, b, key = _rotated_pair(tmp_path)
    c = str(tmp_path / "c.jsonl")
    Path(c).write_text(Path(a).read_text())  # a whole chain from genesis: no link to b
    _edit_line(a, 0, '"action":"before"', '"action":"BEFORE"')
    _edit_line(b, 1, '"action":"after"', '"action":"AFTER"')
    (_, ra), (_, rb) = verify_files([a, b], key)
    assert not ra.ok and ra.first_bad_line == 1
    assert not rb.ok and rb.first_bad_line == 2 and "HMAC mismatch" in rb.reason
    _edit_line(b, 1, '"action":"AFTER"', '"action":"after"')
    results = verify_files([a, b, c], key)
    assert results[1][1].ok and not results[2][1].ok
    assert "prev_file does not match" in results[2][1].reason


def test_after_a_file_that_failed_only_by_its_link_the_next_link_is_checked(
        tmp_path: Path) -> None:
    """A file whose own chain is whole but whose link to the file before it is broken
    still ends where its last line says: the next file's link to it is judged as usual."""
    a, b, key = _rotated_pair(tmp_path)
    other = str(tmp_path / "other.jsonl")
    Path(other).write_text(Path(a).read_text())  # a whole chain A does not link to
    (_, ro), (_, ra), (_, rb) = verify_files([other, a, b], key)
    assert ro.ok and not ra.ok and "prev_file does not match" in ra.reason
    assert rb.ok and rb.note is None  # its link to A was checked, and holds
    # and a file after A that does not link to it fails there, as any broken link does
    (_, ro), (_, ra), (_, rc) = verify_files([other, a, other], key)
    assert not ra.ok and not rc.ok and "prev_file does not match" in rc.reason
