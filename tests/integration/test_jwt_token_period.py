"""``token_period`` on a JWT role (Vault's option): a login's token is periodic.

Its TTL is the period, every renewal sets it back to the period whatever increment is
asked for, and it lives on while renewed, with no max TTL but the role's
``token_explicit_max_ttl``; ``[tokens] max_ttl`` caps the period (a config error
beyond it), not the token's life. The role read shows ``token_period``. A real broker
over HTTP (hvac), a real OIDC issuer (tests/oidc_issuer.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from broker.config import ConfigError, load_config
from tests.integration.api_fixtures import raw
from tests.integration.broker_harness import BrokerThread, write_config
from tests.integration.jwt_fixtures import (
    jwt_role,
    oidc_issuer_fixture,
    oidc_method,
    running_broker,
)
from tests.integration.test_openapi import CHECKS, schema
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

issuer = oidc_issuer_fixture()

POLICY = '\n[policies.app]\n"auth/token/lookup-self" = ["read"]\n'
#: a 1h ceiling: the periodic roles' explicit max TTL of 3h is past it, and loads.
TOKENS = '\n[tokens]\nmax_ttl = "1h"\n'


def periodic_role(name: str, period: str, *extra: str) -> str:
    """A role of the github login whose tokens are periodic (no token_ttl: not used)."""
    return jwt_role(name, ttl=None) + f'token_period = "{period}"\n' + "".join(
        line + "\n" for line in extra)


@pytest.fixture(scope="module")
def broker(issuer: OIDCIssuer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[BrokerThread]:
    config = (TOKENS + oidc_method(issuer)
              + periodic_role("periodic", "2s")
              + periodic_role("bounded", "2s", 'token_explicit_max_ttl = "4s"')
              + periodic_role("long", "10m", 'token_explicit_max_ttl = "3h"')
              + jwt_role("plain", max_ttl="1h") + POLICY)
    with running_broker(tmp_path_factory.mktemp("jwt-period"), config, revoke=()) as server:
        yield server


def login(broker: BrokerThread, issuer: OIDCIssuer, role: str) -> dict[str, object]:
    answer = hvac.Client(url=broker.url).auth.jwt.jwt_login(
        role=role, path="github", jwt=issuer.mint(issuer.github_claims(run_id=role)))
    auth: dict[str, object] = answer["auth"]
    return auth


def as_token(broker: BrokerThread, token: object) -> hvac.Client:
    assert isinstance(token, str)
    return hvac.Client(url=broker.url, token=token)


def alive(client: hvac.Client) -> bool:
    try:
        client.auth.token.lookup_self()
    except hvac.exceptions.Forbidden:
        return False
    return True


def wait_until_dead(client: hvac.Client, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(client):
            return True
        time.sleep(0.2)
    return not alive(client)


def test_a_periodic_role_s_token_lives_while_renewed(broker: BrokerThread,
                                                     issuer: OIDCIssuer) -> None:
    """token_period=2s: the login's TTL is 2 s, each renewal (an hour asked for) gives
    2 s, and renewed every second the token outlives its period twice over; left
    alone, it is refused within about one period."""
    auth = login(broker, issuer, "periodic")
    assert auth["lease_duration"] == 2 and auth["renewable"] is True
    me = as_token(broker, auth["client_token"])
    started = time.monotonic()
    while time.monotonic() - started < 5:
        time.sleep(1)
        assert me.auth.token.renew_self(increment="1h")["auth"]["lease_duration"] == 2
    assert alive(me)
    stopped = time.monotonic()
    assert wait_until_dead(me, timeout=4)
    assert time.monotonic() - stopped <= 3.5


def test_the_login_token_s_lookup_shows_the_period(broker: BrokerThread,
                                                   issuer: OIDCIssuer) -> None:
    """As a periodic token from auth/token/create: period (seconds), creation_ttl the
    period, no max expiry without token_explicit_max_ttl, explicit_max_ttl the role's
    (past [tokens] max_ttl: not cut to it) when it has one; a plain role's has none."""
    data = as_token(broker, login(broker, issuer, "periodic")["client_token"]
                    ).auth.token.lookup_self()["data"]
    assert data["period"] == 2 and data["creation_ttl"] == 2
    assert data["explicit_max_ttl"] == 0 and data["max_expire_time"] is None
    assert data["path"] == "auth/github/login"
    auth = login(broker, issuer, "long")
    assert auth["lease_duration"] == 600
    data = as_token(broker, auth["client_token"]).auth.token.lookup_self()["data"]
    assert data["period"] == 600 and data["explicit_max_ttl"] == 3 * 3600
    plain = as_token(broker, login(broker, issuer, "plain")["client_token"])
    assert "period" not in plain.auth.token.lookup_self()["data"]


def test_token_explicit_max_ttl_still_ends_it(broker: BrokerThread,
                                              issuer: OIDCIssuer) -> None:
    """token_period=2s, token_explicit_max_ttl=4s: renewed every second, it still ends
    at 4 s, the last renewals capped."""
    auth = login(broker, issuer, "bounded")
    me = as_token(broker, auth["client_token"])
    started = time.monotonic()
    granted = []
    while time.monotonic() - started < 3.5:
        time.sleep(1)
        try:
            granted.append(me.auth.token.renew_self()["auth"]["lease_duration"])
        except hvac.exceptions.VaultError:
            break
    assert granted and granted[0] == 2 and min(granted) < 2, granted
    assert wait_until_dead(me, timeout=3)
    assert time.monotonic() - started < 6


def test_the_role_read_shows_the_period(broker: BrokerThread) -> None:
    """token_period in seconds; token_ttl and token_max_ttl 0 (not used), as Vault
    shows a role that sets only the period (the OpenAPI document allows it); 0 for a
    role that is not periodic."""
    root = hvac.Client(url=broker.url, token=broker.root_token)
    read = root.auth.jwt.read_role("bounded", path="github")["data"]
    assert (read["token_period"], read["token_ttl"], read["token_max_ttl"],
            read["token_explicit_max_ttl"]) == (2, 0, 0, 4)
    plain = root.auth.jwt.read_role("plain", path="github")["data"]
    assert (plain["token_period"], plain["token_ttl"]) == (0, 1800)
    # (not api_fixtures.conforms: its argument "method" is a path parameter here)
    case = schema["/v1/auth/{method}/role/{role}"]["GET"].Case(
        path_parameters={"method": "github", "role": "bounded"})
    case.validate_response(raw(broker, "GET", "auth/github/role/bounded"), checks=CHECKS)


# -- config errors: the file, the key, what is wrong ------------------------------------


def _load(tmp_path: Path, issuer: OIDCIssuer, role: str, tokens: str = TOKENS) -> None:
    load_config(write_config(tmp_path, tokens + oidc_method(issuer) + role + POLICY))


def test_a_period_past_the_token_max_ttl_is_a_config_error(tmp_path: Path,
                                                           issuer: OIDCIssuer) -> None:
    """[tokens] max_ttl caps the period: a longer one names the file and the key."""
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, issuer, periodic_role("deploy", "2h"))
    message = str(err.value)
    assert "broker.toml" in message
    assert "auth.jwt.github.roles.deploy.token_period: 2h is longer than tokens.max_ttl " \
           "(1h)" in message, message
    assert "set at most 1h" in message


def test_keys_a_periodic_role_would_not_use_are_config_errors(tmp_path: Path,
                                                              issuer: OIDCIssuer) -> None:
    """token_ttl and token_max_ttl beside token_period (the period is the TTL, there is
    no max TTL) are refused naming them; a period past token_explicit_max_ttl too."""
    with pytest.raises(ConfigError, match=r"roles\.deploy\.token_ttl: not used with "
                                          r"token_period"):
        _load(tmp_path, issuer, jwt_role("deploy", ttl="30m") + 'token_period = "10m"\n')
    with pytest.raises(ConfigError, match=r"roles\.deploy\.token_max_ttl: not used with "
                                          r"token_period.*token_explicit_max_ttl"):
        _load(tmp_path, issuer, periodic_role("deploy", "10m", 'token_max_ttl = "1h"'))
    with pytest.raises(ConfigError, match=r"roles\.deploy\.token_period: longer than "
                                          r"token_explicit_max_ttl \(300s\)"):
        _load(tmp_path, issuer, periodic_role("deploy", "10m",
                                              'token_explicit_max_ttl = "5m"'))


def test_a_periodic_role_loads_under_a_short_token_max_ttl(tmp_path: Path,
                                                           issuer: OIDCIssuer) -> None:
    """Only the period is held to [tokens] max_ttl: no token_max_ttl default (24h) is
    checked against a 1h ceiling, and an explicit max past it loads."""
    _load(tmp_path, issuer, periodic_role("deploy", "1h", 'token_explicit_max_ttl = "48h"'))
    config = load_config(tmp_path / "broker.toml")
    assert config.tokens.max_ttl == 3600
