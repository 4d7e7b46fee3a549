"""QA fixes in the JWT auth config and claim checks, and exec's view of its own token."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker.auth.jwks import StaticKeys
from broker.auth.jwt import JWTAuthMethod
from broker.auth.jwt_config import JWTMethodConfig, JWTRoleConfig
from broker.config import ConfigError, load_config
from broker.errors import PermissionDenied

ISSUER = "https://issuer.example"

METHOD = """
[policies.ci]
"pg/creds/readonly" = ["read"]

[auth.jwt.github]
jwks_url = "https://issuer.example/jwks"
bound_issuer = "https://issuer.example"

[auth.jwt.github.roles.deploy]
bound_audiences = ["broker"]
token_policies = ["ci"]
"""


@pytest.mark.parametrize("key", ["run id", "repo/name", "run_id=", "ünïcode", "a{b}"])
def test_a_claim_mapping_to_a_key_the_lease_apis_refuse_is_a_config_error(
        tmp_path: Path, key: str) -> None:
    """claim_mappings to a metadata key outside [A-Za-z0-9_.-] fails at load time,
    naming the file, the key and the rule: leases carrying it could not be selected."""
    path = tmp_path / "broker.toml"
    path.write_text(METHOD + f'claim_mappings = {{ run_id = "{key}" }}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: auth.jwt.github.roles.deploy.claim_mappings.run_id: ")
    assert f"metadata key {key!r} may hold only letters, digits, '_', '.' and '-'" in message


def test_claim_mappings_to_valid_keys_load(tmp_path: Path) -> None:
    """Letters, digits, '_', '.', '-' are fine, whatever the claim name (a JSON pointer too)."""
    path = tmp_path / "broker.toml"
    path.write_text(METHOD + 'claim_mappings = { run_id = "run_id", repository = "repo.name",'
                    ' "/extra/env" = "ci-env" }\n')
    load_config(path)


def _method() -> JWTAuthMethod:
    return JWTAuthMethod(JWTMethodConfig(name="github", bound_issuer=ISSUER),
                         keys=StaticKeys([]))


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_a_time_claim_too_large_for_a_float_is_refused(claim: str, value: int) -> None:
    """An integer exp/nbf/iat no float can hold is a refusal (403), not an OverflowError."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "broker", "sub": "x", "iat": now, "exp": now + 60}
    claims[claim] = value
    role = JWTRoleConfig(name="deploy", bound_audiences=("broker",))
    with pytest.raises(PermissionDenied, match=f"the {claim} claim is out of range"):
        _method().check_claims(role, claims)


def test_a_large_but_finite_exp_is_still_checked() -> None:
    """A float-sized exp far in the future passes the time checks as before."""
    now = int(time.time())
    role = JWTRoleConfig(name="deploy", bound_audiences=("broker",))
    _method().check_claims(role, {"iss": ISSUER, "aud": "broker", "exp": 10**300, "iat": now})


def test_login_token_from_lookup_reads_expiry_and_max_ttl() -> None:
    """exec's token: expiry from the TTL (exec's clock), max from creation_time +
    explicit_max_ttl as a distance from the broker's expire_time (no clock skew);
    a token that never expires (root) caps nothing."""
    from broker.exec import LoginToken  # here: the other tests do not need exec

    now = 1000.0
    token = LoginToken.from_lookup({"expire_time": "2030-01-01T00:00:04Z", "ttl": 4,
                                    "creation_time": 1893456000, "explicit_max_ttl": 20,
                                    "renewable": True}, now)
    assert token is not None
    assert token.expire_at == 1004.0 and token.server_expire == 1893456004.0
    assert token.max_expire_at == 1020.0 and token.reach == 1020.0
    fixed = LoginToken.from_lookup({"expire_time": "2030-01-01T00:00:04Z", "ttl": 4,
                                    "renewable": False, "explicit_max_ttl": 0}, now)
    assert fixed is not None and fixed.reach == fixed.expire_at == 1004.0
    assert fixed.max_expire_at is None
    assert LoginToken.from_lookup({"expire_time": None, "ttl": 0, "renewable": False},
                                  now) is None
