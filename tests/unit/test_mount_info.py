"""Which mounts a token may learn about (Vault's hasMountAccess), and how the CLI asks.

The server side is ``PolicySet.grants_under``; the client side is
``broker.cli.mount_info.mount_plugins`` against a canned HTTP server: the new path
first, ``sys/mounts`` for an older broker, ``BROKER_*`` names with a warning when
neither may be read.
"""

from __future__ import annotations

import pytest

from broker.cli import common
from broker.cli.mount_info import mount_plugins
from broker.client import Client, ClientError
from broker.policy import DEFAULT_POLICY, PolicySet
from tests.unit.test_cli import (  # noqa: F401 - fixtures
    CREDS,
    TOKEN_FLAG_WARNING,
    Canned,
    canned,
    env,
    run,
)

# --------------------------------------------------------------------------- policies


def test_the_default_policy_grants_no_mount_listing() -> None:
    """sys/mounts is not in the built-in default policy; nor is any mount."""
    ps = PolicySet({})
    assert "sys/mounts" not in DEFAULT_POLICY
    assert ps.capabilities([], "sys/mounts") == frozenset()
    assert not ps.grants_under([], "pg/")
    assert ps.grants_under([], "auth/token/")  # lookup-self, renew-self, revoke-self


@pytest.mark.parametrize(("rules", "mount", "expected"), [
    ({"pg/creds/readonly": ["read"]}, "pg", True),
    ({"pg/creds/readonly": ["read"]}, "pg2", False),
    ({"pg/creds/readonly": ["read"]}, "p", False),
    ({"pg/*": ["list"]}, "pg", True),
    ({"pg/": ["read"]}, "pg", True),
    ({"*": ["read"]}, "pg", True),
    ({"p*": ["read"]}, "pg", True),
    ({"pg*": ["read"]}, "p", False),
    ({"+/creds/readonly": ["read"]}, "anything", True),
    ({"pg/rotate-root": ["sudo"]}, "pg", True),
    ({"pg/creds/readonly": ["deny"]}, "pg", False),
    ({"pg/creds/readonly": []}, "pg", False),
    ({"pg2/creds/readonly": ["read"]}, "pg", False),
    # Vault's rule: a deny on the mount itself does not hide a grant below it...
    ({"pg/*": ["deny"], "pg/creds/readonly": ["read"]}, "pg", True),
    # ...but a broad grant above the mount does not reach past a deny on it.
    ({"*": ["read"], "pg/*": ["deny"]}, "pg", False),
])
def test_grants_under_is_vaults_has_mount_access(rules: dict[str, list[str]], mount: str,
                                                 expected: bool) -> None:
    """Access to a mount: a grant on the mount path, or any non-deny rule below it."""
    ps = PolicySet({"p": rules})
    assert ps.grants_under(["p"], f"{mount}/") is expected
    assert ps.grants_under(["p"], mount) is expected  # the trailing "/" is implied


def test_a_deny_in_another_policy_on_the_same_path_takes_the_grant_away() -> None:
    """The token's policies merge per path as on any check: deny in one wins over read."""
    ps = PolicySet({"a": {"pg/creds/ro": ["read"]}, "b": {"pg/creds/ro": ["deny"]}})
    assert ps.grants_under(["a"], "pg/")
    assert not ps.grants_under(["a", "b"], "pg/")


def test_templated_paths_resolve_against_the_caller() -> None:
    """{{identity.metadata.team}}/creds/ro reaches the mount the token's metadata names."""
    ps = PolicySet({"t": {"{{identity.metadata.team}}/creds/ro": ["read"]}})
    assert ps.grants_under(["t"], "pg/", identity={"metadata": {"team": "pg"}})
    assert not ps.grants_under(["t"], "pg/", identity={"metadata": {"team": "aws"}})
    assert not ps.grants_under(["t"], "pg/", identity={})


def test_root_and_a_configured_default_reach_every_mount_they_name() -> None:
    """root reaches everything; a [policies.default] path reaches its mount for everyone."""
    ps = PolicySet({"default": {"pg/creds/ro": ["read"]}})
    assert ps.grants_under(["root"], "anything/")
    assert ps.grants_under([], "pg/") and not ps.grants_under([], "aws/")
    with pytest.raises(TypeError):
        ps.grants_under("root", "pg/")


# --------------------------------------------------------------------------- the CLI side

PG_INFO = {"data": {"type": "postgres", "path": "pg/",
                    "env_names": {"username": "PGUSER", "password": "PGPASSWORD"}}}


@pytest.fixture(autouse=True)
def fresh_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no env names remembered from a server."""
    monkeypatch.setattr(common, "SERVER_ENV_NAMES", {})


def test_the_mount_path_is_asked_once_per_mount(canned: Canned) -> None:  # noqa: F811
    """Two mounts, one of them twice: two calls; the server's env_names are remembered."""
    canned.on("GET", "/v1/sys/internal/ui/mounts/pg", body=PG_INFO)
    canned.on("GET", "/v1/sys/internal/ui/mounts/kv", body={"data": {
        "type": "thirdparty", "env_names": {"secret": "KV_SECRET"}}})
    found = mount_plugins(Client(canned.address, "t"), ["pg", "kv", "pg"])
    assert found.plugins == {"pg": "postgres", "kv": "thirdparty"}
    assert found.warnings == [] and found.missing == []
    assert [s.path for s in canned.seen] == ["/v1/sys/internal/ui/mounts/pg",
                                             "/v1/sys/internal/ui/mounts/kv"]
    assert common.env_for("thirdparty", {"secret": "s"}) == {"KV_SECRET": "s"}


def test_a_refused_mount_is_left_out_with_a_warning(canned: Canned) -> None:  # noqa: F811
    """403 on one mount: its names will be BROKER_*, the warning names it; sys/mounts is
    not asked (a broker with the path answers 403, never 404)."""
    canned.on("GET", "/v1/sys/internal/ui/mounts/pg", body=PG_INFO)
    canned.on("GET", "/v1/sys/internal/ui/mounts/pg2", 403, {"errors": ["preflight ..."]})
    found = mount_plugins(Client(canned.address, "t"), ["pg", "pg2"])
    assert found.plugins == {"pg": "postgres"}
    assert found.warnings == ["cannot read sys/internal/ui/mounts/pg2 (preflight ... "
                              "(HTTP 403)); using BROKER_* variable names for pg2"]
    assert "/v1/sys/mounts" not in [s.path for s in canned.seen]


@pytest.mark.parametrize("status", [404, 405])
def test_an_older_broker_is_asked_sys_mounts_once(canned: Canned,  # noqa: F811
                                                  status: int) -> None:
    """A broker without the path (404, or 405 from a proxy): sys/mounts, once for all
    mounts; a mount it does not list is reported missing."""
    canned.on("GET", "/v1/sys/internal/ui/mounts/pg", status, {"errors": ["unsupported path"]})
    canned.on("GET", "/v1/sys/mounts", body={"data": {"pg/": {"type": "postgres"},
                                                      "aws/": {"type": "aws"}}})
    found = mount_plugins(Client(canned.address, "t"), ["pg", "aws", "nope"])
    assert found.plugins == {"pg": "postgres", "aws": "aws"}
    assert found.missing == ["nope"] and found.warnings == []
    assert [s.path for s in canned.seen] == ["/v1/sys/internal/ui/mounts/pg", "/v1/sys/mounts"]


def test_neither_path_readable_is_one_warning(canned: Canned) -> None:  # noqa: F811
    """An older broker whose sys/mounts the token may not read: the old warning, no plugins."""
    canned.on("GET", "/v1/sys/mounts", 403, {"errors": ["permission denied"]})
    found = mount_plugins(Client(canned.address, "t"), ["pg"])
    assert found.plugins == {} and found.missing == []
    assert found.warnings == ["cannot read sys/mounts (permission denied (HTTP 403)); "
                              "using BROKER_* variable names"]


def test_other_failures_are_errors(canned: Canned) -> None:  # noqa: F811
    """A 5xx is not a reason to name variables differently: it raises."""
    canned.on("GET", "/v1/sys/internal/ui/mounts/pg", 503, {"errors": ["shutting down"]})
    with pytest.raises(ClientError) as info:
        mount_plugins(Client(canned.address, "t"), ["pg"])
    assert info.value.status == 503


def test_creds_env_warns_after_issuing_only(capsys: pytest.CaptureFixture[str],
                                            env: pytest.MonkeyPatch,  # noqa: F811
                                            canned: Canned) -> None:  # noqa: F811
    """creds --format env, the mount refused: BROKER_* names and the warning, printed once
    the credential is issued; when the issue fails too, only its error line (after the
    --token warning)."""
    canned.on("GET", "/v1/sys/internal/ui/mounts/pg", 403, {"errors": ["denied"]})
    canned.on("GET", "/v1/pg/creds/readonly", body={**CREDS, "warnings": None})
    argv = ("creds", "--address", canned.address, "--token", "t", "--format", "env")
    code, out, err = run(capsys, *argv, "pg/readonly")
    assert code == 0
    assert "export BROKER_USERNAME=v-pg-ro-1\n" in out
    assert err == (TOKEN_FLAG_WARNING
                   + "broker: warning: cannot read sys/internal/ui/mounts/pg (denied (HTTP "
                     "403)); using BROKER_* variable names for pg\n")
    canned.on("GET", "/v1/pg/creds/other", 403, {"errors": ["permission denied"]})
    code, out, err = run(capsys, *argv, "pg/other")
    assert code == 1 and out == ""
    assert err == TOKEN_FLAG_WARNING + "broker: error: permission denied (HTTP 403)\n"
