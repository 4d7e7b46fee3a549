"""A client that closes its connection before its request body has arrived.

The broker cannot answer it, and nothing about it is the broker's fault: it is
logged on one INFO line, not as an ERROR ``internal error on POST ...`` with a
traceback (QA saw one for every client cut off while the broker shut down).
Real broker over real HTTP (a raw socket, so the body can be cut short).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.broker_harness import BrokerThread, start_broker, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    server = start_broker(write_config(tmp_path, ""))
    try:
        yield server
    finally:
        server.stop()


def test_a_body_cut_short_by_the_client_is_not_an_internal_error(
        broker: BrokerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    host, port = broker.url.removeprefix("http://").split(":")
    for path in ("/v1/auth/token/create", "/v1/auth/jwt/login"):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Vault-Token: {broker.root_token}"
                     "\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     '{"ttl": '.encode())
        time.sleep(0.3)  # the handler is waiting for the rest of the body
        sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(
            "closed the connection" in r.getMessage() for r in caplog.records) < 2:
        time.sleep(0.1)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    infos = [r.getMessage() for r in caplog.records if "closed the connection" in r.getMessage()]
    assert len(infos) == 2, infos
    assert broker.root_token not in " ".join(infos)
    # The broker goes on answering.
    resp = requests.get(f"{broker.url}/v1/sys/health", timeout=10)
    assert resp.status_code == 200
