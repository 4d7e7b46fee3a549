"""Mass revocation needs ``sudo``, as in Vault: revoke-prefix, revoke-force and revoke-by's
``force`` refuse a token that holds only ``update`` there (real broker over HTTP, hvac).
"""

from __future__ import annotations

import time
from typing import Any

import hvac
import hvac.exceptions
import pytest

from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker_fixture
from tests.integration.token_fixtures import audit_events, client, made_by_root

pytestmark = pytest.mark.integration

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.a]
default_ttl = "1h"

[mounts.noop.roles.b]
default_ttl = "1h"

[mounts.noop.roles.ab]
default_ttl = "1h"

[policies.app]
"noop/creds/*" = ["read"]

# What the example configs granted operators before: no longer enough.
[policies.updater]
"sys/leases/revoke-prefix/*" = ["update"]
"sys/leases/revoke-force/*" = ["update"]
"sys/leases/revoke-by" = ["update"]

# The least that works, for role a's leases only (hvac drops a prefix's trailing "/").
[policies.sudoer]
"sys/leases/revoke-prefix/noop/creds/a" = ["sudo"]
"sys/leases/revoke-force/noop/creds/a" = ["sudo"]
"sys/leases/revoke-by" = ["sudo"]

# A policy written for Vault works unchanged.
[policies.vault-style]
"sys/leases/revoke-prefix/*" = ["update", "sudo"]
"sys/leases/revoke-force/*" = ["update", "sudo"]
"""


broker = noop_broker_fixture(CONFIG, "admin-sudo")


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, ROOT_TOKEN)


def holder(broker: BrokerThread, root: hvac.Client, policy: str) -> hvac.Client:
    """A client whose token has ``policy`` (and ``default``)."""
    return client(broker, made_by_root(root, [policy]))


def issue(root: hvac.Client, role: str = "a") -> str:
    return str(root.read(f"noop/creds/{role}")["lease_id"])


def state(root: hvac.Client, lease_id: str) -> str:
    """``active``/``revoking``/..., or ``dead`` once lookup refuses a revoked lease."""
    try:
        return str(root.sys.read_lease(lease_id)["data"]["state"])
    except hvac.exceptions.InvalidRequest as exc:
        assert "revoked" in str(exc), exc
        return "dead"


def wait_dead(root: hvac.Client, lease_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while state(root, lease_id) != "dead":
        assert time.monotonic() < deadline, f"{lease_id} still {state(root, lease_id)}"
        time.sleep(0.05)


def denials(broker: BrokerThread, path: str) -> list[dict[str, Any]]:
    return [e for e in audit_events(broker, "policy_denied") if e.get("checked_path") == path]


def test_update_alone_cannot_revoke_prefix_or_force(broker: BrokerThread,
                                                     root: hvac.Client) -> None:
    """update on revoke-prefix/* and revoke-force/* is a 403 naming sudo; the lease lives,
    and each refusal is audited as policy_denied for sudo."""
    lease_id = issue(root)
    updater = holder(broker, root, "updater")
    with pytest.raises(hvac.exceptions.Forbidden,
                       match="sudo on sys/leases/revoke-prefix/noop/creds/a"):
        updater.sys.revoke_prefix("noop/creds/a")
    with pytest.raises(hvac.exceptions.Forbidden,
                       match="sudo on sys/leases/revoke-force/noop/creds/a"):
        updater.sys.revoke_force("noop/creds/a")
    assert state(root, lease_id) == "active"
    for op in ("revoke-prefix", "revoke-force"):
        [denied] = denials(broker, f"sys/leases/{op}/noop/creds/a")
        assert denied["capabilities"] == ["sudo"]


@pytest.mark.parametrize("force", [False, True], ids=["revoke-prefix", "revoke-force"])
def test_sudo_revokes_under_its_prefix_only(broker: BrokerThread, root: hvac.Client,
                                            force: bool) -> None:
    """sudo (without update) on role a's prefix revokes role a's leases; role b's prefix
    is a 403 and its lease lives."""
    mine, other = issue(root, "a"), issue(root, "b")
    sudoer = holder(broker, root, "sudoer")
    call = sudoer.sys.revoke_force if force else sudoer.sys.revoke_prefix
    with pytest.raises(hvac.exceptions.Forbidden):
        call("noop/creds/b")
    assert call("noop/creds/a")["data"]["queued"] >= 1
    wait_dead(root, mine)
    assert state(root, other) == "active"


def test_a_vault_policy_with_update_and_sudo_works(broker: BrokerThread,
                                                   root: hvac.Client) -> None:
    """["update", "sudo"], what a Vault policy holds for these paths, revokes as before."""
    first, second = issue(root, "b"), issue(root, "b")
    vault_style = holder(broker, root, "vault-style")
    assert vault_style.sys.revoke_prefix(first)["data"]["queued"] == 1
    wait_dead(root, first)
    assert vault_style.sys.revoke_force(second)["data"]["queued"] == 1
    wait_dead(root, second)


def test_revoke_by_force_needs_sudo(broker: BrokerThread, root: hvac.Client) -> None:
    """update on sys/leases/revoke-by still revokes any selector, but force=true (revoke-force's
    break-glass) is a 403 naming sudo; sudo on sys/leases/revoke-by may force."""
    run = {"run_id": "force-1"}
    token = root.auth.token.create(policies=["app"], meta=run, ttl="1h")["auth"]
    owner = hvac.Client(url=broker.url, token=token["client_token"])
    first, second = (str(owner.read("noop/creds/a")["lease_id"]) for _ in range(2))

    updater = holder(broker, root, "updater")
    with pytest.raises(hvac.exceptions.Forbidden, match="sudo on sys/leases/revoke-by"):
        updater.write_data("sys/leases/revoke-by", data={"metadata": run, "force": True})
    assert state(root, first) == state(root, second) == "active"
    [denied] = denials(broker, "sys/leases/revoke-by")
    assert denied["capabilities"] == ["sudo"]

    sudoer = holder(broker, root, "sudoer")
    body = sudoer.write_data("sys/leases/revoke-by", data={
        "metadata": run, "prefix": first, "force": True, "sync": True})
    assert body["data"] == {"queued": 1, "still_revoking": 0}
    assert state(root, first) == "dead"
    # without force, update is still enough for any selector
    body = updater.write_data("sys/leases/revoke-by", data={"metadata": run, "sync": True})
    assert body["data"] == {"queued": 1, "still_revoking": 0}
    assert state(root, second) == "dead"


@pytest.mark.parametrize("force", [False, True], ids=["revoke-prefix", "revoke-force"])
def test_a_prefix_is_whole_path_segments_as_in_vault(broker: BrokerThread,
                                                     root: hvac.Client, force: bool) -> None:
    """hvac sends ``noop/creds/a/`` as ``noop/creds/a``: that revokes role a's leases, not
    role ab's (whose ids also start with "noop/creds/a"), and a lease's exact id, which has
    no trailing "/", revokes that lease alone."""
    mine, neighbour = issue(root, "a"), issue(root, "ab")
    call = root.sys.revoke_force if force else root.sys.revoke_prefix
    call("noop/creds/a/")
    wait_dead(root, mine)
    assert state(root, neighbour) == "active"

    one, two = issue(root, "ab"), issue(root, "ab")
    assert call(one)["data"]["queued"] == 1
    wait_dead(root, one)
    assert state(root, two) == state(root, neighbour) == "active"
    root.sys.revoke_prefix("noop/creds/ab/")
    wait_dead(root, two)
    wait_dead(root, neighbour)


def test_revoke_by_reads_its_prefix_as_whole_segments_too(broker: BrokerThread,
                                                          root: hvac.Client) -> None:
    """revoke-by "behaves like revoke-prefix" (docs/api.md): its ``prefix`` without a
    trailing "/" does not reach role ab's leases of the same run."""
    run = {"run_id": "segments-1"}
    token = root.auth.token.create(policies=["app"], meta=run, ttl="1h")["auth"]
    owner = hvac.Client(url=broker.url, token=token["client_token"])
    mine = str(owner.read("noop/creds/a")["lease_id"])
    neighbour = str(owner.read("noop/creds/ab")["lease_id"])
    body = root.write_data("sys/leases/revoke-by", data={
        "metadata": run, "prefix": "noop/creds/a", "sync": True})
    assert body["data"] == {"queued": 1, "still_revoking": 0}
    assert state(root, mine) == "dead"
    assert state(root, neighbour) == "active"
    root.write_data("sys/leases/revoke-by", data={"metadata": run, "sync": True})
