"""Use-limited tokens (``num_uses``), as Vault has them.

hvac against a real broker: a token created with ``num_uses=N`` makes N requests and
is then refused (403, audited as ``reuse_attempt``); lookups show the uses left; the
request that takes the last use revokes the token and its leases (real PostgreSQL
roles, dropped), and an answer that would carry a lease on that last use is Vault's
400; a use-limited token cannot create tokens. The count is atomic: concurrent
requests through two brokers on one PostgreSQL store, and the store's own
``use_token`` on both store kinds (two SQLite stores on one file stand for workers,
two PostgreSQL stores on one database for replicas), never exceed it. A store from
before the migration reads its tokens as unlimited.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import hvac
import hvac.exceptions
import pytest
import requests

from broker.lease import Token, TokenState
from broker.store import open_store
from broker.store.base import LeaseStore
from broker.store.sqlite import SQLiteStore
from tests.conftest import run
from tests.integration import store_fixtures
from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.store_fixtures import (
    T0,
    fresh_postgres_database,
    make_token,
    open_replicas,
    store_before,
)
from tests.integration.token_fixtures import (
    audit_events,
    client,
    pg_readonly_mount,
    pg_revoking_broker,
    role_exists,
    wait_until,
)

pytestmark = pytest.mark.integration

SPENT = "permission denied: the token has no uses left (num_uses)"
WITHHELD = ("Secret cannot be returned; token had one use left, so leased credentials "
            "were immediately revoked.")


def pg_mount(dsn: str) -> str:
    """A real PostgreSQL mount (roles named v-...) and a policy that may read from it."""
    return pg_readonly_mount(dsn) + """
[policies.app]
"pg/creds/readonly" = ["read"]
"auth/token/create" = ["update"]
"auth/token/create-orphan" = ["update"]
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str
           ) -> Iterator[BrokerThread]:
    with pg_revoking_broker(tmp_path_factory.mktemp("num-uses"), pg_mount(postgres_dsn)) as server:
        yield server


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, broker.root_token)


def limited(root: hvac.Client, uses: int, policies: tuple[str, ...] = ("app",)
            ) -> tuple[str, str]:
    """A new token that may make ``uses`` requests (hvac's create_token): (token, accessor)."""
    auth = root.auth.token.create(policies=list(policies), ttl="10m", num_uses=uses)["auth"]
    assert auth["num_uses"] == uses
    return auth["client_token"], auth["accessor"]


def about(broker: BrokerThread, type_: str, field: str, accessor: str) -> list[dict[str, Any]]:
    """The ``type_`` audit lines whose ``field`` is ``accessor`` (as the log's HMAC)."""
    assert broker.state is not None
    mac = broker.state.audit.hmac(accessor)
    return [e for e in audit_events(broker, type_) if e.get(field) == mac]


def errors(exc: pytest.ExceptionInfo[hvac.exceptions.VaultError]) -> list[str]:
    listed: list[str] = json.loads(exc.value.text)["errors"]
    return listed


# -- the count, as hvac sees it -----------------------------------------------------------


def test_a_two_use_token_makes_two_requests_then_is_refused(broker: BrokerThread,
                                                            root: hvac.Client) -> None:
    """num_uses=2: two requests work (lookup-self shows 1 left, then -1 on the last one),
    the third is a 403 audited as reuse_attempt; the token is revoked by then."""
    token, accessor = limited(root, 2)
    me = client(broker, token)
    assert me.auth.token.lookup_self()["data"]["num_uses"] == 1
    assert me.auth.token.lookup_self()["data"]["num_uses"] == -1
    with pytest.raises(hvac.exceptions.Forbidden):
        me.auth.token.lookup_self()
    reuse = about(broker, "reuse_attempt", "token_accessor", accessor)
    assert len(reuse) == 1 and reuse[0]["token_state"] == "revoked"
    revoked = about(broker, "token_revoke", "target", accessor)
    assert len(revoked) == 1 and revoked[0]["reason"] == "num_uses"
    with pytest.raises(hvac.exceptions.Forbidden):
        root.auth.token.lookup(token)  # 403 bad token: it is revoked


def test_lookups_show_the_uses_left(broker: BrokerThread, root: hvac.Client) -> None:
    """lookup and lookup-accessor (by root) show the count, which each use lowers;
    a token without a limit shows 0, as in Vault."""
    token, accessor = limited(root, 3)
    assert root.auth.token.lookup(token)["data"]["num_uses"] == 3
    client(broker, token).auth.token.lookup_self()
    assert root.auth.token.lookup(token)["data"]["num_uses"] == 2
    assert root.auth.token.lookup_accessor(accessor)["data"]["num_uses"] == 2
    plain = root.auth.token.create(policies=["app"], ttl="10m")["auth"]
    assert plain["num_uses"] == 0
    assert root.auth.token.lookup(plain["client_token"])["data"]["num_uses"] == 0


def test_a_refused_request_uses_a_use_too(broker: BrokerThread, root: hvac.Client) -> None:
    """As in Vault, the use is taken before the policy check: a 403 for a path the
    token may not read still counts."""
    token, _ = limited(root, 2)
    me = client(broker, token)
    with pytest.raises(hvac.exceptions.Forbidden):
        me.secrets.database.generate_credentials("other", mount_point="pg")
    assert me.auth.token.lookup_self()["data"]["num_uses"] == -1


def test_a_use_limited_token_cannot_create_tokens(broker: BrokerThread,
                                                  root: hvac.Client) -> None:
    """create and create-orphan from a token with num_uses: 400, as Vault's."""
    token, _ = limited(root, 5)
    me = client(broker, token)
    with pytest.raises(hvac.exceptions.InvalidRequest,
                       match="restricted use token cannot generate child tokens"):
        me.auth.token.create(policies=["app"], ttl="1m")
    with pytest.raises(hvac.exceptions.InvalidRequest,
                       match="restricted use token cannot generate child tokens"):
        me.auth.token.create_orphan(policies=["app"], ttl="1m")


# -- leases end with the token, as in Vault ------------------------------------------------


def test_leases_end_with_the_last_use(broker: BrokerThread, root: hvac.Client,
                                      postgres_dsn: str) -> None:
    """A 3-use token fetches two credentials (real PostgreSQL roles); its third request
    revokes it and, with it, both credentials (the roles are dropped)."""
    token, accessor = limited(root, 3)
    me = client(broker, token)
    first = me.secrets.database.generate_credentials("readonly", mount_point="pg")
    second = me.secrets.database.generate_credentials("readonly", mount_point="pg")
    users = [first["data"]["username"], second["data"]["username"]]
    assert all(role_exists(postgres_dsn, user) for user in users)
    assert me.auth.token.lookup_self()["data"]["num_uses"] == -1  # the last use
    assert wait_until(lambda: not any(role_exists(postgres_dsn, u) for u in users))
    revoked = about(broker, "token_revoke", "target", accessor)
    assert revoked[0]["leases_queued"] == 2 and "withheld_lease" not in revoked[0]


def test_a_credential_on_the_last_use_is_withheld(broker: BrokerThread, root: hvac.Client,
                                                  postgres_dsn: str) -> None:
    """num_uses=1 and a creds read: Vault's 400, no credential in the answer; the lease
    it made is revoked (its role dropped), and the audit names it."""
    token, accessor = limited(root, 1)
    resp = requests.get(f"{broker.url}/v1/pg/creds/readonly",
                        headers={"X-Vault-Token": token}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"errors": [WITHHELD]}
    revoked = about(broker, "token_revoke", "target", accessor)
    assert len(revoked) == 1 and revoked[0]["leases_queued"] == 1
    lease_id = revoked[0]["withheld_lease"]
    issued = [e for e in audit_events(broker, "issue")
              if e.get("lease", {}).get("id") == lease_id]
    assert len(issued) == 1
    user = issued[0]["lease"]["username"]
    assert wait_until(lambda: not role_exists(postgres_dsn, user))


# -- atomic across replicas ---------------------------------------------------------------


async def _race(urls: list[str], token: str) -> list[int]:
    """One lookup-self per URL, all at once; their statuses."""
    async with aiohttp.ClientSession() as session:
        async def one(url: str) -> int:
            async with session.get(f"{url}/v1/auth/token/lookup-self",
                                   headers={"X-Vault-Token": token}) as resp:
                return resp.status

        return list(await asyncio.gather(*(one(url) for url in urls)))


def test_replicas_on_one_postgres_store_share_the_count(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Two brokers on one PostgreSQL store: a 1-use token raced through both is served
    once (the other 403, a reuse_attempt); a 3-use token raced ten times, three times."""
    dsn = run(fresh_postgres_database(request))
    replicas: list[BrokerThread] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            replicas.append(start_broker(write_config(
                tmp_path / name, '[policies.app]\n"x/y" = ["read"]\n', storage_url=dsn)))
        a, b = replicas
        root = hvac.Client(url=a.url, token=a.root_token)
        for _ in range(5):
            token, _ = limited(root, 1)
            statuses = run(_race([a.url, b.url], token))
            assert sorted(statuses) == [200, 403]
        token, _ = limited(root, 3)
        statuses = run(_race([a.url, b.url] * 5, token))
        assert sorted(statuses) == [200] * 3 + [403] * 7
        reuse = audit_events(a, "reuse_attempt") + audit_events(b, "reuse_attempt")
        assert len(reuse) == 5 + 7
    finally:
        for server in replicas:
            server.stop()


# -- the store: one conditional write, on both kinds ----------------------------------------


store_maker = store_fixtures.each_store_maker
store = store_fixtures.each_store


async def test_use_token_counts_down_to_minus_one(store: LeaseStore) -> None:
    """3, 2, 1 uses left -> 2, 1, -1 (the last), then None; the row reads the same."""
    token = make_token("acc-3")
    token.num_uses = 3
    await store.insert_token(token)
    assert [await store.use_token("acc-3") for _ in range(4)] == [2, 1, -1, None]
    got = await store.token_by_accessor("acc-3")
    assert got is not None and got.num_uses == -1


async def test_use_token_takes_nothing_from_other_tokens(store: LeaseStore) -> None:
    """A token without a limit, an ended one and an unknown one: None, nothing written."""
    await store.insert_token(make_token("free"))
    assert await store.use_token("free") is None
    got = await store.token_by_accessor("free")
    assert got is not None and got.num_uses == 0
    ended = make_token("ended")
    ended.num_uses = 5
    await store.insert_token(ended)
    assert await store.end_token("ended", state=TokenState.REVOKED.value, now=T0)
    assert await store.use_token("ended") is None
    assert await store.use_token("nobody") is None


async def test_concurrent_uses_never_exceed_the_count(store: LeaseStore) -> None:
    """Twenty uses at once of a 5-use token: five succeed, the last leaving -1."""
    token = make_token("acc-5")
    token.num_uses = 5
    await store.insert_token(token)
    answers = await asyncio.gather(*(store.use_token("acc-5") for _ in range(20)))
    assert sorted(a for a in answers if a is not None) == [-1, 1, 2, 3, 4]
    assert answers.count(None) == 15


async def _four_uses_of_twenty(a: LeaseStore, b: LeaseStore) -> None:
    """A 4-use token written through ``a``, then ten uses of it each through ``a`` and
    ``b`` at once: four succeed, the last leaving -1."""
    token = make_token("acc-4")
    token.num_uses = 4
    await a.insert_token(token)
    answers = await asyncio.gather(*(s.use_token("acc-4") for _ in range(10) for s in (a, b)))
    assert sorted(x for x in answers if x is not None) == [-1, 1, 2, 3]


async def test_two_sqlite_stores_on_one_file_share_the_count(tmp_path: Path) -> None:
    """Two SQLite stores on one file (two workers' writers): ten uses each at once of a
    4-use token, four succeed."""
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    a, b = SQLiteStore.from_url(url), SQLiteStore.from_url(url)
    await a.open()
    await b.open()
    try:
        await _four_uses_of_twenty(a, b)
    finally:
        await a.close()
        await b.close()


async def test_two_postgres_replicas_share_the_count(request: pytest.FixtureRequest) -> None:
    """Two PostgreSQL stores on one database: ten uses each at once of a 4-use token,
    four succeed."""
    dsn = await fresh_postgres_database(request)
    async with open_replicas(dsn) as (a, b):
        await _four_uses_of_twenty(a, b)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_store_from_before_reads_its_tokens_as_unlimited(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Opening an older store adds tokens.num_uses: its tokens have no limit (0), and
    use_token takes nothing from them."""
    url = (f"sqlite:///{tmp_path / 'old.db'}" if kind == "sqlite"
           else await fresh_postgres_database(request))
    old = Token(accessor="old", token_hash="hash-old", policies=["default"], created=1,
                expire_time=None)
    await store_before(url, "num_uses", old)
    store = open_store(url)
    await store.open()
    try:
        got = await store.token_by_accessor("old")
        assert got is not None and got.num_uses == 0
        assert await store.use_token("old") is None
    finally:
        await store.close()
