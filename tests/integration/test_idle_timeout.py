"""``[server] idle_timeout``: a connection that never finishes its request headers
(a slowloris client) is closed, and the broker answers everyone else meanwhile.

aiohttp's own keep-alive timeout is an hour, and nothing else bounded a
connection stuck in its headers: a client that sent one header line every few
seconds held its socket for as long as it liked, without a token, and enough
of them would use up the process's file descriptors. A real ``broker
server`` process, with ``idle_timeout = "2s"``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import requests

from tests.integration.broker_harness import (
    config_url,
    spawn_broker,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.integration


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (a header line sent every 0.5 s), or None."""
    started = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(1024) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        try:
            sock.sendall(b"X-Slow: 1\r\n")  # never the blank line that ends the headers
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
    return None


def test_a_connection_stuck_in_its_headers_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    config = write_config(tmp_path, "", server='idle_timeout = "2s"')
    proc = spawn_broker(config)
    try:
        url = config_url(config)
        wait_healthy(url)
        host, port = url.removeprefix("http://").split(":")
        slow = [socket.create_connection((host, int(port))) for _ in range(5)]
        try:
            for sock in slow:
                sock.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n")
            # Everyone else is served meanwhile.
            assert requests.get(f"{url}/v1/sys/health", timeout=5).status_code == 200
            closed = [_closed_within(sock, 10) for sock in slow]
            assert all(after is not None and after < 5 for after in closed), closed
        finally:
            for sock in slow:
                sock.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_request_body_that_never_arrives_is_answered_408(tmp_path: Path) -> None:
    """Headers sent, then a body trickled a byte at a time to a route that reads it
    before any token check (JWT login): answered 408 after idle_timeout. It held its
    socket for as long as the client kept trickling (QA: 3,000 of them past 130 s)."""
    config = write_config(tmp_path, "", server='idle_timeout = "2s"')
    proc = spawn_broker(config)
    try:
        url = config_url(config)
        wait_healthy(url)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/auth/jwt/login HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            sock.settimeout(0.5)
            started, answer = time.monotonic(), b""
            while time.monotonic() - started < 15 and b"\r\n\r\n" not in answer:
                try:
                    answer += sock.recv(4096)
                except TimeoutError:
                    try:
                        sock.sendall(b" ")  # a byte now and then: never the whole body
                    except (BrokenPipeError, ConnectionResetError):
                        break
            took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert took < 8, took
        # Everyone else is served.
        assert requests.get(f"{url}/v1/sys/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
