"""Ops QA fixes against a real broker over HTTP: NUL in input is a 400 on both stores,
metrics scrape while the store is down, the lease listing pages, and an empty listing
is Vault's bare 404 (which only the CLI's "no leases" reads as empty).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from broker.lease import LeaseState
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    TcpProxy,
    dsn_port,
    start_broker,
    via_proxy,
    write_config,
)
from tests.integration.store_fixtures import (
    broker_store_url,
    fresh_postgres_database,
    make_lease,
    put_many_active,
)
from tests.integration.test_metrics_prometheus import CONFIG  # no-op mount, scraper policy

pytestmark = pytest.mark.integration

H = {"X-Vault-Token": ROOT_TOKEN}


def _start(tmp_path: Path, url: str) -> BrokerThread:
    from broker.bench.noop import register

    register()
    return start_broker(write_config(tmp_path, CONFIG, storage_url=url))


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerThread]:
    server = _start(tmp_path, broker_store_url(request, tmp_path))
    yield server
    server.stop()


# -- 1. NUL in any input: 400 naming the parameter, on both stores -------------------------

NUL_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("LIST", "sys/leases/lookup/qpg%00", {}, "prefix"),
    ("PUT", "sys/leases/revoke-prefix/qpg%00/", {}, "prefix"),
    ("PUT", "sys/leases/revoke-force/qpg%00/", {}, "prefix"),
    ("PUT", "sys/leases/lookup", {"json": {"lease_id": "a\x00b"}}, "lease_id"),
    ("PUT", "sys/leases/renew", {"json": {"lease_id": "a\x00b"}}, "lease_id"),
    ("PUT", "sys/leases/revoke", {"json": {"lease_id": "a\x00b"}}, "lease_id"),
    ("GET", "sys/leases/stats", {"params": {"prefix": "qpg\x00"}}, "prefix"),
    ("GET", "sys/leases/search", {"params": {"meta.run": "a\x00"}}, "meta.run"),
    ("GET", "sys/leases/search", {"params": {"after": "a\x00"}}, "after"),
    ("GET", "sys/leases/irrevocable", {"params": {"prefix": "qpg\x00"}}, "prefix"),
    ("PUT", "sys/leases/revoke-by", {"json": {"metadata": {"run": "a\x00"}}}, "metadata"),
    ("POST", "auth/token/lookup-accessor", {"json": {"accessor": "a\x00b"}}, "accessor"),
    ("POST", "auth/token/revoke-accessor", {"json": {"accessor": "a\x00b"}}, "accessor"),
    ("POST", "auth/token/create", {"json": {"display_name": "a\x00b"}}, "display_name"),
    ("POST", "auth/token/create", {"json": {"meta": {"k": "v\x00"}}}, "meta"),
    ("POST", "auth/token/create", {"json": {"policies": ["app\x00"]}}, "policies"),
    ("LIST", "auth/token/accessors", {"params": {"after": "a\x00"}}, "after"),
    ("POST", "sys/capabilities-accessor", {"json": {"accessor": "a\x00b", "paths": ["x"]}},
     "accessor"),
]


def test_nul_in_input_is_a_400_naming_the_parameter(any_store_broker: BrokerThread,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Every endpoint QA found answering 500 on PostgreSQL answers 400 on both stores, the
    message names the parameter, and no raw NUL reaches the server log."""
    caplog.set_level(logging.DEBUG)
    got = {}
    for method, path, kw, _ in NUL_CASES:
        resp = requests.request(method, f"{any_store_broker.url}/v1/{path}", headers=H,
                                timeout=30, **kw)
        got[(method, path, str(kw))] = (resp.status_code, resp.json()["errors"][0])
    want = {(m, p, str(kw)): (400, f"{name} holds a NUL character (\\u0000), which is "
                                   "not allowed") for m, p, kw, name in NUL_CASES}
    assert got == want
    assert not [r for r in caplog.records if "\x00" in r.getMessage()]
    # Nothing was made or changed: the store still works, with no token but root.
    root = hvac.Client(url=any_store_broker.url, token=ROOT_TOKEN)
    assert root.list("auth/token/accessors")["data"]["keys"] == ["test-root"]


def test_a_nul_is_refused_before_the_token_check(any_store_broker: BrokerThread) -> None:
    """A %00 in the URL is refused for any caller (like X-Vault-Wrap-TTL): nothing runs."""
    resp = requests.get(f"{any_store_broker.url}/v1/sys/leases/stats?prefix=%00", timeout=30)
    assert resp.status_code == 400
    # An escaped backslash before "u0000" is no NUL: a normal answer (here: no lease).
    resp = requests.put(f"{any_store_broker.url}/v1/sys/leases/lookup", headers=H, timeout=30,
                        data='{"lease_id": "a\\\\u0000b"}')
    assert resp.status_code in (400, 404) and "NUL" not in resp.text


# -- 2. metrics while the store is down --------------------------------------------------


@pytest.fixture
def proxied_pg_broker(request: pytest.FixtureRequest, tmp_path: Path
                      ) -> Iterator[tuple[BrokerThread, TcpProxy]]:
    dsn = asyncio.run(fresh_postgres_database(request))
    proxy = TcpProxy(dsn_port(dsn))
    server = _start(tmp_path, via_proxy(dsn, proxy.port))
    try:
        yield server, proxy
    finally:
        proxy.up()
        server.stop()
        proxy.close()


def _scrape(url: str, token: str | None, fmt: str = "prometheus") -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{url}/v1/sys/metrics", params={"format": fmt} if fmt else {},
                        headers=headers, timeout=30)


def _families(text: str) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_scrape_reports_the_store_down(
        proxied_pg_broker: tuple[BrokerThread, TcpProxy]) -> None:
    """With the store unreachable a scrape still reads broker_store_healthy 0 (200), and
    only the health gauges sys/health shows anyone; back up, everything returns."""
    broker, proxy = proxied_pg_broker
    root = hvac.Client(url=broker.url, token=ROOT_TOKEN)
    scraper = root.auth.token.create(policies=["scraper"])["auth"]["client_token"]
    up = _scrape(broker.url, scraper)
    assert up.status_code == 200 and "broker_leases" in _families(up.text)

    proxy.down()
    for token in (scraper, "not-a-token"):  # neither can be checked: the same answer
        resp = _scrape(broker.url, token)
        assert resp.status_code == 200, resp.text
        families = _families(resp.text)
        assert set(families) == {"broker_store_healthy", "broker_audit_healthy",
                                 "broker_mount_healthy"}
        assert families["broker_store_healthy"][0].value == 0
    assert _scrape(broker.url, None).status_code == 403  # no token at all: as always
    assert _scrape(broker.url, scraper, fmt="").status_code == 503  # JSON: as every call

    proxy.up()
    deadline = time.monotonic() + 30
    while True:
        resp = _scrape(broker.url, scraper)
        families = _families(resp.text) if resp.status_code == 200 else {}
        if "broker_leases" in families or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "broker_sweeper_busy" in families and "broker_leases" in families


# -- 3. and 4. the lease listing pages; an empty one is Vault's bare 404 ------------------


def test_listing_pages_with_after_and_warns_at_the_limit(any_store_broker: BrokerThread) -> None:
    """limit=2 over 5 leases: a warning naming after=LAST on each full page, every lease
    exactly once; a folder key pages past the whole folder; the end is 404 {"errors": []}."""
    root = hvac.Client(url=any_store_broker.url, token=ROOT_TOKEN)
    ids = sorted(root.read("noop/creds/a")["lease_id"] for _ in range(5))
    url = f"{any_store_broker.url}/v1/sys/leases/lookup/noop/creds/a/"
    seen: list[str] = []
    after = ""
    while True:
        resp = requests.request("LIST", url, params={"limit": "2", "after": after or None},
                                headers=H, timeout=30)
        if resp.status_code == 404:
            assert resp.json() == {"errors": []}
            break
        body = resp.json()
        keys = body["data"]["keys"]
        seen += keys
        if len(keys) == 2:
            assert body["warnings"] == [f"listing stopped at limit=2; there may be more: "
                                        f"repeat with after={keys[-1]}"]
        else:
            assert body["warnings"] is None
            break
        after = keys[-1]
    assert ["noop/creds/a/" + k for k in seen] == ids
    top = requests.request("LIST", f"{any_store_broker.url}/v1/sys/leases/lookup/noop/",
                           params={"limit": "1"}, headers=H, timeout=30).json()
    assert top["data"]["keys"] == ["creds/"] and top["warnings"]
    past = requests.request("LIST", f"{any_store_broker.url}/v1/sys/leases/lookup/noop/",
                            params={"after": "creds/"}, headers=H, timeout=30)
    assert (past.status_code, past.json()) == (404, {"errors": []})


def test_empty_listing_is_vaults_bare_404(any_store_broker: BrokerThread) -> None:
    """An empty listing answers {"errors": []} (hvac: InvalidPath, as with Vault); an
    unknown path still says "unsupported path"."""
    resp = requests.request("LIST", f"{any_store_broker.url}/v1/sys/leases/lookup/nothing/",
                            headers=H, timeout=30)
    assert (resp.status_code, resp.json()) == (404, {"errors": []})
    root = hvac.Client(url=any_store_broker.url, token=ROOT_TOKEN)
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.sys.list_leases("nothing/")
    wrong = requests.get(f"{any_store_broker.url}/v1/v1/sys/leases/lookup/x/?list=true",
                         headers=H, timeout=30)
    assert (wrong.status_code, wrong.json()) == (404, {"errors": ["unsupported path"]})


def _cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BROKER_ADDR": address, "BROKER_TOKEN": ROOT_TOKEN}
    return subprocess.run([sys.executable, "-m", "broker.cli", "lease", "list", *args],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def sqlite_broker(tmp_path: Path) -> Iterator[BrokerThread]:
    server = _start(tmp_path, f"sqlite:///{tmp_path / 'broker.db'}")
    yield server
    server.stop()


def test_cli_lists_past_the_server_limit(sqlite_broker: BrokerThread) -> None:
    """`broker lease list` prints all 10,050 leases of a role, not the first 10,000."""
    leases = [make_lease(f"noop/creds/a/{n:06d}", issue_time=time.time())
              for n in range(10_050)]
    assert sqlite_broker.state is not None
    sqlite_broker.call(put_many_active(sqlite_broker.state.store, leases), timeout=300)
    assert sqlite_broker.call(sqlite_broker.state.store.count_by_state())[
        LeaseState.ACTIVE.value] == 10_050
    done = _cli(sqlite_broker.url, "noop/creds/a/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{n:06d}" for n in range(10_050)]
    done = _cli(sqlite_broker.url, "noop/", "-r")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 10_050


def test_cli_tells_an_empty_listing_from_a_wrong_address(sqlite_broker: BrokerThread) -> None:
    """Only Vault's empty-listing 404 is "no leases"; a wrong path prefix is an error."""
    done = _cli(sqlite_broker.url, "noop/creds/nothing/")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    done = _cli(sqlite_broker.url + "/v1", "noop/", "-r")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "broker: error: unsupported path (HTTP 404)\n"
