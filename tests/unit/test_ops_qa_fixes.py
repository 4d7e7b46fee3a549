"""Ops QA fixes that need no server: the example operator policy covers what
docs/operations.md has operators run, and the NUL check's cost stays linear."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest

from broker.api.common import _nul_field
from broker.api.system import STORE_DOWN_FAMILIES, _only_families
from broker.policy import PolicySet

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [ROOT / "config" / "broker.example.toml", ROOT / "deploy" / "compose" / "broker.toml"]

#: (path, capability) of each operator command docs/operations.md shows.
OPERATOR_COMMANDS = [
    ("sys/leases/lookup/pg/creds/readonly/", "list"),        # broker lease list PREFIX
    ("sys/leases/lookup", "update"),                          # broker lease lookup ...
    ("sys/leases/lookup/pg/creds/readonly/abc123", "update"),  # ... of anyone's lease
    ("sys/leases/search", "read"),                            # broker lease list --meta
    ("sys/leases/revoke-by", "update"),                       # broker lease revoke --meta
    ("sys/leases/revoke-prefix/pg/", "sudo"),                 # broker lease revoke --prefix
    ("sys/leases/revoke-force/pg/", "sudo"),                  # ... --force
    ("sys/leases/revoke/pg/creds/readonly/abc123", "update"),  # broker lease revoke LEASE_ID
    ("sys/leases/irrevocable", "read"),                       # broker lease irrevocable
    ("sys/leases/stats", "read"),                             # revoke progress
    ("auth/token/revoke-accessor", "update"),                 # broker token revoke --accessor
    ("sys/metrics", "read"),                                  # the scrape
]


def _operator(path: Path) -> PolicySet:
    policies = tomllib.loads(path.read_text())["policies"]
    return PolicySet({"operator": policies["operator"]})


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.parent.name)
@pytest.mark.parametrize(("path", "capability"), OPERATOR_COMMANDS)
def test_example_operator_policy_covers_the_operations_guide(
        example: Path, path: str, capability: str) -> None:
    """[policies.operator] grants each command docs/operations.md tells operators to run."""
    assert _operator(example).allows(["operator"], path, capability, identity={})


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.parent.name)
@pytest.mark.parametrize(("path", "capability"), [
    ("sys/leases/revoke-by", "sudo"),         # revoke-by force=true is break-glass
    ("auth/token/create", "update"),          # no minting of tokens
    ("auth/token/accessors/", "sudo"),
    ("pg/creds/readonly", "read"),            # no credentials of its own
])
def test_example_operator_policy_stays_narrow(example: Path, path: str, capability: str) -> None:
    """The operator policy grants nothing the guide does not use."""
    assert not _operator(example).allows(["operator"], path, capability, identity={})


def test_nul_walk_names_the_top_level_parameter() -> None:
    """A NUL at any depth, in a key or a value, is reported under its top-level key."""
    assert _nul_field({"a": "x", "meta": {"run": ["ok", "b\x00"]}}) == "meta"
    assert _nul_field({"a": {"k\x00": 1}}) == "a"
    assert _nul_field({"x\x00": 1}) == "x\x00"
    assert _nul_field({"a": ["x", {"b": 2}], "c": None}) is None


def test_nul_walk_is_linear() -> None:
    """Ten times the body takes about ten times as long (never quadratic)."""
    def timed(n: int) -> float:
        body = {f"k{i}": {"v": ["s" * 20, {"w": "t"}]} for i in range(n)}
        body["last"] = "x\x00"
        start = time.perf_counter()
        for _ in range(5):
            assert _nul_field(body) == "last"
        return time.perf_counter() - start

    timed(1000)
    assert timed(20_000) < 60 * timed(2000)


def test_store_down_scrape_keeps_only_the_health_families() -> None:
    """The families kept are whole (HELP, TYPE, samples); others are dropped entirely."""
    text = ("# HELP broker_leases x\n# TYPE broker_leases gauge\nbroker_leases{state=\"a\"} 1\n"
            "# HELP broker_store_healthy y\n# TYPE broker_store_healthy gauge\n"
            "broker_store_healthy 0\n"
            "# HELP broker_mount_healthy z\n# TYPE broker_mount_healthy gauge\n"
            "broker_mount_healthy{mount=\"pg\"} 1\n")
    assert _only_families(text, STORE_DOWN_FAMILIES) == (
        "# HELP broker_store_healthy y\n# TYPE broker_store_healthy gauge\n"
        "broker_store_healthy 0\n"
        "# HELP broker_mount_healthy z\n# TYPE broker_mount_healthy gauge\n"
        "broker_mount_healthy{mount=\"pg\"} 1\n")
