"""QA round 4 on the HTTP API and the CLI, against a real broker on a real port.

- ``GET /v1/sys/health`` takes Vault's status-code parameters (``activecode``,
  ``sealedcode``, ...; a bad value is a 400), and shows why a mount, the audit log
  or the store fails in full only to a token that may read ``sys/metrics``;
- every answer carries ``Cache-Control: no-store``, as Vault's do;
- ``PUT sys/leases/revoke`` with ``sync=false`` answers 202 saying the revocation
  was queued, not that anything failed;
- ``broker lease renew --increment -5m`` says what is wrong in one line, and
  ``broker lease list`` of a mount the broker does not have is an error (exit 2).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import requests

from broker.cli import main
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    free_port,
    start_broker,
    write_config,
)

pytestmark = pytest.mark.integration

#: a PostgreSQL mount on a port nothing listens on: unhealthy from the start, and its
#: error names 127.0.0.1 and that port.
DOWN_PORT = free_port()
CONFIG = f"""
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "2h"

[mounts.down]
plugin = "postgres"
connection_url = "postgresql://postgres@127.0.0.1:{DOWN_PORT}/postgres"
connect_timeout = 2

[mounts.down.roles.app]
username_template = "qa4-{{{{random 10}}}}"
creation_statements = ["CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}'"]
default_ttl = "1h"
max_ttl = "2h"

[policies.metrics]
"sys/metrics" = ["read"]
"""
WITHHELD = "unavailable; a token that may read sys/metrics sees why"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    from broker.bench.noop import register

    register()
    server = start_broker(write_config(tmp_path_factory.mktemp("qa4"), CONFIG))
    try:
        yield server
    finally:
        server.stop()


def _root(broker: BrokerThread) -> hvac.Client:
    return hvac.Client(url=broker.url, token=ROOT_TOKEN)


def _health(broker: BrokerThread, query: str = "", *, token: str | None = None,
            method: str = "GET") -> requests.Response:
    headers = {"X-Vault-Token": token} if token else {}
    return requests.request(method, f"{broker.url}/v1/sys/health{query}", headers=headers,
                            timeout=30)


# -- 1. sys/health: Vault's parameters ---------------------------------------------------


def test_health_answers_the_status_vaults_parameters_choose(broker: BrokerThread) -> None:
    """A serving broker answers ``activecode`` (default 200), for GET and HEAD; the
    parameters of states it is never in are checked but change nothing; hvac's own
    parameters work."""
    assert _health(broker).status_code == 200
    chosen = _health(broker, "?activecode=299&sealedcode=503")
    assert chosen.status_code == 299, chosen.text
    assert chosen.json()["initialized"] is True and chosen.json()["sealed"] is False
    head = _health(broker, "?activecode=202", method="HEAD")
    assert (head.status_code, head.content) == (202, b"")
    # A bodiless status goes out without a body.
    empty = _health(broker, "?activecode=204")
    assert (empty.status_code, empty.content) == (204, b"")
    never = _health(broker, "?standbyok=true&perfstandbyok=1&standbycode=299&uninitcode=299"
                            "&drsecondarycode=299&performancestandbycode=299&sealedcode=299")
    assert never.status_code == 200, never.text
    client = _root(broker)
    answer = client.sys.read_health_status(method="GET", standby_ok=True, active_code=200,
                                           sealed_code=503)
    assert answer["initialized"] is True


@pytest.mark.parametrize("query, name", [
    ("activecode=abc", "activecode"),
    ("activecode=99", "activecode"),
    ("sealedcode=1000", "sealedcode"),
    ("activecode=503", "activecode"),
    ("standbycode=", "standbycode"),
    ("uninitcode=5x", "uninitcode"),
    ("drsecondarycode=4.5", "drsecondarycode"),
    ("performancestandbycode=%C2%B2", "performancestandbycode"),
    ("standbyok=yes", "standbyok"),
    ("perfstandbyok=2", "perfstandbyok"),
])
def test_health_refuses_a_bad_parameter_value(broker: BrokerThread, query: str,
                                              name: str) -> None:
    """As Vault, a value that is not a status code (or a boolean) is a 400; ours names it."""
    resp = _health(broker, "?" + query)
    assert resp.status_code == 400, resp.text
    [error] = resp.json()["errors"]
    assert error.startswith(f"bad value for {name} parameter"), error


def test_health_answers_sealedcode_while_the_store_cannot_write(tmp_path: Path) -> None:
    """The SQLite store's writes stall (another process holds its write lock): health
    answers ``sealedcode`` (503 by default) and the store's plain reason to anyone."""
    from broker.bench.noop import register

    register()
    db = tmp_path / "broker.db"
    server = start_broker(write_config(tmp_path, CONFIG,
                                       storage_url=f"sqlite:///{db}?command_timeout=2"))
    lock = os.open(f"{db}-writer.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        refused = requests.get(f"{server.url}/v1/noop/creds/r",
                               headers={"X-Vault-Token": ROOT_TOKEN}, timeout=30)
        assert refused.status_code == 503, refused.text
        assert _health(server).status_code == 503
        chosen = _health(server, "?sealedcode=429&activecode=200")
        assert chosen.status_code == 429, chosen.text
        assert chosen.json()["storage"] == {"healthy": False, "error": "no commit within 2s"}
        fcntl.flock(lock, fcntl.LOCK_UN)
        deadline = time.monotonic() + 30
        while _health(server, "?activecode=299").status_code != 299:
            assert time.monotonic() < deadline, "health did not recover"
            time.sleep(0.3)
    finally:
        os.close(lock)
        server.stop()


# -- 1b. sys/health: no backend detail without a token that may read sys/metrics -----------


def test_health_withholds_backend_detail_without_a_metrics_token(broker: BrokerThread) -> None:
    """The down mount's error names its host and port. Anyone (no token, a bad one, a
    token without read on sys/metrics) is told it is unavailable, not why; root and a
    token with read on sys/metrics get the error in full."""
    port = str(DOWN_PORT)
    root = _root(broker)
    default = root.auth.token.create(policies=["default"])["auth"]["client_token"]
    metrics = root.auth.token.create(policies=["metrics"])["auth"]["client_token"]
    for token in (None, "not-a-token", default):
        resp = _health(broker, token=token)
        assert resp.status_code == 200, resp.text
        down = resp.json()["mounts"]["down"]
        assert down == {"plugin": "postgres", "healthy": False, "error": WITHHELD}, down
        assert resp.json()["mounts"]["noop"]["error"] is None
        assert port not in resp.text
    for token in (ROOT_TOKEN, metrics):
        resp = _health(broker, token=token)
        down = resp.json()["mounts"]["down"]
        assert down["healthy"] is False and port in down["error"], down
    # hvac sends its token with every call, health too.
    assert port in root.sys.read_health_status(method="GET")["mounts"]["down"]["error"]


# -- 2. Cache-Control: no-store on every answer --------------------------------------------


def test_every_answer_says_no_store(broker: BrokerThread) -> None:
    """A credential, a new token, an error, health: none may be kept by a cache."""
    headers = {"X-Vault-Token": ROOT_TOKEN}
    issued = requests.get(f"{broker.url}/v1/noop/creds/r", headers=headers, timeout=30)
    assert issued.status_code == 200, issued.text
    assert issued.headers["Cache-Control"] == "no-store"
    created = requests.post(f"{broker.url}/v1/auth/token/create", headers=headers,
                            json={"policies": ["default"]}, timeout=30)
    assert created.status_code == 200, created.text
    assert created.headers["Cache-Control"] == "no-store"
    for resp in (
        requests.get(f"{broker.url}/v1/sys/health", timeout=30),
        requests.get(f"{broker.url}/v1/noop/creds/r", timeout=30),  # 403
        requests.get(f"{broker.url}/v1/no/such/path", headers=headers, timeout=30),  # 404
        requests.put(f"{broker.url}/v1/sys/leases/revoke", headers=headers,
                     json={"lease_id": issued.json()["lease_id"]}, timeout=30),  # 204
    ):
        assert resp.headers.get("Cache-Control") == "no-store", (resp.status_code, resp.text)


def test_a_malformed_request_is_answered_no_store_too(broker: BrokerThread) -> None:
    """The answer aiohttp's parser gives (not a handler's) carries it as well."""
    port = broker.config.server.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nX-Long: "
                     + b"a" * 20000 + b"\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    assert head.split(" ", 2)[1] == "400", head
    assert "cache-control: no-store" in head, head


# -- 3. revoke with sync=false ---------------------------------------------------------------


def test_revoke_sync_false_says_queued_not_failed(broker: BrokerThread) -> None:
    """sync=false: 202 (as Vault) whose warning says the revocation was queued and goes on
    in the background; the lease then ends. sync=true (hvac's default): 204."""
    client = _root(broker)
    lease_id = client.read("noop/creds/r")["lease_id"]
    resp = requests.put(f"{broker.url}/v1/sys/leases/revoke",
                        headers={"X-Vault-Token": ROOT_TOKEN},
                        json={"lease_id": lease_id, "sync": False}, timeout=30)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["data"] == {"queued": 1}
    [warning] = body["warnings"]
    assert warning.startswith(f"revocation of {lease_id} queued (sync=false)"), warning
    assert "fail" not in warning and "still in progress" not in warning, warning
    deadline = time.monotonic() + 30
    while True:
        looked = requests.put(f"{broker.url}/v1/sys/leases/lookup",
                              headers={"X-Vault-Token": ROOT_TOKEN},
                              json={"lease_id": lease_id}, timeout=30)
        if looked.status_code == 400 and "revoked" in looked.text:
            break
        assert time.monotonic() < deadline, looked.text
        time.sleep(0.2)
    other = client.read("noop/creds/r")["lease_id"]
    done = client.adapter.put("/v1/sys/leases/revoke", json={"lease_id": other})
    assert done.status_code == 204


# -- 4. the CLI ------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
         broker: BrokerThread, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("BROKER_ADDR", broker.url)
    monkeypatch.setenv("BROKER_TOKEN", ROOT_TOKEN)
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, option", [
    (["lease", "renew", "noop/creds/r/x", "--increment", "-5m"], "--increment"),
    (["lease", "renew", "noop/creds/r/x", "--increment=-5m"], "--increment"),
    (["lease", "renew", "noop/creds/r/x", "--increment", "-1.5h"], "--increment"),
    (["creds", "noop/r", "--ttl", "-10m"], "--ttl"),
    (["token", "create", "--ttl", "-1h"], "--ttl"),
])
def test_a_negative_duration_is_one_clear_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        broker: BrokerThread, args: list[str], option: str) -> None:
    """`--increment -5m`: argparse took "-5m" for an option ("expected one argument")."""
    code, out, err = _cli(capsys, monkeypatch, broker, *args)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert err.startswith(f"broker: error: argument {option}: duration must not be negative"), err


def test_a_negative_increment_never_reaches_the_server(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        broker: BrokerThread) -> None:
    """A real lease: `--increment -5m` is refused before any call; `--increment 5m` renews."""
    lease = _root(broker).read("noop/creds/r")
    code, _, err = _cli(capsys, monkeypatch, broker, "lease", "renew", lease["lease_id"],
                        "--increment", "-5m")
    assert code == 2 and "must not be negative" in err, err
    code, out, err = _cli(capsys, monkeypatch, broker, "lease", "renew", lease["lease_id"],
                          "--increment", "5m", "--format", "json")
    assert code == 0, err
    assert '"lease_duration": 300' in out or '"lease_duration": 299' in out, out
    _root(broker).sys.revoke_lease(lease["lease_id"])


def test_lease_list_of_an_unknown_mount_is_an_error(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        broker: BrokerThread) -> None:
    """As `vault list sys/leases/lookup/nomount/` ("No value found", exit 2): one line,
    exit 2. A mount the broker has, with nothing under the prefix, lists nothing, exit 0."""
    for args in (["nomount/"], ["nomount"], ["nomount/creds/", "-r"]):
        code, out, err = _cli(capsys, monkeypatch, broker, "lease", "list", *args)
        assert (code, out) == (2, ""), (args, err)
        assert err.count("\n") == 1, err
        assert "no mount named 'nomount'" in err, err
    code, out, err = _cli(capsys, monkeypatch, broker, "lease", "list", "noop/creds/none/")
    assert (code, out, err) == (0, "", "")
    code, out, err = _cli(capsys, monkeypatch, broker, "lease", "list", "down/", "-r")
    assert (code, out, err) == (0, "", "")

