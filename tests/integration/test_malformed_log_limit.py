"""Malformed HTTP requests (bytes the HTTP parser refuses: a TLS hello on the plain port,
an unknown verb, a broken request line) cannot fill the broker's log: each client
address gets LOG_BURST ``refused a request from ...`` lines at once, then LOG_RATE a
second; the rest are counted, and said in one line per window, or as the broker stops.
Every such request still gets its 400.

A real broker (in-process, real TCP); garbage sent over raw sockets from one loopback
address per test.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.broker_harness import BrokerThread, noop_broker
from tests.integration.test_security_hygiene_audit_limit import CONFIG

pytestmark = pytest.mark.integration

BURST, RATE = 10, 1.0  # broker.api.LOG_BURST, LOG_RATE
GARBAGE = (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
           b"FROB / HTTP/1.1\r\nHost: x\r\n\r\n",
           b"GET / HTTP/9.9\r\n\r\n")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with noop_broker(tmp_path_factory.mktemp("malformed-log"), CONFIG) as server:
        yield server


def garbage(port: int, source: str, n: int) -> float:
    """Send ``n`` malformed requests, one connection each; every answer is a 400.
    Returns the seconds taken."""
    start = time.monotonic()
    for i in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=30,
                                      source_address=(source, 0)) as sock:
            sock.sendall(GARBAGE[i % len(GARBAGE)])
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0], answer
    return time.monotonic() - start


def lines_of(caplog: pytest.LogCaptureFixture, source: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "broker.api" and source in r.getMessage()]


def counted(lines: list[str], source: str) -> int:
    """What the summary lines of ``source`` count ("refused N more malformed ...")."""
    prefix = "refused "
    return sum(int(line[len(prefix):].split()[0]) for line in lines
               if line.startswith(prefix) and " more malformed request(s) from " + source in line)


def one_by_one(lines: list[str], source: str) -> int:
    return sum(1 for line in lines if line.startswith(f"refused a request from {source}: "))


def test_a_garbage_flood_is_logged_a_few_lines_then_counted(
        broker: BrokerThread, caplog: pytest.LogCaptureFixture) -> None:
    """60 malformed requests from one address: at most LOG_BURST (+ the refill while
    they ran) lines one by one, then one summary line counts the rest (logged + counted
    = sent); another address's first one is still logged."""
    caplog.set_level(logging.INFO, logger="broker.api")
    source, n = "127.0.0.61", 60
    took = garbage(broker.config.server.port, source, n)
    garbage(broker.config.server.port, "127.0.0.62", 1)
    logged = one_by_one(lines_of(caplog, source), source)
    assert BURST <= logged <= BURST + RATE * took + 1, (logged, took)
    assert one_by_one(lines_of(caplog, "127.0.0.62"), "127.0.0.62") == 1
    deadline = time.monotonic() + 60
    while counted(lines_of(caplog, source), source) < n - logged:
        assert time.monotonic() < deadline, lines_of(caplog, source)[-3:]
        time.sleep(0.2)
    assert counted(lines_of(caplog, source), source) == n - logged


def test_counts_still_pending_are_logged_as_the_broker_stops(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A broker stopped before the summary is due says its count as it stops."""
    caplog.set_level(logging.INFO, logger="broker.api")
    source, n = "127.0.0.63", 30
    with noop_broker(tmp_path, CONFIG) as server:
        garbage(server.config.server.port, source, n)
    lines = lines_of(caplog, source)
    assert one_by_one(lines, source) + counted(lines, source) == n, lines
    assert one_by_one(lines, source) < n
