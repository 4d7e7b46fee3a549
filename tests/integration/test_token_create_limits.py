"""auth/token/create against a real broker: a chosen ``id`` (root or sudo only, never
reused), the options the broker refuses (``no_default_policy``, ``entity_alias``) and
the ``[tokens] max_ttl`` ceiling on every token's life.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from broker.config import ConfigError, load_config
from broker.tokens import TokenIdTaken, hash_token
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    noop_broker_fixture,
    write_config,
)
from tests.integration.token_fixtures import (
    audit_events,
    broker_on_store,
    client,
    made_by_root,
)

pytestmark = pytest.mark.integration

#: The ceiling these tests run under: short, so capping is visible.
CEILING = 2 * 3600

CONFIG = """
[tokens]
max_ttl = "2h"

[policies.creator]
"auth/token/create" = ["update"]
"auth/token/create-orphan" = ["update"]

[policies.sudo-creator]
"auth/token/create" = ["update", "sudo"]
"auth/token/create-orphan" = ["update", "sudo"]
"""


broker = noop_broker_fixture(CONFIG, "token-limits")


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, ROOT_TOKEN)


def create(broker: BrokerThread, body: dict[str, Any], *, token: str = ROOT_TOKEN,
           path: str = "auth/token/create") -> requests.Response:
    return requests.post(f"{broker.url}/v1/{path}", json=body, timeout=30,
                         headers={"X-Vault-Token": token})


def audit_text(broker: BrokerThread) -> str:
    return Path(broker.audit_path).read_text()


# -- id: the token's value, chosen by root or sudo -----------------------------------------


def test_root_chooses_the_token_value(broker: BrokerThread, root: hvac.Client,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """id from a root token becomes the token (it used to be ignored), and is never
    written in clear to the audit log or the broker's log."""
    caplog.set_level(logging.DEBUG)
    chosen = "chosen-by-root-0001"
    auth = root.auth.token.create(id=chosen, policies=["creator"], ttl="1h")["auth"]
    assert auth["client_token"] == chosen
    me = client(broker, chosen).auth.token.lookup_self()["data"]
    assert me["accessor"] == auth["accessor"] and me["policies"] == ["creator", "default"]
    assert chosen not in audit_text(broker)
    assert chosen not in caplog.text
    created = [e for e in audit_events(broker, "token_create")
               if e.get("created", {}).get("accessor") == broker.state.audit.hmac(auth["accessor"])]
    assert created and created[0]["created"]["client_token"].startswith("hmac-sha256:")


@pytest.mark.parametrize("path", ["auth/token/create", "auth/token/create-orphan"])
def test_sudo_on_the_path_may_choose_the_token_value(broker: BrokerThread, root: hvac.Client,
                                                     path: str) -> None:
    """As in Vault, sudo on the create path is enough (create-orphan too)."""
    sudo = made_by_root(root, ["sudo-creator"])
    chosen = f"sudo-chosen-{path.rsplit('/', 1)[1]}"
    resp = create(broker, {"id": chosen, "policies": ["sudo-creator"]}, token=sudo, path=path)
    assert resp.status_code == 200, resp.text
    assert resp.json()["auth"]["client_token"] == chosen
    assert client(broker, chosen).auth.token.lookup_self()["data"]["policies"] \
        == ["default", "sudo-creator"]


@pytest.mark.parametrize("path", ["auth/token/create", "auth/token/create-orphan"])
def test_a_token_without_sudo_cannot_choose_the_value(broker: BrokerThread, root: hvac.Client,
                                                      path: str) -> None:
    """403, audited as policy_denied (without the value), and no token is made."""
    plain = made_by_root(root, ["creator"])
    chosen = f"not-allowed-{path.rsplit('/', 1)[1]}"
    resp = create(broker, {"id": chosen, "policies": ["creator"]}, token=plain, path=path)
    assert resp.status_code == 403, resp.text
    assert "id" in resp.json()["errors"][0] and "sudo" in resp.json()["errors"][0]
    assert chosen not in resp.text
    denied = audit_events(broker, "policy_denied")
    assert any("choosing the token's value" in str(e.get("error")) for e in denied)
    assert chosen not in audit_text(broker)
    assert broker.state is not None
    assert broker.call(broker.state.store.token_by_hash(hash_token(chosen))) is None


def test_a_value_in_use_is_400_and_the_token_holding_it_is_untouched(
        broker: BrokerThread, root: hvac.Client) -> None:
    """A second create with the same id answers 400 (not 500), audited; the first token
    keeps its accessor, policies and expiry, and a revoked token's value is not reused."""
    chosen = "taken-value-0001"
    first = root.auth.token.create(id=chosen, policies=["creator"], ttl="1h")["auth"]
    before = client(broker, chosen).auth.token.lookup_self()["data"]
    resp = create(broker, {"id": chosen, "policies": ["sudo-creator"], "ttl": "2h"})
    assert resp.status_code == 400, resp.text
    assert "already exists" in resp.json()["errors"][0] and chosen not in resp.text
    after = client(broker, chosen).auth.token.lookup_self()["data"]
    assert after["accessor"] == first["accessor"] and after["policies"] == ["creator", "default"]
    assert after["expire_time"] == before["expire_time"]
    errors = [e for e in audit_events(broker, "token_create") if e.get("outcome") == "error"]
    assert errors and "already exists" in errors[-1]["error"]
    root.auth.token.revoke(chosen)
    again = create(broker, {"id": chosen, "policies": ["creator"]})
    assert again.status_code == 400, again.text  # a dead token's value stays recognisable


@pytest.mark.parametrize(("chosen", "message"), [
    ("short", "at least 8 characters"),
    ("has a space", "spaces or control characters"),
    ("tab\there-x", "spaces or control characters"),
])
def test_a_bad_chosen_value_is_400(broker: BrokerThread, chosen: str, message: str) -> None:
    """check_token_id applies to a chosen id: too short, or unsendable in a header."""
    resp = create(broker, {"id": chosen, "policies": ["creator"]})
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["errors"][0]


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store_broker(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> Iterator[BrokerThread]:
    with broker_on_store(request, tmp_path) as server:
        yield server


def test_two_creates_of_one_value_at_once_make_one_token(any_store_broker: BrokerThread) -> None:
    """Racing past the lookup, the second insert hits the store's unique token_hash: on
    both stores that is TokenIdTaken (400), the winner's row stands, the store stays
    healthy, and the HTTP answer for the value is 400 too."""
    broker = any_store_broker
    assert broker.state is not None
    tokens, store = broker.state.tokens, broker.state.store
    chosen = "raced-value-0001"

    async def race() -> list[Any]:
        return await asyncio.gather(
            *(tokens.create(policies=["default"], ttl=600, token_id=chosen) for _ in range(2)),
            return_exceptions=True)

    outcomes = broker.call(race())
    made = [o for o in outcomes if isinstance(o, tuple)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(made) == 1 and len(refused) == 1, outcomes
    assert isinstance(refused[0], TokenIdTaken)
    stored = broker.call(store.token_by_hash(hash_token(chosen)))
    assert stored is not None and stored.accessor == made[0][1].accessor
    assert store.error is None
    resp = create(broker, {"id": chosen, "policies": ["default"]})
    assert resp.status_code == 400, resp.text
    assert client(broker, chosen).auth.token.lookup_self()["data"]["accessor"] == stored.accessor


# -- options the broker does not have --------------------------------------------------------


@pytest.mark.parametrize(("option", "message"), [
    ({"no_default_policy": True}, "every token carries the built-in 'default' policy"),
    ({"no_default_policy": "true"}, "no_default_policy is not supported"),
    ({"entity_alias": "alice"}, "entity_alias is not supported"),
])
@pytest.mark.parametrize("path", ["auth/token/create", "auth/token/create-orphan"])
def test_unsupported_options_are_400(broker: BrokerThread, option: dict[str, Any],
                                     message: str, path: str) -> None:
    """They used to be ignored: a token "without" default still had it."""
    resp = create(broker, {"policies": ["creator"], **option}, path=path)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["errors"][0]


def test_their_neutral_values_are_accepted(root: hvac.Client) -> None:
    """no_default_policy=false (hvac always sends it) and an empty entity_alias."""
    auth = root.auth.token.create(policies=["creator"], no_default_policy=False,
                                  entity_alias="")["auth"]
    assert auth["client_token"]


# -- the TTL ceiling --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["auth/token/create", "auth/token/create-orphan"])
def test_a_ttl_above_the_ceiling_is_capped_with_a_warning(broker: BrokerThread,
                                                          path: str) -> None:
    """ttl=876000h (100 years) gets [tokens] max_ttl, says so, and lookup agrees."""
    resp = create(broker, {"policies": ["creator"], "ttl": "876000h"}, path=path)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["auth"]["lease_duration"] == CEILING
    assert any("ttl 36500d is longer than the token max TTL" in w and "capped at 2h" in w
               for w in body["warnings"]), body["warnings"]
    data = client(broker, body["auth"]["client_token"]).auth.token.lookup_self()["data"]
    assert CEILING - 10 < data["ttl"] <= CEILING and data["creation_ttl"] == CEILING
    assert data["explicit_max_ttl"] == CEILING


def test_an_explicit_max_ttl_above_the_ceiling_is_capped(broker: BrokerThread) -> None:
    """explicit_max_ttl=10h becomes 2h, with a warning; a TTL within both stays."""
    resp = create(broker, {"policies": ["creator"], "ttl": "30m", "explicit_max_ttl": "10h"})
    body = resp.json()
    assert body["auth"]["lease_duration"] == 1800
    assert any(w.startswith("explicit_max_ttl 10h") for w in body["warnings"])
    data = client(broker, body["auth"]["client_token"]).auth.token.lookup_self()["data"]
    assert data["explicit_max_ttl"] == CEILING


def test_no_warning_when_nothing_was_capped(broker: BrokerThread) -> None:
    """A TTL within the ceiling answers warnings: null, as before."""
    body = create(broker, {"policies": ["creator"], "ttl": "1h"}).json()
    assert body["auth"]["lease_duration"] == 3600 and body["warnings"] is None


@pytest.mark.parametrize("ttl", [None, 0, "0", "0s"])
def test_a_missing_or_zero_ttl_means_the_ceiling(broker: BrokerThread, ttl: Any) -> None:
    """No ttl gives [tokens] max_ttl (was 32 days); ttl 0 too (it was a token that never
    expired), as Vault reads 0 as "the default"."""
    body = {"policies": ["creator"]} | ({} if ttl is None else {"ttl": ttl})
    auth = create(broker, body).json()["auth"]
    assert auth["lease_duration"] == CEILING and auth["renewable"] is True
    data = client(broker, auth["client_token"]).auth.token.lookup_self()["data"]
    assert data["expire_time"] is not None and data["ttl"] <= CEILING


def test_renewals_stop_at_the_ceiling(broker: BrokerThread, root: hvac.Client) -> None:
    """A 1h token renewed by 5h gets what is left of creation + 2h, not 5h."""
    token = root.auth.token.create(policies=["creator"], ttl="1h")["auth"]["client_token"]
    renewed = client(broker, token).auth.token.renew_self(increment="5h")["auth"]
    assert CEILING - 10 < renewed["lease_duration"] <= CEILING


def test_a_root_token_without_ttl_is_the_only_unlimited_one(broker: BrokerThread,
                                                            root: hvac.Client) -> None:
    """Root policy and no ttl: never expires. Root with a ttl: capped like any other."""
    unlimited = root.auth.token.create(policies=["root"])["auth"]
    assert unlimited["lease_duration"] == 0 and unlimited["renewable"] is False
    data = client(broker, unlimited["client_token"]).auth.token.lookup_self()["data"]
    assert data["expire_time"] is None
    capped = create(broker, {"policies": ["root"], "ttl": "100h"}).json()
    assert capped["auth"]["lease_duration"] == CEILING and capped["warnings"]


def test_a_root_token_with_only_an_explicit_max_ttl_expires(broker: BrokerThread) -> None:
    """explicit_max_ttl without ttl on a root token: it lives that long (it used to never
    expire, the cap ignored)."""
    auth = create(broker, {"policies": ["root"], "explicit_max_ttl": "1h"}).json()["auth"]
    assert auth["lease_duration"] == 3600


# -- [tokens] in the config file --------------------------------------------------------------


def _config_error(tmp_path: Path, body: str) -> ConfigError:
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


def test_tokens_max_ttl_loads_and_defaults_to_768h(tmp_path: Path) -> None:
    """Absent: 768h, Vault's default system max TTL. Set: whole seconds."""
    assert load_config(write_config(tmp_path, "")).tokens.max_ttl == 768 * 3600
    assert load_config(write_config(tmp_path, '[tokens]\nmax_ttl = "7d"\n')).tokens.max_ttl \
        == 7 * 86400


@pytest.mark.parametrize(("body", "key", "message"), [
    ('[tokens]\nmax_ttl = "soon"\n', "tokens.max_ttl", "expected a duration"),
    ('[tokens]\nmax_ttl = "500ms"\n', "tokens.max_ttl", "must be at least 1s"),
    ("[tokens]\nmax_ttl = 0\n", "tokens.max_ttl", "must be at least 1s"),
    ('[tokens]\nmax_tll = "1h"\n', "tokens.max_tll", "unknown key"),
    ('[tokens]\nmax_ttl = "1h"\n[auth.jwt.ci]\njwks_url = "http://127.0.0.1:1/jwks"\n'
     'bound_issuer = "https://ci.example"\n[auth.jwt.ci.roles.deploy]\n'
     'bound_audiences = "ci"\ntoken_ttl = "30m"\n',
     "auth.jwt.ci.roles.deploy.token_max_ttl", "1d (the default) is longer than tokens.max_ttl"),
    ('[auth.jwt.ci]\njwks_url = "http://127.0.0.1:1/jwks"\nbound_issuer = "https://ci.example"\n'
     '[auth.jwt.ci.roles.deploy]\nbound_audiences = "ci"\n'
     'token_ttl = "1h"\ntoken_max_ttl = "2000h"\n',
     "auth.jwt.ci.roles.deploy.token_max_ttl", "longer than tokens.max_ttl (32d)"),
    ('[auth.jwt.ci]\njwks_url = "http://127.0.0.1:1/jwks"\nbound_issuer = "https://ci.example"\n'
     '[auth.jwt.ci.roles.deploy]\nbound_audiences = "ci"\n'
     'token_ttl = "1h"\ntoken_max_ttl = 0\n',
     "auth.jwt.ci.roles.deploy.token_max_ttl", "0 (no limit)"),
    ('[auth.jwt.ci]\njwks_url = "http://127.0.0.1:1/jwks"\nbound_issuer = "https://ci.example"\n'
     '[auth.jwt.ci.roles.deploy]\nbound_audiences = "ci"\n'
     'token_ttl = "800h"\ntoken_max_ttl = "900h"\n',
     "auth.jwt.ci.roles.deploy.token_ttl", "longer than tokens.max_ttl"),
])
def test_bad_token_limits_name_the_file_and_key(tmp_path: Path, body: str, key: str,
                                                message: str) -> None:
    """A bad [tokens] max_ttl, or a JWT role whose tokens could outlive it, stops the load."""
    error = _config_error(tmp_path, body)
    assert error.key == key, str(error)
    assert message in error.message, str(error)


def test_a_jwt_role_within_the_ceiling_loads(tmp_path: Path) -> None:
    """token_max_ttl above the ceiling is fine when token_explicit_max_ttl is within it."""
    config = load_config(write_config(tmp_path, """
[tokens]
max_ttl = "12h"
[auth.jwt.ci]
jwks_url = "http://127.0.0.1:1/jwks"
bound_issuer = "https://ci.example"
[auth.jwt.ci.roles.deploy]
bound_audiences = ["ci"]
token_ttl = "30m"
token_max_ttl = "48h"
token_explicit_max_ttl = "12h"
"""))
    assert config.tokens.max_ttl == 12 * 3600
