"""``token_num_uses`` on a JWT role (Vault's option): a login's token may make that many
requests, then it is revoked, as a token made with ``num_uses``.

A real broker over HTTP (hvac), a real OIDC issuer (tests/oidc_issuer.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from broker.config import ConfigError, load_config
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

POLICY = '\n[policies.app]\n"auth/token/lookup-self" = ["read"]\n'


@pytest.fixture(scope="module")
def broker(issuer: OIDCIssuer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[BrokerThread]:
    config = (oidc_method(issuer) + jwt_role("limited") + "token_num_uses = 2\n"
              + jwt_role("plain") + POLICY)
    with running_broker(tmp_path_factory.mktemp("jwt-num-uses"), config,
                        revoke=()) as server:
        yield server


def _login(broker: BrokerThread, issuer: OIDCIssuer, role: str, run_id: str) -> str:
    client = hvac.Client(url=broker.url)
    answer = client.auth.jwt.jwt_login(role=role, path="github",
                                       jwt=issuer.mint(issuer.github_claims(run_id=run_id)))
    assert answer["auth"]["num_uses"] == (2 if role == "limited" else 0)
    token: str = answer["auth"]["client_token"]
    return token


def test_a_login_token_has_the_role_s_uses(broker: BrokerThread, issuer: OIDCIssuer) -> None:
    """Two requests work (the second, its last use, sees -1 left); the third is a 403."""
    client = hvac.Client(url=broker.url, token=_login(broker, issuer, "limited", "uses-1"))
    assert client.auth.token.lookup_self()["data"]["num_uses"] == 1
    assert client.auth.token.lookup_self()["data"]["num_uses"] == -1
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.token.lookup_self()


def test_a_role_without_it_makes_unlimited_tokens(broker: BrokerThread,
                                                  issuer: OIDCIssuer) -> None:
    client = hvac.Client(url=broker.url, token=_login(broker, issuer, "plain", "uses-2"))
    for _ in range(4):
        assert client.auth.token.lookup_self()["data"]["num_uses"] == 0


def test_the_role_read_shows_it(broker: BrokerThread) -> None:
    client = hvac.Client(url=broker.url, token=broker.root_token)
    read = client.auth.jwt.read_role("limited", path="github")["data"]
    assert read["token_num_uses"] == 2


def test_a_negative_value_is_a_config_error(tmp_path: Path, issuer: OIDCIssuer) -> None:
    config = write_config(tmp_path, oidc_method(issuer) + jwt_role("bad")
                          + "token_num_uses = -1\n" + POLICY)
    with pytest.raises(ConfigError, match=r"token_num_uses.*must not be negative"):
        load_config(config)
