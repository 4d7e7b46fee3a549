"""Vault compatibility of the token API and JWT login, against a real broker over HTTP
(hvac 2.x where a Vault client is the point): PUT as POST, the token endpoints hvac
exposes (renew-accessor, accessors, revoke-orphan), the token echoed by lookups but
never audited, sys/auth, and type errors that say what is wrong.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    noop_broker_fixture,
    start_broker,
    write_config,
)
from tests.integration.store_fixtures import broker_store_url
from tests.oidc_issuer import SigningKey

pytestmark = pytest.mark.integration

POLICIES = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "24h"

[policies.issuer]
"noop/creds/r" = ["read"]
"auth/token/create" = ["update"]

[policies.renewer]
"auth/token/renew-accessor" = ["update"]

# update/list where Vault wants sudo: not enough.
[policies.almost]
"auth/token/revoke-orphan" = ["update"]
"auth/token/accessors" = ["list", "read"]

[policies.sudoer]
"auth/token/revoke-orphan" = ["sudo"]
"auth/token/accessors/" = ["list", "sudo"]
"""

KEY = SigningKey.generate("RS256")
JWT_METHODS = f"""
[auth.jwt.github]
bound_issuer = "https://token.actions.githubusercontent.com"
jwt_validation_pubkeys = ['''
{KEY.public_pem()}''']

[auth.jwt.github.roles.deploy]
bound_audiences = ["broker"]
token_policies = ["issuer"]

[auth.jwt.gitlab]
bound_issuer = "https://gitlab.example.com"
jwt_validation_pubkeys = ['''
{KEY.public_pem()}''']

[auth.jwt.gitlab.roles.ci]
bound_audiences = ["broker"]
token_policies = ["issuer"]
"""


broker = noop_broker_fixture(POLICIES + JWT_METHODS, "vault-compat-tokens")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store_broker(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> Iterator[BrokerThread]:
    """A broker on each lease store: the accessor listing is a query of its own in each."""
    from broker.bench.noop import register

    register()
    url = broker_store_url(request, tmp_path)
    server = start_broker(write_config(tmp_path, POLICIES, storage_url=url))
    yield server
    server.stop()


def client(broker: BrokerThread, token: str = ROOT_TOKEN) -> hvac.Client:
    return hvac.Client(url=broker.url, token=token)


def new_token(broker: BrokerThread, *policies: str, by: str = ROOT_TOKEN,
              ttl: str = "1h") -> dict[str, Any]:
    """A new token's auth block, created by ``by``."""
    return dict(client(broker, by).auth.token.create(policies=list(policies) or None,
                                                    ttl=ttl)["auth"])


def call(broker: BrokerThread, method: str, path: str, token: str = ROOT_TOKEN,
         **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{broker.url}/v1/{path}", timeout=30,
                            headers={"X-Vault-Token": token}, **kwargs)


def audit_text(broker: BrokerThread) -> str:
    return Path(broker.audit_path).read_text()


def audit_events(broker: BrokerThread, type_: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, audit_text(broker).splitlines()) if e["type"] == type_]


def alive(broker: BrokerThread, token: str) -> bool:
    return call(broker, "GET", "auth/token/lookup-self", token).status_code == 200


def lease_revoked(broker: BrokerThread, lease_id: str, timeout: float = 10) -> bool:
    """Wait until the lease is revoked (a lookup then answers 400 "... is revoked")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = call(broker, "PUT", "sys/leases/lookup", json={"lease_id": lease_id})
        if resp.status_code == 400 and "is revoked" in resp.text:
            return True
        time.sleep(0.05)
    return False


# -- 3. PUT is POST ---------------------------------------------------------------------


def test_put_works_wherever_post_does_on_token_paths(broker: BrokerThread) -> None:
    """create, create-orphan, lookup, lookup-accessor and lookup-self answer a PUT as a
    POST (`vault write auth/token/create` sends PUT); they were 405s."""
    made = call(broker, "PUT", "auth/token/create", json={"policies": ["default"]})
    assert made.status_code == 200, made.text
    auth = made.json()["auth"]
    assert auth["orphan"] is False and alive(broker, auth["client_token"])
    orphan = call(broker, "PUT", "auth/token/create-orphan", json={"policies": ["default"]})
    assert orphan.status_code == 200, orphan.text
    assert orphan.json()["auth"]["orphan"] is True
    for path, body in [("auth/token/lookup", {"token": auth["client_token"]}),
                       ("auth/token/lookup-accessor", {"accessor": auth["accessor"]})]:
        resp = call(broker, "PUT", path, json=body)
        assert resp.status_code == 200, (path, resp.text)
        assert resp.json()["data"]["accessor"] == auth["accessor"]
    resp = call(broker, "PUT", "auth/token/lookup-self", auth["client_token"])
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["accessor"] == auth["accessor"]


# -- 5. lookups echo the token they were given, never into the audit log --------------


def test_lookups_show_the_presented_token_as_id_but_the_audit_log_never_does(
        broker: BrokerThread) -> None:
    """lookup-self and lookup answer data.id = the token (as Vault); lookup-accessor keeps
    "" (an accessor must never lead to its token); the audit log holds no copy of it."""
    auth = new_token(broker, "default")
    token, accessor = auth["client_token"], auth["accessor"]
    assert client(broker, token).auth.token.lookup_self()["data"]["id"] == token
    assert client(broker).auth.token.lookup(token)["data"]["id"] == token
    by_accessor = client(broker).auth.token.lookup_accessor(accessor)["data"]
    assert by_accessor["id"] == "" and by_accessor["accessor"] == accessor
    lookups = audit_events(broker, "token_lookup")
    assert any(e.get("target") == broker.state.audit.hmac(accessor) for e in lookups)
    assert accessor not in audit_text(broker)  # written as its HMAC
    assert token not in audit_text(broker)


# -- 4. renew-accessor --------------------------------------------------------------------


def test_renew_accessor_renews_without_revealing_the_token(broker: BrokerThread) -> None:
    """hvac's renew_accessor extends the token by the increment; the answer's client_token
    is "" (as Vault); the capability is update on auth/token/renew-accessor."""
    target = new_token(broker, "default", ttl="10m")
    renewer = new_token(broker, "renewer")["client_token"]
    resp = client(broker, renewer).auth.token.renew_accessor(target["accessor"], increment="2h")
    auth = resp["auth"]
    assert auth["client_token"] == ""
    assert auth["accessor"] == target["accessor"] and auth["lease_duration"] == 7200
    assert target["client_token"] not in json.dumps(resp)
    looked = client(broker).auth.token.lookup_accessor(target["accessor"])["data"]
    assert 7000 < looked["ttl"] <= 7200
    renewals = audit_events(broker, "token_renew")
    assert renewals[-1]["target"] == broker.state.audit.hmac(target["accessor"])
    # PUT too; without the capability a 403; an unknown accessor a 400.
    put = call(broker, "PUT", "auth/token/renew-accessor", renewer,
               json={"accessor": target["accessor"]})
    assert put.status_code == 200, put.text
    nobody = new_token(broker, "default")["client_token"]
    with pytest.raises(hvac.exceptions.Forbidden):
        client(broker, nobody).auth.token.renew_accessor(target["accessor"])
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid accessor"):
        client(broker, renewer).auth.token.renew_accessor("no-such-accessor")


# -- 4. LIST auth/token/accessors (on both stores) ----------------------------------------


def test_list_accessors_lists_live_tokens_and_needs_sudo(any_store_broker: BrokerThread
                                                         ) -> None:
    """hvac's list_accessors (LIST) answers every live token's accessor, sorted, and no
    revoked one; list alone is a 403, sudo is needed as in Vault; limit/after page."""
    broker = any_store_broker
    live = [new_token(broker, "default") for _ in range(3)]
    dead = new_token(broker, "default")
    client(broker).auth.token.revoke(dead["client_token"])
    keys = client(broker).auth.token.list_accessors()["data"]["keys"]
    assert keys == sorted(keys)
    assert {t["accessor"] for t in live} | {"test-root"} <= set(keys)
    assert dead["accessor"] not in keys
    with pytest.raises(hvac.exceptions.Forbidden):
        client(broker, new_token(broker, "almost")["client_token"]).auth.token.list_accessors()
    sudoer = new_token(broker, "sudoer")["client_token"]
    assert set(client(broker, sudoer).auth.token.list_accessors()["data"]["keys"]) == set(
        client(broker).auth.token.list_accessors()["data"]["keys"])
    # Paging (extension): limit, then after=the last key.
    keys = client(broker).auth.token.list_accessors()["data"]["keys"]
    first = call(broker, "GET", "auth/token/accessors",
                 params={"list": "true", "limit": "2"}).json()
    assert first["data"]["keys"] == keys[:2] and first["warnings"]
    rest = call(broker, "GET", "auth/token/accessors",
                params={"list": "true", "after": keys[1]}).json()
    assert rest["data"]["keys"] == keys[2:] and rest["warnings"] is None
    # A plain GET is not a listing (after the token check, as Vault); POST is not allowed.
    plain = call(broker, "GET", "auth/token/accessors")
    assert plain.status_code == 405 and "LIST" in plain.headers["Allow"]
    assert call(broker, "POST", "auth/token/accessors").status_code == 405


# -- 4. revoke-orphan ---------------------------------------------------------------------


def test_revoke_orphan_revokes_the_token_and_its_leases_but_not_its_children(
        broker: BrokerThread) -> None:
    """hvac's revoke_and_orphan_children ends the parent and its leases; its child (and
    grandchild) live on, now orphans, with their leases, and a later revoke of the parent
    does not reach them. It needs sudo: update is a 403."""
    parent = new_token(broker, "issuer")
    child = new_token(broker, "issuer", by=parent["client_token"])
    grandchild = new_token(broker, "issuer", by=child["client_token"])
    parent_lease = client(broker, parent["client_token"]).read("noop/creds/r")["lease_id"]
    child_lease = client(broker, child["client_token"]).read("noop/creds/r")["lease_id"]
    assert client(broker).auth.token.lookup(child["client_token"])["data"]["orphan"] is False

    updater = new_token(broker, "almost")["client_token"]
    with pytest.raises(hvac.exceptions.Forbidden):
        client(broker, updater).auth.token.revoke_and_orphan_children(parent["client_token"])
    assert alive(broker, parent["client_token"])

    sudoer = new_token(broker, "sudoer")["client_token"]
    resp = client(broker, sudoer).auth.token.revoke_and_orphan_children(parent["client_token"])
    assert resp.status_code == 204
    assert not alive(broker, parent["client_token"])
    assert alive(broker, child["client_token"]) and alive(broker, grandchild["client_token"])
    assert client(broker).auth.token.lookup(child["client_token"])["data"]["orphan"] is True
    root = client(broker)
    assert lease_revoked(broker, parent_lease)
    assert root.sys.read_lease(child_lease)["data"]["state"] == "active"
    revoked = audit_events(broker, "token_revoke")[-1]
    assert revoked["target"] == broker.state.audit.hmac(parent["accessor"])
    assert revoked["tokens"] == 1

    # Revoking the parent again (by value or accessor) reaches none of its orphans.
    root.auth.token.revoke(parent["client_token"])
    root.auth.token.revoke_accessor(parent["accessor"])
    assert alive(broker, child["client_token"]) and alive(broker, grandchild["client_token"])
    # The orphan is still a parent: revoking it takes its own child.
    root.auth.token.revoke(child["client_token"])
    assert not alive(broker, grandchild["client_token"])
    # A token that is gone: 400, as Vault.
    gone = call(broker, "PUT", "auth/token/revoke-orphan", json={"token": parent["client_token"]})
    assert gone.status_code == 400 and gone.json() == {"errors": ["token to revoke not found"]}


# -- 4. GET sys/auth -----------------------------------------------------------------------


def test_sys_auth_lists_the_token_and_jwt_methods_in_vaults_shape(broker: BrokerThread) -> None:
    """hvac's sys.list_auth_methods: token/ and each [auth.jwt.NAME] as NAME/, with Vault's
    fields, under data and at the top level; read on sys/auth is needed."""
    answer = client(broker).sys.list_auth_methods()
    methods = answer["data"]
    assert set(methods) == {"token/", "github/", "gitlab/"}
    assert methods["token/"]["type"] == "token"
    assert methods["github/"]["type"] == "jwt" and methods["gitlab/"]["type"] == "jwt"
    for entry in methods.values():
        assert entry["accessor"].startswith(f"auth_{entry['type']}_")
        assert {"config", "description", "local", "seal_wrap", "uuid", "options"} <= set(entry)
    assert methods["github/"]["accessor"] != methods["gitlab/"]["accessor"]
    assert answer["github/"] == methods["github/"]  # Vault's older top-level shape
    with pytest.raises(hvac.exceptions.Forbidden):
        client(broker, new_token(broker, "default")["client_token"]).sys.list_auth_methods()


# -- 6. type errors say what is wrong -----------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    ({"num_uses": "abc"}, "num_uses must be a whole number, not a string"),
    ({"num_uses": "--5"}, "num_uses must be a whole number, not a string"),
    ({"num_uses": [1]}, "num_uses must be a whole number, not a list"),
    ({"num_uses": True}, "num_uses must be a whole number, not a boolean"),
    ({"num_uses": -1}, "num_uses must not be negative"),
    ({"num_uses": 2**63}, "num_uses must be at most 9223372036854775807"),
    ({"meta": []}, "meta must be an object of string values, not a list"),
    ({"meta": "team=a"}, "meta must be an object of string values, not a string"),
    # A number is taken as its text, as Vault's weak decoding does (round 5); a list is not.
    ({"meta": {"team": [5]}}, "meta 'team' must be a string, number or boolean, not a list"),
    ({"type": 5}, "type must be a string"),
    ({"entity_alias": 5}, "entity_alias must be a string"),
])
def test_token_create_type_errors_say_what_is_wrong(broker: BrokerThread, body: dict[str, Any],
                                                    message: str) -> None:
    """A value of the wrong type is a 400 naming the field and the type expected, not
    "not supported" or a silent default; nothing is created."""
    created = len(audit_events(broker, "token_create"))
    resp = call(broker, "POST", "auth/token/create", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["errors"][0].startswith(message), resp.text
    assert len(audit_events(broker, "token_create")) == created


def test_token_create_still_takes_what_vault_clients_send(broker: BrokerThread) -> None:
    """num_uses 0 or 2 (number or text), an empty or absent meta: accepted."""
    for body in ({"num_uses": 0}, {"num_uses": "0"}, {"num_uses": "2"}, {"meta": {}},
                 {"meta": None}, {}):
        resp = call(broker, "POST", "auth/token/create", json={"policies": ["default"], **body})
        assert resp.status_code == 200, (body, resp.text)


@pytest.mark.parametrize(("body", "message"), [
    ({"role": 5, "jwt": "x.y.z"}, "role must be a string"),
    ({"role": ["deploy"], "jwt": "x.y.z"}, "role must be a string"),
    ({"role": "deploy", "jwt": 5}, "jwt must be a string"),
    ({"role": "deploy", "jwt": {"a": 1}}, "jwt must be a string"),
])
def test_login_type_errors_say_what_is_wrong(broker: BrokerThread, body: dict[str, Any],
                                             message: str) -> None:
    """A login whose role or jwt is not a string is a 400 saying so (it used to say
    "missing required parameter"), audited as an auth_failure."""
    resp = requests.post(f"{broker.url}/v1/auth/github/login", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"errors": [message]}
    assert audit_events(broker, "auth_failure")[-1]["error"] == message
    # hvac's jwt_login says the same
    with pytest.raises(hvac.exceptions.InvalidRequest, match=message):
        hvac.Client(url=broker.url).auth.jwt.jwt_login(path="github", **body)


def test_login_missing_role_is_still_missing(broker: BrokerThread) -> None:
    """No role at all keeps Vault's "missing required parameter" answer."""
    resp = requests.post(f"{broker.url}/v1/auth/github/login", json={"jwt": "x.y.z"}, timeout=30)
    assert resp.status_code == 400 and "missing required parameter 'role'" in resp.text
