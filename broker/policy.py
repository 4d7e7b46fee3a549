"""Policies with Vault's semantics: path patterns mapped to capabilities.

A token carries policy names; :class:`PolicySet` answers which capabilities
those names grant on one request path. The rules are Vault's:

- ``pg/creds/readonly`` matches exactly that path.
- A trailing ``*`` is a prefix glob: ``pg/creds/*`` matches ``pg/creds/ro`` and
  ``pg/creds/ro/x``; ``pg/cr*`` matches ``pg/creds``. ``*`` anywhere else is an error.
- A ``+`` segment matches exactly one non-empty path segment:
  ``pg/creds/+/x`` matches ``pg/creds/ro/x`` but not ``pg/creds/a/b/x``.
- When several patterns match, ONE wins, by Vault's priority order: the pattern
  whose first wildcard (``+`` or ``*``) comes later; then one not ending in ``*``;
  then fewer ``+`` segments; then the longer pattern; then the lexicographically
  larger one. An exact pattern therefore beats every wildcard.
- The same pattern in several of the token's policies merges (union of
  capabilities); ``deny`` in the winning set yields no capability at all.
- ``root`` grants everything (``sudo`` included) and overrides any ``deny``.
  ``default`` is attached to every token implicitly (see :data:`DEFAULT_POLICY`);
  a configured ``default`` extends it: its rules are added, and on a path both
  name, the configured capabilities replace the built-in ones (``["deny"]``
  takes one away). Unknown names are ignored: a token may outlive the policy
  it names.
- A pattern may contain ``{{identity.metadata.KEY}}``, ``{{identity.entity.name}}``
  or ``{{identity.display_name}}``. They are resolved against the caller's
  identity on every check. A missing (or empty, or non-scalar) value means the
  pattern matches nothing, and the value is literal text: a ``*``, ``+`` or ``/``
  inside it never acts as a wildcard.

Patterns are parsed once at construction and the merged rules of each distinct
policy combination are cached, so a check is a dict lookup plus at most one
regular expression per wildcard pattern. The expressions are built only from
escaped literals, ``[^/]+`` between literal slashes and a trailing ``.*``, so
they cannot backtrack catastrophically.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "ALL_CAPABILITIES",
    "DEFAULT_POLICY",
    "PolicySet",
]

log = logging.getLogger(__name__)

#: what ``root`` holds; ``deny`` is not a grant, so it is not part of it.
ALL_CAPABILITIES = frozenset({"create", "read", "update", "delete", "list", "sudo"})

#: attached to every token. The lease endpoints are further restricted by the
#: lease engine to leases the token itself owns (its accessor is the lease
#: owner); this policy only lets the request reach that check.
#: It grants no ``read`` on ``sys/mounts`` (nor does Vault's): that lists every mount and
#: role. What a client needs to know about a mount it may use (its plugin type and
#: variable names, for ``broker creds --format env`` and ``broker exec``) comes from
#: ``sys/internal/ui/mounts/MOUNT``, which needs no grant of its own (see
#: :meth:`PolicySet.grants_under`).
DEFAULT_POLICY: Mapping[str, tuple[str, ...]] = {
    "auth/token/lookup-self": ("read",),
    "auth/token/renew-self": ("update",),
    "auth/token/revoke-self": ("update",),
    "sys/leases/renew": ("update",),
    "sys/leases/revoke": ("update",),
    "sys/leases/lookup": ("update",),
    "sys/capabilities-self": ("update",),
}

_VALID_CAPS = ALL_CAPABILITIES | {"deny"}
_TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_NAMES_CACHE_SIZE = 1024

@dataclass(frozen=True)
class _Var:
    """A ``{{identity...}}`` reference inside a pattern segment."""

    path: tuple[str, ...]

    def resolve(self, identity: Mapping[str, Any]) -> str | None:
        node: Any = identity
        for part in self.path:
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        # Only scalars substitute; an empty value would turn "x/{{v}}*" into "x/*".
        if isinstance(node, bool) or not isinstance(node, str | int) or node == "":
            return None
        return str(node)


# Resolved form of a pattern: is_prefix, then per segment None (a "+") or literal text.
_Resolved = tuple[bool, tuple[str | None, ...]]
_Priority = tuple[int, int, int, int, str, tuple[int, ...]]


@dataclass(frozen=True)
class _Rule:
    """A pattern with no template left: what is matched and ranked."""

    key: _Resolved
    priority: _Priority
    exact: str | None  # the path, when the pattern has no wildcard at all
    regex: re.Pattern[str] | None
    caps: frozenset[str]

    def matches(self, path: str) -> bool:
        if self.exact is not None:
            return path == self.exact
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


@dataclass(frozen=True)
class _Template:
    """A pattern containing ``{{identity...}}``; resolved on each check."""

    is_prefix: bool
    segments: tuple[Any, ...]
    caps: frozenset[str]

    def resolve(self, identity: Mapping[str, Any]) -> _Rule | None:
        out: list[str | None] = []
        for seg in self.segments:
            if seg == "+":
                out.append(None)
                continue
            text = []
            for piece in seg:
                value = piece if isinstance(piece, str) else piece.resolve(identity)
                if value is None:
                    return None
                text.append(value)
            out.append("".join(text))
        return _rule((self.is_prefix, tuple(out)), self.caps)


@dataclass(frozen=True)
class _Compiled:
    """The merged rules of one combination of policy names."""

    exact: Mapping[str, _Rule]
    # Wildcard rules sorted best first (the first match wins), bucketed by a
    # fixed first path segment so a check only tries rules that could match;
    # rules without one (``+/...``, ``pg*``) are in every bucket and in ``anywhere``.
    buckets: Mapping[str, tuple[_Rule, ...]]
    anywhere: tuple[_Rule, ...]
    templates: tuple[_Template, ...]


def _priority(key: _Resolved) -> _Priority:
    is_prefix, segs = key
    body = "/".join("+" if s is None else s for s in segs)
    first = sys.maxsize
    offset = 0
    plus: list[int] = []
    for i, seg in enumerate(segs):
        if seg is None:
            first = min(first, offset)
            plus.append(i)
        offset += (1 if seg is None else len(seg)) + 1
    if is_prefix:
        first = min(first, len(body))
    # Bigger is better. The wildcard positions only break ties between a "+"
    # wildcard and a literal "+" that came from a template value.
    return (first, 0 if is_prefix else 1, -len(plus), len(body), body, tuple(-i for i in plus))


@lru_cache(maxsize=4096)
def _regex(key: _Resolved) -> re.Pattern[str]:
    is_prefix, segs = key
    parts = ["[^/]+" if s is None else re.escape(s) for s in segs]
    return re.compile("/".join(parts) + (".*" if is_prefix else ""), re.DOTALL)


def _rule(key: _Resolved, caps: frozenset[str]) -> _Rule:
    is_prefix, segs = key
    if not is_prefix and None not in segs:
        return _Rule(key, _priority(key), "/".join(s for s in segs if s is not None), None, caps)
    return _Rule(key, _priority(key), None, _regex(key), caps)


def _first_segment(key: _Resolved) -> str | None:
    """The literal first path segment every match must have, if the pattern fixes one."""
    is_prefix, segs = key
    if segs[0] is None or (is_prefix and len(segs) == 1):
        return None
    return segs[0]


def _below(key: _Resolved, prefix: tuple[str, ...]) -> bool:
    """Whether the pattern ``key`` names paths strictly below the path ``prefix`` (its
    segments): longer than it, and each of its first segments ``+`` or the same.

    A templated segment may have resolved to a value holding ``/`` (metadata
    ``m = "pg/creds"`` in ``{{identity.metadata.m}}/readonly``): it names that
    many segments, as it does when the rule is matched against a path.
    """
    segs = tuple(part for seg in key[1]
                 for part in ((None,) if seg is None else seg.split("/")))
    return len(segs) > len(prefix) and all(
        seg is None or seg == want for seg, want in zip(segs, prefix, strict=False))


def _parse_var(name: str, pattern: str) -> _Var:
    parts = name.split(".")
    if parts[:2] == ["identity", "metadata"] and len(parts) > 2 and all(parts[2:]):
        # Metadata keys may contain dots; everything after "metadata." is the key.
        return _Var(("metadata", ".".join(parts[2:])))
    if parts in (["identity", "entity", "name"], ["identity", "entity", "id"]):
        return _Var(("entity", parts[2]))
    if parts == ["identity", "display_name"]:
        return _Var(("display_name",))
    raise ValueError(
        f"policy path {pattern!r}: unknown template {{{{{name}}}}}; use "
        "identity.metadata.KEY, identity.entity.name or identity.display_name"
    )


def _parse(pattern: str) -> tuple[bool, tuple[Any, ...], bool]:
    """Split a pattern into segments; returns (is_prefix, segments, has_templates).

    A segment is the string ``"+"`` (wildcard) or a tuple of pieces, each literal
    text or a :class:`_Var` to resolve.
    """
    is_prefix = pattern.endswith("*")
    body = pattern[:-1] if is_prefix else pattern
    if "*" in body:
        raise ValueError(f"policy path {pattern!r}: '*' is only allowed at the end")
    segments: list[Any] = []
    templated = False
    for seg in body.split("/"):
        if seg == "+":
            segments.append("+")
            continue
        pieces: list[str | _Var] = []
        pos = 0
        for m in _TEMPLATE.finditer(seg):
            pieces.append(seg[pos : m.start()])
            pieces.append(_parse_var(m.group(1), pattern))
            pos = m.end()
        pieces.append(seg[pos:])
        for piece in pieces:
            if isinstance(piece, str) and ("{{" in piece or "}}" in piece):
                raise ValueError(f"policy path {pattern!r}: unbalanced '{{{{' / '}}}}'")
        templated = templated or len(pieces) > 1
        segments.append(tuple(p for p in pieces if p != ""))
    return is_prefix, tuple(segments), templated


def _static_key(is_prefix: bool, segments: tuple[Any, ...]) -> _Resolved:
    return is_prefix, tuple(None if s == "+" else "".join(s) for s in segments)


#: The order a rendered policy lists capabilities in (the order of Vault's docs), so
#: its text does not depend on the order the config file happened to list them in.
_CAPABILITY_ORDER = ("create", "read", "update", "delete", "list", "sudo", "deny")


def _static_text(key: _Resolved) -> str:
    """A parsed pattern written back: ``+`` where a segment is a wildcard, ``*`` if a prefix."""
    is_prefix, segs = key
    return "/".join("+" if s is None else s for s in segs) + ("*" if is_prefix else "")


def _template_text(is_prefix: bool, segments: tuple[Any, ...]) -> str:
    """A templated pattern written back, each reference in its canonical spelling
    (``{{identity.metadata.KEY}}``, without the spaces a config may put inside)."""
    parts = []
    for seg in segments:
        if seg == "+":
            parts.append("+")
            continue
        parts.append("".join(piece if isinstance(piece, str)
                             else "{{identity." + ".".join(piece.path) + "}}"
                             for piece in seg))
    return "/".join(parts) + ("*" if is_prefix else "")


def _hcl_block(pattern: str, caps: frozenset[str]) -> str:
    # A JSON string is a valid HCL string (same quotes, same escapes), so a pattern
    # holding a quote or a backslash still reads back as itself.
    listed = ", ".join(json.dumps(c) for c in _CAPABILITY_ORDER if c in caps)
    return (f"path {json.dumps(pattern, ensure_ascii=False)} {{\n"
            f"  capabilities = [{listed}]\n}}")


def _open_ended(segments: tuple[Any, ...]) -> bool:
    """Whether a prefix pattern's last segment holds a template (``{{...}}-*``), so the
    ``*`` extends the resolved value itself, not a path below it."""
    last = segments[-1] if segments else ()
    return isinstance(last, tuple) and any(isinstance(piece, _Var) for piece in last)


class PolicySet:
    """All configured policies, answering capability questions for a token's names."""

    def __init__(self, policies: Mapping[str, Mapping[str, Sequence[str]]]) -> None:
        merged: dict[str, Mapping[str, Sequence[str]]] = {"default": DEFAULT_POLICY}
        for name, rules in policies.items():
            if name == "root":
                raise ValueError("policy 'root' is built in and cannot be redefined")
            merged[name] = rules
        if "default" in policies:
            # Extended, not replaced: a [policies.default] that only meant to add
            # a path must not silently take self-management (lookup, renew and
            # revoke-self, which `broker exec` cleans up with) from every token.
            own = policies["default"]
            named = {path.lstrip("/") for path in own}
            kept = {path: caps for path, caps in DEFAULT_POLICY.items() if path not in named}
            merged["default"] = {**kept, **own}
        # Per policy: static rules keyed by resolved pattern, templates keyed by source.
        self._static: dict[str, dict[_Resolved, frozenset[str]]] = {}
        self._templates: dict[str, dict[tuple[bool, tuple[Any, ...]], frozenset[str]]] = {}
        for name, rules in merged.items():
            static: dict[_Resolved, frozenset[str]] = {}
            templates: dict[tuple[bool, tuple[Any, ...]], frozenset[str]] = {}
            for raw_path, raw_caps in rules.items():
                if isinstance(raw_caps, str):
                    raise ValueError(f"policy {name!r} path {raw_path!r}: expected a list")
                caps = frozenset(raw_caps)
                unknown = caps - _VALID_CAPS
                if unknown:
                    raise ValueError(
                        f"policy {name!r} path {raw_path!r}: unknown capability "
                        f"{sorted(unknown)[0]!r}"
                    )
                is_prefix, segments, templated = _parse(raw_path.lstrip("/"))
                if templated and is_prefix and _open_ended(segments):
                    # Vault's semantics, and a trap: the value is followed by a
                    # string prefix, so "{{...}}-*" for owner "acme" matches
                    # "acme-labs-ro" too (security QA: another owner's credentials).
                    log.warning(
                        "policy %r path %r: the template is followed by '*' in the same "
                        "segment, so it also matches values that only start with the "
                        "token's (acme-* matches acme-labs-*); name the paths exactly, or "
                        "end the template at a '/'", name, raw_path)
                if templated:
                    tkey = (is_prefix, segments)
                    templates[tkey] = templates.get(tkey, frozenset()) | caps
                else:
                    skey = _static_key(is_prefix, segments)
                    static[skey] = static.get(skey, frozenset()) | caps
            self._static[name] = static
            self._templates[name] = templates
        self._cache: dict[frozenset[str], _Compiled] = {}

    @property
    def names(self) -> frozenset[str]:
        """Every policy a token may name, the built-in ``root`` and ``default`` included."""
        return frozenset(self._static) | {"root"}

    def _compiled(self, names: frozenset[str]) -> _Compiled:
        compiled = self._cache.get(names)
        if compiled is not None:
            return compiled
        static: dict[_Resolved, frozenset[str]] = {}
        templates: dict[tuple[bool, tuple[Any, ...]], frozenset[str]] = {}
        for name in sorted(names):
            for skey, caps in self._static.get(name, {}).items():
                static[skey] = static.get(skey, frozenset()) | caps
            for tkey, caps in self._templates.get(name, {}).items():
                templates[tkey] = templates.get(tkey, frozenset()) | caps
        rules = [_rule(k, caps) for k, caps in static.items()]
        wild = sorted((r for r in rules if r.exact is None),
                      key=lambda r: r.priority, reverse=True)
        firsts = {_first_segment(r.key) for r in wild} - {None}
        compiled = _Compiled(
            exact={r.exact: r for r in rules if r.exact is not None},
            buckets={
                first: tuple(r for r in wild if _first_segment(r.key) in (first, None))
                for first in firsts if first is not None
            },
            anywhere=tuple(r for r in wild if _first_segment(r.key) is None),
            templates=tuple(_Template(p, s, caps) for (p, s), caps in templates.items()),
        )
        if len(self._cache) >= _NAMES_CACHE_SIZE:
            # Distinct combinations are few in practice; a crude reset bounds memory.
            self._cache.clear()
        self._cache[names] = compiled
        return compiled

    def capabilities(
        self,
        policies: Sequence[str],
        path: str,
        *,
        identity: Mapping[str, Any] | None = None,
    ) -> frozenset[str]:
        """The capabilities ``policies`` (plus ``default``) grant on ``path``; deny -> empty."""
        caps = self._winning_caps(policies, path, identity)
        return frozenset() if "deny" in caps else caps

    def denies(
        self,
        policies: Sequence[str],
        path: str,
        *,
        identity: Mapping[str, Any] | None = None,
    ) -> bool:
        """Whether the rule that decides ``path`` for ``policies`` says ``deny`` (not merely
        grants nothing): a grant that reaches ``path`` another way (``read`` on
        ``sys/mounts`` for ``sys/mounts/NAME/tune``) must not override it."""
        return "deny" in self._winning_caps(policies, path, identity)

    def _winning_caps(
        self,
        policies: Sequence[str],
        path: str,
        identity: Mapping[str, Any] | None,
    ) -> frozenset[str]:
        """The capabilities of the rule(s) deciding ``path``, ``deny`` included."""
        if isinstance(policies, str):
            raise TypeError("policies must be a sequence of names, not one string")
        names = frozenset(policies) | {"default"}
        if "root" in names:
            return ALL_CAPABILITIES
        path = path.lstrip("/")
        compiled = self._compiled(names)
        best = compiled.exact.get(path)
        if best is None:
            first = path.partition("/")[0]
            for rule in compiled.buckets.get(first, compiled.anywhere):
                if rule.matches(path):
                    best = rule
                    break
        caps = best.caps if best is not None else frozenset()
        if compiled.templates:
            candidates = [best] if best is not None else []
            for template in compiled.templates:
                resolved = template.resolve(identity or {})
                if resolved is not None and resolved.matches(path):
                    candidates.append(resolved)
            if candidates:
                winner = max(candidates, key=lambda r: r.priority)
                caps = frozenset[str]().union(*(r.caps for r in candidates if r.key == winner.key))
        return caps

    def grants_under(
        self,
        policies: Sequence[str],
        prefix: str,
        *,
        identity: Mapping[str, Any] | None = None,
    ) -> bool:
        """Whether ``policies`` grant some capability on ``prefix`` (a mount, ``"pg/"``) or
        on some path below it: Vault's ``hasMountAccess``, which decides what
        ``sys/internal/ui/mounts`` tells a token about a mount.

        As Vault: yes if anything is granted on ``prefix`` itself (a ``*`` or ``pg/*``
        rule), else if one of the token's rules below it, or reaching below it through
        a ``+`` segment, grants anything but ``deny``. Which of several rules wins on
        a given path does not matter here: a grant on any one path is access.
        """
        if isinstance(policies, str):
            raise TypeError("policies must be a sequence of names, not one string")
        prefix = prefix.strip("/") + "/"
        if self.capabilities(policies, prefix, identity=identity):
            return True
        wanted = tuple(prefix[:-1].split("/"))
        merged: dict[_Resolved, frozenset[str]] = {}
        for name in frozenset(policies) | {"default"}:
            for key, caps in self._static.get(name, {}).items():
                merged[key] = merged.get(key, frozenset()) | caps
            for (is_prefix, segments), caps in self._templates.get(name, {}).items():
                rule = _Template(is_prefix, segments, caps).resolve(identity or {})
                if rule is not None:
                    merged[rule.key] = merged.get(rule.key, frozenset()) | caps
        return any(caps and "deny" not in caps and _below(key, wanted)
                   for key, caps in merged.items())

    def allows(
        self,
        policies: Sequence[str],
        path: str,
        capability: str,
        identity: Mapping[str, Any] | None = None,
    ) -> bool:
        """Whether ``capability`` is granted on ``path``; asking for ``deny`` is always False."""
        return capability in self.capabilities(policies, path, identity=identity)

    def hcl(self, name: str) -> str | None:
        """Policy ``name`` as Vault HCL (what ``vault policy read`` shows); None if there
        is no such policy.

        One ``path "PATTERN" { capabilities = [...] }`` block per pattern, sorted
        by pattern. It is written from the rules as parsed, the ones every check
        uses, so it shows what is enforced: ``default`` is the built-in rules with
        a configured ``[policies.default]`` applied, a pattern is written without
        the leading ``/`` a check ignores, and a template in its canonical
        spelling. ``root`` has no rules (it grants everything), so its text is
        empty, as in Vault. A policy without rules is empty too.
        """
        if name == "root":
            return ""
        if name not in self._static:
            return None
        blocks = {_static_text(key): caps for key, caps in self._static[name].items()}
        for (is_prefix, segments), caps in self._templates[name].items():
            # Never the text of a static pattern: those hold no "{{".
            blocks[_template_text(is_prefix, segments)] = caps
        text = "\n\n".join(_hcl_block(pattern, blocks[pattern]) for pattern in sorted(blocks))
        return text + "\n" if text else ""
