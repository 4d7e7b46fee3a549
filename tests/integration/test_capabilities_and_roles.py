"""sys/capabilities(-self, -accessor) and the read-only roles API against a real broker
over HTTP, with hvac where a Vault client is the point: Vault's shapes, the policy
checks, the audit trail, and routes that shadow none of the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from broker.api.roles import role_data
from broker.backend import RoleSpec
from broker.bench.noop import register as register_noop_plugin
from broker.templating import DEFAULT_USERNAME_TEMPLATE
from tests.integration.api_fixtures import audit_lines, conforms, raw
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    aws_mount,
    start_broker,
    write_config,
)

pytestmark = pytest.mark.integration

CREATE_RO = ('CREATE ROLE \\"{{name}}\\" WITH LOGIN PASSWORD \'{{password}}\' '
             "VALID UNTIL '{{expiration}}'")


def config(dsn: str) -> str:
    return f"""
[mounts.pg]
plugin = "postgres"
connection_url = "{dsn}"

[mounts.pg.roles.ro]
creation_statements = ["{CREATE_RO}", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO \\"{{{{name}}}}\\""]
revocation_statements = ["DROP ROLE IF EXISTS \\"{{{{name}}}}\\""]
username_template = "ro-{{{{random 8}}}}"
default_ttl = "1h"
max_ttl = "2h"

[mounts.pg.roles.rw]
default_ttl = "5m"
max_ttl = "10m"

# A mount named like the new path segment: its routes must all still work.
[mounts.roles]
plugin = "bench-noop"

[mounts.roles.roles.a]
default_ttl = "1h"

[mounts.bare]
plugin = "bench-noop"

[policies.reader]
"pg/creds/ro" = ["read"]
"pg/creds/rw" = ["deny"]
"pg/creds/*" = ["list", "read"]
"pg/roles" = ["list"]
"pg/roles/ro" = ["read"]

[policies.team]
"pg/creds/{{{{identity.metadata.team}}}}-*" = ["read", "update"]

[policies.inspector]
"sys/capabilities" = ["update"]
"sys/capabilities-accessor" = ["update"]

# A policy written for Vault: a LIST is checked on "pg/roles/".
[policies.vault-lister]
"pg/roles/*" = ["list", "read"]

[policies.rotator]
"roles/*" = ["update", "sudo"]
"roles/rotate-root/+" = ["deny"]
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str
           ) -> Iterator[BrokerThread]:
    register_noop_plugin()
    server = start_broker(write_config(tmp_path_factory.mktemp("caps-roles"),
                                      config(postgres_dsn)))
    yield server
    # Nothing here issues from pg; the noop leases go with the broker's store.
    server.stop()


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return hvac.Client(url=broker.url, token=ROOT_TOKEN)


def token(root: hvac.Client, *policies: str, meta: dict[str, str] | None = None
          ) -> dict[str, Any]:
    """A new token's auth block (client_token, accessor) with ``policies`` (and ``default``)."""
    return dict(root.auth.token.create(policies=list(policies), meta=meta, ttl="1h")["auth"])


def client(broker: BrokerThread, auth: dict[str, Any]) -> hvac.Client:
    return hvac.Client(url=broker.url, token=auth["client_token"])


# -- capabilities ----------------------------------------------------------------------
def test_a_root_token_has_root_on_every_path(root: hvac.Client) -> None:
    """hvac's get_capabilities for a root token: ["root"] per path, at the top level and
    under data; "capabilities" only when one path was asked."""
    two = root.sys.get_capabilities(paths=["pg/creds/ro", "sys/anything/at/all"])
    assert two["pg/creds/ro"] == two["sys/anything/at/all"] == ["root"]
    assert two["data"] == {"pg/creds/ro": ["root"], "sys/anything/at/all": ["root"]}
    assert "capabilities" not in two and two["request_id"]
    one = root.sys.get_capabilities(paths=["pg/creds/ro"])
    assert one["capabilities"] == one["data"]["capabilities"] == ["root"]


def test_a_policy_token_sees_its_grants_sorted_and_deny_elsewhere(
        broker: BrokerThread, root: hvac.Client) -> None:
    """The reader policy's exact grant, its explicit deny, its glob, the default policy's
    grants and an ungranted path, each as Vault words it; a leading "/" is ignored."""
    reader = client(broker, token(root, "reader"))
    paths = ["pg/creds/ro", "pg/creds/rw", "pg/creds/other", "sys/mounts",
             "sys/capabilities-self", "nothing/here", "/pg/creds/ro"]
    answer = reader.sys.get_capabilities(paths=paths)
    expected = {
        "pg/creds/ro": ["read"],
        "pg/creds/rw": ["deny"],
        "pg/creds/other": ["list", "read"],
        "sys/mounts": ["deny"],  # not in the default policy (as in Vault)
        "sys/capabilities-self": ["update"],
        "nothing/here": ["deny"],
        "/pg/creds/ro": ["read"],
    }
    assert answer["data"] == expected
    assert {p: answer[p] for p in paths} == expected


def test_vaults_older_single_path_field_still_works(broker: BrokerThread,
                                                     root: hvac.Client) -> None:
    """{"path": "..."} (Vault's deprecated field, a string) answers like paths=[...], over PUT
    too, and matches the document."""
    reader = token(root, "reader")
    resp = raw(broker, "PUT", "sys/capabilities-self", reader["client_token"],
               json={"path": "pg/creds/ro"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["capabilities"] == resp.json()["data"]["pg/creds/ro"] == ["read"]
    conforms("/v1/sys/capabilities-self", "PUT", resp)


def test_templated_policy_paths_resolve_against_the_token_asked_about(
        broker: BrokerThread, root: hvac.Client) -> None:
    """A {{identity.metadata.team}} path grants on the token's own team only; asked by
    another token (sys/capabilities, -accessor), the answer is still the team token's."""
    blue = token(root, "team", meta={"team": "blue"})
    paths = ["pg/creds/blue-app", "pg/creds/red-app"]
    own = client(broker, blue).sys.get_capabilities(paths=paths)
    assert own["data"] == {"pg/creds/blue-app": ["read", "update"], "pg/creds/red-app": ["deny"]}
    inspector = client(broker, token(root, "inspector"))  # no team metadata of its own
    by_token = inspector.sys.get_capabilities(paths=paths, token=blue["client_token"])
    by_accessor = inspector.sys.get_capabilities(paths=paths, accessor=blue["accessor"])
    assert by_token["data"] == by_accessor["data"] == own["data"]


def test_asking_about_another_token_needs_update_on_the_path(
        broker: BrokerThread, root: hvac.Client) -> None:
    """sys/capabilities and sys/capabilities-accessor are not in the default policy: 403,
    audited as policy_denied; root and the inspector policy may."""
    other = token(root, "reader")
    plain = client(broker, token(root, "reader"))
    with pytest.raises(hvac.exceptions.Forbidden):
        plain.sys.get_capabilities(paths=["pg/creds/ro"], token=other["client_token"])
    with pytest.raises(hvac.exceptions.Forbidden):
        plain.sys.get_capabilities(paths=["pg/creds/ro"], accessor=other["accessor"])
    denied = [e for e in audit_lines(broker) if e["type"] == "policy_denied"]
    assert {e["checked_path"] for e in denied[-2:]} == {"sys/capabilities",
                                                        "sys/capabilities-accessor"}
    for asker in (root, client(broker, token(root, "inspector"))):
        assert asker.sys.get_capabilities(paths=["pg/creds/ro"], token=other["client_token"]
                                          )["capabilities"] == ["read"]
        assert asker.sys.get_capabilities(paths=["pg/creds/ro"], accessor=other["accessor"]
                                          )["capabilities"] == ["read"]


def test_an_unknown_or_dead_token_or_accessor_is_vaults_400(
        broker: BrokerThread, root: hvac.Client) -> None:
    """Unknown and revoked tokens alike: 400 "invalid token"; accessors: 400
    "invalid accessor" (Vault's answers, which do not tell the two apart)."""
    dead = token(root, "reader")
    root.auth.token.revoke(dead["client_token"])
    for value in ("hvs.no-such-token-anywhere", dead["client_token"]):
        with pytest.raises(hvac.exceptions.InvalidRequest) as exc:
            root.sys.get_capabilities(paths=["pg/creds/ro"], token=value)
        assert "invalid token" in str(exc.value)
    for value in ("no-such-accessor", dead["accessor"]):
        with pytest.raises(hvac.exceptions.InvalidRequest) as exc:
            root.sys.get_capabilities(paths=["pg/creds/ro"], accessor=value)
        assert "invalid accessor" in str(exc.value)


def test_bad_input_is_a_400_naming_the_field(broker: BrokerThread) -> None:
    """No paths, an empty path, a non-string path, a missing token: 400 with the reason."""
    cases = [
        ("sys/capabilities-self", {}, "paths"),
        ("sys/capabilities-self", {"paths": ["pg/creds/ro", ""]}, "empty path"),
        ("sys/capabilities-self", {"paths": [1]}, "list of strings"),
        ("sys/capabilities", {"paths": ["a"]}, "'token'"),
        ("sys/capabilities-accessor", {"paths": ["a"]}, "'accessor'"),
        ("sys/capabilities-self", {"paths": ["p"] * 1001}, "at most 1000"),
    ]
    for path, body, words in cases:
        resp = raw(broker, "POST", path, json=body)
        assert resp.status_code == 400, (path, body, resp.text)
        assert words in resp.json()["errors"][0], resp.text


def test_the_token_asked_about_never_reaches_the_audit_log_in_clear(
        broker: BrokerThread, root: hvac.Client) -> None:
    """sys/capabilities with a token: the audit lines name the target by accessor, and the
    token's value is nowhere in the log (nor is a token given to -accessor by mistake)."""
    secret = token(root, "reader")
    inspector = client(broker, token(root, "inspector"))
    inspector.sys.get_capabilities(paths=["pg/creds/ro"], token=secret["client_token"])
    with pytest.raises(hvac.exceptions.InvalidRequest):
        inspector.sys.get_capabilities(paths=["pg/creds/ro"], accessor=secret["client_token"])
    text = Path(broker.audit_path).read_text()
    assert secret["client_token"] not in text
    lines = [e for e in audit_lines(broker) if e.get("request", {}).get("path")
             in {"sys/capabilities", "sys/capabilities-accessor"}]
    assert [e["type"] for e in lines[-4:]] == ["request", "capabilities"] * 2
    # the accessor too is written as its HMAC
    assert lines[-3]["target"] == broker.state.audit.hmac(secret["accessor"])
    assert lines[-3]["paths"] == ["pg/creds/ro"]
    assert lines[-1]["outcome"] == "error" and "target" not in lines[-1]


def test_capabilities_answers_match_the_document(broker: BrokerThread,
                                                 root: hvac.Client) -> None:
    """Each endpoint's real answer, one path and several, matches docs/openapi.yaml."""
    other = token(root, "reader")
    for path, body in [("sys/capabilities-self", {"paths": ["pg/creds/ro"]}),
                       ("sys/capabilities", {"paths": ["a", "b"], "token": other["client_token"]}),
                       ("sys/capabilities-accessor", {"paths": "a,b", "accessor": other["accessor"]})]:
        resp = raw(broker, "POST", path, json=body)
        assert resp.status_code == 200, resp.text
        conforms(f"/v1/{path}", "POST", resp)


# -- roles -------------------------------------------------------------------------------
def test_hvac_lists_and_reads_database_roles(root: hvac.Client) -> None:
    """hvac's secrets.database.list_roles and read_role: sorted names, then the role's
    TTLs in seconds, statements as lists and the username template in effect."""
    assert root.secrets.database.list_roles(mount_point="pg")["data"] == {"keys": ["ro", "rw"]}
    ro = root.secrets.database.read_role("ro", mount_point="pg")["data"]
    assert ro["default_ttl"] == 3600 and ro["max_ttl"] == 7200
    assert len(ro["creation_statements"]) == 2 and ro["creation_statements"][0].startswith(
        'CREATE ROLE "{{name}}"')
    assert ro["revocation_statements"] == ['DROP ROLE IF EXISTS "{{name}}"']
    assert ro["rollback_statements"] == [] and ro["renew_statements"] == []
    assert ro["username_template"] == "ro-{{random 8}}"
    rw = root.secrets.database.read_role("rw", mount_point="pg")["data"]
    assert (rw["default_ttl"], rw["max_ttl"]) == (300, 600)
    assert rw["username_template"] == DEFAULT_USERNAME_TEMPLATE


def test_every_spelling_of_the_listing_works(broker: BrokerThread) -> None:
    """LIST, GET ?list=true, and the folder with its slash list the same; a plain GET of the
    folder is Vault's 405 (after the token check), naming the ways that work."""
    for method, path, params in [("LIST", "pg/roles", {}), ("LIST", "pg/roles/", {}),
                                 ("GET", "pg/roles", {"list": "true"}),
                                 ("GET", "pg/roles/", {"list": "True"})]:
        resp = raw(broker, method, path, params=params)
        assert resp.status_code == 200, (method, path, resp.text)
        assert resp.json()["data"] == {"keys": ["ro", "rw"]}
    resp = raw(broker, "GET", "pg/roles", params={"list": "true"})
    conforms("/v1/{mount}/roles", "GET", resp, mount="pg")
    plain = raw(broker, "GET", "pg/roles")
    assert plain.status_code == 405 and "list=true" in plain.json()["errors"][0]
    assert raw(broker, "GET", "pg/roles", token="").status_code == 403


def test_role_reads_and_listings_need_their_capability(broker: BrokerThread,
                                                        root: hvac.Client) -> None:
    """list on pg/roles (or Vault's pg/roles/), read on pg/roles/NAME: else 403, audited
    as policy_denied on the path checked."""
    reader = client(broker, token(root, "reader"))
    assert reader.secrets.database.list_roles(mount_point="pg")["data"]["keys"] == ["ro", "rw"]
    assert reader.secrets.database.read_role("ro", mount_point="pg")["data"]["max_ttl"] == 7200
    with pytest.raises(hvac.exceptions.Forbidden):
        reader.secrets.database.read_role("rw", mount_point="pg")
    assert audit_lines(broker)[-1]["type"] == "policy_denied"
    assert audit_lines(broker)[-1]["checked_path"] == "pg/roles/rw"
    vault_style = client(broker, token(root, "vault-lister"))
    assert vault_style.secrets.database.list_roles(mount_point="pg")["data"]["keys"] == [
        "ro", "rw"]
    assert vault_style.secrets.database.read_role("rw", mount_point="pg")["data"]
    nobody = client(broker, token(root, "default"))
    with pytest.raises(hvac.exceptions.Forbidden):
        nobody.secrets.database.list_roles(mount_point="pg")
    assert audit_lines(broker)[-1]["checked_path"] == "pg/roles"
    with pytest.raises(hvac.exceptions.Forbidden):
        nobody.secrets.database.read_role("ro", mount_point="pg")
    # The capability is checked before the mount: a 403 tells nothing about mount names.
    with pytest.raises(hvac.exceptions.Forbidden):
        nobody.secrets.database.read_role("ro", mount_point="no-such-mount")


def test_unknown_roles_and_empty_listings_are_vaults_bare_404(broker: BrokerThread,
                                                              root: hvac.Client) -> None:
    """An unknown role and a mount without roles: 404 {"errors": []}, as Vault; an unknown
    mount: 404 naming it. hvac raises InvalidPath."""
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.database.read_role("nope", mount_point="pg")
    missing = raw(broker, "GET", "pg/roles/nope")
    assert (missing.status_code, missing.json()) == (404, {"errors": []})
    conforms("/v1/{mount}/roles/{role}", "GET", missing, mount="pg", role="nope")
    empty = raw(broker, "LIST", "bare/roles")
    assert (empty.status_code, empty.json()) == (404, {"errors": []})
    for method, path in [("GET", "nomount/roles/x"), ("LIST", "nomount/roles")]:
        resp = raw(broker, method, path)
        assert resp.status_code == 404 and "nomount" in resp.json()["errors"][0], resp.text


def test_roles_are_read_only_writes_are_405_saying_where_roles_live(
        broker: BrokerThread, root: hvac.Client) -> None:
    """POST/PUT/DELETE on a role or the listing: 405 with Allow, pointing at the config file;
    hvac's create_role/delete_role fail; the role is unchanged."""
    for method, path, allow in [("POST", "pg/roles/ro", "GET"), ("PUT", "pg/roles/ro", "GET"),
                                ("DELETE", "pg/roles/ro", "GET"), ("PATCH", "pg/roles/ro", "GET"),
                                ("POST", "pg/roles", "GET,LIST"),
                                ("DELETE", "pg/roles", "GET,LIST")]:
        resp = raw(broker, method, path, json={"db_name": "pg"})
        assert resp.status_code == 405, (method, path, resp.text)
        assert resp.headers["Allow"] == allow
        assert "config file ([mounts.pg.roles.NAME])" in resp.json()["errors"][0]
    with pytest.raises(hvac.exceptions.VaultError) as exc:
        root.secrets.database.create_role("ro", db_name="pg", creation_statements=["x"],
                                          mount_point="pg")
    assert "read-only" in str(exc.value)
    with pytest.raises(hvac.exceptions.VaultError):
        root.secrets.database.delete_role("ro", mount_point="pg")
    assert root.secrets.database.read_role("ro", mount_point="pg")["data"]["max_ttl"] == 7200
    listed_role = raw(broker, "LIST", "pg/roles/ro")
    assert listed_role.status_code == 405 and listed_role.headers["Allow"] == "GET"


def test_role_answers_match_the_document(broker: BrokerThread) -> None:
    """A real read_role answer matches docs/openapi.yaml."""
    resp = raw(broker, "GET", "pg/roles/ro")
    assert resp.status_code == 200, resp.text
    conforms("/v1/{mount}/roles/{role}", "GET", resp, mount="pg", role="ro")


def test_role_reads_are_audited(broker: BrokerThread, root: hvac.Client) -> None:
    """A listing and a read write the request line and one naming the mount and role."""
    root.secrets.database.list_roles(mount_point="pg")
    root.secrets.database.read_role("ro", mount_point="pg")
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.database.read_role("nope", mount_point="pg")
    lines = audit_lines(broker)[-6:]
    assert [e["type"] for e in lines] == ["request", "list", "request", "role_read",
                                          "request", "role_read"]
    assert lines[1]["mount"] == "pg" and lines[1]["count"] == 2
    assert (lines[3]["role"], lines[3]["outcome"]) == ("ro", "ok")
    assert (lines[5]["role"], lines[5]["outcome"]) == ("nope", "error")


def test_secret_named_role_options_are_redacted() -> None:
    """A plugin option named like a secret (any depth) reads back as "[redacted]"."""
    role = RoleSpec(name="x", default_ttl=60, max_ttl=120, options={
        "credential_type": "iam_user", "client_secret": "s3cr3t",
        "nested": {"password": "p4ss", "region": "eu-west-1"}})
    data = role_data(role)
    assert data["credential_type"] == "iam_user"
    assert data["client_secret"] == "[redacted]"
    assert data["nested"] == {"password": "[redacted]", "region": "eu-west-1"}
    assert "s3cr3t" not in json.dumps(data) and "p4ss" not in json.dumps(data)


# -- routes -------------------------------------------------------------------------------
def test_the_roles_routes_shadow_no_other_route(broker: BrokerThread) -> None:
    """With a mount named "roles": its creds, rotate-root and config/rotate-root still
    work, and so do sys/, auth/token/ and auth/{method}/login paths and pg's creds."""
    assert raw(broker, "LIST", "roles/roles").json()["data"] == {"keys": ["a"]}
    assert raw(broker, "GET", "roles/roles/a").json()["data"]["default_ttl"] == 3600
    issued = raw(broker, "GET", "roles/creds/a")
    assert issued.status_code == 200 and issued.json()["lease_id"].startswith("roles/creds/a/")
    revoked = raw(broker, "PUT", "sys/leases/revoke", json={"lease_id": issued.json()["lease_id"]})
    assert revoked.status_code == 204, revoked.text
    for path in ("roles/rotate-root", "roles/config/rotate-root"):
        resp = raw(broker, "POST", path)  # the noop backend: nothing real rotates
        assert resp.status_code == 200 and "new_password" in resp.json()["data"], resp.text
    assert raw(broker, "GET", "sys/mounts").json()["data"]["roles/"]["roles"] == ["a"]
    assert raw(broker, "GET", "auth/token/lookup-self").status_code == 200
    login = raw(broker, "POST", "auth/roles/login", json={"role": "x", "jwt": "y"})
    assert login.status_code not in (403, 405) and login.status_code < 500, login.text
    assert raw(broker, "LIST", "sys/leases/lookup/roles/").status_code in (200, 404)
    # pg's creds answer from the creds handler (an unknown role: nothing issued).
    creds = raw(broker, "GET", "pg/creds/no-such-role")
    assert creds.status_code == 404 and "no-such-role" in creds.json()["errors"][0]


def test_rotate_root_on_a_real_mount_is_still_its_own_route(broker: BrokerThread,
                                                            root: hvac.Client) -> None:
    """pg/rotate-root and pg/config/rotate-root reach rotate-root's policy check (a 403 for a
    token without the right), not the roles routes: nothing rotates on the shared server."""
    reader = token(root, "reader")["client_token"]
    for path in ("pg/rotate-root", "pg/config/rotate-root", "pg/rotate-root/my-db"):
        resp = raw(broker, "POST", path, reader)
        assert resp.status_code == 403, resp.text
        assert resp.json()["errors"] == [f"permission denied: update on {path}"]


def test_rotate_root_is_checked_on_the_path_asked_for(broker: BrokerThread,
                                                       root: hvac.Client) -> None:
    """As in Vault: a deny on {mount}/rotate-root/+ refuses hvac's database-engine path,
    and sys/capabilities-self says so, though {mount}/* grants the broker's own path."""
    rotator = token(root, "rotator")["client_token"]
    asked = raw(broker, "POST", "sys/capabilities-self", rotator,
                json={"paths": ["roles/rotate-root/conn", "roles/rotate-root"]}).json()["data"]
    assert asked["roles/rotate-root/conn"] == ["deny"]
    denied = raw(broker, "POST", "roles/rotate-root/conn", rotator)
    assert denied.status_code == 403, denied.text
    allowed = raw(broker, "POST", "roles/rotate-root", rotator)  # the noop backend
    assert allowed.status_code == 200 and "new_password" in allowed.json()["data"], allowed.text


# -- AWS -------------------------------------------------------------------------------------
AWS_ROLES = """
[mounts.aws.roles.deploy]
credential_type = "assumed_role"
role_arns = ["arn:aws:iam::123456789012:role/deploy"]
policy_arns = ["arn:aws:iam::aws:policy/ReadOnlyAccess"]
default_ttl = "15m"
max_ttl = "1h"

[mounts.aws.roles.ci-user]
credential_type = "iam_user"
policy_arns = ["arn:aws:iam::aws:policy/ReadOnlyAccess"]
default_ttl = "15m"
max_ttl = "1h"
"""


@pytest.fixture(scope="module")
def aws_broker(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str
               ) -> Iterator[BrokerThread]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BROKER_TEST_AWS_SECRET", "testing")
        server = start_broker(write_config(tmp_path_factory.mktemp("caps-roles-aws"),
                                           aws_mount(moto_endpoint) + AWS_ROLES))
    yield server
    server.stop()


def test_hvac_lists_and_reads_aws_roles(aws_broker: BrokerThread) -> None:
    """hvac's secrets.aws.list_roles and read_role: the plugin's own options
    (credential_type, role_arns, policy_arns) beside the common ones."""
    root = hvac.Client(url=aws_broker.url, token=ROOT_TOKEN)
    assert root.secrets.aws.list_roles(mount_point="aws")["data"]["keys"] == ["ci-user", "deploy"]
    deploy = root.secrets.aws.read_role("deploy", mount_point="aws")["data"]
    assert deploy["credential_type"] == "assumed_role"
    assert deploy["role_arns"] == ["arn:aws:iam::123456789012:role/deploy"]
    assert deploy["policy_arns"] == ["arn:aws:iam::aws:policy/ReadOnlyAccess"]
    assert (deploy["default_ttl"], deploy["max_ttl"]) == (900, 3600)
    assert deploy["creation_statements"] == []
    assert root.secrets.aws.read_role("ci-user", mount_point="aws")["data"][
        "credential_type"] == "iam_user"
