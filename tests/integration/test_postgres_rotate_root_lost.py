"""rotate-root on postgres when the connection is lost while ``ALTER ROLE`` is out.

Before, the broker then kept the old password whatever the server had done.
When the server had run the ``ALTER``, the old password no longer logged in,
the new one had never been returned to anyone, and the mount died at its
next new connection: the broker locked out of its own backend. Now it asks
the server (plugins/_rotation.py) and adopts the new password when it took
effect.

The server is a private cluster with ``scram-sha-256`` (the local one trusts
127.0.0.1, so passwords would not matter there); a proxy between the broker
and the cluster cuts the connection that carries the ``ALTER ROLE``, either
after the statement reached the server or before, or swallows the server's
answer so that the call times out (``backend_timeout``) with the outcome
unknown until the server is asked.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import requests

from broker.bench.pgcluster import PrivateCluster
from broker.templating import generate_password
from tests.conftest import server_missing
from tests.integration.broker_harness import BrokerThread, TcpProxy, start_broker, write_config

pytestmark = pytest.mark.integration

#: the mount's timeout: a rotate-root whose answer does not come is asked about after it.
BACKEND_TIMEOUT = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    try:
        started = PrivateCluster.start(settings={"fsync": "off"}, prefix="broker-rotate-")
    except (LookupError, OSError, RuntimeError) as exc:
        server_missing(f"a private PostgreSQL cluster with password authentication ({exc})")
        raise AssertionError("unreachable") from exc
    try:
        yield started
    finally:
        started.stop()


async def _logs_in(cluster: PrivateCluster, user: str, password: str) -> bool:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user=user,
                                     password=password, database="postgres")
    except asyncpg.InvalidPasswordError:
        return False
    await conn.close()
    return True


@pytest.fixture
def served(tmp_path: Path, cluster: PrivateCluster
           ) -> Iterator[tuple[BrokerThread, TcpProxy, str, str]]:
    """A broker whose postgres mount reaches the cluster through a proxy, as a
    least-privilege admin of the test's own: (broker, proxy, admin, its password)."""
    admin, password = f"rot-{secrets.token_hex(3)}", generate_password()

    async def create() -> None:
        conn = await asyncpg.connect(cluster.dsn)
        try:
            await conn.execute(f'CREATE ROLE "{admin}" LOGIN CREATEROLE PASSWORD \'{password}\'')
        finally:
            await conn.close()

    asyncio.run(create())
    (tmp_path / "admin.pw").write_text(password + "\n")
    proxy = TcpProxy(cluster.port)
    broker = start_broker(write_config(tmp_path, f"""
[leases]
backend_timeout = "{BACKEND_TIMEOUT}s"

[mounts.pg]
plugin = "postgres"
connection_url = "postgresql://{admin}@127.0.0.1:{proxy.port}/postgres"
password_file = "admin.pw"

[mounts.pg.roles.app]
default_ttl = "1h"
"""))
    try:
        yield broker, proxy, admin, password
    finally:
        requests.put(f"{broker.url}/v1/sys/leases/revoke-prefix/pg/", json={"sync": True},
                     headers={"X-Vault-Token": broker.root_token}, timeout=60)
        broker.stop()
        proxy.close()


def _post(broker: BrokerThread, path: str) -> requests.Response:
    return requests.post(f"{broker.url}/v1/{path}", headers={"X-Vault-Token": broker.root_token},
                         timeout=60)


def _issues(broker: BrokerThread) -> None:
    """A credential comes through the mount (its pool may open a new connection)."""
    resp = requests.get(f"{broker.url}/v1/pg/creds/app",
                        headers={"X-Vault-Token": broker.root_token}, timeout=60)
    assert resp.status_code == 200, resp.text


def _settled_on(broker: BrokerThread, cluster: PrivateCluster, tmp_path: Path, admin: str,
                password: str, refused: str | None = None) -> None:
    """The server takes ``password`` (and refuses ``refused``), ``password_file``
    holds it, and the mount issues and logs in afresh."""
    assert asyncio.run(_logs_in(cluster, admin, password))
    if refused is not None:
        assert not asyncio.run(_logs_in(cluster, admin, refused))
    assert (tmp_path / "admin.pw").read_text() == f"{password}\n"
    _issues(broker)
    assert broker.state is not None
    broker.call(broker.state.engine.check_mounts())  # a fresh login, with that password
    assert broker.state.engine.mount("pg").healthy


def test_a_lost_answer_after_the_server_took_the_new_password_adopts_it(
        served: tuple[BrokerThread, TcpProxy, str, str], cluster: PrivateCluster,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker, proxy, admin, old = served
    proxy.cut_on = (b"ALTER ROLE", "after")
    resp = _post(broker, "pg/rotate-root")
    assert resp.status_code == 200, resp.text
    new = resp.json()["data"]["new_password"]
    assert proxy.cut_on is None  # the cut happened
    assert "ALTER ROLE got no answer (" in caplog.text
    assert "but the server took the new password" in caplog.text
    assert new not in caplog.text and old not in caplog.text
    _settled_on(broker, cluster, tmp_path, admin, new, refused=old)


def test_a_cut_before_the_server_saw_the_statement_keeps_the_old_password(
        served: tuple[BrokerThread, TcpProxy, str, str], cluster: PrivateCluster,
        tmp_path: Path) -> None:
    broker, proxy, admin, old = served
    proxy.cut_on = (b"ALTER ROLE", "before")
    resp = _post(broker, "pg/rotate-root")
    assert resp.status_code == 503, resp.text
    error = resp.json()["errors"][0]
    assert "the server kept the old password" in error
    assert proxy.cut_on is None
    _settled_on(broker, cluster, tmp_path, admin, old)


def test_an_answer_that_never_comes_after_the_server_took_the_new_password_adopts_it(
        served: tuple[BrokerThread, TcpProxy, str, str], cluster: PrivateCluster,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ALTER commits, its answer is lost in a stalled network, the call times out.

    Before, the timeout cancelled the call and the broker kept the old password,
    which the server no longer took: locked out at the next new connection.
    """
    broker, proxy, admin, old = served
    proxy.cut_on = (b"ALTER ROLE", "hold")
    resp = _post(broker, "pg/rotate-root")
    assert resp.status_code == 200, resp.text
    new = resp.json()["data"]["new_password"]
    assert proxy.cut_on is None and proxy.held  # the answer was swallowed
    assert (f"ALTER ROLE got no answer (rotate_root: the server did not answer within "
            f"{BACKEND_TIMEOUT}s), but the server took the new password") in caplog.text
    _settled_on(broker, cluster, tmp_path, admin, new, refused=old)


def test_a_statement_stuck_behind_a_lock_past_the_timeout_keeps_the_old_password(
        served: tuple[BrokerThread, TcpProxy, str, str], cluster: PrivateCluster,
        tmp_path: Path) -> None:
    """Another transaction holds the admin role's row: the ALTER waits, the call
    times out, its session is ended (the ALTER never commits) and the server,
    asked, still takes the old password: 503, and the mount goes on working."""
    broker, _proxy, admin, old = served

    async def rotate_behind_a_lock() -> requests.Response:
        blocker = await asyncpg.connect(cluster.dsn)
        try:
            async with blocker.transaction():
                await blocker.execute(f'ALTER ROLE "{admin}" CONNECTION LIMIT 50')
                return await asyncio.to_thread(_post, broker, "pg/rotate-root")
        finally:
            await blocker.close()

    started = time.monotonic()
    resp = asyncio.run(rotate_behind_a_lock())
    assert resp.status_code == 503, resp.text
    assert time.monotonic() - started >= BACKEND_TIMEOUT
    error = resp.json()["errors"][0]
    assert "did not answer within" in error and "the server kept the old password" in error
    _settled_on(broker, cluster, tmp_path, admin, old)
