"""A credential inside a path or an error message is hidden, not only a whole value.

The writer hides a value that starts like a credential; a token pasted where a
role name goes (hvac ``generate_credentials(name=token)``) lands inside the
request's ``path`` (``pg/creds/brk....``) and inside the error that quotes the
name (``no role 'brk....' on mount 'pg'``), where a prefix check never looked
(security review). The CLI's usage errors quote what argparse could not parse,
so they go through the same scrub.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from broker.audit import AuditLog, event, scrub

TOKEN = "brk." + "Q" * 43
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyZXBvOmFjbWUvYXBwIn0.c2lnbmF0dXJl"
LEGACY = "s.Ab3dEf6hIj9kLm2nOp5qRs8t"


def _read(path: str) -> str:
    return Path(path).read_text()


def test_scrub_hides_credentials_inside_text_and_leaves_names() -> None:
    assert scrub(f"pg/creds/{TOKEN}") == "pg/creds/[hidden: 47 characters]"
    assert scrub(f"no role '{JWT}' on mount 'pg'") == (
        f"no role '[hidden: {len(JWT)} characters]' on mount 'pg'")
    assert scrub(f"a {LEGACY} b") == "a [hidden: 26 characters] b"
    for text in ("sys/leases/revoke", "no role 's.jones' on mount 'pg'",
                 "pg/creds/readonly/abc.def", "lease pg/creds/ro/x is revoked."):
        assert scrub(text) == text


async def test_the_audit_writer_hides_a_token_inside_a_path_and_an_error(
    tmp_path: Path,
) -> None:
    path, key = str(tmp_path / "audit.jsonl"), str(tmp_path / "audit.key")
    log = await AuditLog.open(path, key, create_key=True)
    try:
        await log.write(event("request", request={"path": f"pg/creds/{TOKEN}",
                                                   "remote_addr": "127.0.0.1"}))
        await log.write(event("policy_denied", error=f"no role '{TOKEN}' on mount 'pg'",
                              checked_path=f"auth/{JWT}/login", note="left as it is: pg.x"))
        await log.write(event("admin", action="list", prefix=f"pg/creds/{TOKEN}/",
                              paths=[f"pg/creds/{JWT}", "sys/health"]))
    finally:
        await log.close()
    text = _read(path)
    assert TOKEN not in text and JWT not in text
    first, second, third = (json.loads(line) for line in text.splitlines())
    assert third["prefix"] == "pg/creds/[hidden: 47 characters]/"
    assert third["paths"] == [f"pg/creds/[hidden: {len(JWT)} characters]", "sys/health"]
    assert first["request"]["path"] == "pg/creds/[hidden: 47 characters]"
    assert second["error"] == "no role '[hidden: 47 characters]' on mount 'pg'"
    assert second["note"] == "left as it is: pg.x"


def test_shown_hides_a_token_inside_a_name() -> None:
    """``shown`` (names quoted in errors: an unknown lease id) hides one inside too."""
    from broker.audit import shown

    assert shown(f"pg/creds/ro/{TOKEN}") == "pg/creds/ro/[hidden: 47 characters]"
    assert shown("pg/creds/ro/abc") == "pg/creds/ro/abc"


def test_a_cli_usage_error_does_not_echo_a_token() -> None:
    """``broker creds pg/readonly TOKEN``: argparse's "unrecognized arguments: TOKEN"."""
    done = subprocess.run([sys.executable, "-m", "broker.cli", "creds", "pg/readonly", TOKEN],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    assert TOKEN not in done.stderr and "[hidden: 47 characters]" in done.stderr, done.stderr
