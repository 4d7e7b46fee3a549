"""Vault's JWT auth read paths through hvac: auth/NAME/role, auth/NAME/role/ROLE, auth/NAME/config.

A real broker and a real OIDC issuer (tests/oidc_issuer.py). An operator who
wonders why a pipeline's login was refused reads the role with hvac's
``client.auth.jwt.read_role`` and sees the bindings the login enforces: each
test that reads a role also logs in against it. Before these paths existed
every one of them answered 404 ``unsupported path``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from broker.audit import SECRET_KEYS
from broker.server import reload
from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.integration.jwt_fixtures import jwt_role, oidc_issuer_fixture, running_broker
from tests.integration.test_openapi import CHECKS, schema
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

ENVELOPE = {"request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info",
            "warnings", "auth"}
WRITES = ("POST", "PUT", "PATCH", "DELETE")

POLICIES = """
[policies.app]
"pg/creds/readonly" = ["read"]

# what an operator debugging logins of auth/github is given
[policies.github-reader]
"auth/github/role/*" = ["read"]
"auth/github/role" = ["list"]
"auth/github/config" = ["read"]

# the same for every auth method
[policies.auth-reader]
"auth/+/role/*" = ["read"]
"auth/+/role" = ["list"]
"auth/+/config" = ["read"]
"""


def github_method(issuer: OIDCIssuer, *, ref: str = "refs/heads/main",
                  extra_role: str = "release") -> str:
    """auth/github: keys by OIDC discovery, a leeway of 30 s, and two roles: deploy (the
    fixtures' CI role, bound to one branch) and EXTRA_ROLE (a subject, a numeric claim,
    exact comparison, a JSON-pointer user claim, an explicit max TTL)."""
    return f"""
[auth.jwt.github]
oidc_discovery_url = "{issuer.url}"
clock_skew_leeway = "30s"
jwks_cache_ttl = "5m"
""" + jwt_role("deploy", bound_claims={"repository": "acme/*", "ref": ref},
               claim_mappings={"run_id": "run_id", "actor": "actor"}, max_ttl="2h") + f"""
[auth.jwt.github.roles.{extra_role}]
bound_audiences = ["broker", "release"]
bound_subject = "repo:acme/app:ref:refs/heads/main"
bound_claims = {{ run_attempt = 1, ref_type = ["branch", "tag"] }}
bound_claims_type = "string"
user_claim = "/actor"
token_policies = ["app"]
token_ttl = "10m"
token_explicit_max_ttl = "1h"
"""


def other_methods(github: OIDCIssuer, gitlab: OIDCIssuer) -> str:
    """auth/gitlab: a JWKS URL over TLS with a pinned CA and two algorithms; auth/pinned:
    github's RSA key as a PEM and no roles."""
    return f"""
[auth.jwt.gitlab]
jwks_url = "{gitlab.jwks_url}"
bound_issuer = "{gitlab.url}"
jwt_supported_algs = ["RS256", "ES256"]
jwks_ca_pem = '''
{gitlab.ca_pem}'''

[auth.jwt.gitlab.roles.ci]
bound_audiences = "broker"
bound_claims = {{ namespace_path = "acme" }}
user_claim = "user_login"
token_policies = ["app"]

[auth.jwt.pinned]
jwt_validation_pubkeys = ['''{github.rsa_key.public_pem()}''']
bound_issuer = "{github.url}"
"""


github = oidc_issuer_fixture()
gitlab = oidc_issuer_fixture(tls=True)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, github: OIDCIssuer,
           gitlab: OIDCIssuer) -> Iterator[BrokerThread]:
    tmp = tmp_path_factory.mktemp("jwtroles")
    body = POLICIES + github_method(github) + other_methods(github, gitlab)
    with running_broker(tmp, body, revoke=()) as server:
        yield server


def client(broker: BrokerThread, token: str | None = None) -> hvac.Client:
    """An hvac client with ``token`` (the root token by default)."""
    return hvac.Client(url=broker.url, token=broker.root_token if token is None else token)


def token_with(broker: BrokerThread, *policies: str) -> str:
    """A new token with ``policies`` plus default, made by the root token."""
    # (none named would be the root token's own: Vault's rule for a child token)
    created = client(broker).auth.token.create(policies=[*policies, "default"], ttl="10m")
    token: str = created["auth"]["client_token"]
    return token


def call(broker: BrokerThread, method: str, path: str, token: str | None = None,
         **kwargs: Any) -> requests.Response:
    """``method /v1/path`` with ``token`` (the root token by default; "" for none)."""
    token = broker.root_token if token is None else token
    headers = {"X-Vault-Token": token} if token else {}
    return requests.request(method, f"{broker.url}/v1/{path}", headers=headers, timeout=30,
                            **kwargs)


def jwt_login(broker: BrokerThread, jwt: str, role: str = "deploy") -> dict[str, Any]:
    """The auth block of a login at auth/github, as a CI job does it."""
    auth: dict[str, Any] = hvac.Client(url=broker.url).auth.jwt.jwt_login(
        role=role, jwt=jwt, path="github")["auth"]
    return auth


def refusal(broker: BrokerThread, jwt: str, role: str = "deploy") -> str:
    """The reason a login at auth/github is refused (403)."""
    with pytest.raises(hvac.exceptions.Forbidden) as refused:
        jwt_login(broker, jwt, role)
    return str(refused.value)


def audit_events(broker: BrokerThread, type_: str) -> list[dict[str, Any]]:
    lines = Path(broker.audit_path).read_text().splitlines()
    return [event for event in map(json.loads, lines) if event.get("type") == type_]


DEPLOY: dict[str, Any] = {
    "role_type": "jwt",
    "bound_audiences": ["broker"],
    "bound_subject": "",
    "bound_claims_type": "glob",
    "bound_claims": {"repository": ["acme/*"], "ref": ["refs/heads/main"]},
    "claim_mappings": {"run_id": "run_id", "actor": "actor"},
    "user_claim": "sub",
    "user_claim_json_pointer": False,
    "clock_skew_leeway": 30,
    "token_policies": ["app"],
    "token_no_default_policy": False,
    "token_ttl": 1800,
    "token_max_ttl": 7200,
    "token_explicit_max_ttl": 0,
    "token_type": "service",
    "token_num_uses": 0,
    "token_period": 0,
    "single_use": False,
}

RELEASE: dict[str, Any] = {
    **DEPLOY,
    "bound_audiences": ["broker", "release"],
    "bound_subject": "repo:acme/app:ref:refs/heads/main",
    "bound_claims_type": "string",
    "bound_claims": {"run_attempt": ["1"], "ref_type": ["branch", "tag"]},
    "claim_mappings": {},
    "user_claim": "/actor",
    "user_claim_json_pointer": True,
    "token_ttl": 600,
    "token_max_ttl": 86400,
    "token_explicit_max_ttl": 3600,
}


def test_list_roles(broker: BrokerThread) -> None:
    """hvac's list_roles (LIST), GET ?list=true and the folder with its slash: the role
    names, sorted, in Vault's envelope; a method without roles is Vault's bare 404."""
    listed = client(broker).auth.jwt.list_roles(path="github")
    assert set(listed) == ENVELOPE and listed["data"] == {"keys": ["deploy", "release"]}
    for method, path, params in [("GET", "auth/github/role", {"list": "true"}),
                                 ("LIST", "auth/github/role/", {}),
                                 ("GET", "auth/github/role/", {"list": "True"})]:
        resp = call(broker, method, path, params=params)
        assert resp.status_code == 200, (method, path, resp.text)
        assert resp.json()["data"] == {"keys": ["deploy", "release"]}
    assert client(broker).auth.jwt.list_roles(path="gitlab")["data"]["keys"] == ["ci"]

    with pytest.raises(hvac.exceptions.InvalidPath):
        client(broker).auth.jwt.list_roles(path="pinned")
    empty = call(broker, "LIST", "auth/pinned/role")
    assert (empty.status_code, empty.json()) == (404, {"errors": []})
    plain = call(broker, "GET", "auth/github/role")  # a plain GET of the folder: as Vault
    assert plain.status_code == 405 and plain.headers["Allow"] == "GET,LIST", plain.text
    assert audit_events(broker, "list")[-1]["auth_method"] == "pinned"


def test_read_role_shows_what_the_login_enforces(broker: BrokerThread,
                                                 github: OIDCIssuer) -> None:
    """read_role answers the role as the login checks it; a login missing any binding
    it shows is refused naming that binding, and one that has them all gets the
    policies and TTL it shows."""
    read = client(broker).auth.jwt.read_role("deploy", path="github")
    assert set(read) == ENVELOPE and read["data"] == DEPLOY

    # Each binding the read shows is one the login enforces.
    assert "'repository'" in refusal(broker, github.github_token(repository="evil/app"))
    assert "'ref'" in refusal(broker, github.github_token(ref="refs/heads/dev"))
    assert "audience" in refusal(broker, github.github_token(aud="someone-else"))
    # A token whose claims match every binding logs in, as the read says.
    auth = jwt_login(broker, github.github_token(repository="acme/tools", run_id="99"))
    assert auth["policies"] == sorted([*DEPLOY["token_policies"], "default"])
    assert DEPLOY["token_ttl"] - 10 <= auth["lease_duration"] <= DEPLOY["token_ttl"]
    assert auth["metadata"] == {"run_id": "99", "actor": "octocat", "role": "deploy",
                                "auth": "github"}

    release = client(broker).auth.jwt.read_role("release", path="github")["data"]
    assert release == RELEASE
    assert "bound_subject" in refusal(
        broker, github.github_token(ref="refs/heads/dev", aud="release"), "release")
    assert "'run_attempt'" in refusal(
        broker, github.github_token(aud="release", run_attempt="2"), "release")
    assert "'ref_type'" in refusal(
        broker, github.github_token(aud="release", ref_type="pr"), "release")
    # run_attempt = 1 in the file: the read's "1" is the text the claim must equal,
    # and the token's "1" logs in.
    auth = jwt_login(broker, github.github_token(aud="release", actor="hubot",
                                                 run_attempt="1"), "release")
    me = client(broker, auth["client_token"]).auth.token.lookup_self()["data"]
    assert me["display_name"] == "github-hubot"  # user_claim /actor, a JSON pointer

    reads = audit_events(broker, "role_read")
    assert reads[-1]["auth_method"] == "github" and reads[-1]["role"] == "release"
    assert reads[-1]["outcome"] == "ok"


def test_unknown_role_and_unknown_method(broker: BrokerThread) -> None:
    """With the grant: an unknown role is Vault's bare 404 (hvac's InvalidPath), an
    unknown method the 404 ``unsupported path`` of any path the broker lacks."""
    with pytest.raises(hvac.exceptions.InvalidPath):
        client(broker).auth.jwt.read_role("nope", path="github")
    resp = call(broker, "GET", "auth/github/role/nope")
    assert (resp.status_code, resp.json()) == (404, {"errors": []})
    # Matched exactly, as the login matches it.
    assert call(broker, "GET", "auth/github/role/Deploy").status_code == 404
    failed = audit_events(broker, "role_read")[-1]
    assert (failed["outcome"], failed["role"], failed["error"]) == ("error", "Deploy",
                                                                    "no such role")

    for method, path in [("GET", "auth/nope/role/deploy"), ("LIST", "auth/nope/role"),
                         ("GET", "auth/nope/config")]:
        resp = call(broker, method, path)
        assert (resp.status_code, resp.json()) == (404, {"errors": ["unsupported path"]}), path
    with pytest.raises(hvac.exceptions.InvalidPath):
        client(broker).auth.jwt.read_config(path="nope")


def test_read_config_shows_the_settings_and_no_secret(broker: BrokerThread, github: OIDCIssuer,
                                                      gitlab: OIDCIssuer) -> None:
    """read_config answers Vault's fields with the values in force (the default
    algorithms, the pinned CA, the public keys as PEM) and the broker's own key-fetching
    settings; nothing of Vault's OIDC client (no client secret), no private key."""
    read = client(broker).auth.jwt.read_config(path="github")
    assert set(read) == ENVELOPE
    assert read["data"] == {
        "oidc_discovery_url": github.url,
        "oidc_discovery_ca_pem": "",
        "jwks_url": "",
        "jwks_ca_pem": "",
        "jwt_validation_pubkeys": [],
        "jwt_supported_algs": ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"],
        "bound_issuer": github.url,
        "default_role": "",
        "clock_skew_leeway": 30,
        "jwks_cache_ttl": 300,
        "jwks_max_stale": 86400,
        "fetch_timeout": 5,
    }
    pinned_ca = client(broker).auth.jwt.read_config(path="gitlab")["data"]
    assert pinned_ca["jwks_url"] == gitlab.jwks_url and pinned_ca["oidc_discovery_url"] == ""
    assert pinned_ca["jwks_ca_pem"] == gitlab.ca_pem
    assert pinned_ca["oidc_discovery_ca_pem"] == ""
    assert pinned_ca["jwt_supported_algs"] == ["RS256", "ES256"]
    assert pinned_ca["bound_issuer"] == gitlab.url and pinned_ca["clock_skew_leeway"] == 60

    pinned = client(broker).auth.jwt.read_config(path="pinned")["data"]
    assert pinned["jwt_validation_pubkeys"] == [github.rsa_key.public_pem()]
    assert pinned["jwks_url"] == pinned["oidc_discovery_url"] == ""
    # Never fetched: the fetch settings mean nothing for these keys and are not shown.
    assert not {"jwks_cache_ttl", "jwks_max_stale", "fetch_timeout"} & set(pinned)

    for name in ("github", "gitlab", "pinned"):
        resp = call(broker, "GET", f"auth/{name}/config")
        data = resp.json()["data"]
        assert not {key.lower() for key in data} & SECRET_KEYS
        assert not {"oidc_client_id", "oidc_client_secret"} & set(data)
        assert "PRIVATE KEY" not in resp.text
    assert audit_events(broker, "config_read")[-1]["auth_method"] == "pinned"


def test_without_a_grant_every_name_is_the_same_403(broker: BrokerThread) -> None:
    """Vault's default policy grants none of these paths: a token without the grant is
    refused before anything is looked up, so a method or role that exists and one
    that does not get the same 403 and nothing is read."""
    default_only = token_with(broker)
    login_token = token_with(broker, "app")
    github_reader = token_with(broker, "github-reader")
    reads_before = len(audit_events(broker, "role_read")) + len(audit_events(broker,
                                                                             "config_read"))
    for token in (default_only, login_token, github_reader, ""):
        for name in ("gitlab", "nope"):  # github-reader may read github only
            answers = {}
            for method, path in [("GET", f"auth/{name}/role/ci"), ("GET", f"auth/{name}/role/x"),
                                 ("LIST", f"auth/{name}/role"), ("LIST", f"auth/{name}/role/"),
                                 ("GET", f"auth/{name}/config")]:
                resp = call(broker, method, path, token)
                assert resp.status_code == 403, (token, method, path, resp.text)
                # The error names the path asked for: the same words for either name.
                answers[method, path.replace(name, "NAME")] = resp.text.replace(name, "NAME")
            if name == "gitlab":
                gitlab_answers = answers
            else:
                assert answers == gitlab_answers  # nothing tells the two apart
    denied = audit_events(broker, "policy_denied")[-1]  # github-reader's last try
    assert denied["checked_path"] == "auth/nope/config"
    with pytest.raises(hvac.exceptions.Forbidden):
        client(broker, default_only).auth.jwt.read_role("deploy", path="github")
    with pytest.raises(hvac.exceptions.Forbidden):
        client(broker, login_token).auth.jwt.list_roles(path="github")
    assert len(audit_events(broker, "role_read")) + len(
        audit_events(broker, "config_read")) == reads_before

    # The grants: github-reader reads auth/github, auth-reader any method.
    reader = client(broker, github_reader)
    assert reader.auth.jwt.read_role("deploy", path="github")["data"] == DEPLOY
    assert reader.auth.jwt.list_roles(path="github")["data"]["keys"] == ["deploy", "release"]
    assert reader.auth.jwt.read_config(path="github")["data"]["bound_issuer"]
    anyone = client(broker, token_with(broker, "auth-reader"))
    assert anyone.auth.jwt.read_role("ci", path="gitlab")["data"]["user_claim"] == "user_login"
    assert anyone.auth.jwt.list_roles(path="gitlab")["data"]["keys"] == ["ci"]
    with pytest.raises(hvac.exceptions.InvalidPath):  # granted: now it may learn that
        anyone.auth.jwt.read_role("ci", path="nope")


def test_writes_answer_405_saying_where_methods_are_set(broker: BrokerThread) -> None:
    """A write to a role, the role folder or the config (of any name, configured or not)
    is a 405 whose Allow header lists the reads and whose error names the config file's
    section; nothing changes."""
    for name in ("github", "nope"):
        for path, allowed in [(f"auth/{name}/role/deploy", "GET"),
                              (f"auth/{name}/role/new", "GET"),
                              (f"auth/{name}/role", "GET,LIST"),
                              (f"auth/{name}/role/", "GET,LIST"),
                              (f"auth/{name}/config", "GET")]:
            for method in WRITES:
                resp = call(broker, method, path, json={"bound_audiences": ["x"]})
                assert resp.status_code == 405, (method, path, resp.text)
                assert resp.headers["Allow"] == allowed, (method, path)
                error = resp.json()["errors"][0]
                assert f"[auth.jwt.{name}]" in error and "SIGHUP" in error, error
    root = client(broker)
    with pytest.raises(hvac.exceptions.UnexpectedError, match=r"auth\.jwt\.github"):
        root.auth.jwt.create_role("deploy", user_claim="sub", allowed_redirect_uris=[],
                                  bound_audiences=["anyone"], path="github")
    with pytest.raises(hvac.exceptions.UnexpectedError):
        root.auth.jwt.delete_role("deploy", path="github")
    with pytest.raises(hvac.exceptions.UnexpectedError):
        root.auth.jwt.configure(bound_issuer="https://evil.example", path="github")
    assert root.auth.jwt.read_role("deploy", path="github")["data"] == DEPLOY


def test_login_and_token_paths_are_not_shadowed(broker: BrokerThread,
                                                github: OIDCIssuer) -> None:
    """The new routes take auth/NAME/role and auth/NAME/config of JWT methods only: the
    login answers as before, and the token method's paths too (its role and config
    paths, which the broker does not have, are still 404 ``unsupported path``)."""
    auth = jwt_login(broker, github.github_token())
    login_client = client(broker, auth["client_token"])
    assert login_client.auth.token.lookup_self()["data"]["policies"] == ["app", "default"]
    got = call(broker, "GET", "auth/github/login")
    assert got.status_code == 405 and got.headers["Allow"] == "POST,PUT"
    assert call(broker, "LIST", "auth/token/accessors").status_code == 200

    # Beside them, the role read of the same role answers.
    assert client(broker).auth.jwt.read_role("deploy", path="github")["data"] == DEPLOY
    for path in ("auth/token/role", "auth/token/role/", "auth/token/role/x",
                 "auth/token/roles/x", "auth/token/config"):
        for method in ("GET", "LIST", "POST", "DELETE"):
            for token in (None, ""):
                resp = call(broker, method, path, token)
                assert (resp.status_code, resp.json()) == (
                    404, {"errors": ["unsupported path"]}), (method, path, token)


def test_a_reload_shows_the_changed_role(tmp_path: Path, github: OIDCIssuer) -> None:
    """After a config reload (what SIGHUP runs) the read shows the new bindings, a new
    role is listed, and the login enforces what the read now shows."""
    config = write_config(tmp_path, POLICIES + github_method(github))
    server = start_broker(config)
    try:
        root = client(server)
        assert root.auth.jwt.read_role("deploy", path="github")["data"] == DEPLOY
        config.write_text(config.read_text().replace(
            github_method(github),
            github_method(github, ref="refs/heads/release-*", extra_role="hotfix")))
        assert server.state is not None
        assert server.call(reload(server.state)) is True  # what SIGHUP runs

        changed = root.auth.jwt.read_role("deploy", path="github")["data"]
        assert changed == {**DEPLOY, "bound_claims": {"repository": ["acme/*"],
                                                      "ref": ["refs/heads/release-*"]}}
        assert root.auth.jwt.list_roles(path="github")["data"]["keys"] == ["deploy", "hotfix"]
        with pytest.raises(hvac.exceptions.InvalidPath):
            root.auth.jwt.read_role("release", path="github")
        # The login checks what the read shows now: main is out, a release branch in.
        assert "'ref'" in refusal(server, github.github_token(ref="refs/heads/main"))
        assert jwt_login(server, github.github_token(ref="refs/heads/release-2"))
    finally:
        server.stop()


def test_the_answers_match_the_openapi_document(broker: BrokerThread) -> None:
    """Each answer, a listing, a role (glob and string, subject or not), a config (keys
    fetched, CA pinned, keys pinned) and a bare 404, matches docs/openapi.yaml."""
    for path, verb, sent, params in [
        ("/v1/auth/{method}/role", "GET", "auth/github/role", {"method": "github"}),
        ("/v1/auth/{method}/role", "GET", "auth/pinned/role", {"method": "pinned"}),
        ("/v1/auth/{method}/role/{role}", "GET", "auth/github/role/deploy",
         {"method": "github", "role": "deploy"}),
        ("/v1/auth/{method}/role/{role}", "GET", "auth/github/role/release",
         {"method": "github", "role": "release"}),
        ("/v1/auth/{method}/role/{role}", "GET", "auth/github/role/nope",
         {"method": "github", "role": "nope"}),
        ("/v1/auth/{method}/config", "GET", "auth/github/config", {"method": "github"}),
        ("/v1/auth/{method}/config", "GET", "auth/gitlab/config", {"method": "gitlab"}),
        ("/v1/auth/{method}/config", "GET", "auth/pinned/config", {"method": "pinned"}),
        ("/v1/auth/{method}/config", "GET", "auth/nope/config", {"method": "nope"}),
    ]:
        listing = {"list": "true"} if path.endswith("/role") else {}
        resp = call(broker, verb, sent, params=listing)
        expected = 404 if "nope" in sent or "pinned/role" in sent else 200
        assert resp.status_code == expected, (sent, resp.text)
        # (not test_openapi._validate: its keyword "method" is a path parameter here)
        case = schema[path][verb].Case(path_parameters=params)
        case.validate_response(resp, checks=CHECKS)
