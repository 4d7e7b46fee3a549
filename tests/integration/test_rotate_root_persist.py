"""rotate-root writes the new admin password to the mount's ``password_file``.

Before, the new secret lived only in the memory of the process that rotated
it: a restart read the old, now refused, password and the mount was dead, and
with several workers the others could not open a connection once their
pooled ones were recycled. MariaDB enforces passwords (the local PostgreSQL
trusts 127.0.0.1), so the admin here is a MariaDB account of the test's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import hvac
import pymysql
import pytest
import requests

from broker.templating import generate_password
from tests.integration.broker_harness import start_broker, write_config
from tests.integration.ops_fixtures import mysql_admin_account, mysql_statement
from tests.integration.test_api_mysql_aws import mysql_connect
from tests.integration.test_workers import _call, _served, _wait

pytestmark = pytest.mark.integration


def _logs_in(dsn: str, user: str, password: str) -> bool:
    async def attempt() -> bool:
        try:
            conn = await mysql_connect(dsn, user, password)
        except pymysql.err.OperationalError:
            return False
        await conn.ensure_closed()
        return True

    return asyncio.run(attempt())


@pytest.fixture
def admin(mysql_dsn: str) -> Iterator[tuple[str, str]]:
    """A MariaDB admin account of this test's own: (user, its first password)."""
    with mysql_admin_account(mysql_dsn, "v-rot-") as account:
        yield account


def _mount(mysql_dsn: str, user: str, secret_line: str) -> str:
    url = urlsplit(mysql_dsn)
    return f"""
[mounts.my]
plugin = "mysql"
connection_url = "mysql://{user}@{url.hostname}:{url.port or 3306}{url.path or '/test'}"
{secret_line}

[mounts.my.roles.app]
default_ttl = "1h"
"""


def _rotate(url: str, token: str) -> dict[str, object]:
    resp = requests.post(f"{url}/v1/my/rotate-root", headers={"X-Vault-Token": token},
                         timeout=60)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_the_new_password_is_written_and_a_restart_uses_it(
        tmp_path: Path, mysql_dsn: str, admin: tuple[str, str]) -> None:
    user, first = admin
    pw = tmp_path / "admin.pw"
    pw.write_text(first + "\n")
    pw.chmod(0o640)
    config = write_config(tmp_path, _mount(mysql_dsn, user, 'password_file = "admin.pw"'))
    server = start_broker(config)
    try:
        assert server.state is not None
        running = server.state.engine.mount("my")
        answer = _rotate(server.url, server.root_token)
        new = answer["data"]["new_password"]  # type: ignore[index]
        assert answer["warnings"] is None  # nothing left for the operator to do
        # The running mount knows its secret is the file's: not rebuilt for it.
        assert running.spec.secret == new
        server.call(server.state.engine.check_mounts())
        assert server.state.engine.mount("my") is running
    finally:
        server.stop()
    assert pw.read_text() == f"{new}\n"
    assert stat.S_IMODE(pw.stat().st_mode) == 0o600  # an admin password: never group-readable
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not _logs_in(mysql_dsn, user, first) and _logs_in(mysql_dsn, user, str(new))
    audit = (tmp_path / "audit.jsonl").read_text()
    assert str(new) not in audit and '"password_file_written":true' in audit

    # A new broker on the same config logs in with what the file now holds.
    server = start_broker(config)
    try:
        client = hvac.Client(url=server.url, token=server.root_token)
        health = client.sys.read_health_status(method="GET")
        assert health["mounts"]["my"]["healthy"] is True, health
        lease = client.read("my/creds/app")
        client.sys.revoke_lease(lease["lease_id"])
    finally:
        server.stop()


def test_a_password_from_the_environment_is_left_to_the_operator(
        tmp_path: Path, mysql_dsn: str, admin: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    user, first = admin
    monkeypatch.setenv("BROKER_TEST_ROTATE_PW", first)
    config = write_config(tmp_path, _mount(mysql_dsn, user,
                                           'password_env = "BROKER_TEST_ROTATE_PW"'))
    server = start_broker(config)
    try:
        answer = _rotate(server.url, server.root_token)
    finally:
        server.stop()
    [warning] = answer["warnings"]  # type: ignore[misc]
    assert "store the new secret where password_file/password_env points" in warning
    assert os.environ["BROKER_TEST_ROTATE_PW"] == first  # nothing the broker could write


def test_with_several_workers_every_worker_follows_the_new_password(
        tmp_path: Path, mysql_dsn: str, admin: tuple[str, str]) -> None:
    """The other worker sees password_file change and rebuilds the mount with the new secret;
    nothing else is reloaded (before, rotate-root sent SIGHUP to the supervisor, and so
    applied whatever edit was waiting in the config file)."""
    user, first = admin
    (tmp_path / "admin.pw").write_text(first + "\n")
    config = write_config(tmp_path, _mount(mysql_dsn, user, 'password_file = "admin.pw"'),
                          workers=2)
    with _served(config) as (_proc, token, url, server_log):
        # An edit waiting in the config file for the operator's SIGHUP.
        config.write_text(config.read_text() + '\n[mounts.my.roles.pending]\ndefault_ttl = "1h"\n')
        new = _rotate(url, token)["data"]["new_password"]  # type: ignore[index]
        # The worker that rotated already runs the file's secret; the other follows it.
        _wait(lambda: "admin.pw changed; the mount now uses the new secret"
              in server_log.read_text(), 10, "the other worker to follow the file")
        assert (tmp_path / "admin.pw").read_text() == f"{new}\n"
        # Pooled sessions stay logged in whatever the password: end them, so each
        # worker must log in again, with the new password.
        _kill_sessions(mysql_dsn, user)
        for _ in range(12):  # spread over both workers by the kernel (SO_REUSEPORT)
            status, body = _call(url, token, "GET", "my/creds/app")
            assert status == 200, body
            assert _call(url, token, "PUT", "sys/leases/revoke",
                         {"lease_id": body["lease_id"]})[0] == 204
            assert _call(url, token, "GET", "my/creds/pending")[0] == 404  # not reloaded
        log_text = server_log.read_text()
        assert "config reloaded" not in log_text
        assert str(new) not in log_text


def test_concurrent_rotations_in_two_workers_leave_the_file_holding_the_servers_password(
        tmp_path: Path, mysql_dsn: str, admin: tuple[str, str]) -> None:
    """Two rotate-roots at once, in two workers sharing the password_file: each changed
    the password, the loser's check failed and it set "the old password" again over
    the winner's, so the file held a password the server no longer took (day-2 QA:
    3 rounds in 8). They now take turns; after every round the file's password logs in."""
    user, first = admin
    pw = tmp_path / "admin.pw"
    pw.write_text(first + "\n")
    config = write_config(tmp_path, _mount(mysql_dsn, user, 'password_file = "admin.pw"'),
                          workers=2)
    with _served(config) as (_proc, token, url, _log):
        for round_ in range(8):
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(
                    lambda _: requests.post(f"{url}/v1/my/rotate-root", timeout=120,
                                            headers={"X-Vault-Token": token}), range(2)))
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            held = pw.read_text().strip()
            assert _logs_in(mysql_dsn, user, held), f"round {round_}: the file's password fails"
            # The later of the two is what the file holds: both were real, in turn.
            assert held in {a.json()["data"]["new_password"] for a in answers}


def _kill_sessions(mysql_dsn: str, user: str) -> None:
    """End every session of ``user``: the broker's pool must log in again."""
    async def kill() -> None:
        url = urlsplit(mysql_dsn)
        conn = await mysql_connect(mysql_dsn, url.username or "root", url.password or "")
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT id FROM information_schema.processlist WHERE user = %s",
                                  (user,))
                for (session,) in await cur.fetchall():
                    try:
                        await cur.execute(f"KILL {int(session)}")
                    except pymysql.err.OperationalError:
                        pass  # gone meanwhile
        finally:
            conn.close()

    asyncio.run(kill())


def test_a_password_file_changed_elsewhere_is_followed_without_a_reload(
        tmp_path: Path, mysql_dsn: str, admin: tuple[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Another replica (or an operator, or a secret manager) changes the admin password
    and the file: the next mount-health check rebuilds the mount with it, no SIGHUP.
    A file whose content the server refuses leaves the running mount alone."""
    user, first = admin
    pw = tmp_path / "admin.pw"
    pw.write_text(first + "\n")
    server = start_broker(write_config(tmp_path, _mount(mysql_dsn, user,
                                                        'password_file = "admin.pw"')))
    try:
        assert server.state is not None
        engine = server.state.engine
        client = hvac.Client(url=server.url, token=server.root_token)

        # A wrong file: refused, logged once, the running mount keeps working.
        pw.write_text("not-the-password\n")
        server.call(engine.follow_password_files())  # the every-second job
        server.call(engine.follow_password_files())
        server.call(engine.check_mounts())
        assert caplog.text.count("refuses it") == 1, caplog.text
        client.sys.revoke_lease(client.read("my/creds/app")["lease_id"])

        # The password changes on the server, the sessions end, the file follows.
        second = generate_password()
        asyncio.run(mysql_statement(mysql_dsn, f"ALTER USER '{user}'@'%' IDENTIFIED BY '{second}'"))
        _kill_sessions(mysql_dsn, user)
        pw.write_text(second + "\n")
        server.call(engine.follow_password_files())
        assert engine.mount("my").spec.secret == second
        assert engine.mount("my").healthy
        lease = client.read("my/creds/app")
        client.sys.revoke_lease(lease["lease_id"])
        assert second not in caplog.text and first not in caplog.text
    finally:
        server.stop()
