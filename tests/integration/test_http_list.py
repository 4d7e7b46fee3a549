"""Vault's LIST verb on a real broker: C parser for normal requests, Python parser from a LIST on.

Raw sockets, so the bytes on the wire (and how they are cut into TCP reads)
are the test's choice: keep-alive, pipelined in one write, a LIST cut mid-verb,
a body that contains a line starting with "LIST ".
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import hvac
import pytest

from broker.bench.noop import register as register_noop_plugin
from tests.conftest import server_missing
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, start_broker, write_config

MOUNT = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "24h"
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    tmp = tmp_path_factory.mktemp("http-list")
    register_noop_plugin()
    b = start_broker(write_config(tmp, MOUNT))
    try:
        client = hvac.Client(url=b.url, token=ROOT_TOKEN)
        client.write("noop/creds/r")  # one lease, so LIST has a key to answer
        yield b
    finally:
        b.stop()


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Vault-Token: {ROOT_TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def _read_response(f: BinaryIO) -> tuple[int, bytes]:
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1."), status_line
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline().strip(), 16):
            body += f.read(size)
            f.readline()
        f.readline()
    else:
        body = f.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), body


def _connect(broker: BrokerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", broker.config.server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


LIST_PATH = "/v1/sys/leases/lookup/noop/creds/"


def _is_list_answer(status: int, body: bytes) -> bool:
    # The handler's answer; a parse failure would be a 400, a GET without ?list a 405.
    return status == 200 and json.loads(body)["data"]["keys"] == ["r/"]


def test_get_list_get_on_one_keepalive_connection(broker: BrokerThread) -> None:
    with _connect(broker) as sock, sock.makefile("rb") as f:
        for method, path in [("GET", "/v1/sys/health"), ("LIST", LIST_PATH),
                             ("GET", "/v1/sys/health"), ("LIST", LIST_PATH)]:
            sock.sendall(_request(method, path))
            status, body = _read_response(f)
            if method == "GET":
                assert status == 200 and json.loads(body)["initialized"] is True
            else:
                assert _is_list_answer(status, body), (status, body)


def test_pipelined_get_list_get_in_one_write(broker: BrokerThread) -> None:
    wire = (_request("GET", "/v1/sys/health") + _request("LIST", LIST_PATH)
            + _request("GET", "/v1/sys/health") + _request("LIST", LIST_PATH)
            + _request("GET", "/v1/sys/health"))
    with _connect(broker) as sock, sock.makefile("rb") as f:
        sock.sendall(wire)
        answers = [_read_response(f) for _ in range(5)]
    assert [s for s, _ in answers[::2]] == [200, 200, 200]
    assert all(_is_list_answer(s, b) for s, b in answers[1::2]), answers


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 9])
def test_list_cut_across_reads(broker: BrokerThread, cut: int) -> None:
    """A LIST whose first bytes arrive in an earlier read than the rest."""
    first = _request("GET", "/v1/sys/health")
    second = _request("LIST", LIST_PATH)
    with _connect(broker) as sock, sock.makefile("rb") as f:
        sock.sendall(first + second[:cut])
        time.sleep(0.05)  # two separate reads on the server
        sock.sendall(second[cut:])
        assert _read_response(f)[0] == 200
        status, body = _read_response(f)
        assert _is_list_answer(status, body), (status, body)


def test_list_right_after_a_body_without_crlf(broker: BrokerThread) -> None:
    """A request follows a body directly (no CRLF between): a LIST there is found too."""
    body = b'{"lease_id": "nope"}'
    with _connect(broker) as sock, sock.makefile("rb") as f:
        sock.sendall(_request("PUT", "/v1/sys/leases/lookup", body) + _request("LIST", LIST_PATH))
        assert _read_response(f)[0] in (400, 404)
        status, answer = _read_response(f)
        assert _is_list_answer(status, answer), (status, answer)


def test_list_line_inside_a_body_is_body(broker: BrokerThread) -> None:
    """A body line that starts with "LIST " is body bytes, not a request: framing holds."""
    body = b'{"lease_id": "x"}\r\nLIST /v1/sys/health HTTP/1.1\r\n'
    wire = _request("PUT", "/v1/sys/leases/lookup", body) + _request("GET", "/v1/sys/health")
    with _connect(broker) as sock, sock.makefile("rb") as f:
        sock.sendall(wire)
        first, _ = _read_response(f)
        second, health = _read_response(f)
    assert first == 400  # not JSON: the whole body reached the handler
    assert second == 200 and json.loads(health)["initialized"] is True


@pytest.mark.parametrize("verb", ["LISTX", "GLIST", "XLIST", "LIS"])
def test_other_unknown_methods_still_400(broker: BrokerThread, verb: str) -> None:
    """Only LIST itself moves a connection to the Python parser; a verb around it is a 400."""
    with _connect(broker) as sock, sock.makefile("rb") as f:
        sock.sendall(_request("GET", "/v1/sys/health"))
        assert _read_response(f)[0] == 200
        sock.sendall(_request(verb, LIST_PATH))
        status, answer = _read_response(f)
    assert status == 400  # llhttp's answer to a verb outside its table
    assert json.loads(answer) == {"errors": ["malformed HTTP request: unknown method"]}


def test_a_request_the_parser_refuses_gets_a_json_error(broker: BrokerThread,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """An over-long header never reaches a handler, yet its 400 is {"errors": [...]} too;
    the header's bytes (a token, say) are neither in the answer nor in the log."""
    caplog.set_level(logging.INFO, logger="broker.api")
    secret = "s3cr3t-" * 2000
    head = (f"GET /v1/sys/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"X-Vault-Token: {secret}\r\n\r\n").encode()
    with _connect(broker) as sock, sock.makefile("rb") as f:
        sock.sendall(head)
        status, answer = _read_response(f)
    assert status == 400
    assert json.loads(answer) == {
        "errors": ["malformed HTTP request: request line or header too long"]}
    assert b"s3cr3t" not in answer
    assert "malformed HTTP request" in caplog.text and "s3cr3t" not in caplog.text


def test_list_pipelined_behind_a_full_request_queue(broker: BrokerThread) -> None:
    """40 GETs, a LIST, a GET in one write: the LIST waits until the queue drains (limit 32)."""
    wire = _request("GET", "/v1/sys/health") * 40 + _request("LIST", LIST_PATH)
    wire += _request("GET", "/v1/sys/health")
    with _connect(broker) as sock, sock.makefile("rb") as f:
        sock.sendall(wire)
        answers = [_read_response(f) for _ in range(42)]
    assert [s for s, _ in answers[:40]] == [200] * 40
    assert _is_list_answer(*answers[40]), answers[40]
    assert answers[41][0] == 200


def test_hvac_list_after_get_on_one_session(broker: BrokerThread) -> None:
    client = hvac.Client(url=broker.url, token=ROOT_TOKEN)
    assert client.sys.read_health_status(method="GET")["initialized"] is True
    assert client.sys.list_leases("noop/creds/")["data"]["keys"] == ["r/"]
    listed = client.adapter.request("LIST", "/v1/sys/leases/lookup/noop/creds/")
    assert listed["data"]["keys"] == ["r/"]
    assert client.sys.read_health_status(method="GET")["initialized"] is True


def test_parser_module_is_wired(tmp_path: Path) -> None:
    """The broker's API module installs the LIST-aware parser for aiohttp's server."""
    from aiohttp import web_protocol

    from broker.api.httpparser import ListAwareRequestParser

    assert web_protocol.HttpRequestParser is ListAwareRequestParser  # type: ignore[attr-defined,comparison-overlap]


def test_curl_get_list_get_reusing_one_connection(broker: BrokerThread) -> None:
    if shutil.which("curl") is None:
        server_missing("curl")  # fails under CI, skips elsewhere
    health, listing = f"{broker.url}/v1/sys/health", f"{broker.url}{LIST_PATH}"
    token = f"X-Vault-Token: {ROOT_TOKEN}"
    out = subprocess.run(
        ["curl", "-sS", "-w", "\\n%{http_code} %{num_connects}\\n", health,
         "--next", "-X", "LIST", "-H", token, "-w", "\\n%{http_code} %{num_connects}\\n", listing,
         "--next", "-w", "\\n%{http_code} %{num_connects}\\n", health],
        capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    bodies, codes = out[0::2], out[1::2]
    assert codes == ["200 1", "200 0", "200 0"]  # one connection, reused twice
    assert json.loads(bodies[1])["data"]["keys"] == ["r/"]
