"""The JWT validator on its own: signatures, algorithms, claims, key caching, config errors.

No server: keys come from ``jwt_validation_pubkeys`` or from a JWKS document
handed to the key cache in memory (the HTTP path is in tests/integration).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from jwt.api_jws import PyJWS

from broker.auth import JWTAuthMethod, describe_token, parse_jwt_methods
from broker.auth.jwks import MAX_DOCUMENT_BYTES, FetchError, JWKSKeys, fetch_json, parse_jwks
from broker.auth.jwt import MAX_JWT_LENGTH, glob_match
from broker.config import ConfigError, load_config
from broker.errors import BadRequest, PermissionDenied, ServiceUnavailable
from tests.oidc_issuer import OIDCIssuer, SigningKey


@pytest.fixture(scope="module")
def issuer() -> OIDCIssuer:
    """Keys and token shapes only; nothing is served."""
    return OIDCIssuer()


def deploy_role(**overrides: Any) -> dict[str, Any]:
    role: dict[str, Any] = {
        "bound_audiences": ["broker"],
        "bound_claims": {"repository": "acme/*", "ref": "refs/heads/main"},
        "claim_mappings": {"repository": "repository", "run_id": "run_id",
                           "repository_owner": "repository_owner"},
        "token_policies": ["ci"],
        "token_ttl": "30m",
    }
    role.update(overrides)
    return role


def make_method(issuer: OIDCIssuer, *, clock: Callable[[], float] = time.time,
                **roles: dict[str, Any]) -> JWTAuthMethod:
    table = {
        "github": {
            "bound_issuer": issuer.url,
            "jwt_validation_pubkeys": [issuer.rsa_key.public_pem(), issuer.ec_key.public_pem()],
            "roles": roles or {"deploy": deploy_role()},
        }
    }
    return JWTAuthMethod(parse_jwt_methods(table)["github"], clock=clock)


async def denied(method: JWTAuthMethod, token: str, role: str = "deploy") -> str:
    with pytest.raises(PermissionDenied) as info:
        await method.login(role, token)
    assert info.value.status == 403
    return str(info.value)


# -- successful logins --------------------------------------------------------------

async def test_github_token_logs_in_with_mapped_metadata(issuer: OIDCIssuer) -> None:
    """A GitHub-shaped RS256 token matching the bound claims yields policies, TTL and metadata."""
    method = make_method(issuer)
    result = await method.login("deploy", issuer.github_token(repository="acme/app",
                                                              run_id="777"))
    assert result.policies == ["ci", "default"]
    assert result.ttl == 1800
    assert result.display_name == "github-repo:acme/app:ref:refs/heads/main"
    assert result.metadata == {"repository": "acme/app", "run_id": "777",
                               "repository_owner": "acme", "role": "deploy", "auth": "github"}


async def test_es256_and_ps256_signatures_verify(issuer: OIDCIssuer) -> None:
    """EC P-256 (ES256) and RSA-PSS (PS256) signatures are accepted."""
    method = make_method(issuer)
    await method.login("deploy", issuer.github_token(key=issuer.ec_key))
    pss = SigningKey("rsa-1", "PS256", issuer.rsa_key.private)
    await method.login("deploy", issuer.github_token(key=pss))


async def test_gitlab_token_with_list_and_nested_bound_claims(issuer: OIDCIssuer) -> None:
    """List values are any-of, list claims match if one element does, /a/b reaches nested claims."""
    method = make_method(issuer, ci={
        "bound_audiences": "broker",
        "bound_claims": {"namespace_path": ["other", "acme"], "groups": "deployers",
                         "/extra/env": "prod"},
        "user_claim": "user_login",
        "claim_mappings": {"pipeline_id": "pipeline_id", "/extra/env": "env"},
        "token_policies": ["ci"],
    })
    token = issuer.gitlab_token(groups=["devs", "deployers"], extra={"env": "prod"})
    result = await method.login("ci", token)
    assert result.display_name == "github-alice"
    assert result.metadata["pipeline_id"] == "9001" and result.metadata["env"] == "prod"
    msg = await denied(method, issuer.gitlab_token(groups=["devs"], extra={"env": "prod"}),
                       "ci")
    assert "'groups'" in msg


# -- algorithms and signatures ---------------------------------------------------------

async def test_alg_none_is_refused_before_verification(issuer: OIDCIssuer) -> None:
    """An unsigned token (alg none) is refused, naming why."""
    msg = await denied(make_method(issuer), issuer.github_token(signing="none"))
    assert "alg none" in msg


async def test_hs256_keyed_with_the_public_key_is_refused(issuer: OIDCIssuer) -> None:
    """The algorithm confusion attack (HMAC with the public PEM as secret) is refused."""
    token = issuer.github_token(signing="hs256-public-key")
    msg = await denied(make_method(issuer), token)
    assert "symmetric algorithm 'HS256' refused" in msg


async def test_signature_by_another_key_fails(issuer: OIDCIssuer) -> None:
    """A token signed by a key the method does not trust fails verification."""
    msg = await denied(make_method(issuer), issuer.github_token(signing="unknown-key"))
    assert "signature verification failed" in msg


async def test_tampered_payload_fails(issuer: OIDCIssuer) -> None:
    """Swapping the payload of a genuine token (another repository) breaks the signature."""
    genuine = issuer.github_token(repository="acme/app")
    forged_payload = issuer.github_token(repository="acme/other").split(".")[1]
    head, _, sig = genuine.split(".")
    msg = await denied(make_method(issuer), f"{head}.{forged_payload}.{sig}")
    assert "signature verification failed" in msg


async def test_algorithm_must_fit_the_key_type(issuer: OIDCIssuer) -> None:
    """An ES256 token cannot be checked with an RSA key: with only RSA keys it is refused."""
    table = {"gh": {"bound_issuer": issuer.url,
                    "jwt_validation_pubkeys": [issuer.rsa_key.public_pem()],
                    "roles": {"deploy": deploy_role()}}}
    method = JWTAuthMethod(parse_jwt_methods(table)["gh"])
    msg = await denied(method, issuer.github_token(key=issuer.ec_key))
    assert "no configured key can verify ES256" in msg


async def test_restricted_algorithm_list_is_enforced(issuer: OIDCIssuer) -> None:
    """jwt_supported_algs narrows the accepted algorithms."""
    table = {"gh": {"bound_issuer": issuer.url, "jwt_supported_algs": ["ES256"],
                    "jwt_validation_pubkeys": [issuer.rsa_key.public_pem()],
                    "roles": {"deploy": deploy_role()}}}
    method = JWTAuthMethod(parse_jwt_methods(table)["gh"])
    assert "not accepted" in await denied(method, issuer.github_token())


async def test_malformed_tokens_are_refused(issuer: OIDCIssuer) -> None:
    """Garbage, JWE, crit headers and oversized tokens are 403 with a reason, never a 500."""
    method = make_method(issuer)
    assert "three dot-separated" in await denied(method, "not-a-jwt")
    assert "JWE" in await denied(method, "a.b.c.d.e")
    assert "header is not base64url JSON" in await denied(method, "!!!.e30.sig")
    crit = issuer.mint(issuer.github_claims(), headers={"crit": ["exp"]})
    assert "crit" in await denied(method, crit)
    assert "longer than" in await denied(method, "a" * (MAX_JWT_LENGTH + 1))


async def test_deeply_nested_json_is_refused_not_a_crash(issuer: OIDCIssuer) -> None:
    """Header, unverified payload or signed payload nested thousands deep: a 403, never a 500."""
    method = make_method(issuer)
    nested = base64.urlsafe_b64encode(b"[" * 5000).rstrip(b"=").decode()
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256"}).encode()).decode()
    assert "header is not base64url JSON" in await denied(method, f"{nested}.e30.c2ln")
    assert "signature verification failed" in await denied(method,
                                                             f"{header}.{nested}.c2ln")
    signed = PyJWS().encode(b"[" * 5000, issuer.rsa_key.private, algorithm="RS256",
                            headers={"kid": "rsa-1"})
    assert "payload is not JSON" in await denied(method, signed)
    assert describe_token(f"{nested}.e30.c2ln") == {}
    assert describe_token(f"{header}.{nested}.c2ln") == {"jwt_header": {"alg": "RS256"}}


async def test_unknown_role_and_missing_jwt_are_bad_requests(issuer: OIDCIssuer) -> None:
    """An unknown role or a missing jwt is a 400, not a 403."""
    method = make_method(issuer)
    with pytest.raises(BadRequest, match="role 'nope' could not be found"):
        await method.login("nope", issuer.github_token())
    with pytest.raises(BadRequest, match="'jwt'"):
        await method.login("deploy", None)
    with pytest.raises(BadRequest, match="'role'"):
        await method.login(None, issuer.github_token())


# -- time claims -------------------------------------------------------------------------

def base_claims(issuer: OIDCIssuer, now: float, **overrides: Any) -> dict[str, Any]:
    claims = issuer.github_claims()
    claims.update(iat=int(now) - 10, nbf=int(now) - 10, exp=int(now) + 300)
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


async def test_expiry_is_required_and_enforced_with_leeway(issuer: OIDCIssuer) -> None:
    """exp is required; 30 s past exp passes (60 s leeway), 61 s past fails."""
    now = 1_900_000_000.0
    method = make_method(issuer, clock=lambda: now)
    await method.login("deploy", issuer.mint(base_claims(issuer, now, exp=int(now) - 30)))
    msg = await denied(method, issuer.mint(base_claims(issuer, now, exp=int(now) - 61)))
    assert "expired at 2030-03-17T17:45:39Z" in msg
    assert "no exp claim" in await denied(method, issuer.mint(base_claims(issuer, now,
                                                                          exp=None)))
    assert "not a number" in await denied(method, issuer.mint(base_claims(issuer, now,
                                                                          exp="soon")))


async def test_nbf_and_iat_in_the_future_are_refused(issuer: OIDCIssuer) -> None:
    """A token not yet valid, or issued in the future beyond the leeway, is refused."""
    now = 1_900_000_000.0
    method = make_method(issuer, clock=lambda: now)
    await method.login("deploy", issuer.mint(base_claims(issuer, now, nbf=int(now) + 30)))
    assert "not valid before" in await denied(
        method, issuer.mint(base_claims(issuer, now, nbf=int(now) + 120)))
    assert "issued in the future" in await denied(
        method, issuer.mint(base_claims(issuer, now, iat=int(now) + 120)))


async def test_expired_token_from_the_issuer_helper_is_refused(issuer: OIDCIssuer) -> None:
    """A genuine token replayed after it expired fails."""
    assert "expired" in await denied(make_method(issuer), issuer.github_token(expired=True))


# -- issuer, audience, subject, bound claims ----------------------------------------------

async def test_wrong_issuer_is_refused(issuer: OIDCIssuer) -> None:
    """iss must equal bound_issuer exactly."""
    msg = await denied(make_method(issuer),
                       issuer.github_token(iss="https://token.actions.githubusercontent.com"))
    assert "is not the bound issuer" in msg


async def test_audience_rules_follow_vault(issuer: OIDCIssuer) -> None:
    """aud must intersect bound_audiences; an aud with no bound audiences is refused too."""
    method = make_method(issuer, deploy=deploy_role(),
                         open=deploy_role(bound_audiences=[]))
    await method.login("deploy", issuer.github_token(aud=["sts.amazonaws.com", "broker"]))
    assert "not in the role's bound_audiences" in await denied(
        method, issuer.github_token(aud="https://github.com/acme"))
    claims = issuer.github_claims()
    del claims["aud"]
    assert "no aud claim" in await denied(method, issuer.mint(claims))
    await method.login("open", issuer.mint(claims))
    assert "has no bound_audiences" in await denied(method, issuer.github_token(), "open")


async def test_bound_subject(issuer: OIDCIssuer) -> None:
    """bound_subject must equal sub exactly."""
    method = make_method(issuer, deploy=deploy_role(
        bound_subject="repo:acme/app:ref:refs/heads/main"))
    await method.login("deploy", issuer.github_token())
    assert "bound_subject" in await denied(method, issuer.github_token(ref="refs/heads/dev"))


async def test_bound_claims_wrong_repo_and_missing_claim(issuer: OIDCIssuer) -> None:
    """Another owner's repository or a missing bound claim is refused, naming the claim."""
    method = make_method(issuer)
    msg = await denied(method, issuer.github_token(repository="evil/app"))
    assert "claim 'repository' value 'evil/app' does not match" in msg
    claims = issuer.github_claims()
    del claims["ref"]
    assert "claim 'ref' is missing" in await denied(method, issuer.mint(claims))


async def test_string_bound_claims_take_star_literally(issuer: OIDCIssuer) -> None:
    """With bound_claims_type = "string" a '*' is not a wildcard."""
    method = make_method(issuer, deploy=deploy_role(bound_claims_type="string"))
    await denied(method, issuer.github_token(repository="acme/app"))
    await method.login("deploy", issuer.github_token(repository="acme/*"))


def test_glob_match() -> None:
    """'*' matches any run (slashes included); everything else is literal; no backtracking blowup."""
    assert glob_match("acme/*", "acme/app")
    assert glob_match("acme/*", "acme/")
    assert glob_match("repo:acme/*:ref:refs/heads/main", "repo:acme/app:ref:refs/heads/main")
    assert not glob_match("repo:acme/*:ref:refs/heads/main", "repo:acme/app:ref:refs/heads/dev")
    assert glob_match("*", "")
    assert glob_match("a*b*c", "abc") and glob_match("a*b*c", "axxbyyc")
    assert not glob_match("a*b*c", "acb")
    assert not glob_match("ab*ba", "aba")  # head and tail may not overlap
    assert not glob_match("acme/?pp", "acme/app")
    started = time.monotonic()
    assert not glob_match("*a" * 50 + "*b", "a" * 100_000)
    assert time.monotonic() - started < 1


async def test_claim_mapping_of_a_structured_claim_is_refused(issuer: OIDCIssuer) -> None:
    """Only scalars become metadata; a missing mapped claim is simply left out."""
    method = make_method(issuer, deploy=deploy_role(
        claim_mappings={"groups": "groups", "not_there": "x"}))
    result = await method.login("deploy", issuer.github_token())
    assert "x" not in result.metadata
    assert "is not a string, number or boolean" in await denied(
        method, issuer.github_token(groups=["a", "b"]))


def test_describe_token_never_contains_the_token(issuer: OIDCIssuer) -> None:
    """The audit description has iss/sub/kid but not the token or its signature."""
    token = issuer.github_token()
    info = describe_token(token)
    assert info["jwt_claims"]["iss"] == issuer.url
    assert info["jwt_claims"]["sub"].startswith("repo:acme/app")
    assert info["jwt_header"] == {"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}
    text = repr(info)
    assert token not in text and token.split(".")[2] not in text
    assert describe_token("garbage") == {} and describe_token(None) == {}


# -- the JWKS cache --------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def jwks_method(issuer: OIDCIssuer, fetch: Callable[[str], Any], clock: FakeClock,
                *, discovery: bool = False) -> tuple[JWTAuthMethod, JWKSKeys]:
    cfg = parse_jwt_methods({"gh": {
        "bound_issuer": issuer.url,
        ("oidc_discovery_url" if discovery else "jwks_url"):
            issuer.url if discovery else issuer.jwks_url,
        "jwks_cache_ttl": "10m",
        "roles": {"deploy": deploy_role()},
    }})["gh"]

    async def fetch_async(url: str) -> Any:
        return fetch(url)

    keys = JWKSKeys(issuer=cfg.bound_issuer, jwks_url=cfg.jwks_url,
                    discovery_url=cfg.oidc_discovery_url, cache_ttl=cfg.jwks_cache_ttl,
                    fetch=fetch_async, monotonic=clock)
    return JWTAuthMethod(cfg, keys=keys), keys


def served(issuer: OIDCIssuer, log: list[str]) -> Callable[[str], Any]:
    def fetch(url: str) -> Any:
        log.append(url)
        if url.endswith("/.well-known/openid-configuration"):
            return issuer.discovery()
        assert url == issuer.jwks_url
        return issuer.jwks()
    return fetch


async def test_jwks_is_cached_and_refetched_after_its_ttl() -> None:
    """Many logins fetch the key set once; after jwks_cache_ttl it is fetched again."""
    issuer, log, clock = OIDCIssuer(), [], FakeClock()
    method, keys = jwks_method(issuer, served(issuer, log), clock)
    for _ in range(5):
        await method.login("deploy", issuer.github_token())
    assert len(log) == 1
    clock.now += 599
    await method.login("deploy", issuer.github_token())
    await keys.wait_refreshed()
    assert len(log) == 1
    clock.now += 2
    await method.login("deploy", issuer.github_token())
    await keys.wait_refreshed()  # a stale key set is refreshed in the background
    assert len(log) == 2


async def test_unknown_kid_refreshes_once_rate_limited() -> None:
    """A rotated key is picked up by one refresh; made-up kids cannot force more than 1 per 10 s."""
    issuer, log, clock = OIDCIssuer(), [], FakeClock()
    method, _ = jwks_method(issuer, served(issuer, log), clock)
    await method.login("deploy", issuer.github_token())
    clock.now += 11
    new = issuer.rotate()
    await method.login("deploy", issuer.github_token(key=new))
    assert len(log) == 2
    clock.now += 10
    for _ in range(20):
        assert "unknown signing key id" in await denied(
            method, issuer.github_token(signing="unknown-key"))
    assert len(log) == 3  # the first made-up kid refreshed; the rest were rate-limited
    clock.now += 5
    newer = issuer.rotate()
    assert "unknown signing key id" in await denied(method, issuer.github_token(key=newer))
    assert len(log) == 3
    clock.now += 6
    await method.login("deploy", issuer.github_token(key=newer))
    assert len(log) == 4


async def test_discovery_issuer_must_match_and_fetch_failures_are_503() -> None:
    """A discovery document naming another issuer is refused; no keys at all answers 503."""
    issuer, clock = OIDCIssuer(), FakeClock()

    def wrong_issuer(url: str) -> Any:
        return {**issuer.discovery(), "issuer": "https://evil.example"}

    method, _ = jwks_method(issuer, wrong_issuer, clock, discovery=True)
    with pytest.raises(ServiceUnavailable, match="is not the bound issuer"):
        await method.login("deploy", issuer.github_token())
    log: list[str] = []
    method, _ = jwks_method(issuer, served(issuer, log), clock, discovery=True)
    await method.login("deploy", issuer.github_token())
    assert log == [f"{issuer.url}/.well-known/openid-configuration", issuer.jwks_url]


async def test_failed_refresh_keeps_the_cached_keys() -> None:
    """When the issuer is down after a good fetch, the last good keys keep working."""
    issuer, clock, up = OIDCIssuer(), FakeClock(), [True]

    def flaky(url: str) -> Any:
        if not up[0]:
            raise FetchError(f"{url}: connection refused")
        return issuer.jwks()

    method, keys = jwks_method(issuer, flaky, clock)
    await method.login("deploy", issuer.github_token())
    up[0] = False
    clock.now += 3600
    await method.login("deploy", issuer.github_token())
    await keys.wait_refreshed()
    assert keys.fetches == 2
    await method.login("deploy", issuer.github_token())


def test_jwks_parsing_skips_unusable_keys(issuer: OIDCIssuer) -> None:
    """Symmetric, encryption, small-RSA and other-curve keys never become verification keys."""
    small = {"kty": "RSA", "kid": "small", "n": "sXch", "e": "AQAB"}
    doc = {"keys": [
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {**issuer.rsa_key.public_jwk(), "kid": "enc", "use": "enc"},
        {**issuer.rsa_key.public_jwk(), "kid": "hs", "alg": "HS256"},
        small,
        issuer.ec_key.public_jwk(),
    ]}
    assert [k.kid for k in parse_jwks(doc, "test")] == ["ec-1"]
    with pytest.raises(FetchError, match="no usable signing key"):
        parse_jwks({"keys": [doc["keys"][0]]}, "test")
    with pytest.raises(FetchError, match="not a JWKS"):
        parse_jwks({"nope": 1}, "test")


# -- config errors name file and key ----------------------------------------------------

def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(f"""
[storage]
url = "sqlite:///{tmp_path / 'b.db'}"
[audit]
path = "{tmp_path / 'a.jsonl'}"
hmac_key_file = "{tmp_path / 'k'}"
[policies.ci]
"pg/creds/readonly" = ["read"]
""" + body)
    return path


@pytest.mark.parametrize(("body", "key", "message"), [
    ('[auth.jwt.github]\nbound_issuer = "x"\n', "auth.jwt.github.jwks_url",
     "exactly one of"),
    ('[auth.jwt.github]\njwks_url = "https://a/jwks"\noidc_discovery_url = "https://a"\n',
     "auth.jwt.github.oidc_discovery_url", "exactly one of"),
    ('[auth.jwt.github]\njwks_url = "http://10.0.0.1/jwks"\nbound_issuer = "x"\n',
     "auth.jwt.github.jwks_url", "plain http"),
    ('[auth.jwt.github]\njwks_url = "https://a/jwks"\n', "auth.jwt.github.bound_issuer",
     "missing"),
    ('[auth.jwt.github]\noidc_discovery_url = "https://a"\njwt_supported_algs = ["HS256"]\n',
     "auth.jwt.github.jwt_supported_algs", "'HS256' is not allowed"),
    ('[auth.jwt.github]\nbound_issuer = "x"\njwt_validation_pubkeys = ["nope"]\n',
     "auth.jwt.github.jwt_validation_pubkeys[0]", "not a PEM public key"),
    ('[auth.jwt.github]\noidc_discovery_url = "https://a"\nleeway = "1m"\n'
     'clock_skew_leeway = "1m"\n', "auth.jwt.github.leeway", "not both"),
    ('[auth.jwt.github]\noidc_discovery_url = "https://a"\nbogus = 1\n',
     "auth.jwt.github.bogus", "unknown key"),
    ('[auth.jwt.github]\noidc_discovery_url = "https://a"\n'
     '[auth.jwt.github.roles.deploy]\nbound_audiences = 3\n',
     "auth.jwt.github.roles.deploy.bound_audiences", "expected list or str"),
    ('[auth.jwt.github]\noidc_discovery_url = "https://a"\n'
     '[auth.jwt.github.roles.deploy]\ntoken_policies = ["cj"]\n',
     "auth.jwt.github.roles.deploy.token_policies", "unknown policy 'cj'"),
    ('[auth.jwt.github]\noidc_discovery_url = "https://a"\n'
     '[auth.jwt.github.roles.deploy]\nclaim_mappings = { repository = "role" }\n',
     "auth.jwt.github.roles.deploy.claim_mappings.repository", "set by the login itself"),
    ('[auth.jwt.github]\noidc_discovery_url = "https://a"\n'
     '[auth.jwt.github.roles.deploy]\nbound_claims_type = "regex"\n',
     "auth.jwt.github.roles.deploy.bound_claims_type", "'string' or 'glob'"),
    ('[auth.jwt.github]\noidc_discovery_url = "https://a"\n'
     '[auth.jwt.github.roles.deploy]\ntoken_ttl = "2h"\ntoken_explicit_max_ttl = "1h"\n',
     "auth.jwt.github.roles.deploy.token_ttl", "longer than token_explicit_max_ttl"),
    ('[auth.jwt.token]\noidc_discovery_url = "https://a"\n', "auth.jwt.token",
     "'token' is reserved: it is the token auth method"),
    ('[auth.jwt.github]\noidc_discovery_url = "https://a"\njwks_max_stale = "a day"\n',
     "auth.jwt.github.jwks_max_stale", "expected a duration"),
])
def test_config_errors_name_file_and_key(tmp_path: Path, body: str, key: str,
                                         message: str) -> None:
    """A bad [auth.jwt.NAME] fails at load with FILE: auth.jwt.NAME...KEY: reason."""
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key, str(info.value)
    assert message in info.value.message
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_jwks_max_stale_with_pem_keys_names_the_key(tmp_path: Path, issuer: OIDCIssuer) -> None:
    """jwks_max_stale next to jwt_validation_pubkeys (which never go stale) is a config error."""
    pem = issuer.rsa_key.public_pem().replace("\n", "\\n")
    path = write(tmp_path, f"""
[auth.jwt.pinned]
bound_issuer = "https://gitlab.example.com"
jwt_validation_pubkeys = ["{pem}"]
jwks_max_stale = "1h"
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "auth.jwt.pinned.jwks_max_stale"
    assert "only applies to jwks_url and oidc_discovery_url" in info.value.message


def test_good_config_loads_with_defaults(tmp_path: Path, issuer: OIDCIssuer) -> None:
    """A DESIGN.md-style section loads; the discovery URL is the default bound issuer."""
    pem = issuer.rsa_key.public_pem().replace("\n", "\\n")
    path = write(tmp_path, f"""
[auth.jwt.github]
oidc_discovery_url = "https://token.actions.githubusercontent.com"
[auth.jwt.github.roles.deploy]
bound_audiences = ["broker"]
bound_claims = {{ repository = "acme/*" }}
claim_mappings = {{ repository = "repository", run_id = "run_id" }}
token_policies = ["ci"]
token_ttl = "30m"
[auth.jwt.pinned]
bound_issuer = "https://gitlab.example.com"
jwt_validation_pubkeys = ["{pem}"]
""")
    config = load_config(path)
    parsed = parse_jwt_methods(config.auth["jwt"])
    github = parsed["github"]
    assert github.bound_issuer == "https://token.actions.githubusercontent.com"
    assert github.leeway == 60 and github.jwks_cache_ttl == 600 and github.fetch_timeout == 5
    assert github.jwks_max_stale == 86400
    role = github.roles["deploy"]
    assert role.token_ttl == 1800 and role.token_cap == 86400
    assert role.bound_claims == {"repository": ("acme/*",)}
    assert len(parsed["pinned"].public_keys) == 1


async def test_a_jwks_key_is_used_only_for_its_own_algorithm() -> None:
    """A kid naming an RSA key cannot carry an ES256 token, nor an RS256 key sign PS256."""
    issuer, log, clock = OIDCIssuer(), [], FakeClock()
    method, _ = jwks_method(issuer, served(issuer, log), clock)
    ec_signed_as_rsa = issuer.mint(issuer.github_claims(), key=issuer.ec_key, kid="rsa-1")
    assert "key id 'rsa-1' cannot verify ES256" in await denied(method, ec_signed_as_rsa)
    pss = SigningKey("rsa-1", "PS256", issuer.rsa_key.private)  # the JWK says alg RS256
    assert "key id 'rsa-1' cannot verify PS256" in await denied(
        method, issuer.github_token(key=pss))
    assert len(log) == 1  # a known kid never triggers a refresh


async def test_fetch_json_reads_a_document_that_arrives_in_pieces(
        aiohttp_server: Any, issuer: OIDCIssuer) -> None:
    """A JWKS streamed in small pieces is read to its end; one past the size limit is refused."""
    data = json.dumps(issuer.jwks()).encode()

    async def pieces(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for start in range(0, len(data), 100):
            await resp.write(data[start:start + 100])
            await asyncio.sleep(0.01)
        return resp

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(2 * MAX_DOCUMENT_BYTES // 65536 + 2):
            await resp.write(b" " * 65536)
        return resp

    app = web.Application()
    app.router.add_get("/jwks", pieces)
    app.router.add_get("/huge", endless)
    server = await aiohttp_server(app)
    doc = await fetch_json(str(server.make_url("/jwks")), timeout=5)
    assert doc == issuer.jwks()
    assert len(parse_jwks(doc, "test")) == 2
    with pytest.raises(FetchError, match="document larger than"):
        await fetch_json(str(server.make_url("/huge")), timeout=5)
