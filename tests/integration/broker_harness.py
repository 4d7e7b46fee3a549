"""Run a real broker for tests: in-process in a thread (for hvac), or as a subprocess.

The in-process server is the same wiring as ``broker server`` (store, audit,
engine, sweeper, jobs, aiohttp on a real TCP port); only the process differs,
so tests can also peek at the store through ``call()``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import boto3
import pytest
import requests
from aiohttp import web

from broker.api import create_app
from broker.config import Config, load_config
from broker.jobs import start_jobs
from broker.server import build_state, start, stop
from broker.state import BrokerState
from plugins._sql import escape_identifier

T = TypeVar("T")
ROOT_TOKEN = "root-token-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, body: str, *, port: int | None = None,
                 storage_url: str | None = None, workers: int = 1, server: str = "") -> Path:
    """A config file under ``tmp`` with storage and audit inside it, plus ``body``.

    ``storage_url``: another lease store (e.g. a PostgreSQL database) than the
    SQLite file in ``tmp``. ``workers``: ``[server] workers``; ``server``: more
    lines for ``[server]``.
    """
    port = port or free_port()
    storage_url = storage_url or f"sqlite:///{tmp / 'broker.db'}"
    path = tmp / "broker.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "5s"
workers = {workers}
{server}

[storage]
url = "{storage_url}"

[audit]
path = "{tmp / 'audit.jsonl'}"
hmac_key_file = "{tmp / 'audit.key'}"
"""
        + body
    )
    return path


def config_url(config_path: Path) -> str:
    """The base URL of the broker a ``write_config`` file describes."""
    for line in config_path.read_text().splitlines():
        if line.startswith("listen"):
            return "http://" + line.split("=", 1)[1].strip().strip('"')
    raise AssertionError(f"no listen line in {config_path}")


@dataclass
class BrokerThread:
    """A broker running on its own event loop in a background thread."""

    config: Config
    root_token: str = ROOT_TOKEN
    state: BrokerState | None = None
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _stopped: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.server.port}"

    @property
    def audit_path(self) -> str:
        return self.config.audit.path

    def start(self) -> BrokerThread:
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("broker did not start within 60s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        # As asyncio.run (what `broker server` runs under) does: what the broker left
        # running is cancelled and unwinds, not destroyed pending at the loop's close.
        left = asyncio.all_tasks(self.loop)
        for task in left:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    async def _serve(self) -> None:
        try:
            self.state = await build_state(self.config)
            if await self.state.store.token_by_accessor("test-root") is None:
                await self.state.tokens.create(policies=["root"], ttl=None, display_name="root",
                                               token_id=self.root_token, accessor="test-root")
            await start(self.state)
            scheduler = start_jobs(self.state)
            runner = web.AppRunner(create_app(self.state), shutdown_timeout=5)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.config.server.port).start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._stopped = asyncio.Event()
        self._ready.set()
        await self._stopped.wait()
        scheduler.shutdown()
        self.state.serving = False
        await runner.cleanup()
        await scheduler.finish(2.0)  # as run_server: no job run left pending at loop close
        await stop(self.state, 5)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the broker's loop (e.g. a store query) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._stopped is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)


def start_broker(config_path: Path) -> BrokerThread:
    return BrokerThread(load_config(config_path)).start()


@contextmanager
def noop_broker(tmp: Path, body: str) -> Iterator[BrokerThread]:
    """A broker on ``body`` (the bench's no-op plugin registered), stopped on exit: the
    module fixture of API tests that need no real backend."""
    from broker.bench.noop import register

    register()
    server = start_broker(write_config(tmp, body))
    try:
        yield server
    finally:
        server.stop()


def noop_broker_fixture(body: str, name: str) -> Callable[..., Any]:
    """A module-scoped fixture: :func:`noop_broker` on ``body``, its files in a temporary
    folder named after ``name``, started once for the module's tests.

    Assign it in the test module, e.g. ``broker = noop_broker_fixture(CONFIG, "caps")``:
    pytest names a fixture after the module attribute holding it.
    """

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
        with noop_broker(tmp_path_factory.mktemp(name), body) as server:
            yield server

    return fixture


def wait_healthy(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/sys/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"broker at {url} not healthy after {timeout}s")


def spawn_broker(config_path: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> subprocess.Popen[bytes]:
    """``broker server --config FILE`` as a real subprocess (for kill -9 tests).

    Its output goes to ``server.log`` beside the config (appended across restarts).
    """
    log_path = config_path.parent / "server.log"
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "server", "--config", str(config_path), *extra],
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def broker_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``broker ARGS`` as a real subprocess with no BROKER_* or VAULT_* variable of the
    test run's environment (so only ``args`` choose the address, token and config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_"))}
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def stop_spawned(proc: subprocess.Popen[bytes]) -> int:
    """Stop a :func:`spawn_broker` process as an operator does (SIGTERM), killing it after
    30 s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class TcpProxy:
    """A loopback TCP proxy to a real server that tests can cut and restore (a backend outage)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        #: the open sides of the connections being piped (cut by down()).
        self.conns: set[asyncio.StreamWriter] = set()
        #: every side ever opened, held (so none is garbage-collected open while
        #: the test runs) and aborted by close(), whatever state it is in.
        self.every: set[asyncio.StreamWriter] = set()
        #: the handler tasks: the loop itself holds tasks only weakly.
        self.tasks: set[asyncio.Task[None]] = set()
        #: (marker, "before" | "after"): the next client chunk holding ``marker``
        #: cuts its connection (both sides), before or after it reaches the
        #: server; the server's answer never comes back. (marker, "hold"): the
        #: chunk reaches the server, the connection stays open, and nothing
        #: the server sends on it comes back any more (a stalled network).
        #: One-shot.
        self.cut_on: tuple[bytes, str] | None = None
        #: the client sides whose answers are swallowed ("hold").
        self.held: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.up()

    def _track(self, writer: asyncio.StreamWriter) -> None:
        self.conns.add(writer)
        self.every.add(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    client: asyncio.StreamWriter | None = None) -> None:
        """Copy ``reader`` to ``writer``; ``client``: this is the client-to-server direction."""
        try:
            while data := await reader.read(65536):
                cut = None
                if client is not None and self.cut_on is not None and self.cut_on[0] in data:
                    cut, self.cut_on = self.cut_on, None
                if client is None and writer in self.held:
                    continue  # an answer the "hold" swallows
                if cut is not None and cut[1] == "hold":
                    assert client is not None
                    self.held.add(client)
                    cut = None
                if cut is None or cut[1] == "after":
                    writer.write(data)
                    await writer.drain()
                if cut is not None and client is not None:
                    client.transport.abort()  # the answer never reaches the client
                    return  # the finally closes the server's side once the data is out
        except OSError:
            pass
        finally:
            writer.close()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio calls it from connection_made,
        # so the accepted side is held before anything can cancel its handler (a
        # task cancelled before its first step never runs its finally). Every
        # side is held until close() aborts it.
        self._track(writer)
        task = self.loop.create_task(self._handle(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_w: asyncio.StreamWriter | None = None
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._track(up_w)
            await asyncio.gather(self._pipe(reader, up_w, client=writer),
                                 self._pipe(up_r, writer))
        except OSError:
            pass
        finally:
            writer.close()
            if up_w is not None:
                up_w.close()
            self.conns -= {writer, up_w} if up_w is not None else {writer}

    def up(self) -> None:
        async def start() -> None:
            if self.server is None or not self.server.is_serving():
                self.server = await asyncio.start_server(self._accepted, "127.0.0.1", self.port)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def down(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            # Stop accepting first, then let the accepts already under way attach
            # to the server, and only then close it. Python 3.11's Server.close()
            # with an accept still pending made that accept's transport fail its
            # Server._attach() assertion half-built; asyncio swallows the error and
            # the transport, never closed, was garbage-collected later: the
            # "unclosed transport" ResourceWarning that failed ~1 store-failover
            # run in 12 (traced with a diagnostic hook: the protocol never got
            # connection_made).
            for sock in self.server.sockets:
                self.loop.remove_reader(sock.fileno())
            for _ in range(3):
                await asyncio.sleep(0)
            self.server.close()
            for w in self.conns:
                w.close()
            self.conns.clear()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)

    def close(self) -> None:
        self.down()

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # close() on a side with unsent data waits for it to flush before the
            # socket is closed, which a stopped loop never does: abort every side.
            for w in self.every:
                w.transport.abort()
            self.every.clear()
            for _ in range(3):  # the aborts' connection_lost callbacks close the sockets
                await asyncio.sleep(0)
            if self.server is not None:
                await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(drain(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def pg_roles(dsn: str, prefix: str) -> set[str]:
    """The names of the roles on the server of ``dsn`` that start with ``prefix``."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)",
                                prefix)
        return {r[0] for r in rows}
    finally:
        await conn.close()


async def pg_execute(dsn: str, *statements: str) -> None:
    """Run ``statements`` one after the other on one connection to ``dsn``."""
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def drop_pg_roles(dsn: str, prefix: str) -> None:
    """Drop every role named ``prefix...``: what a failed test leased must not stay behind."""
    for name in await pg_roles(dsn, prefix):
        await pg_execute(dsn, f'DROP ROLE IF EXISTS "{escape_identifier(name)}"')


def root_api(broker: BrokerThread) -> Callable[..., requests.Response]:
    """``api(method, path, **kwargs)``: a call to ``broker``'s ``/v1/path`` with its root token."""
    headers = {"X-Vault-Token": broker.root_token}

    def api(method: str, path: str, **kw: Any) -> requests.Response:
        return requests.request(method, f"{broker.url}/v1/{path}", headers=headers,
                                timeout=60, **kw)

    return api


def revoke_mount_pg(api: Callable[..., requests.Response], dsn: str, prefix: str) -> None:
    """Revoke every lease of mount ``pg`` (waiting), then check no role ``prefix...`` is left."""
    resp = api("PUT", "sys/leases/revoke-prefix/pg/", json={"sync": True})
    assert resp.status_code in (200, 204), resp.text
    assert asyncio.run(pg_roles(dsn, prefix)) == set()


def dsn_port(dsn: str, default: int = 5432) -> int:
    """The port a DSN names (``default`` when it names none)."""
    return urlsplit(dsn).port or default


def via_proxy(dsn: str, port: int) -> str:
    """``dsn`` pointed at a local ``port`` (a TcpProxy); user, password and database kept."""
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}"))


def aws_client(endpoint: str, service: str, creds: Mapping[str, Any] | None = None) -> Any:
    """A boto3 client of the moto server at ``endpoint`` (region us-east-1).

    Signed with ``creds`` (a credential's data block: ``access_key``,
    ``secret_key`` and, for STS, ``security_token``), else with moto's
    dummy keys, which act as the account's root.
    """
    creds = creds or {"access_key": "testing", "secret_key": "testing"}
    return boto3.session.Session(
        aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"],
        aws_session_token=creds.get("security_token"), region_name="us-east-1",
    ).client(service, endpoint_url=endpoint)


def aws_mount(moto_endpoint: str) -> str:
    """An ``aws`` mount on moto; its secret comes from BROKER_TEST_AWS_SECRET."""
    return f"""
[mounts.aws]
plugin = "aws"
region = "us-east-1"
endpoint_url = "{moto_endpoint}"
access_key = "testing"
password_env = "BROKER_TEST_AWS_SECRET"
"""
