"""No audit, no credential: an issue whose ``request`` line cannot be written
creates nothing, on either kind of backend.

A real ``broker server`` with a PostgreSQL mount (a staging backend: the role is
created in an open transaction, committed last) and a MySQL mount (created in
one go, after the intent). A file size limit on the running broker (prlimit)
makes every audit write fail, as a full disk would; the lease store is
PostgreSQL, so nothing else is hit.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.integration.broker_harness import write_config
from tests.integration.store_fixtures import broker_store_url
from tests.integration.test_api_mysql_aws import mysql_connect
from tests.integration.test_api_postgres import pg_mount
from tests.integration.test_workers import _call, _served, _wait

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="prlimit (Linux)")]

PREFIX = "v-aud-"


def _mounts(postgres_dsn: str, mysql_dsn: str) -> str:
    # Fixed usernames (no {{random}}) with a prefix of this test's own, so the
    # server can be searched for anything a refused issue left behind.
    pg = pg_mount(postgres_dsn).replace(
        "[mounts.pg.roles.readonly]",
        '[mounts.pg.roles.readonly]\nusername_template = "v-aud-{{unix_time}}-pg"', 1)
    return pg + f"""
[mounts.my]
plugin = "mysql"
connection_url = "{mysql_dsn}"

[mounts.my.roles.app]
default_ttl = "1h"
username_template = "v-aud-{{{{unix_time}}}}-my"
"""


async def _leftovers(postgres_dsn: str, mysql_dsn: str) -> list[str]:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        names = [r[0] for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE $1", PREFIX + "%")]
    finally:
        await conn.close()
    url = urlsplit(mysql_dsn)
    my = await mysql_connect(mysql_dsn, url.username or "root", url.password or "")
    try:
        async with my.cursor() as cur:
            await cur.execute("SELECT user FROM mysql.user WHERE user LIKE %s", (PREFIX + "%",))
            names += [r[0] for r in await cur.fetchall()]
    finally:
        my.close()
    return names


@pytest.fixture(params=["postgresql"])
def pg_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return broker_store_url(request, tmp_path)


async def _lease_rows(store_dsn: str, path: str) -> int:
    conn = await asyncpg.connect(store_dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM leases WHERE id LIKE $1",
                                       path + "/%"))
    finally:
        await conn.close()


def _issued_and_revoked(url: str, token: str, path: str) -> dict[str, Any]:
    """One issue through ``path``, revoked at once: the mount works, the log has its lines."""
    ok, body = _call(url, token, "GET", path)
    assert ok == 200, body
    assert _call(url, token, "PUT", "sys/leases/revoke", {"lease_id": body["lease_id"]})[0] == 204
    return body


@pytest.mark.parametrize("path", ["pg/creds/readonly", "my/creds/app"])
def test_an_issue_whose_request_line_cannot_be_written_creates_nothing(
        tmp_path: Path, pg_store: str, postgres_dsn: str, mysql_dsn: str, path: str) -> None:
    config = write_config(tmp_path, _mounts(postgres_dsn, mysql_dsn), storage_url=pg_store)
    audit = tmp_path / "audit.jsonl"
    with _served(config) as (proc, token, url, server_log):
        _issued_and_revoked(url, token, path)
        assert asyncio.run(_leftovers(postgres_dsn, mysql_dsn)) == []
        # The log fills up to where the next line would go past the limit.
        while audit.stat().st_size < server_log.stat().st_size + 8192:
            assert _call(url, token, "GET", "sys/mounts")[0] == 200
        full = audit.stat().st_size
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (full, resource.RLIM_INFINITY))
        try:
            status, refused = _call(url, token, "GET", path)
            assert status == 503 and "audit log" in refused["errors"][0], refused
            assert audit.stat().st_size == full
            # No user on the server, and no lease left that the broker would
            # hand out or sweep: the refused issue was undone before it committed.
            assert asyncio.run(_leftovers(postgres_dsn, mysql_dsn)) == []
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        _wait(lambda: _call(url, token, "GET", "sys/health")[0] == 200, 10, "audit to recover")
        # Only the first (revoked) lease ever had a row: the refused one's intent is gone.
        assert asyncio.run(_lease_rows(pg_store, path)) == 1
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    issued = [e for e in lines if e["type"] == "issue" and e.get("outcome") == "ok"]
    assert len(issued) == 1
    # Every issue line comes after its own request line.
    request_seq = next(e["seq"] for e in lines if e["type"] == "request"
                       and e["request"]["id"] == issued[0]["request"]["id"])
    assert request_seq < issued[0]["seq"]


async def _lease_states(store_dsn: str, path: str) -> list[str]:
    conn = await asyncpg.connect(store_dsn)
    try:
        return [r[0] for r in await conn.fetch(
            "SELECT state FROM leases WHERE id LIKE $1 ORDER BY issue_time", path + "/%")]
    finally:
        await conn.close()


def _settled_size(path: Path) -> int:
    """The log's size once nothing has been appended for a while (ended lines come late)."""
    size = -1
    while True:
        now = path.stat().st_size
        if now == size:
            return size
        size = now
        time.sleep(0.5)


@pytest.mark.parametrize("path", ["pg/creds/readonly", "my/creds/app"])
def test_an_issue_whose_issue_line_cannot_be_written_is_revoked(
        tmp_path: Path, pg_store: str, postgres_dsn: str, mysql_dsn: str, path: str) -> None:
    """The request line goes out, the issue line does not: the user was created (on
    PostgreSQL its line is written beside the COMMIT), so the lease is revoked and
    the caller gets 503 with no credential."""
    config = write_config(tmp_path, _mounts(postgres_dsn, mysql_dsn), storage_url=pg_store)
    audit = tmp_path / "audit.jsonl"
    with _served(config) as (proc, token, url, _server_log):
        body = _issued_and_revoked(url, token, path)
        _wait(lambda: asyncio.run(_leftovers(postgres_dsn, mysql_dsn)) == [], 30,
              "the first user's revocation")
        # How long this call's two lines are: the next call's request line has
        # the same length (give or take a digit of its seq), its issue line too.
        raw = audit.read_text().splitlines()
        mine = {json.loads(line)["type"]: len(line) + 1 for line in raw
                if json.loads(line).get("request", {}).get("id") == body["request_id"]}
        assert set(mine) == {"request", "issue"}, mine
        full = _settled_size(audit)
        limit = full + mine["request"] + mine["issue"] // 2
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            status, refused = _call(url, token, "GET", path)
            assert status == 503 and "audit log" in refused["errors"][0], refused
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        # The user existed (its request line was written, so the issue went
        # ahead); the broker queued its revocation at once.
        _wait(lambda: asyncio.run(_leftovers(postgres_dsn, mysql_dsn)) == [], 30,
              "the untraced user's revocation")
        _wait(lambda: asyncio.run(_lease_states(pg_store, path)) == ["revoked", "revoked"],
              30, "both leases revoked")
        _wait(lambda: _call(url, token, "GET", "sys/health")[0] == 200, 10, "audit to recover")
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    requests = [e for e in lines if e["type"] == "request" and e["request"]["path"] == path]
    assert len(requests) == 2, requests
    refused_id = requests[1]["request"]["id"]
    # Its request line is in the log, and no issue line claims a credential.
    assert not [e for e in lines if e["type"] == "issue"
                and e["request"]["id"] == refused_id], lines[-6:]
