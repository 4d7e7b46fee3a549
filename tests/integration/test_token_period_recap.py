"""Periodic tokens under a changed ceiling, and their leases' renewal hint.

As Vault's ``CalculateTTL`` on every renewal: after a reload (what SIGHUP runs) lowers
``[tokens] max_ttl`` below a periodic token's period, its renewals give the new
ceiling, with Vault's warning, for a token from auth/token/create and a JWT login's
alike; the token keeps its period, so raising the ceiling again gives it back. A lease
cut at a periodic token's ``explicit_max_ttl`` is told so, at issue and at a renewal
past it, not "renew the token first", which cannot move that limit. A real broker
over HTTP (hvac), a real OIDC issuer, real PostgreSQL roles (dropped at the end).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import pytest

from broker.server import reload
from tests.integration.broker_harness import BrokerThread, write_config
from tests.integration.jwt_fixtures import (
    jwt_role,
    oidc_issuer_fixture,
    oidc_method,
    running_broker,
)
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

issuer = oidc_issuer_fixture()

LOWERED = 'period of "1h" exceeded the effective max_ttl of "30m"; period value is capped'
RENEW_FIRST = "renew the token first"


def config(issuer: OIDCIssuer, dsn: str, *, max_ttl: str, period: str,
           role: str = "periodic", extra: str = "") -> str:
    """A 1h-role PostgreSQL mount, a JWT login whose ``periodic`` role has ``period``,
    and [tokens] max_ttl = ``max_ttl``."""
    return f"""
[tokens]
max_ttl = "{max_ttl}"

[mounts.pg]
plugin = "postgres"
connection_url = "{dsn}"

[mounts.pg.roles.readonly]
default_ttl = "1h"
max_ttl = "2h"

[policies.app]
"pg/creds/readonly" = ["read"]
""" + oidc_method(issuer) + jwt_role(role, ttl=None) + (f'token_period = "{period}"\n' if period else "") + extra


@dataclass
class Running:
    server: BrokerThread
    tmp: Path
    issuer: OIDCIssuer
    dsn: str

    def reload(self, *, max_ttl: str, period: str, role: str = "periodic",
               extra: str = "") -> None:
        """Rewrite the config file (same port, store, audit) and reload, as SIGHUP does."""
        write_config(self.tmp, config(self.issuer, self.dsn, max_ttl=max_ttl, period=period,
                                      role=role, extra=extra),
                     port=self.server.config.server.port)
        assert self.server.state is not None
        assert self.server.call(reload(self.server.state)) is True
        assert self.server.state.config.tokens.max_ttl == (1800 if max_ttl == "30m" else 3600)


@pytest.fixture(scope="module")
def broker(issuer: OIDCIssuer, postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("period-recap")
    with running_broker(tmp, config(issuer, postgres_dsn, max_ttl="1h", period="1h")
                        ) as server:
        yield Running(server, tmp, issuer, postgres_dsn)


@pytest.fixture
def root(broker: Running) -> hvac.Client:
    return hvac.Client(url=broker.server.url, token=broker.server.root_token)


def as_token(broker: Running, token: str) -> hvac.Client:
    return hvac.Client(url=broker.server.url, token=token)


def warnings(answer: dict[str, Any]) -> list[str]:
    return list(answer.get("warnings") or [])


# -- the period, re-capped at every renewal -----------------------------------------------


def test_a_lowered_token_max_ttl_caps_the_next_renewals(broker: Running,
                                                        root: hvac.Client) -> None:
    """period=1h under a 1h ceiling; a reload lowers it to 30m: renew-self, renew and
    renew-accessor give 30m with Vault's warning, the lookup still shows the 1h period;
    a reload back to 1h gives the whole period again, without a warning."""
    auth = root.auth.token.create(policies=["app"], period="1h")["auth"]
    assert auth["lease_duration"] == 3600
    me = as_token(broker, auth["client_token"])
    broker.reload(max_ttl="30m", period="20m")
    try:
        for renewed in (me.auth.token.renew_self(increment="1h"),
                        root.auth.token.renew(auth["client_token"]),
                        root.auth.token.renew_accessor(auth["accessor"])):
            assert renewed["auth"]["lease_duration"] == 1800, renewed
            assert any(LOWERED in w and "[tokens] max_ttl" in w
                       for w in warnings(renewed)), renewed
        data = me.auth.token.lookup_self()["data"]
        assert data["period"] == 3600
        assert 1790 <= data["ttl"] <= 1800
    finally:
        broker.reload(max_ttl="1h", period="1h")
    again = me.auth.token.renew_self()
    assert again["auth"]["lease_duration"] == 3600 and not warnings(again), again


def test_a_periodic_login_token_is_re_capped_too(broker: Running, root: hvac.Client) -> None:
    """A JWT login's periodic token (token_period=1h), once a reload lowered [tokens]
    max_ttl to 30m and the role's period to 20m: renewed by 20m, the role's period now
    (Vault's auth method re-reads the role at a renewal), with both warnings."""
    login = hvac.Client(url=broker.server.url).auth.jwt.jwt_login(
        role="periodic", path="github",
        jwt=broker.issuer.mint(broker.issuer.github_claims(run_id="recap")))["auth"]
    assert login["lease_duration"] == 3600
    me = as_token(broker, login["client_token"])
    broker.reload(max_ttl="30m", period="20m")
    try:
        renewed = me.auth.token.renew_self()
        assert renewed["auth"]["lease_duration"] == 1200
        assert any(LOWERED in w for w in warnings(renewed)), renewed
        assert any('exceeded the effective max_ttl of "20m"' in w
                   and "token_period of JWT role 'periodic' of auth/github" in w
                   for w in warnings(renewed)), renewed
        # A new login gets the role's new period.
        fresh = hvac.Client(url=broker.server.url).auth.jwt.jwt_login(
            role="periodic", path="github",
            jwt=broker.issuer.mint(broker.issuer.github_claims(run_id="recap-2")))["auth"]
        assert fresh["lease_duration"] == 1200
    finally:
        broker.reload(max_ttl="1h", period="1h")


def test_a_period_within_the_ceiling_renews_without_a_warning(broker: Running,
                                                              root: hvac.Client) -> None:
    """A 20m period under the lowered 30m ceiling is not capped: 20m, no warning."""
    auth = root.auth.token.create(policies=["app"], period="20m")["auth"]
    broker.reload(max_ttl="30m", period="20m")
    try:
        renewed = as_token(broker, auth["client_token"]).auth.token.renew_self()
        assert renewed["auth"]["lease_duration"] == 1200 and not warnings(renewed)
    finally:
        broker.reload(max_ttl="1h", period="1h")


# -- the lease hint ------------------------------------------------------------------------


def test_a_lease_capped_at_a_periodic_token_s_explicit_max_ttl_says_so(
        broker: Running, root: hvac.Client) -> None:
    """A periodic token with explicit_max_ttl=10m gets a 10m lease from a 1h role; the
    issue warning and a renewal asking for an hour name that limit and say renewing
    the token cannot move it, not "renew the token first"."""
    auth = root.auth.token.create(policies=["app"], period="1h",
                                  explicit_max_ttl="10m")["auth"]
    creds = as_token(broker, auth["client_token"]).secrets.database.generate_credentials(
        "readonly", mount_point="pg")
    assert 590 <= creds["lease_duration"] <= 600, creds
    assert any(w.startswith("lease TTL capped at the periodic token's explicit_max_ttl: ")
               for w in warnings(creds)), creds
    renewed = root.sys.renew_lease(creds["lease_id"], increment=3600)
    assert renewed["lease_duration"] <= 600
    hint = " ".join(warnings(renewed))
    assert "the explicit_max_ttl of the periodic token that owns the lease" in hint, hint
    assert "no renewal of the token moves it" in hint
    assert RENEW_FIRST not in hint


def test_an_ordinary_token_s_lease_still_says_renew_the_token_first(
        broker: Running, root: hvac.Client) -> None:
    """A 10m token (not periodic): its 1h lease is cut at the token's expiry, and a
    renewal past it is told to renew the token first, which does help there."""
    auth = root.auth.token.create(policies=["app"], ttl="10m")["auth"]
    creds = as_token(broker, auth["client_token"]).secrets.database.generate_credentials(
        "readonly", mount_point="pg")
    assert any(w.startswith("lease TTL capped at the token's expiry: ")
               for w in warnings(creds)), creds
    renewed = root.sys.renew_lease(creds["lease_id"], increment=3600)
    assert RENEW_FIRST in " ".join(warnings(renewed)), renewed


# -- an ordinary token, under the ceiling in force ---------------------------------------


def test_a_lowered_token_max_ttl_caps_an_ordinary_token_s_renewal(
        broker: Running, root: hvac.Client) -> None:
    """A 1h token (max 1h) made under a 1h ceiling; a reload lowers it to 30m: a renewal
    asking for 1h gets what is left of 30m from the token's creation, with a warning
    naming [tokens] max_ttl, as Vault's renewals do; back at 1h, the whole hour again."""
    auth = root.auth.token.create(policies=["app"], ttl="1h")["auth"]
    me = as_token(broker, auth["client_token"])
    broker.reload(max_ttl="30m", period="20m")
    try:
        renewed = me.auth.token.renew_self(increment="1h")
        assert 1790 <= renewed["auth"]["lease_duration"] <= 1800, renewed
        assert any("[tokens] max_ttl" in w and "exceeded the effective max_ttl" in w
                   for w in warnings(renewed)), renewed
        assert 1790 <= me.auth.token.lookup_self()["data"]["ttl"] <= 1800
    finally:
        broker.reload(max_ttl="1h", period="1h")
    again = me.auth.token.renew_self(increment="1h")
    assert again["auth"]["lease_duration"] >= 3590, again


def test_an_ordinary_token_past_the_lowered_ceiling_cannot_renew(
        broker: Running, root: hvac.Client) -> None:
    """A token older than the ceiling in force: its renewal is Vault's 400 "past the max
    TTL, cannot renew", and the token keeps the expiry it had (the store's token
    manager, as the renew paths call it, with a 1 s ceiling)."""
    from broker.errors import BadRequest

    auth = root.auth.token.create(policies=["app"], ttl="1h")["auth"]
    state = broker.server.state
    assert state is not None
    token = broker.server.call(state.store.token_by_accessor(auth["accessor"]))
    assert token is not None
    time.sleep(1.1)
    with pytest.raises(BadRequest, match="past the max TTL, cannot renew"):
        broker.server.call(state.tokens.renew(token, 3600, system_max_ttl=1))
    after = broker.server.call(state.store.token_by_accessor(auth["accessor"]))
    assert after is not None and after.expire_time == token.expire_time


def test_a_login_token_whose_role_is_gone_cannot_renew(broker: Running) -> None:
    """A reload removed the role a token logged in with: its renewal is a 400 naming the
    role (Vault's auth method finds no role at the renewal); the role back, it renews."""
    login = hvac.Client(url=broker.server.url).auth.jwt.jwt_login(
        role="periodic", path="github",
        jwt=broker.issuer.mint(broker.issuer.github_claims(run_id="gone")))["auth"]
    me = as_token(broker, login["client_token"])
    broker.reload(max_ttl="1h", period="1h", role="renamed")
    try:
        with pytest.raises(hvac.exceptions.InvalidRequest,
                           match="role 'periodic' of auth method 'github' no longer exists"):
            me.auth.token.renew_self()
    finally:
        broker.reload(max_ttl="1h", period="1h")
    assert me.auth.token.renew_self()["auth"]["lease_duration"] == 3600


def test_a_login_token_renews_under_its_role_s_lowered_max_ttl(broker: Running) -> None:
    """A (non-periodic) role's token_max_ttl lowered from 1h to 40m by a reload: the next
    renewal of a token that logged in before goes no further than 40m from its login,
    with a warning naming the role's max TTL (it kept the 1h cap it was given)."""
    plain = 'token_ttl = "1h"\ntoken_max_ttl = "1h"\n'
    broker.reload(max_ttl="1h", period="", extra=plain)
    try:
        login = hvac.Client(url=broker.server.url).auth.jwt.jwt_login(
            role="periodic", path="github",
            jwt=broker.issuer.mint(broker.issuer.github_claims(run_id="capped")))["auth"]
        me = as_token(broker, login["client_token"])
        broker.reload(max_ttl="1h", period="",
                      extra='token_ttl = "30m"\ntoken_max_ttl = "40m"\n')
        renewed = me.auth.token.renew_self(increment="1h")
        assert 2390 <= renewed["auth"]["lease_duration"] <= 2400, renewed
        assert any("the max TTL of JWT role 'periodic' of auth/github" in w
                   for w in warnings(renewed)), renewed
    finally:
        broker.reload(max_ttl="1h", period="1h")
