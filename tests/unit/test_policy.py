"""PolicySet: Vault's path matching, priority, merging, deny, built-ins and templates."""

from __future__ import annotations

import logging

import pytest

from broker.policy import ALL_CAPABILITIES, PolicySet


def caps(rules: dict[str, list[str]], path: str, **identity: object) -> frozenset[str]:
    return PolicySet({"p": rules}).capabilities(["p"], path, identity=identity or None)


def test_exact_path_matches_only_itself() -> None:
    """An exact pattern grants on that path and nowhere else, not even below it."""
    ps = PolicySet({"p": {"pg/creds/ro": ["read"]}})
    assert ps.capabilities(["p"], "pg/creds/ro") == {"read"}
    assert ps.capabilities(["p"], "pg/creds/ro/x") == frozenset()
    assert ps.capabilities(["p"], "pg/creds/r") == frozenset()


def test_trailing_glob_is_a_string_prefix() -> None:
    """'*' at the end matches any continuation, including a partial segment."""
    assert caps({"pg/cr*": ["read"]}, "pg/creds/ro/deep") == {"read"}
    assert caps({"pg/cr*": ["read"]}, "pg/cr") == {"read"}
    assert caps({"pg/cr*": ["read"]}, "pg/c") == frozenset()


def test_exact_beats_glob_deny() -> None:
    """Vault's example: secret/* deny + secret/foo read -> foo readable, bar denied."""
    rules = {"secret/*": ["deny"], "secret/foo": ["read"]}
    assert caps(rules, "secret/foo") == {"read"}
    assert caps(rules, "secret/bar") == frozenset()
    assert caps(rules, "secret/foo/sub") == frozenset()


def test_plus_matches_exactly_one_nonempty_segment() -> None:
    """'+' stands for one segment: not zero, not two, not an empty one."""
    rules = {"secret/+/x": ["read"]}
    assert caps(rules, "secret/a/x") == {"read"}
    assert caps(rules, "secret/a/b/x") == frozenset()
    assert caps(rules, "secret//x") == frozenset()
    assert caps(rules, "secret/x") == frozenset()
    assert caps(rules, "secret/a/x/y") == frozenset()


def test_plus_pattern_beats_glob_at_same_position() -> None:
    """secret/+/x and secret/* wildcard at the same place: the non-glob one wins."""
    rules = {"secret/*": ["read"], "secret/+/x": ["deny"]}
    assert caps(rules, "secret/a/x") == frozenset()
    assert caps(rules, "secret/a/y") == {"read"}
    rules = {"secret/*": ["deny"], "secret/+/x": ["read", "list"]}
    assert caps(rules, "secret/a/x") == {"read", "list"}


@pytest.mark.parametrize(
    ("winner", "loser", "path"),
    [
        # first wildcard later wins (Vault: prefer foo/a* over foo/+)
        ("foo/a*", "foo/+", "foo/ab"),
        ("foo/bar/+/baz", "foo/+/bar/baz", "foo/bar/bar/baz"),
        ("secret/foo*", "secret/*", "secret/food"),
        # not ending in * wins (prefer foo/+/bar over foo/+/ba*, foo/+ over foo/*)
        ("foo/+/bar", "foo/+/ba*", "foo/x/bar"),
        ("foo/+", "foo/*", "foo/x"),
        # fewer + segments wins
        ("foo/+/bar/baz", "foo/+/+/baz", "foo/a/bar/baz"),
        # longer wins (prefer foo/+/bar/ba* over foo/+/bar/b*)
        ("foo/+/bar/ba*", "foo/+/bar/b*", "foo/x/bar/baz"),
        # lexicographically larger wins ('b' > '+')
        ("foo/+/b/+", "foo/+/+/c", "foo/a/b/c"),
    ],
)
def test_vault_priority_order(winner: str, loser: str, path: str) -> None:
    """Of two matching patterns, Vault's priority rules pick the same single winner."""
    assert caps({winner: ["read"], loser: ["deny"]}, path) == {"read"}
    assert caps({winner: ["deny"], loser: ["read"]}, path) == frozenset()


def test_same_pattern_merges_across_policies() -> None:
    """Identical patterns in a token's policies grant the union of their capabilities."""
    ps = PolicySet({"a": {"pg/creds/ro": ["read"]}, "b": {"pg/creds/ro": ["update"]}})
    assert ps.capabilities(["a", "b"], "pg/creds/ro") == {"read", "update"}
    assert ps.capabilities(["a"], "pg/creds/ro") == {"read"}


def test_deny_wins_within_merged_set() -> None:
    """A deny on the winning pattern in any of the token's policies denies everything."""
    ps = PolicySet({"a": {"pg/*": ["read", "update"]}, "b": {"pg/*": ["deny"]}})
    assert ps.capabilities(["a", "b"], "pg/creds/ro") == frozenset()
    assert not ps.allows(["a", "b"], "pg/creds/ro", "read")
    assert ps.allows(["a"], "pg/creds/ro", "read")


def test_deny_on_losing_pattern_does_not_apply() -> None:
    """Only the single winning pattern counts: a broader deny loses to a narrower grant."""
    ps = PolicySet({"a": {"pg/creds/ro": ["read"]}, "b": {"pg/*": ["deny"]}})
    assert ps.capabilities(["a", "b"], "pg/creds/ro") == {"read"}
    assert ps.capabilities(["a", "b"], "pg/creds/rw") == frozenset()


def test_root_grants_everything_and_overrides_deny() -> None:
    """root holds every capability including sudo on any path, whatever else is attached."""
    ps = PolicySet({"nope": {"*": ["deny"]}})
    assert ps.capabilities(["root"], "sys/leases/revoke-force/pg") == ALL_CAPABILITIES
    assert ps.capabilities(["nope", "root"], "anything") == ALL_CAPABILITIES
    assert ps.allows(["root"], "x", "sudo")
    assert not ps.allows(["root"], "x", "deny")


def test_root_cannot_be_redefined() -> None:
    """A config trying to define 'root' is rejected."""
    with pytest.raises(ValueError, match="root"):
        PolicySet({"root": {"x": ["read"]}})


def test_default_policy_is_implicit() -> None:
    """Every token gets 'default': self-service token and lease endpoints, nothing else."""
    ps = PolicySet({})
    assert ps.capabilities([], "auth/token/lookup-self") == {"read"}
    for path in ("auth/token/renew-self", "auth/token/revoke-self", "sys/leases/renew",
                 "sys/leases/revoke", "sys/leases/lookup", "sys/capabilities-self"):
        assert ps.capabilities([], path) == {"update"}, path
    assert ps.capabilities([], "pg/creds/ro") == frozenset()
    assert ps.capabilities([], "sys/leases/revoke-prefix/pg") == frozenset()


def test_default_merges_with_other_policies() -> None:
    """A token's own policy and the implicit default combine on the same pattern."""
    ps = PolicySet({"ci": {"sys/leases/renew": ["read"]}})
    assert ps.capabilities(["ci"], "sys/leases/renew") == {"read", "update"}


def test_config_default_extends_the_built_in_one() -> None:
    """A configured 'default' adds its paths and replaces only the built-in paths it names."""
    ps = PolicySet({"default": {"pg/creds/ro": ["read"], "sys/leases/renew": ["read"],
                                "/auth/token/revoke-self": ["deny"]}})
    assert ps.capabilities([], "pg/creds/ro") == {"read"}
    assert ps.capabilities([], "sys/leases/renew") == {"read"}  # replaced, not merged
    assert ps.capabilities([], "auth/token/revoke-self") == frozenset()  # taken away
    assert ps.capabilities([], "auth/token/lookup-self") == {"read"}  # the rest stays


def test_unknown_policy_names_are_ignored() -> None:
    """A token naming a policy removed from config keeps only what its other policies grant."""
    ps = PolicySet({"ci": {"pg/creds/ro": ["read"]}})
    assert ps.capabilities(["ci", "gone"], "pg/creds/ro") == {"read"}
    assert ps.capabilities(["gone"], "pg/creds/ro") == frozenset()


def test_leading_slash_is_ignored() -> None:
    """'/pg/creds/ro' in a policy or a request means the same as 'pg/creds/ro'."""
    ps = PolicySet({"p": {"/pg/creds/ro": ["read"]}})
    assert ps.capabilities(["p"], "pg/creds/ro") == {"read"}
    assert ps.capabilities(["p"], "/pg/creds/ro") == {"read"}


def test_policies_as_one_string_is_rejected() -> None:
    """Passing 'ci' instead of ['ci'] is a programming error, not a set of letters."""
    with pytest.raises(TypeError):
        PolicySet({}).capabilities("ci", "x")


@pytest.mark.parametrize(
    "pattern",
    ["a/*/b", "a/**", "a/{{identity.metadata.x}", "a/{{nope.x}}", "a/{{identity.metadata.}}"],
)
def test_malformed_patterns_are_rejected(pattern: str) -> None:
    """Misplaced globs, unknown or unbalanced templates fail at construction."""
    with pytest.raises(ValueError):
        PolicySet({"p": {pattern: ["read"]}})


def test_unknown_capability_is_rejected() -> None:
    """A typo in a capability name fails at construction rather than granting nothing."""
    with pytest.raises(ValueError, match="capability"):
        PolicySet({"p": {"x": ["raed"]}})


REPO = "ci/{{identity.metadata.repository}}/*"


def test_template_resolves_against_identity() -> None:
    """A metadata template grants on the caller's own subtree and no one else's."""
    ident = {"metadata": {"repository": "acme/app"}}
    assert caps({REPO: ["read"]}, "ci/acme/app/creds", metadata=ident["metadata"]) == {"read"}
    assert caps({REPO: ["read"]}, "ci/acme/other/creds", metadata=ident["metadata"]) == frozenset()


def test_template_entity_and_display_name() -> None:
    """identity.entity.name and identity.display_name resolve too."""
    rules = {"u/{{identity.entity.name}}/{{identity.display_name}}": ["read"]}
    assert caps(rules, "u/bob/ci-bob", entity={"name": "bob"}, display_name="ci-bob") == {"read"}
    assert caps(rules, "u/bob/ci-bob", entity={"name": "eve"}, display_name="ci-bob") == frozenset()


def test_template_missing_key_never_matches() -> None:
    """Without the metadata key the pattern matches nothing, not even its literal text."""
    rules = {REPO: ["read"]}
    assert caps(rules, "ci/acme/app/x") == frozenset()
    assert caps(rules, "ci/{{identity.metadata.repository}}/x") == frozenset()
    assert caps(rules, "ci/acme/app/x", metadata={"other": "acme/app"}) == frozenset()
    assert caps(rules, "ci//x", metadata={"repository": ""}) == frozenset()
    assert caps(rules, "ci/x/y", metadata={"repository": ["x"]}) == frozenset()


@pytest.mark.parametrize("value", ["acme/*", "*", "+", "acme/+"])
def test_template_value_cannot_inject_wildcards(value: str) -> None:
    """A '*', '+' or '/' inside a metadata value is literal text, never a wildcard."""
    rules = {"ci/{{identity.metadata.repository}}": ["read"]}
    meta = {"repository": value}
    for path in ("ci/acme/app", "ci/acme/*/x", "ci/other", "ci/acme/x"):
        assert caps(rules, path, metadata=meta) == frozenset(), path
    assert caps(rules, f"ci/{value}", metadata=meta) == {"read"}


def test_template_value_with_glob_does_not_widen_prefix_pattern() -> None:
    """With ci/{{repo}}/*, repo='acme/*' only reaches below the literal 'ci/acme/*/'."""
    meta = {"repository": "acme/*"}
    assert caps({REPO: ["read"]}, "ci/acme/app/creds", metadata=meta) == frozenset()
    assert caps({REPO: ["read"]}, "ci/acme/*/creds", metadata=meta) == {"read"}


def test_template_competes_by_priority_with_static_patterns() -> None:
    """A resolved template ranks like any pattern: exact template beats a static glob deny."""
    rules = {"ci/*": ["deny"], "ci/{{identity.metadata.repo}}": ["read"]}
    assert caps(rules, "ci/app", metadata={"repo": "app"}) == {"read"}
    assert caps(rules, "ci/other", metadata={"repo": "app"}) == frozenset()


def test_template_merges_with_identical_static_pattern() -> None:
    """A template resolving to the same pattern as a static one merges, and deny still wins."""
    ps = PolicySet({
        "a": {"ci/app": ["read"]},
        "b": {"ci/{{identity.metadata.repo}}": ["update"]},
        "c": {"ci/{{identity.metadata.repo}}": ["deny"]},
    })
    ident = {"metadata": {"repo": "app"}}
    assert ps.capabilities(["a", "b"], "ci/app", identity=ident) == {"read", "update"}
    assert ps.capabilities(["a", "b", "c"], "ci/app", identity=ident) == frozenset()


def test_integer_metadata_substitutes() -> None:
    """Numeric claims such as a CI run id substitute as their decimal text."""
    assert caps({"ci/{{identity.metadata.run_id}}": ["read"]}, "ci/42",
                metadata={"run_id": 42}) == {"read"}


def test_long_adversarial_path_is_cheap() -> None:
    """Patterns cannot backtrack catastrophically on a long path that almost matches."""
    ps = PolicySet({"p": {"a/+/+/+/+/+/+/b": ["read"], "a/+/+/+/+/+/+/c*": ["read"]}})
    path = "a/" + "x/" * 5000 + "y"
    assert ps.capabilities(["p"], path) == frozenset()


def test_patterns_without_fixed_first_segment_compete_everywhere() -> None:
    """'+/x' and 'f*' apply under every first segment and still rank by priority."""
    rules = {"+/x": ["read"], "foo/*": ["deny"], "f*": ["list"], "foo/+/y": ["update"]}
    assert caps(rules, "bar/x") == {"read"}
    assert caps(rules, "foo/x") == frozenset()  # foo/* (wildcard at 4) beats +/x (at 0)
    assert caps(rules, "fab/z") == {"list"}
    assert caps(rules, "foo/a/y") == {"update"}
    assert caps(rules, "f") == {"list"}


def test_a_template_followed_by_a_star_in_its_segment_is_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    """"{{...}}-*" for owner acme also matches acme-labs-ro (security QA): said at load."""
    with caplog.at_level(logging.WARNING, logger="broker.policy"):
        policies = PolicySet({"per-owner": {
            "pg/creds/{{identity.metadata.owner}}-*": ["read"],
            "pg/creds/{{identity.metadata.owner}}-ro": ["read"],
            "aws/{{identity.metadata.owner}}/*": ["read"],
        }})
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "'pg/creds/{{identity.metadata.owner}}-*'" in warned[0]
    assert "acme-* matches acme-labs-*" in warned[0]
    # The semantics the warning is about (Vault's too): the value is a string prefix.
    acme = {"metadata": {"owner": "acme"}}
    assert policies.allows(["per-owner"], "pg/creds/acme-labs-ro", "read", identity=acme)
    assert not policies.allows(["per-owner"], "aws/acme-labs/x", "read", identity=acme)
