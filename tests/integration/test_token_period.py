"""Periodic tokens (``period``), as Vault has them.

hvac against a real broker: a token created with ``period`` has that TTL, every
renewal sets it back to the period whatever increment is asked for, and it lives
on while renewed (past ``[tokens] max_ttl``, which caps only the period), until
its ``explicit_max_ttl`` if it has one; left unrenewed, it expires after one period.
Lookups show ``period``. Only a root token or ``sudo`` on the create path may make
one (Vault's 400 otherwise). Its leases (real PostgreSQL roles, dropped) keep their
role's TTL, as in Vault, and are revoked with the token when it lapses. The store
keeps the period (both kinds), and a store from before the column reads its tokens
as not periodic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from broker.lease import Token
from broker.store import open_store
from broker.store.base import LeaseStore
from tests.integration import store_fixtures
from tests.integration.broker_harness import BrokerThread
from tests.integration.store_fixtures import fresh_postgres_database, make_token, store_before
from tests.integration.token_fixtures import (
    audit_events,
    client,
    pg_readonly_mount,
    pg_revoking_broker,
    role_exists,
    wait_until,
)

pytestmark = pytest.mark.integration

NOT_SUDO = "root or sudo privileges required to create periodic token"
#: the token-expiry job's interval (broker/jobs.py TOKEN_SWEEP_INTERVAL) plus a margin.
TOKEN_JOB_WAIT = 45


def config(dsn: str) -> str:
    """A real PostgreSQL mount (roles named v-...), a 1h token ceiling, and creators
    with and without sudo on the create paths."""
    return """
[tokens]
max_ttl = "1h"
""" + pg_readonly_mount(dsn) + """
[policies.app]
"pg/creds/readonly" = ["read"]

[policies.creator]
"auth/token/create" = ["update"]
"auth/token/create-orphan" = ["update"]

[policies.sudo-creator]
"auth/token/create" = ["update", "sudo"]
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str
           ) -> Iterator[BrokerThread]:
    with pg_revoking_broker(tmp_path_factory.mktemp("period"), config(postgres_dsn)) as server:
        yield server


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, broker.root_token)


def alive(me: hvac.Client) -> bool:
    try:
        me.auth.token.lookup_self()
    except hvac.exceptions.Forbidden:
        return False
    return True


# -- renewals keep it alive, by its period ------------------------------------------------


def test_a_periodic_token_lives_while_renewed_then_expires(broker: BrokerThread,
                                                           root: hvac.Client) -> None:
    """period=2s: renewed every second for 5 s (an hour's increment asked for, 2 s given
    each time, by renew-self, renew and renew-accessor alike), it outlives its period
    twice over; left alone, it is refused within about one period."""
    auth = root.auth.token.create(policies=["app"], period="2s")["auth"]
    assert auth["lease_duration"] == 2 and auth["renewable"] is True
    me = client(broker, auth["client_token"])
    started = time.monotonic()
    renewals = [
        lambda: me.auth.token.renew_self(increment="1h"),
        lambda: root.auth.token.renew(auth["client_token"], increment=3600),
        lambda: root.auth.token.renew_accessor(auth["accessor"], increment="1h"),
    ]
    turn = 0
    while time.monotonic() - started < 5:
        time.sleep(1)
        renewed = renewals[turn % 3]()["auth"]
        turn += 1
        assert renewed["lease_duration"] == 2, renewed
    assert alive(me)
    assert time.monotonic() - started > 4  # past its period twice: the renewals kept it
    stopped = time.monotonic()
    assert wait_until(lambda: not alive(me), timeout=4)
    assert time.monotonic() - stopped <= 3.5


def test_lookup_shows_the_period(broker: BrokerThread, root: hvac.Client) -> None:
    """As Vault: period (seconds), a TTL and expire_time from it, creation_ttl the period,
    explicit_max_ttl 0 and no max expiry; a token that is not periodic has no period."""
    auth = root.auth.token.create(policies=["app"], period="10m")["auth"]
    assert auth["lease_duration"] == 600
    data = root.auth.token.lookup(auth["client_token"])["data"]
    assert data["period"] == 600
    assert 595 <= data["ttl"] <= 600 and data["creation_ttl"] == 600
    assert data["expire_time"] is not None
    assert data["explicit_max_ttl"] == 0
    assert data["max_expire_time"] is None  # no limit on renewals
    assert client(broker, auth["client_token"]).auth.token.lookup_self()["data"][
        "period"] == 600
    assert root.auth.token.lookup_accessor(auth["accessor"])["data"]["period"] == 600
    plain = root.auth.token.create(policies=["app"], ttl="10m")["auth"]
    assert "period" not in root.auth.token.lookup(plain["client_token"])["data"]


def test_the_period_is_capped_at_the_token_max_ttl_but_not_the_life(
        root: hvac.Client) -> None:
    """[tokens] max_ttl (1h here) caps the period, in Vault's words; an explicit_max_ttl
    past it is kept (a periodic token's life is not capped by it); a ttl is not used."""
    resp = root.auth.token.create(policies=["app"], period="2h")
    assert resp["auth"]["lease_duration"] == 3600
    assert any('period of "2h" exceeded the effective max_ttl of "1h"' in w
               for w in resp["warnings"]), resp["warnings"]
    data = root.auth.token.lookup(resp["auth"]["client_token"])["data"]
    assert data["period"] == 3600
    long = root.auth.token.create(policies=["app"], period="10m", explicit_max_ttl="3h",
                                  ttl="30m")
    assert long["auth"]["lease_duration"] == 600
    assert any("ttl is not used for a periodic token" in w for w in long["warnings"])
    data = root.auth.token.lookup(long["auth"]["client_token"])["data"]
    assert data["explicit_max_ttl"] == 3 * 3600 and data["period"] == 600


def test_only_root_or_sudo_creates_periodic_tokens(broker: BrokerThread,
                                                   root: hvac.Client) -> None:
    """update alone on auth/token/create (or create-orphan): Vault's 400, audited as
    policy_denied; sudo on the path, or a root token, may; period 0 is no period."""
    creator = client(broker, root.auth.token.create(
        policies=["creator", "app"], ttl="10m")["auth"]["client_token"])
    with pytest.raises(hvac.exceptions.InvalidRequest, match=NOT_SUDO):
        creator.auth.token.create(policies=["app"], period="1m")
    with pytest.raises(hvac.exceptions.InvalidRequest, match=NOT_SUDO):
        creator.auth.token.create_orphan(policies=["app"], period="1m")
    denied = audit_events(broker, "policy_denied")
    assert sum(NOT_SUDO in (e.get("error") or "") for e in denied) >= 2
    plain = creator.auth.token.create(policies=["app"], period="0", ttl="1m")["auth"]
    assert plain["lease_duration"] == 60
    sudo = client(broker, root.auth.token.create(
        policies=["sudo-creator", "app"], ttl="10m")["auth"]["client_token"])
    made = sudo.auth.token.create(policies=["app"], period="1m")["auth"]
    assert made["lease_duration"] == 60
    assert root.auth.token.lookup(made["client_token"])["data"]["period"] == 60


def test_explicit_max_ttl_still_ends_it(broker: BrokerThread, root: hvac.Client) -> None:
    """period=2s, explicit_max_ttl=4s: renewed every second, it still ends at 4 s; the
    renewals near the end are capped (Vault's warning), and after it, refused."""
    auth = root.auth.token.create(policies=["app"], period="2s", explicit_max_ttl="4s")["auth"]
    me = client(broker, auth["client_token"])
    assert root.auth.token.lookup(auth["client_token"])["data"]["explicit_max_ttl"] == 4
    started = time.monotonic()
    capped = []
    while time.monotonic() - started < 3.5:
        time.sleep(1)
        try:
            resp = me.auth.token.renew_self()
        except hvac.exceptions.VaultError:
            break
        if resp["auth"]["lease_duration"] < 2:
            capped.append(resp["warnings"] or [])
    # (A renewal within half a second of the end is cut without a warning: clock slack.)
    assert any("exceeded the effective max_ttl" in w for ws in capped for w in ws), capped
    assert wait_until(lambda: not alive(me), timeout=3)
    assert time.monotonic() - started < 6


def test_a_periodic_child_follows_its_renewed_parent(broker: BrokerThread,
                                                     root: hvac.Client) -> None:
    """A periodic child of an expiring parent is held to the parent's current expiry,
    not to the one it had when the child was made: renew the parent, and the child's
    renewals go on."""
    parent = root.auth.token.create(policies=["sudo-creator", "app"], ttl="3s")["auth"]
    maker = client(broker, parent["client_token"])
    child = maker.auth.token.create(policies=["app"], period="2s")["auth"]
    me = client(broker, child["client_token"])
    started = time.monotonic()
    while time.monotonic() - started < 5:
        time.sleep(1)
        maker.auth.token.renew_self()
        assert me.auth.token.renew_self()["auth"]["lease_duration"] == 2
    assert alive(me)  # past the parent's first expiry (3 s)
    root.auth.token.revoke(parent["client_token"])
    assert not alive(me)


# -- its leases, as in Vault ------------------------------------------------------------


def test_its_leases_keep_their_ttl_and_end_with_it(broker: BrokerThread, root: hvac.Client,
                                                   postgres_dsn: str) -> None:
    """A 2 s periodic token's credential gets the role's 1h, as in Vault (not the 2 s the
    token has left); not renewed, the token lapses and the token-expiry job revokes the
    lease, dropping the role. With an explicit_max_ttl, the lease ends by it."""
    bounded = root.auth.token.create(policies=["app"], period="1h",
                                     explicit_max_ttl="10m")["auth"]
    short = client(broker, bounded["client_token"]).secrets.database.generate_credentials(
        "readonly", mount_point="pg")
    assert 590 <= short["lease_duration"] <= 600, short
    client(broker, bounded["client_token"]).auth.token.revoke_self()

    auth = root.auth.token.create(policies=["app"], period="2s")["auth"]
    me = client(broker, auth["client_token"])
    creds = me.secrets.database.generate_credentials("readonly", mount_point="pg")
    assert creds["lease_duration"] >= 3590, creds
    user = creds["data"]["username"]
    assert role_exists(postgres_dsn, user)
    assert wait_until(lambda: not alive(me), timeout=4)
    assert wait_until(lambda: not role_exists(postgres_dsn, user), timeout=TOKEN_JOB_WAIT)


# -- the store ----------------------------------------------------------------------------


store_maker = store_fixtures.each_store_maker
store = store_fixtures.each_store


async def test_the_store_keeps_the_period(store: LeaseStore) -> None:
    """Written and read back on both kinds; a token made without one has 0."""
    token = make_token("periodic")
    token.period = 86400
    await store.insert_token(token)
    await store.insert_token(make_token("plain"))
    got = await store.token_by_accessor("periodic")
    assert got is not None and got.period == 86400
    by_hash = await store.token_by_hash("hash-periodic")
    assert by_hash is not None and by_hash.period == 86400
    plain = await store.token_by_accessor("plain")
    assert plain is not None and plain.period == 0


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_store_from_before_reads_its_tokens_as_not_periodic(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Opening an older store adds tokens.period: its tokens are not periodic (0), and
    new tokens keep theirs."""
    url = (f"sqlite:///{tmp_path / 'old.db'}" if kind == "sqlite"
           else await fresh_postgres_database(request))
    old = Token(accessor="old", token_hash="hash-old", policies=["default"], created=1,
                expire_time=100000)
    await store_before(url, "ADD COLUMN period", old)
    store = open_store(url)
    await store.open()
    try:
        got = await store.token_by_accessor("old")
        assert got is not None and got.period == 0
        token = make_token("new")
        token.period = 60
        await store.insert_token(token)
        new = await store.token_by_accessor("new")
        assert new is not None and new.period == 60
    finally:
        await store.close()
