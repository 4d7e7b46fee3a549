"""Start-up and reload against a backend that hangs (accepts TCP, never answers).

Both waited ``backend_timeout`` for such a mount (30 s by default, per reload):
now they wait at most ``mounts.CONNECT_WAIT`` (5 s), all mounts at once; the
mount serves 503 with the reason meanwhile, and its connection attempt goes on
in the background until it gives up or the backend answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from broker.mounts import CONNECT_WAIT
from broker.server import reload
from tests.integration import ops_fixtures
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    TcpProxy,
    dsn_port,
    start_broker,
    via_proxy,
    write_config,
)
from tests.integration.ops_fixtures import (
    mount_health,
    mounts_health,
    pg_mount,
    pg_role_prefix,
    wait_for,
)

pytestmark = pytest.mark.integration

BACKEND_TIMEOUT = 10

LEASES = f"""
[leases]
backend_timeout = "{BACKEND_TIMEOUT}s"
"""


@pytest.fixture
def template(postgres_dsn: str) -> Iterator[str]:
    """A username prefix for this test's roles; whatever is left of them is dropped."""
    with pg_role_prefix(postgres_dsn, "v-st") as name:
        yield name


blackhole = ops_fixtures.blackhole
quick_probe = ops_fixtures.quick_probe


def test_start_up_does_not_wait_for_a_hung_backend(
        tmp_path: Path, postgres_dsn: str, blackhole: int, template: str,
        quick_probe: None) -> None:
    """A broker with a mount on a hung backend (backend_timeout 10 s) serves within
    CONNECT_WAIT + 2 s (it took 10 s): the healthy mount issues, the hung one answers 503
    at once with the reason, and once its backend answers it issues too."""
    proxy = TcpProxy(blackhole)
    config = write_config(tmp_path, LEASES + pg_mount("pg", postgres_dsn, f"{template}p")
                          + pg_mount("hung", via_proxy(postgres_dsn, proxy.port), f"{template}h"))
    started = time.monotonic()
    server = start_broker(config)
    took = time.monotonic() - started
    try:
        assert took < CONNECT_WAIT + 2.0 < BACKEND_TIMEOUT, took
        mounts = mounts_health(server)
        assert mounts["pg"]["healthy"] is True, mounts
        assert mounts["hung"]["healthy"] is False, mounts
        assert (f"connecting: no answer within {CONNECT_WAIT:g}s at start-up"
                in mounts["hung"]["error"]), mounts
        client = hvac.Client(url=server.url, token=ROOT_TOKEN, timeout=30)
        client.read("pg/creds/app")
        asked = time.monotonic()
        with pytest.raises(hvac.exceptions.VaultDown, match="mount 'hung' is unavailable"):
            client.read("hung/creds/app")
        assert time.monotonic() - asked < 1.5
        # The attempt goes on: it gives up at backend_timeout, with its own reason.
        wait_for("the start-up attempt timed out",
                 lambda: f"timed out after {BACKEND_TIMEOUT}s"
                 in str(mount_health(server, "hung")["error"]),
                 BACKEND_TIMEOUT + 3)
        proxy.down()
        proxy.target_port = dsn_port(postgres_dsn)
        proxy.up()
        wait_for("hung healthy", lambda: mount_health(server, "hung")["healthy"],
                 BACKEND_TIMEOUT + 5)
        assert client.read("hung/creds/app")["lease_id"].startswith("hung/creds/app/")
    finally:
        server.stop()
        proxy.close()


def test_a_reload_does_not_wait_for_hung_backends(
        tmp_path: Path, postgres_dsn: str, blackhole: int, template: str) -> None:
    """A reload that adds two mounts on hung backends returns within CONNECT_WAIT + 2 s
    (it took backend_timeout); both are unhealthy with the reason, the running mount
    serves on."""
    base = LEASES + pg_mount("pg", postgres_dsn, f"{template}p")
    config = write_config(tmp_path, base)
    server = start_broker(config)
    try:
        assert server.state is not None
        hung = f"postgresql://admin@127.0.0.1:{blackhole}/app"
        config.write_text(config.read_text() + pg_mount("h1", hung, f"{template}a")
                          + pg_mount("h2", hung, f"{template}b"))
        started = time.monotonic()
        assert server.call(reload(server.state)) is True
        took = time.monotonic() - started
        assert took < CONNECT_WAIT + 2.0 < BACKEND_TIMEOUT, took
        mounts = mounts_health(server)
        for name in ("h1", "h2"):
            assert mounts[name]["healthy"] is False, mounts
            assert f"connecting: no answer within {CONNECT_WAIT:g}s at reload" in mounts[name]["error"], mounts
        client = hvac.Client(url=server.url, token=ROOT_TOKEN, timeout=30)
        assert client.read("pg/creds/app")["lease_id"].startswith("pg/creds/app/")
    finally:
        server.stop()


def test_a_reload_does_not_wait_for_a_password_file_being_verified(
        tmp_path: Path, postgres_dsn: str, blackhole: int, template: str) -> None:
    """The password-file job verifies a changed file's secret against a backend that
    now hangs (up to backend_timeout); a reload meanwhile does not wait for it (it
    waited for the mounts lock the job held throughout, then connected too)."""
    proxy = TcpProxy(dsn_port(postgres_dsn))
    (tmp_path / "admin.pw").write_text("first\n")
    body = LEASES + pg_mount("pg", via_proxy(postgres_dsn, proxy.port), f"{template}p").replace(
        'plugin = "postgres"', 'plugin = "postgres"\npassword_file = "admin.pw"', 1)
    config = write_config(tmp_path, body)
    server = start_broker(config)
    try:
        assert server.state is not None
        assert mount_health(server, "pg")["healthy"] is True
        proxy.down()
        proxy.target_port = blackhole
        proxy.up()
        (tmp_path / "admin.pw").write_text("second\n")  # the job verifies it: it hangs
        time.sleep(1.5)
        config.write_text(config.read_text() + '\n[policies.extra]\n"x/y" = ["read"]\n')
        started = time.monotonic()
        assert server.call(reload(server.state)) is True
        took = time.monotonic() - started
        # The reload connects the mount with the new secret itself: CONNECT_WAIT at most.
        assert took < CONNECT_WAIT + 2.5 < BACKEND_TIMEOUT, took
    finally:
        server.stop()
        proxy.close()
