"""Helpers the token API tests share: clients, audit events, a broker per store kind, a
broker with a real PostgreSQL mount (and a check of its roles), and roles slow enough to
revoke a token (or a prefix) while one of its issues is in flight.

They used to be copied into each test module (test_token_api_fixes,
test_token_create_limits, test_admin_sudo, test_token_revoke_inflight,
test_lifecycle_qa_fixes, test_token_num_uses, test_token_period); one copy here means
a fix reaches every user. Each module still declares its own pytest fixtures (its own
``CONFIG``, its own parameters), thin ones that call these, as ``store_url`` calls
``store_fixtures.broker_store_url``: a fixture imported from another module would need
a ``noqa`` on every test that takes it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import hvac
import pytest
import requests

from broker.lease import LeaseFilter, LeaseState
from tests.integration.broker_harness import (
    BrokerThread,
    pg_roles,
    start_broker,
    write_config,
)
from tests.integration.store_fixtures import broker_store_url

__all__ = [
    "SLOW",
    "SlowRoles",
    "audit_events",
    "broker_on_store",
    "client",
    "made_by_root",
    "pg_readonly_mount",
    "pg_revoking_broker",
    "role_exists",
    "wait_until",
]


def client(broker: BrokerThread, token: str) -> hvac.Client:
    """An hvac client of ``broker`` that sends ``token`` (``ROOT_TOKEN``: the root client)."""
    return hvac.Client(url=broker.url, token=token)


def made_by_root(root: hvac.Client, policies: list[str]) -> str:
    """A 1h token with ``policies`` (and ``default``) that ``root`` creates: a caller
    holding just those policies, for tests of what they allow."""
    return str(root.auth.token.create(policies=policies, ttl="1h")["auth"]["client_token"])


def audit_events(broker: BrokerThread, type_: str) -> list[dict[str, Any]]:
    """The events of type ``type_`` in ``broker``'s audit log so far, oldest first."""
    lines = Path(broker.audit_path).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("type") == type_]


@contextmanager
def broker_on_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerThread]:
    """A broker with no mounts whose store is ``request.param`` ("sqlite" or "postgresql"),
    stopped on the way out: for behaviour each store implements on its own (a renewal's
    new expiry, a unique token value), so a test runs once per store kind."""
    url = broker_store_url(request, tmp_path)
    server = start_broker(write_config(tmp_path, "", storage_url=url))
    try:
        yield server
    finally:
        server.stop()


def wait_until(check: Callable[[], object], timeout: float = 30) -> bool:
    """Poll ``check`` every 0.1 s until it is true or ``timeout`` s have passed; whether it
    came true, for the caller to assert."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


# -- a real PostgreSQL mount ---------------------------------------------------------------


def pg_readonly_mount(dsn: str) -> str:
    """The config of mount ``pg`` on the PostgreSQL server of ``dsn`` with role ``readonly``
    (real roles, named v-..., 1h up to 2h); a module adds its policies after it."""
    return f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{dsn}"

[mounts.pg.roles.readonly]
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
]
default_ttl = "1h"
max_ttl = "2h"
"""


@contextmanager
def pg_revoking_broker(tmp: Path, body: str) -> Iterator[BrokerThread]:
    """A broker on ``body`` (with a mount ``pg`` of real roles), which on the way out
    revokes every lease of ``pg``, waiting, before it stops: no role is left behind on
    the shared server."""
    server = start_broker(write_config(tmp, body))
    try:
        yield server
    finally:
        requests.put(f"{server.url}/v1/sys/leases/revoke-prefix/pg/", json={"sync": True},
                     headers={"X-Vault-Token": server.root_token}, timeout=120)
        server.stop()


def role_exists(dsn: str, name: str) -> bool:
    """Whether the PostgreSQL server of ``dsn`` has a role named ``name``."""
    return name in asyncio.run(pg_roles(dsn, name))


# -- issues held in flight ---------------------------------------------------------------

#: How long the slow roles' creation statements sleep (seconds): the window a revoke
#: must land in. It was 1 s, with the revoke sent after a fixed 0.4 s: an issue slower
#: than 0.4 s to reach its statements, or a revoke slower than 0.6 s, on a loaded machine
#: failed the tests. Now the revoke goes once the issue is seen in the sleep
#: (SlowRoles.wait_in_flight), and has SLOW s to land; the bug (the lease going live
#: after all) shows the same.
SLOW = 3


def _unique_marker() -> str:
    return f"in-flight-{secrets.token_hex(8)}"


@dataclass(frozen=True)
class SlowRoles:
    """Roles ``slow`` on mounts ``pg`` (PostgreSQL) and ``my`` (MySQL) whose creation
    statements sleep SLOW s after creating the user: an issue of ``pg/creds/slow`` or
    ``my/creds/slow`` stays in flight (its lease row pending) that long.

    On PostgreSQL (a staging backend) the role waits in an open transaction; on
    MySQL it is created at once, before the lease is activated.

    The sleep statement carries ``marker``, new for each SlowRoles, as a comment:
    :meth:`wait_in_flight` looks for that exact statement among the servers' running
    queries. The servers are shared (other tests, other checkouts on the machine), and
    a plain ``pg_sleep(3)`` or ``SLEEP(3)`` of anyone else's used to pass for this
    test's issue, sending the revoke before the issue was there to be caught.
    """

    postgres_dsn: str
    mysql_dsn: str
    #: the start of every user name (the tests' cleanups search for it).
    prefix: str
    marker: str = field(default_factory=_unique_marker)

    def sleep_statement(self, mount: str) -> str:
        """The slow role's last creation statement on ``mount`` ("pg" or "my")."""
        if mount == "pg":
            return f"SELECT pg_sleep({SLOW}) /* {self.marker} */"
        return f"DO SLEEP({SLOW}) /* {self.marker} */"

    def mounts(self) -> str:
        """The config of mounts ``pg`` and ``my`` with their ``slow`` roles; a module adds
        its other roles and policies in tables of its own after it."""
        return f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{self.postgres_dsn}"

[mounts.pg.roles.slow]
username_template = "{self.prefix}{{{{random 8}}}}-pg"
creation_statements = [
  "CREATE ROLE \\"{{{{name}}}}\\" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'",
  "{self.sleep_statement('pg')}",
]

[mounts.my]
plugin = "mysql"
connection_url = "{self.mysql_dsn}"

[mounts.my.roles.slow]
username_template = "{self.prefix}{{{{random 8}}}}-my"
creation_statements = [
  "CREATE USER '{{{{name}}}}'@'%' IDENTIFIED BY '{{{{password}}}}'",
  "{self.sleep_statement('my')}",
]
"""

    def sleeping(self, mount: str) -> bool:
        """Whether a session on ``mount``'s server runs this SlowRoles' sleep statement."""
        return asyncio.run(self._sleeping(mount))

    async def _sleeping(self, mount: str) -> bool:
        statement = self.sleep_statement(mount)
        if mount == "pg":
            conn = await asyncpg.connect(self.postgres_dsn)
            try:
                # The mount sends its creation statements as one query text.
                return bool(await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                    " AND application_name = 'broker:pg' AND strpos(query, $1) > 0",
                    statement))
            finally:
                await conn.close()
        # Imported here, not at the top: only the MySQL half of the slow roles needs it,
        # and that test module brings the AWS tests' set-up with it, which the other
        # users of this module (plain token tests) have no use for.
        from tests.integration.test_api_mysql_aws import mysql_connect

        url = urlsplit(self.mysql_dsn)
        my = await mysql_connect(self.mysql_dsn, url.username or "root", url.password or "")
        try:
            async with my.cursor() as cur:
                # Not this query itself, whose text holds the statement too.
                await cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                                  " WHERE INSTR(INFO, %s) > 0 AND ID <> CONNECTION_ID()",
                                  (statement,))
                row = await cur.fetchone()
                return bool(row and row[0])
        finally:
            my.close()

    def wait_in_flight(self, broker: BrokerThread, path: str) -> None:
        """Until the issue of ``path`` (``pg/creds/slow``) has its pending row and runs
        its creation statements' sleep: the moment a revoke must land in (a fixed wait
        was too short on a loaded machine)."""
        assert broker.state is not None
        store = broker.state.store
        deadline = time.monotonic() + 30
        while True:
            pending = broker.call(store.list_ids(LeaseFilter(prefix=path + "/"),
                                                 states=[LeaseState.PENDING]))
            if pending and self.sleeping(path.split("/")[0]):
                return
            assert time.monotonic() < deadline, f"the issue of {path} never reached its sleep"
            time.sleep(0.05)

    def start_issue(self, broker: BrokerThread, path: str, token: str
                    ) -> Callable[[], requests.Response]:
        """GET ``path`` with ``token`` in a thread, and return once that issue is in its
        sleep (:meth:`wait_in_flight`): the caller's revoke then lands mid-issue.

        Returns the function that waits for the issue's answer (up to 30 s more) and
        returns it.
        """
        answers: list[requests.Response] = []

        def issue() -> None:
            answers.append(requests.get(f"{broker.url}/v1/{path}", timeout=60,
                                        headers={"X-Vault-Token": token}))

        # A daemon: a test that fails before the answer does not hold pytest's exit.
        issuing = threading.Thread(target=issue, daemon=True)
        issuing.start()
        self.wait_in_flight(broker, path)

        def answer() -> requests.Response:
            issuing.join(30)
            [got] = answers
            return got

        return answer
