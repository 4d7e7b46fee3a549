"""A lean HTTP/1.1 client for the bench's load: keep-alive sockets, no framework.

The bench runs on the same machine as the broker it measures, so every
microsecond the load generator spends is taken from the broker. aiohttp's
client cost ~220 µs of CPU per call here (a third of a core at 1,600 calls a
second, on a 2-core box); this client writes a pre-built request and reads a
``Content-Length`` response for 50-95 µs measured with the load loop's own
bookkeeping, in the spirit of the C load generators (wrk, hey)
that HTTP servers are usually measured with. It speaks only what the broker
answers: HTTP/1.1, keep-alive, a ``Content-Length`` (or no) body; anything
else is an error, never a silent success.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast
from urllib.parse import urlsplit

__all__ = ["HttpError", "LeanClient", "Response"]


class HttpError(RuntimeError):
    """The server's answer was not HTTP this client understands, or the socket broke."""


class Response:
    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time: a bare Protocol (no
    stream reader in between) that parses just enough of each response."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._head: tuple[int, int] | None = None  # (status, body length) once parsed
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("the server closed the connection")
        self._settle(None, self._lost)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is None:  # never reuse a connection in an unknown state
            self._lost = HttpError("bytes from the server nobody asked for")
            return
        try:
            if self._head is None:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head = _parse_head(bytes(self._buf[:end]))
                del self._buf[:end + 4]
            status, length = self._head
            if len(self._buf) < length:
                return
            body = bytes(self._buf[:length])
            del self._buf[:length]
            self._head = None
            self._settle(Response(status, body), None)
        except HttpError as exc:
            self._settle(None, exc)

    def _settle(self, response: Response | None, exc: Exception | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if exc is not None or response is None:
            waiter.set_exception(exc or HttpError("no response"))
        else:
            waiter.set_result(response)

    async def call(self, request: bytes) -> Response:
        if self._lost is not None or self._transport is None:
            raise HttpError(f"connection lost: {self._lost}")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _parse_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) of a response head; HttpError for what we do not speak."""
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
        raise HttpError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    status = int(status_line[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise HttpError("chunked responses are not supported by the bench client")
        elif name == b"connection" and value.strip().lower() == b"close":
            raise HttpError("the server closed the keep-alive connection")
    return status, length


class LeanClient:
    """Up to ``concurrency`` keep-alive connections to one ``http://host:port``."""

    def __init__(self, url: str, *, concurrency: int, headers: dict[str, str],
                 timeout: float = 120.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the bench client speaks plain http only, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(concurrency)
        self.timeout = timeout

    async def request(self, method: str, path: str, body: Any = None) -> Response:
        data = b"" if body is None else json.dumps(body).encode()
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self._extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode() + data
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                async with asyncio.timeout(self.timeout):
                    response = await conn.call(request)
            except (OSError, ValueError, HttpError, TimeoutError) as exc:
                conn.close()  # its state is unknown: never reuse it
                raise HttpError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
            self._idle.append(conn)
            return response

    async def _connect(self) -> _Connection:
        _, conn = await asyncio.get_running_loop().create_connection(
            _Connection, self.host, self.port)
        return conn

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
