"""The bench's lean HTTP client against a real aiohttp server on a loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.bench.http import HttpError, LeanClient


async def _echo(request: web.Request) -> web.Response:
    body = await request.json() if request.body_exists else None
    return web.json_response({
        "method": request.method, "path": request.path, "body": body,
        "token": request.headers.get("X-Vault-Token"),
        "peer": request.transport.get_extra_info("peername")[1] if request.transport else None,
    })


async def _empty(_request: web.Request) -> web.Response:
    return web.Response(status=204)


async def _chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(b"part")
    await resp.write_eof()
    return resp


async def _close(_request: web.Request) -> web.Response:
    return web.Response(text="bye", headers={"Connection": "close"})


async def _slow(_request: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.Response(text="late")


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_route("*", "/echo", _echo)
    app.router.add_get("/empty", _empty)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/close", _close)
    app.router.add_get("/slow", _slow)
    async with TestServer(app, host="127.0.0.1") as srv:
        yield srv


def _client(server: TestServer, **kw: float) -> LeanClient:
    return LeanClient(f"http://127.0.0.1:{server.port}", concurrency=4,
                      headers={"X-Vault-Token": "t0k"}, **kw)


async def test_json_round_trip_and_headers(server: TestServer) -> None:
    client = _client(server)
    try:
        resp = await client.request("PUT", "/echo", {"lease_id": "a/b", "n": 1})
        assert resp.status == 200
        assert resp.json() == {"method": "PUT", "path": "/echo", "token": "t0k",
                               "body": {"lease_id": "a/b", "n": 1},
                               "peer": resp.json()["peer"]}
        empty = await client.request("GET", "/empty")
        assert (empty.status, empty.body) == (204, b"")
    finally:
        await client.close()


async def test_connections_are_kept_alive_and_bounded(server: TestServer) -> None:
    client = _client(server)
    try:
        peers = set()
        for _ in range(5):  # one at a time: the same connection every time
            peers.add((await client.request("GET", "/echo")).json()["peer"])
        assert len(peers) == 1
        answers = await asyncio.gather(*(client.request("GET", "/echo") for _ in range(20)))
        assert len({a.json()["peer"] for a in answers}) <= 4  # concurrency=4
    finally:
        await client.close()


async def test_what_it_does_not_speak_is_an_error(server: TestServer) -> None:
    client = _client(server)
    try:
        with pytest.raises(HttpError, match="chunked"):
            await client.request("GET", "/chunked")
        with pytest.raises(HttpError, match="closed"):
            await client.request("GET", "/close")
        # A broken connection is dropped, not reused: the next call works.
        assert (await client.request("GET", "/echo")).status == 200
    finally:
        await client.close()


async def test_timeout(server: TestServer) -> None:
    client = _client(server, timeout=0.2)
    try:
        with pytest.raises(HttpError, match="TimeoutError"):
            await client.request("GET", "/slow")
    finally:
        await client.close()


def test_https_is_refused() -> None:
    with pytest.raises(ValueError, match="plain http"):
        LeanClient("https://127.0.0.1:8200", concurrency=1, headers={})
