"""sys/policy and sys/policies/acl against a real broker, through hvac: Vault's shapes,
the policies as Vault HCL written from what the broker enforces, Vault's grants (the
default policy has none), the bare 404 of an unknown policy, read-only writes (405),
and a reload showing the changed policies.

Before these paths existed every one of hvac's policy calls raised InvalidPath
(404 ``unsupported path``).
"""

from __future__ import annotations

import json
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from broker.policy import DEFAULT_POLICY
from broker.server import reload
from tests.integration import broker_harness
from tests.integration.api_fixtures import audit_lines, conforms, raw
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker, write_config

pytestmark = pytest.mark.integration

# The template is written with spaces inside the braces, and the capabilities
# out of order: the policy's text has the canonical spelling and Vault's order.
CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"

[policies.app]
"noop/creds/r" = ["read"]
"/noop/creds/+/x" = ["list", "read"]
"noop/{{ identity.metadata.team }}/*" = ["update"]

# Extends the built-in default: a path added, one taken away.
[policies.default]
"extra/path" = ["read"]
"auth/token/revoke-self" = ["deny"]

[policies.policy-reader]
"sys/policy" = ["read"]
"sys/policy/*" = ["read"]
"sys/policies/acl" = ["list"]
"sys/policies/acl/*" = ["read"]

# Written for Vault: a LIST is checked on the path with a slash.
[policies.vault-lister]
"sys/policy/" = ["list"]
"sys/policies/acl/" = ["list"]

[policies.one-reader]
"sys/policies/acl/app" = ["read"]

[policies.single-reader]
"sys/policy/*" = ["read"]
"""

#: every name a token may carry, as Vault lists them: sorted, then root.
NAMES = ["app", "default", "one-reader", "policy-reader", "single-reader", "vault-lister", "root"]

APP_HCL = """\
path "noop/creds/+/x" {
  capabilities = ["read", "list"]
}

path "noop/creds/r" {
  capabilities = ["read"]
}

path "noop/{{identity.metadata.team}}/*" {
  capabilities = ["update"]
}
"""

ENVELOPE = {"lease_id": "", "renewable": False, "lease_duration": 0, "wrap_info": None,
            "warnings": None, "auth": None}

READ_ONLY = ("policies are read-only over the API; they are set in the broker's config file "
             "([policies.NAME]), re-read on SIGHUP")


broker = broker_harness.noop_broker_fixture(CONFIG, "policies-api")


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return hvac.Client(url=broker.url, token=ROOT_TOKEN)


def client(broker: BrokerThread, root: hvac.Client, *policies: str,
           meta: dict[str, str] | None = None) -> hvac.Client:
    """hvac with a new token holding ``policies`` and ``default`` (only that without any:
    a child of root given no policies would inherit root)."""
    auth = root.auth.token.create(policies=list(policies) or ["default"], meta=meta,
                                  ttl="1h")["auth"]
    return hvac.Client(url=broker.url, token=auth["client_token"])


def hcl_block(path: str, *caps: str) -> str:
    listed = ", ".join(f'"{c}"' for c in caps)
    return f'path "{path}" {{\n  capabilities = [{listed}]\n}}'


# -- listing ------------------------------------------------------------------------------
def test_hvac_lists_the_policies_in_vaults_shapes(broker: BrokerThread,
                                                  root: hvac.Client) -> None:
    """sys.list_policies: keys and policies under data and at the top level, with Vault's
    envelope; sys.list_acl_policies: data.keys only. Sorted, root last, as Vault."""
    legacy = root.sys.list_policies()
    assert legacy["data"] == {"keys": NAMES, "policies": NAMES}
    assert legacy["keys"] == legacy["policies"] == NAMES
    assert {k: legacy[k] for k in ENVELOPE} == ENVELOPE and legacy["request_id"]
    acl = root.sys.list_acl_policies()
    assert acl["data"] == {"keys": NAMES}
    assert "keys" not in acl and {k: acl[k] for k in ENVELOPE} == ENVELOPE
    conforms("/v1/sys/policy", "GET", raw(broker, "GET", "sys/policy"))
    conforms("/v1/sys/policies/acl", "GET", raw(broker, "LIST", "sys/policies/acl"))


def test_every_spelling_of_the_listings_works(broker: BrokerThread) -> None:
    """LIST, GET ?list=true and the folder with its slash list the same; a plain GET lists
    sys/policy (Vault reads it) but is Vault's 405 on sys/policies/acl, naming what works."""
    for method, path, params in [("GET", "sys/policy", {}), ("GET", "sys/policy/", {}),
                                 ("LIST", "sys/policy", {}), ("LIST", "sys/policy/", {}),
                                 ("GET", "sys/policy", {"list": "true"}),
                                 ("LIST", "sys/policies/acl", {}),
                                 ("LIST", "sys/policies/acl/", {}),
                                 ("GET", "sys/policies/acl", {"list": "true"}),
                                 ("GET", "sys/policies/acl/", {"list": "True"})]:
        resp = raw(broker, method, path, params=params)
        assert resp.status_code == 200, (method, path, resp.text)
        assert resp.json()["data"]["keys"] == NAMES, (method, path)
    plain = raw(broker, "GET", "sys/policies/acl")
    assert plain.status_code == 405 and plain.headers["Allow"] == "GET,LIST"
    assert "sys/policies/acl is a listing" in plain.json()["errors"][0]
    assert raw(broker, "GET", "sys/policies/acl", token="").status_code == 403  # token first


# -- reading ------------------------------------------------------------------------------
def test_hvac_reads_a_config_policy_as_vault_hcl(broker: BrokerThread,
                                                 root: hvac.Client) -> None:
    """read_policy answers name and rules (also at the top level), read_acl_policy name and
    policy under data: one path block per pattern, sorted, without the leading "/", the
    template in its canonical spelling, capabilities in Vault's order."""
    legacy = root.sys.read_policy("app")
    assert legacy["data"] == {"name": "app", "rules": APP_HCL}
    assert (legacy["name"], legacy["rules"]) == ("app", APP_HCL)
    assert {k: legacy[k] for k in ENVELOPE} == ENVELOPE
    acl = root.sys.read_acl_policy("app")
    assert acl["data"] == {"name": "app", "policy": APP_HCL}
    assert "policy" not in acl and "name" not in acl
    conforms("/v1/sys/policy/{name}", "GET", raw(broker, "GET", "sys/policy/app"), name="app")
    conforms("/v1/sys/policies/acl/{name}", "GET", raw(broker, "GET", "sys/policies/acl/app"),
             name="app")


def test_default_shows_the_built_in_rules_as_the_config_extends_them(
        broker: BrokerThread, root: hvac.Client) -> None:
    """default reads as what every token gets: the built-in rules, the config's path added,
    and revoke-self as the config's deny; a default-only token is checked by the same."""
    text = root.sys.read_acl_policy("default")["data"]["policy"]
    assert root.sys.read_policy("default")["data"]["rules"] == text
    expected = {path: caps for path, caps in DEFAULT_POLICY.items()}
    expected.update({"extra/path": ("read",), "auth/token/revoke-self": ("deny",)})
    assert text == "\n\n".join(hcl_block(p, *expected[p]) for p in sorted(expected)) + "\n"
    # ... and that is what is enforced.
    plain = client(broker, root)
    caps = plain.sys.get_capabilities(paths=["extra/path", "auth/token/revoke-self",
                                             "auth/token/lookup-self"])["data"]
    assert caps["extra/path"] == ["read"]
    assert caps["auth/token/revoke-self"] == ["deny"]
    assert caps["auth/token/lookup-self"] == ["read"]


def test_root_has_empty_rules_as_in_vault(root: hvac.Client) -> None:
    """root grants everything and has no rules: its text is empty on both paths."""
    assert root.sys.read_policy("root")["data"] == {"name": "root", "rules": ""}
    assert root.sys.read_acl_policy("root")["data"] == {"name": "root", "policy": ""}


def test_an_unknown_policy_is_vaults_bare_404(broker: BrokerThread, root: hvac.Client) -> None:
    """No such policy: 404 {"errors": []} on both paths (hvac's InvalidPath), audited as a
    policy_read error naming it."""
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.sys.read_policy("nope")
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.sys.read_acl_policy("nope")
    for path in ("sys/policy/nope", "sys/policies/acl/nope", "sys/policy/Default"):
        resp = raw(broker, "GET", path)
        assert (resp.status_code, resp.json()) == (404, {"errors": []}), path
    conforms("/v1/sys/policies/acl/{name}", "GET", resp, name="Default")
    last = audit_lines(broker)[-1]
    assert (last["type"], last["outcome"], last["policy"]) == ("policy_read", "error", "Default")


# -- who may read ---------------------------------------------------------------------------
def test_the_default_policy_grants_no_read_not_even_of_a_tokens_own_policies(
        broker: BrokerThread, root: hvac.Client) -> None:
    """As in Vault: without a grant on sys/policy or sys/policies/acl every call is a 403,
    also for a policy the token holds, and also for a name that does not exist (a 403
    says nothing about which policies exist). Audited as policy_denied on the path."""
    for holder in (client(broker, root), client(broker, root, "app")):
        for call, args in [(holder.sys.list_policies, ()), (holder.sys.list_acl_policies, ()),
                           (holder.sys.read_policy, ("app",)),
                           (holder.sys.read_acl_policy, ("app",)),
                           (holder.sys.read_acl_policy, ("default",)),
                           (holder.sys.read_acl_policy, ("nope",))]:
            with pytest.raises(hvac.exceptions.Forbidden):
                call(*args)
    last = audit_lines(broker)[-1]
    assert (last["type"], last["checked_path"]) == ("policy_denied", "sys/policies/acl/nope")


def test_a_grant_on_the_path_allows_exactly_what_it_names(broker: BrokerThread,
                                                          root: hvac.Client) -> None:
    """read on sys/policy/* and sys/policies/acl/* reads any policy; list on the listing
    (or on the path with Vault's slash) lists; a grant on one policy reads that one only,
    and only on the path it names."""
    reader = client(broker, root, "policy-reader")
    assert reader.sys.list_policies()["data"]["keys"] == NAMES
    assert reader.sys.list_acl_policies()["data"]["keys"] == NAMES
    assert reader.sys.read_policy("app")["data"]["rules"] == APP_HCL
    assert reader.sys.read_acl_policy("root")["data"]["policy"] == ""
    lister = client(broker, root, "vault-lister")
    assert lister.sys.list_acl_policies()["data"]["keys"] == NAMES
    assert raw(broker, "LIST", "sys/policy", token=lister.token).json()["keys"] == NAMES
    with pytest.raises(hvac.exceptions.Forbidden):
        lister.sys.list_policies()  # a GET: read on sys/policy, which it lacks
    with pytest.raises(hvac.exceptions.Forbidden):
        lister.sys.read_acl_policy("app")
    one = client(broker, root, "one-reader")
    assert one.sys.read_acl_policy("app")["data"]["policy"] == APP_HCL
    for call, name in [(one.sys.read_acl_policy, "default"), (one.sys.read_policy, "app")]:
        with pytest.raises(hvac.exceptions.Forbidden):
            call(name)
    # read on sys/policy/* reads single policies; the names are a read of sys/policy
    # itself (sys/policy/* also matches "sys/policy/": that is the LIST's path only).
    single = client(broker, root, "single-reader")
    assert single.sys.read_policy("app")["data"]["rules"] == APP_HCL
    with pytest.raises(hvac.exceptions.Forbidden):
        single.sys.list_policies()


def test_reads_are_audited(broker: BrokerThread, root: hvac.Client) -> None:
    """A listing writes a request line and a list line with the count; a read a
    policy_read line naming the policy."""
    root.sys.list_acl_policies()
    root.sys.read_acl_policy("app")
    lines = audit_lines(broker)[-4:]
    assert [e["type"] for e in lines] == ["request", "list", "request", "policy_read"]
    assert lines[1]["count"] == len(NAMES)
    assert (lines[3]["policy"], lines[3]["outcome"]) == ("app", "ok")


# -- writes -------------------------------------------------------------------------------
def test_writes_are_405_saying_policies_are_set_in_the_config(broker: BrokerThread,
                                                              root: hvac.Client) -> None:
    """hvac's create_or_update_(acl_)policy and delete_(acl_)policy, and every write on
    the four paths, with or without a token: 405 with Allow, pointing at [policies.NAME];
    nothing changes."""
    rules = 'path "x" { capabilities = ["read"] }'
    writes = [
        (root.sys.create_or_update_policy, ("app", rules), "PUT"),
        (root.sys.delete_policy, ("app",), "DELETE"),
        (root.sys.create_or_update_acl_policy, ("new", rules), "PUT"),
        (root.sys.delete_acl_policy, ("app",), "DELETE"),
    ]
    for call, args, method in writes:
        # hvac has no exception of its own for a 405: UnexpectedError, whose message is
        # the body followed by ", on put URL".
        with pytest.raises(hvac.exceptions.UnexpectedError) as exc:
            call(*args)
        body, _ = json.JSONDecoder().raw_decode(str(exc.value))
        assert body == {"errors": [f"method {method} not allowed here: {READ_ONLY}"]}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path, allow in [("sys/policy", "GET,LIST"), ("sys/policy/app", "GET"),
                            ("sys/policies/acl", "GET,LIST"), ("sys/policies/acl/app", "GET")]:
            for tok in (ROOT_TOKEN, ""):
                resp = raw(broker, method, path, token=tok, json={"policy": "x"})
                assert resp.status_code == 405, (method, path, resp.text)
                assert resp.headers["Allow"] == allow
                assert resp.json() == {"errors": [f"method {method} not allowed here: "
                                                  f"{READ_ONLY}"]}
    assert root.sys.read_acl_policy("app")["data"]["policy"] == APP_HCL
    assert root.sys.list_acl_policies()["data"]["keys"] == NAMES
    # A listing of a policy is no write: 405 without the config hint, as in Vault.
    listed = raw(broker, "LIST", "sys/policies/acl/app")
    assert (listed.status_code, listed.headers["Allow"]) == (405, "GET")
    assert listed.json() == {"errors": ["method LIST not allowed here"]}
    listed = raw(broker, "GET", "sys/policy/app", params={"list": "true"})
    assert (listed.status_code, listed.headers["Allow"]) == (405, "GET")
    assert listed.json() == {"errors": ["sys/policy/app is a policy, not a listing: GET it "
                                        "without ?list=true, or list sys/policy"]}


# -- reload -------------------------------------------------------------------------------
def test_a_reload_shows_the_changed_policies(tmp_path: Path) -> None:
    """SIGHUP's reload with a changed policy, one added and one removed: the reads and the
    listings show the new config at once."""
    before = CONFIG + '\n[policies.gone]\n"noop/creds/r" = ["read"]\n'
    after = (CONFIG.replace('"noop/creds/r" = ["read"]', '"noop/creds/r" = ["read", "update"]')
             + '\n[policies.added]\n"noop/creds/*" = ["list"]\n')
    with noop_broker(tmp_path, before) as server:
        api = hvac.Client(url=server.url, token=ROOT_TOKEN)
        assert api.sys.list_acl_policies()["data"]["keys"] == ["app", "default", "gone",
                                                               *NAMES[2:]]
        assert hcl_block("noop/creds/r", "read") in api.sys.read_policy("app")["data"]["rules"]
        config = write_config(tmp_path, after, port=server.config.server.port)
        assert config == tmp_path / "broker.toml"
        assert server.state is not None
        assert server.call(reload(server.state)) is True
        assert api.sys.list_acl_policies()["data"]["keys"] == ["added", *NAMES]
        assert api.sys.list_policies()["policies"] == ["added", *NAMES]
        assert hcl_block("noop/creds/r", "read", "update") in api.sys.read_acl_policy(
            "app")["data"]["policy"]
        assert api.sys.read_acl_policy("added")["data"]["policy"] == (
            hcl_block("noop/creds/*", "list") + "\n")
        with pytest.raises(hvac.exceptions.InvalidPath):
            api.sys.read_acl_policy("gone")
