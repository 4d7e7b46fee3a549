"""AuditLog's one-pass signing gives byte for byte the lines of the two-half reference."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import pytest

from broker.audit import AuditLog, _canonical, _line_mac, event, load_key
from broker.audit_verify import verify_file


def reference_sign(key: bytes, record: dict[str, Any]) -> bytes:
    """The former implementation: serialize the members before and after "mac" apart."""
    left = _canonical({k: v for k, v in record.items() if k < "mac"})[1:-1]
    right = _canonical({k: v for k, v in record.items() if k > "mac"})[1:-1]
    body = b"{" + left + (b"," if left and right else b"") + right + b"}"
    mac = b'"mac":"' + _line_mac(key, body).encode("ascii") + b'"'
    return b"{" + b",".join(part for part in (left, mac, right) if part) + b"}"


RECORDS: list[dict[str, Any]] = [
    {},
    {"auth": {"accessor": "a"}},  # only members before "mac"
    {"type": "issue"},  # only after
    {"a": 1, "z": 2},
    {"auth": {"mac": "hmac-sha256:" + "0" * 64, "metadata": {"x": "\u00e9\u2603"}},
     "error": 'quote " and , and "mac":"x"', "lease": {"id": "pg/creds/ro/abc"},
     "type": "renew", "seq": 7, "prev": "sha256:" + "1" * 64, "ttl": 3600.5,
     "request": {"mac": "nested", "path": "sys/leases/renew"}, "list": [1, "two", None]},
    {"ma": 1, "mab": 2, "mac0": 3, "mad": [], "m": {}},  # keys right around "mac"
]


@pytest.mark.parametrize("record", RECORDS)
async def test_sign_matches_reference(tmp_path: Path, record: dict[str, Any]) -> None:
    log = await AuditLog.open(str(tmp_path / "a.jsonl"), str(tmp_path / "k"), create_key=True)
    try:
        key = load_key(str(tmp_path / "k"))
        before = dict(record)
        assert log._sign(record) == reference_sign(key, record)
        assert record == before  # the caller's record is left as it was
    finally:
        await log.close()


async def test_hmac_matches_one_shot_digest(tmp_path: Path) -> None:
    log = await AuditLog.open(str(tmp_path / "a.jsonl"), str(tmp_path / "k"), create_key=True)
    try:
        key = load_key(str(tmp_path / "k"))
        for value in ["", "s3cret", "\u00e9" * 100]:
            expected = "hmac-sha256:" + hmac.digest(key, value.encode(), "sha256").hex()
            assert log.hmac(value) == expected
        for n in range(30):  # lines written through the new path verify with the old rules
            await log.write(event("issue", n=n, password=f"p{n}", lease={"id": f"x/{n}"}))
    finally:
        await log.close()
    assert verify_file(str(tmp_path / "a.jsonl"), key).ok


def test_now_has_the_isoformat_shape_and_value() -> None:
    """``_now`` keeps datetime's RFC 3339 text (microseconds, Z) and tells the time."""
    import re
    from datetime import UTC, datetime, timedelta

    from broker.audit import _now

    for _ in range(2000):
        before = datetime.now(UTC)
        text = _now()
        after = datetime.now(UTC)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text), text
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        # One microsecond of slack: datetime and this code round the float alike, not
        # identically. Compared as datetimes (whole microseconds): float seconds near
        # 1.8e9 cannot hold the slack exactly.
        slack = timedelta(microseconds=1)
        assert before - slack <= parsed <= after + slack
