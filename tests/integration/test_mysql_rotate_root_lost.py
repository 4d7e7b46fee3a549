"""rotate-root on mysql when the connection is lost while ``ALTER USER`` is out.

As for postgres (test_postgres_rotate_root_lost.py): before, the broker kept
the old password whatever the server had done, and when the server had run
the ``ALTER`` the mount was locked out at its next new connection. Now it
asks the server which password logs in (plugins/_rotation.py). MariaDB
enforces passwords on the local server; a proxy between the broker and it
cuts the connection carrying the ``ALTER USER``, after the statement reached
the server or before, or swallows the server's answer so that the call times
out (``backend_timeout``) with the outcome unknown until the server is asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.integration.broker_harness import BrokerThread, TcpProxy, start_broker, write_config
from tests.integration.test_rotate_root_persist import _logs_in, _mount, admin

pytestmark = pytest.mark.integration

__all__ = ["admin"]  # the fixture, imported for its use here

#: the mount's timeout: a rotate-root whose answer does not come is asked about after it.
BACKEND_TIMEOUT = 3


@pytest.fixture
def served(tmp_path: Path, mysql_dsn: str, admin: tuple[str, str]
           ) -> Iterator[tuple[BrokerThread, TcpProxy]]:
    """A broker whose mysql mount reaches MariaDB through a proxy, as the test's own admin."""
    user, password = admin
    (tmp_path / "admin.pw").write_text(password + "\n")
    url = urlsplit(mysql_dsn)
    proxy = TcpProxy(url.port or 3306)
    proxied = mysql_dsn.replace(f":{url.port or 3306}", f":{proxy.port}", 1)
    broker = start_broker(write_config(
        tmp_path, f'[leases]\nbackend_timeout = "{BACKEND_TIMEOUT}s"\n'
        + _mount(proxied, user, 'password_file = "admin.pw"')))
    try:
        yield broker, proxy
    finally:
        requests.put(f"{broker.url}/v1/sys/leases/revoke-prefix/my/", json={"sync": True},
                     headers={"X-Vault-Token": broker.root_token}, timeout=60)
        broker.stop()
        proxy.close()


def _call(broker: BrokerThread, method: str, path: str) -> requests.Response:
    return requests.request(method, f"{broker.url}/v1/{path}", timeout=60,
                            headers={"X-Vault-Token": broker.root_token})


def _healthy_after_a_fresh_login(broker: BrokerThread) -> None:
    assert _call(broker, "GET", "my/creds/app").status_code == 200
    assert broker.state is not None
    broker.call(broker.state.engine.check_mounts())
    assert broker.state.engine.mount("my").healthy


def _rotated_through(broker: BrokerThread, proxy: TcpProxy, mode: str) -> str:
    """rotate-root with the proxy set to ``mode`` on the ALTER; it succeeds: the new password."""
    proxy.cut_on = (b"ALTER USER", mode)
    resp = _call(broker, "POST", "my/rotate-root")
    assert resp.status_code == 200, resp.text
    assert proxy.cut_on is None  # the proxy met the statement
    return str(resp.json()["data"]["new_password"])


def _adopted(broker: BrokerThread, mysql_dsn: str, user: str, tmp_path: Path,
             new: str, old: str) -> None:
    """The server takes ``new`` and refuses ``old``; ``password_file`` and the mount follow."""
    assert _logs_in(mysql_dsn, user, new)
    assert not _logs_in(mysql_dsn, user, old)
    assert (tmp_path / "admin.pw").read_text() == f"{new}\n"
    _healthy_after_a_fresh_login(broker)


def test_a_lost_answer_after_the_server_took_the_new_password_adopts_it(
        served: tuple[BrokerThread, TcpProxy], admin: tuple[str, str], mysql_dsn: str,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker, proxy = served
    user, old = admin
    new = _rotated_through(broker, proxy, "after")
    assert "ALTER USER got no answer (" in caplog.text
    assert "but the server took the new password" in caplog.text
    assert new not in caplog.text and old not in caplog.text
    _adopted(broker, mysql_dsn, user, tmp_path, new, old)


def test_a_cut_before_the_server_saw_the_statement_keeps_the_old_password(
        served: tuple[BrokerThread, TcpProxy], admin: tuple[str, str], mysql_dsn: str,
        tmp_path: Path) -> None:
    broker, proxy = served
    user, old = admin
    proxy.cut_on = (b"ALTER USER", "before")
    resp = _call(broker, "POST", "my/rotate-root")
    assert resp.status_code == 503, resp.text
    assert "the server kept the old password" in resp.json()["errors"][0]
    assert proxy.cut_on is None
    assert _logs_in(mysql_dsn, user, old)
    assert (tmp_path / "admin.pw").read_text() == f"{old}\n"
    _healthy_after_a_fresh_login(broker)




def test_an_answer_that_never_comes_after_the_server_took_the_new_password_adopts_it(
        served: tuple[BrokerThread, TcpProxy], admin: tuple[str, str], mysql_dsn: str,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ALTER is applied, its answer is lost in a stalled network, the call times
    out. Before, the broker then kept the old password: locked out."""
    broker, proxy = served
    user, old = admin
    new = _rotated_through(broker, proxy, "hold")
    assert proxy.held  # the answer was swallowed
    assert ("ALTER USER got no answer (rotating the admin password: the server did not"
            f" answer within {BACKEND_TIMEOUT}s), but the server took the new password"
            ) in caplog.text
    _adopted(broker, mysql_dsn, user, tmp_path, new, old)
