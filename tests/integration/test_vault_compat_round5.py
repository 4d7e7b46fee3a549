"""Vault compatibility, round 5, against a real broker over HTTP with hvac: revoking a
root token needs sudo (the example operator policy could end root-init and everything
below it), a child's explicit_max_ttl is its own, numbers and booleans in ``meta`` are
taken as Vault takes them, and ``sys/mounts/NAME/tune`` answers (read-only).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from broker.server import INIT_ROOT_ACCESSOR
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker_fixture
from tests.integration.token_fixtures import audit_events, client, made_by_root

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: [tokens] max_ttl when the config sets none (768h).
CEILING = 768 * 3600


def example_policy(name: str) -> str:
    """``[policies.NAME]`` exactly as config/broker.example.toml has it."""
    example = tomllib.loads((ROOT / "config" / "broker.example.toml").read_text())
    rules = example["policies"][name]
    lines = [f"[policies.{name}]"]
    lines += [f"{json.dumps(path)} = {json.dumps(list(caps))}" for path, caps in rules.items()]
    return "\n".join(lines) + "\n"


CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "24h"

[mounts.other]
plugin = "bench-noop"

[mounts.other.roles.r]

[policies.issuer]
"noop/creds/r" = ["read"]
"auth/token/create" = ["update"]

[policies.revoker]
"auth/token/revoke" = ["update"]

[policies.sudo_revoker]
"auth/token/revoke-accessor" = ["sudo"]
"auth/token/revoke" = ["sudo"]

[policies.tuner]
"sys/mounts/+/tune" = ["read"]
""" + example_policy("operator")


broker = noop_broker_fixture(CONFIG, "vault-compat-round5")


@pytest.fixture(scope="module")
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, ROOT_TOKEN)


def alive(broker: BrokerThread, token: str) -> bool:
    answer = requests.get(f"{broker.url}/v1/auth/token/lookup-self", timeout=30,
                          headers={"X-Vault-Token": token})
    return answer.status_code == 200


def new_root_token(broker: BrokerThread, accessor: str) -> str:
    """A root token made as ``broker operator init`` makes it: no parent, no TTL, the
    given (well-known) accessor."""
    assert broker.state is not None
    token, _ = broker.call(broker.state.tokens.create(
        policies=["root"], ttl=None, display_name="root", accessor=accessor))
    return token


def root_denials(broker: BrokerThread, path: str) -> list[dict[str, Any]]:
    """The ``policy_denied`` events of the root guard on ``path`` (its target accessor is
    in them only as an HMAC, as every accessor in the audit log)."""
    return [e for e in audit_events(broker, "policy_denied")
            if e.get("checked_path") == path and "root policy" in e.get("error", "")]


# -- 1. revoking a root token needs sudo --------------------------------------------------
def test_the_example_operator_cannot_revoke_root_init(broker: BrokerThread,
                                                      root: hvac.Client) -> None:
    """The operator policy of config/broker.example.toml (update on revoke-accessor) gets
    Vault's plain 403 for root-init (the audit line, not the caller, learns that it is a
    root token): the root token, its child and the child's lease live on. A root token
    then revokes it by accessor."""
    init_token = new_root_token(broker, INIT_ROOT_ACCESSOR)
    child = client(broker, init_token).auth.token.create(policies=["issuer"], ttl="1h")
    child_token = child["auth"]["client_token"]
    lease = client(broker, child_token).read("noop/creds/r")["lease_id"]
    operator = client(broker, made_by_root(root, ["operator"]))

    with pytest.raises(hvac.exceptions.Forbidden) as denied:
        operator.auth.token.revoke_accessor(INIT_ROOT_ACCESSOR)
    assert json.loads(denied.value.text)["errors"] == ["permission denied"]
    assert alive(broker, init_token) and alive(broker, child_token)
    assert root.sys.read_lease(lease)["data"]["ttl"] > 0
    (event,) = root_denials(broker, "auth/token/revoke-accessor")
    assert event["target"].startswith("hmac-sha256:") and event["capabilities"] == ["sudo"]
    assert "sudo on auth/token/revoke-accessor" in event["error"]

    root.auth.token.revoke_accessor(INIT_ROOT_ACCESSOR)
    assert not alive(broker, init_token) and not alive(broker, child_token)


def test_the_example_operator_still_revokes_ordinary_tokens(broker: BrokerThread,
                                                           root: hvac.Client) -> None:
    """A CI run's token (no root policy), by accessor: 204, with its children."""
    operator = client(broker, made_by_root(root, ["operator"]))
    run = root.auth.token.create(policies=["issuer"], ttl="1h")["auth"]
    below = client(broker, run["client_token"]).auth.token.create(ttl="10m")["auth"]
    operator.auth.token.revoke_accessor(run["accessor"])
    assert not alive(broker, run["client_token"])
    assert not alive(broker, below["client_token"])


def test_sudo_on_the_path_may_revoke_a_root_token(broker: BrokerThread,
                                                  root: hvac.Client) -> None:
    """A token without root but with sudo on revoke-accessor / revoke ends a root token;
    update on revoke is not enough (403), whether the root token is named by value."""
    sudoer = client(broker, made_by_root(root, ["sudo_revoker"]))
    revoker = client(broker, made_by_root(root, ["revoker"]))
    by_accessor = new_root_token(broker, "round5-root-a")
    by_value = new_root_token(broker, "round5-root-b")

    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
        revoker.auth.token.revoke(by_value)
    assert alive(broker, by_value)
    # Why is said to the operators only: the audit line names the sudo it needs.
    assert root_denials(broker, "auth/token/revoke")

    sudoer.auth.token.revoke_accessor("round5-root-a")
    sudoer.auth.token.revoke(by_value)
    assert not alive(broker, by_accessor) and not alive(broker, by_value)


def test_a_root_token_may_still_revoke_itself(broker: BrokerThread) -> None:
    """revoke-self, and revoke naming its own value: the guard is about others' root."""
    own = client(broker, new_root_token(broker, "round5-root-self"))
    own.auth.token.revoke_self()
    assert not alive(broker, str(own.token))
    named = new_root_token(broker, "round5-root-named")
    client(broker, named).auth.token.revoke(named)
    assert not alive(broker, named)


def test_revoke_orphan_of_a_root_token_needs_sudo_as_before(broker: BrokerThread,
                                                            root: hvac.Client) -> None:
    """revoke-orphan was already sudo-only; the root token revokes another root token."""
    other = new_root_token(broker, "round5-root-orphan")
    with pytest.raises(hvac.exceptions.Forbidden):
        client(broker, made_by_root(root, ["operator"])).auth.token.revoke_and_orphan_children(other)
    root.auth.token.revoke_and_orphan_children(other)
    assert not alive(broker, other)


# -- 2. a child's explicit_max_ttl is its own -----------------------------------------------
def test_a_childs_explicit_max_ttl_is_the_one_it_was_created_with(
        broker: BrokerThread, root: hvac.Client) -> None:
    """A 10m parent's child asking explicit_max_ttl=1h: lookup shows 3600 (it showed the
    parent's 600); ttl and expire_time still end with the parent, and a renewal too."""
    parent = root.auth.token.create(policies=["issuer"], ttl="10m")["auth"]["client_token"]
    child = client(broker, parent).auth.token.create(ttl="1h", explicit_max_ttl="1h")
    child_token = child["auth"]["client_token"]
    assert child["auth"]["lease_duration"] <= 600

    data = client(broker, child_token).auth.token.lookup_self()["data"]
    assert data["explicit_max_ttl"] == 3600, data
    assert data["ttl"] <= 600
    parent_data = client(broker, parent).auth.token.lookup_self()["data"]
    assert data["expire_time"] <= parent_data["expire_time"]
    # Without one of its own: the ceiling that bounds it (as for any token), not 600.
    unasked = client(broker, parent).auth.token.create(ttl="5m")["auth"]["client_token"]
    assert client(broker, unasked).auth.token.lookup_self()["data"]["explicit_max_ttl"] \
        == CEILING

    renewed = client(broker, child_token).auth.token.renew_self(increment="1h")
    assert renewed["auth"]["lease_duration"] <= 600
    assert "its parent token's expiry" in renewed["warnings"][0]


# -- 3. numbers and booleans in meta --------------------------------------------------------
def test_meta_numbers_and_booleans_are_taken_as_text(broker: BrokerThread,
                                                     root: hvac.Client) -> None:
    """meta={"run": 42, ...}: Vault's weak decoding, 42 -> "42", true -> "1", 1.5 -> "1.5"."""
    created = root.auth.token.create(policies=["issuer"], ttl="10m",
                                     meta={"run": 42, "ok": True, "off": False,
                                           "ratio": 1.5, "name": "x"})
    expected = {"run": "42", "ok": "1", "off": "0", "ratio": "1.5", "name": "x"}
    assert created["auth"]["metadata"] == expected
    token = created["auth"]["client_token"]
    assert client(broker, token).auth.token.lookup_self()["data"]["meta"] == expected
    # The child of such a token repeats its creator's pairs, as numbers too.
    child = client(broker, token).auth.token.create(ttl="5m", meta={"run": 42})
    assert child["auth"]["metadata"] == expected


@pytest.mark.parametrize(("value", "kind"), [([1, 2], "a list"), ({"a": "b"}, "an object"),
                                             (None, "null")])
def test_meta_values_without_a_text_form_are_a_400_naming_the_key(
        root: hvac.Client, value: Any, kind: str) -> None:
    """A list, an object or null under a key: 400 naming the key (never the value)."""
    with pytest.raises(hvac.exceptions.InvalidRequest) as bad:
        root.auth.token.create(policies=["issuer"], ttl="10m", meta={"ok": "1", "bad": value})
    assert f"meta 'bad' must be a string, number or boolean, not {kind}" in str(bad.value)


# -- 4. sys/mounts/NAME/tune ----------------------------------------------------------------
def test_tune_reads_the_mounts_lease_ttls(root: hvac.Client) -> None:
    """hvac's read_mount_configuration: the [leases] TTLs every role falls back to, under
    data and at the top level, as Vault answers it."""
    answer = root.sys.read_mount_configuration("noop")
    expected = {"description": "", "default_lease_ttl": 3600, "max_lease_ttl": 86400,
                "force_no_cache": False}
    assert answer["data"] == expected
    assert {k: answer[k] for k in expected} == expected
    assert root.sys.read_mount_configuration("noop/")["data"] == expected


def test_tune_grants_follow_sys_mounts(broker: BrokerThread, root: hvac.Client) -> None:
    """read on sys/mounts (the operator), on sys/mounts/+/tune, or a grant under the mount:
    allowed; a token with none of these: 403, before the mount is looked up."""
    operator = client(broker, made_by_root(root, ["operator"]))
    assert operator.sys.read_mount_configuration("other")["data"]["max_lease_ttl"] == 86400
    tuner = client(broker, made_by_root(root, ["tuner"]))
    assert tuner.sys.read_mount_configuration("other")["data"]["default_lease_ttl"] == 3600
    issuer = client(broker, made_by_root(root, ["issuer"]))
    assert issuer.sys.read_mount_configuration("noop")["data"]["default_lease_ttl"] == 3600
    with pytest.raises(hvac.exceptions.Forbidden, match="read on sys/mounts/other/tune"):
        issuer.sys.read_mount_configuration("other")
    with pytest.raises(hvac.exceptions.Forbidden):
        issuer.sys.read_mount_configuration("nothere")
    with pytest.raises(hvac.exceptions.InvalidPath, match="no mount named 'nothere'"):
        root.sys.read_mount_configuration("nothere")


def test_tune_is_read_only(root: hvac.Client) -> None:
    """hvac's tune_mount_configuration: 405 saying mounts are set in the config file."""
    with pytest.raises(hvac.exceptions.UnexpectedError) as refused:
        root.sys.tune_mount_configuration("noop", default_lease_ttl="2h")
    assert "405" in str(refused.value) or "config file" in str(refused.value)
    assert "config file" in str(refused.value) and "read-only" in str(refused.value)
    # Unchanged.
    assert root.sys.read_mount_configuration("noop")["data"]["default_lease_ttl"] == 3600
