"""``single_use = true`` on a JWT role: each CI token logs in once, a replay is refused.

A real broker over HTTP (hvac and aiohttp), a real OIDC issuer (tests/oidc_issuer.py):
the first login with a JWT works, a second one with the same JWT is a 403 audited as
``reuse_attempt``, concurrent logins with one JWT make one token, and two replicas on
one PostgreSQL store refuse a replay made on the other. Without the option a JWT logs
in as often as before. Also here: a login token's lookup shows ``auth/NAME/login`` as
its path, as Vault's does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import hvac
import hvac.exceptions
import pytest

from broker.auth.jwt import REPLAY_MARGIN
from broker.config import ConfigError, load_config
from broker.server import reload
from tests.conftest import run
from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.jwt_fixtures import (
    jwt_role,
    oidc_issuer_fixture,
    oidc_method,
    running_broker,
)
from tests.integration.store_fixtures import fresh_postgres_database
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

issuer = oidc_issuer_fixture()

REPLAYED = ("permission denied: this JWT has already been used to log in and the role "
            "accepts each JWT once (single_use); request a new JWT from the CI system")


def auth_config(oidc: OIDCIssuer) -> str:
    """auth/github with two roles alike but for single_use: ``once`` and ``many``."""
    return (oidc_method(oidc) + jwt_role("once") + "single_use = true\n"
            + jwt_role("many") + "single_use = false\n" + '\n[policies.app]\n"x/y" = ["read"]\n')


@pytest.fixture(scope="module")
def broker(issuer: OIDCIssuer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[BrokerThread]:
    with running_broker(tmp_path_factory.mktemp("single-use"), auth_config(issuer),
                        revoke=()) as server:
        yield server


def login(broker: BrokerThread, role: str, jwt: str) -> dict[str, Any]:
    """hvac's jwt_login at auth/github."""
    client = hvac.Client(url=broker.url)
    answer: dict[str, Any] = client.auth.jwt.jwt_login(role=role, jwt=jwt, path="github")
    return answer


def errors(exc: pytest.ExceptionInfo[hvac.exceptions.VaultError]) -> list[str]:
    """The ``errors`` of the answer hvac raised for."""
    listed: list[str] = json.loads(exc.value.text)["errors"]
    return listed


def events(broker: BrokerThread, type_: str) -> list[dict[str, Any]]:
    lines = Path(broker.audit_path).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("type") == type_]


def test_a_jwt_logs_in_once_and_a_replay_is_refused_and_audited(
        broker: BrokerThread, issuer: OIDCIssuer) -> None:
    """The second login with one JWT is a 403 saying only that it was used, audited as
    reuse_attempt with the first login's accessor and never the JWT."""
    jwt = issuer.github_token(run_id="replay-1")
    first = login(broker, "once", jwt)["auth"]
    with pytest.raises(hvac.exceptions.Forbidden) as info:
        login(broker, "once", jwt)
    assert errors(info) == [REPLAYED]
    # Whitespace around it (a token read from a file) does not make it another JWT.
    with pytest.raises(hvac.exceptions.Forbidden):
        login(broker, "once", jwt.strip() + "\n")

    # Accessors are written as HMACs: the login's and the reuse's are the same one.
    [logged] = [e for e in events(broker, "login")
                if e["auth"]["metadata"].get("run_id") == "replay-1"]
    [reuse, _] = [e for e in events(broker, "reuse_attempt")
                  if e.get("first_accessor") == logged["created"]["accessor"]]
    assert reuse["outcome"] == "denied" and reuse["error"] == REPLAYED
    assert (reuse["auth_method"], reuse["role"]) == ("github", "once")
    assert reuse["jwt_claims"]["sub"] == "repo:acme/app:ref:refs/heads/main"
    assert jwt not in Path(broker.audit_path).read_text()
    # The first token still works; only the replay was refused.
    assert hvac.Client(url=broker.url, token=first["client_token"]).auth.token.lookup_self()


def test_the_store_keeps_only_a_hash_of_the_jti(broker: BrokerThread,
                                                issuer: OIDCIssuer) -> None:
    """The used_jwts row holds the SHA-256 of the jti, the accessor and the JWT's end
    (exp + the 60 s leeway); neither the jti nor the JWT in clear."""
    claims = issuer.github_claims(run_id="hash-1")
    first = login(broker, "once", issuer.mint(claims))["auth"]
    db = sqlite3.connect(broker.config.storage.url.removeprefix("sqlite:///"))
    try:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM used_jwts WHERE accessor = ?",
                                            (first["accessor"],))]
    finally:
        db.close()
    assert len(rows) == 1
    assert rows[0]["method"] == "github"
    assert rows[0]["jti_hash"] == hashlib.sha256(claims["jti"].encode()).hexdigest()
    assert rows[0]["valid_until"] == claims["exp"] + 60 + REPLAY_MARGIN  # leeway + margin
    assert claims["jti"] not in json.dumps(rows)


def test_without_single_use_a_jwt_logs_in_again(broker: BrokerThread,
                                                issuer: OIDCIssuer) -> None:
    """A role without the option (the default) lets one JWT log in twice, as before."""
    jwt = issuer.github_token()
    tokens = {login(broker, "many", jwt)["auth"]["accessor"] for _ in range(2)}
    assert len(tokens) == 2


@pytest.mark.parametrize(("drop", "value", "message"), [
    ("jti", None, "role 'once' is single_use and the JWT has no jti claim: without a unique "
                  "token id a replay cannot be told from a first login"),
    ("jti", "", "role 'once' is single_use and the JWT has no jti claim"),
    ("jti", 42, "the jti claim is not a string"),
    ("exp", None, "the JWT has no exp claim (tokens must expire)"),
])
def test_a_jwt_without_jti_or_exp_is_refused_under_single_use(
        broker: BrokerThread, issuer: OIDCIssuer, drop: str, value: Any, message: str) -> None:
    """Under single_use a JWT must carry a string jti (and exp): a 403 naming the claim."""
    claims = issuer.github_claims()
    if value is None:
        del claims[drop]
    else:
        claims[drop] = value
    jwt = issuer.mint(claims)
    with pytest.raises(hvac.exceptions.Forbidden) as info:
        login(broker, "once", jwt)
    assert errors(info)[0].startswith("permission denied: " + message)
    if drop == "jti":  # the role without the option takes such a JWT
        assert login(broker, "many", jwt)["auth"]["client_token"]


def test_a_refused_login_does_not_use_up_the_jwt(broker: BrokerThread,
                                                 issuer: OIDCIssuer) -> None:
    """Only a login that passes every check records the JWT: an unknown role does not."""
    jwt = issuer.github_token()
    with pytest.raises(hvac.exceptions.InvalidRequest):
        login(broker, "nope", jwt)
    assert login(broker, "once", jwt)["auth"]["client_token"]


async def _login_many(urls: list[str], jwt: str) -> list[int]:
    """POST the same login to ``urls`` all at once; the statuses."""
    async with aiohttp.ClientSession() as session:
        async def one(url: str) -> int:
            async with session.post(f"{url}/v1/auth/github/login",
                                    json={"role": "once", "jwt": jwt}) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one(url) for url in urls)))


def test_concurrent_logins_with_one_jwt_make_one_token(broker: BrokerThread,
                                                       issuer: OIDCIssuer) -> None:
    """Ten logins with one JWT at once: one token, nine 403s, nine reuse_attempts."""
    jwt = issuer.github_token(run_id="race-1")
    statuses = run(_login_many([broker.url] * 10, jwt))
    assert sorted(statuses) == [200] + [403] * 9
    logins = [e for e in events(broker, "login")
              if e.get("created", {}).get("accessor")
              and e["auth"]["metadata"].get("run_id") == "race-1"]
    assert len(logins) == 1


def test_a_login_token_looks_like_vaults(broker: BrokerThread, issuer: OIDCIssuer) -> None:
    """lookup_self after jwt_login: path auth/github/login, display name github-<sub>;
    a child token it makes shows auth/token/create."""
    token = login(broker, "many", issuer.github_token())["auth"]["client_token"]
    client = hvac.Client(url=broker.url, token=token)
    me = client.auth.token.lookup_self()["data"]
    assert me["path"] == "auth/github/login"
    assert me["display_name"] == "github-repo:acme/app:ref:refs/heads/main"
    root = hvac.Client(url=broker.url, token=broker.root_token)
    child = root.auth.token.create(policies=["app"], ttl="5m")["auth"]["client_token"]
    assert root.auth.token.lookup(child)["data"]["path"] == "auth/token/create"


def test_the_role_read_shows_single_use(broker: BrokerThread) -> None:
    """GET auth/github/role/ROLE shows single_use as the login applies it."""
    root = hvac.Client(url=broker.url, token=broker.root_token)
    assert root.auth.jwt.read_role("once", path="github")["data"]["single_use"] is True
    assert root.auth.jwt.read_role("many", path="github")["data"]["single_use"] is False


@pytest.mark.parametrize("value", ['"true"', "1", "[true]"])
def test_a_single_use_that_is_not_a_boolean_is_a_config_error(
        tmp_path: Path, issuer: OIDCIssuer, value: str) -> None:
    """single_use = "true" (a string), 1 ...: the error names file, key and problem."""
    body = oidc_method(issuer) + jwt_role("once") + f"single_use = {value}\n" \
        + '\n[policies.app]\n"x/y" = ["read"]\n'
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: auth.jwt.github.roles.once.single_use: "
                                      "expected true or false (unquoted), got ")


def test_replicas_on_one_postgres_store_refuse_a_replay(
        request: pytest.FixtureRequest, tmp_path: Path, issuer: OIDCIssuer) -> None:
    """A JWT used on replica A is refused on B; and ten logins split over both at once
    make one token."""
    dsn = run(fresh_postgres_database(request))
    replicas = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            replicas.append(start_broker(write_config(tmp_path / name, auth_config(issuer),
                                                      storage_url=dsn)))
        a, b = replicas
        jwt = issuer.github_token()
        assert login(a, "once", jwt)["auth"]["client_token"]
        with pytest.raises(hvac.exceptions.Forbidden) as info:
            login(b, "once", jwt)
        assert errors(info) == [REPLAYED]
        assert len(events(b, "reuse_attempt")) == 1

        statuses = run(_login_many([a.url, b.url] * 5, issuer.github_token()))
        assert sorted(statuses) == [200] + [403] * 9
    finally:
        for server in replicas:
            server.stop()


def test_a_larger_leeway_after_a_reload_does_not_let_a_used_jwt_in_again(
    issuer: OIDCIssuer, tmp_path: Path,
) -> None:
    """Logged in under leeway 0; a reload raises it to 5 minutes, so the JWT is accepted
    again for 5 minutes past its exp. Its record must still be there then: it used to
    run out at exp + the old leeway and be taken over by the replay (security review)."""
    config = auth_config(issuer).replace(
        "[auth.jwt.github]\n", '[auth.jwt.github]\nclock_skew_leeway = "0s"\n', 1)
    assert 'clock_skew_leeway = "0s"' in config
    with running_broker(tmp_path, config, revoke=()) as broker:
        claims = issuer.github_claims(run_id="leeway-1", lifetime=2)
        jwt = issuer.mint(claims)
        login(broker, "once", jwt)
        source = Path(broker.config.source)
        source.write_text(source.read_text().replace('clock_skew_leeway = "0s"',
                                                     'clock_skew_leeway = "5m"'))
        assert broker.call(reload(broker.state)) if broker.state else False
        while time.time() < claims["exp"] + 1:  # past exp: only the new leeway accepts it
            time.sleep(0.2)
        with pytest.raises(hvac.exceptions.Forbidden) as refused:
            login(broker, "once", jwt)
        assert errors(refused) == [REPLAYED]
