"""A connection the PostgreSQL store is still opening when it closes, on a loop that then ends.

test_store_failover failed in CI with unraisable ResourceWarnings ("unclosed
<socket.socket>", once "unclosed transport"), the sockets allocated in asyncpg's
connect. A pool acquire that may open a connection runs in a task of its own
(broker/store/pg_guard.py), so that a request's timeout does not cut the connect
short, and the store's close() left that task running: asyncpg's ``Pool.close()``
waits for the connections in use, not for one being opened. A stopping broker's
loop ends right after the store's close (``BrokerThread`` closes it as soon as
the broker's ``stop`` returns): the connect never finished, and its socket was
left to a later garbage collection, inside whichever test was running then.

Here the connect never finishes by itself: the store reaches its database
through a proxy, and once the pooled connections are cut the proxy leads to a
socket that listens and never accepts, as a server that stopped answering.
Each scenario runs on a loop of its own that is closed the way BrokerThread
closes it (nothing left on it is cancelled), then the garbage is collected.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from broker.errors import StoreUnavailable
from broker.store.deadline import request_budget
from broker.store.postgres import PostgresStore
from tests.integration.broker_harness import TcpProxy
from tests.integration.store_fixtures import fresh_postgres_database

pytestmark = pytest.mark.integration


class Outage:
    """The store's URL (through ``proxy``), and a way to make its server stop answering."""

    def __init__(self, url: str, proxy: TcpProxy, silent_port: int) -> None:
        self.url = url
        self.proxy = proxy
        self.silent_port = silent_port

    async def server_stops_answering(self, store: PostgresStore) -> None:
        """Cut every connection ``store`` holds; new ones lead to a server that never answers."""
        self.proxy.down()
        self.proxy.target_port = self.silent_port
        pool = store.pool._pool  # asyncpg's: how many of its connections are open
        deadline = asyncio.get_running_loop().time() + 10
        while pool.get_size():  # until the pool has seen the cut: the next call connects
            assert asyncio.get_running_loop().time() < deadline, "the pool never saw the cut"
            await asyncio.sleep(0.05)
        self.proxy.up()


@pytest.fixture
def outage(request: pytest.FixtureRequest) -> Iterator[Outage]:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connects complete in the backlog, and nothing ever answers
    dsn = asyncio.run(fresh_postgres_database(request))
    parts = urlsplit(dsn)
    proxy = TcpProxy(parts.port or 5432)
    user = parts.netloc.rpartition("@")[0]
    url = urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{proxy.port}"))
    try:
        yield Outage(url, proxy, silent.getsockname()[1])
    finally:
        proxy.close()
        silent.close()


def on_a_loop_that_ends(scenario: Callable[[], Awaitable[None]]) -> tuple[list[str], list[str]]:
    """Run ``scenario`` on a new loop, close the loop as BrokerThread does, collect the
    garbage: (the tasks left pending on the loop, the ResourceWarnings raised)."""
    loop = asyncio.new_event_loop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loop.run_until_complete(scenario())
            # Names only: a reference held here would keep a leaked socket alive.
            left = [repr(t) for t in asyncio.all_tasks(loop) if not t.done()]
        finally:
            loop.close()
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    return left, leaks


def test_a_request_that_gave_up_on_a_connect_leaves_no_socket_when_the_store_closes(
        outage: Outage) -> None:
    """A request's store call answers 503 while its connect goes on; close() ends that
    connect, and nothing is left on the loop or unclosed after it."""

    async def scenario() -> None:
        store = PostgresStore.from_url(f"{outage.url}?command_timeout=1&pool_max_size=2")
        await store.open()
        try:
            await outage.server_stops_answering(store)
            with request_budget(), pytest.raises(StoreUnavailable, match="TimeoutError"):
                await store.pool.fetchval("SELECT 1")
        finally:
            await store.close()

    left, leaks = on_a_loop_that_ends(scenario)
    assert (left, leaks) == ([], [])


def test_a_call_waiting_for_a_connect_when_the_store_closes_fails_at_once(
        outage: Outage) -> None:
    """A call outside a request (a periodic job's) waiting for a connection when the store
    closes answers "unavailable" at once, instead of its connect outliving the store."""

    async def scenario() -> None:
        store = PostgresStore.from_url(f"{outage.url}?command_timeout=30&pool_max_size=2")
        await store.open()
        try:
            await outage.server_stops_answering(store)
            call = asyncio.ensure_future(store.pool.fetchval("SELECT 1"))
            await asyncio.sleep(0.3)  # its connect is under way
            assert not call.done()
        finally:
            await store.close()
        with pytest.raises(StoreUnavailable, match="closed while this call waited"):
            await asyncio.wait_for(call, 2)

    left, leaks = on_a_loop_that_ends(scenario)
    assert (left, leaks) == ([], [])
