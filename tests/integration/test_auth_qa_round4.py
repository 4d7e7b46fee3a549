"""QA round 4 on login and tokens, with real hvac against a real broker over HTTP.

1. A JWT with whitespace around it (read from a file) logs in; whitespace inside is refused.
2. Token create, lookup and renew list the ``default`` policy, as Vault and the JWT
   login do; what a token may do is unchanged (rows from before included).
3. A renewal capped by the token's max TTL says so in ``warnings``, in Vault's words.
4. A renewal capped by the parent token's expiry names that limit, not the max TTL.
5. A JWT role that binds nothing is a config error naming file, key and problem.
6. A misspelt key is reported as unknown, with the key it most likely meant.

No token or JWT appears in an assertion message: they are compared, never printed.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from broker.config import ConfigError, load_config
from broker.lease import Token
from broker.tokens import hash_token
from tests.integration.broker_harness import BrokerThread, write_config
from tests.integration.jwt_fixtures import github_auth, oidc_issuer_fixture, running_broker
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration

POLICIES = """
[tokens]
max_ttl = "2h"

[policies.ci]
"pg/creds/readonly" = ["read"]
"auth/token/create" = ["update"]
"auth/token/lookup" = ["update"]
"""

#: what the built-in default policy and ``ci`` grant, on paths either names and on
#: paths neither does: the answer for every ``ci`` token, however it lists its policies.
EXPECTED_CAPABILITIES = {
    "auth/token/lookup-self": ["read"],
    "auth/token/renew-self": ["update"],
    "sys/leases/renew": ["update"],
    "pg/creds/readonly": ["read"],
    "pg/creds/admin": ["deny"],
    "sys/policies/acl/ci": ["deny"],
    "auth/token/create-orphan": ["deny"],
}


def jwt_method(issuer: OIDCIssuer) -> str:
    """The login at auth/github: role deploy, tokens with policy ci for 30 min, renewable
    to 1 h (the max TTL a renewal is capped at), no claim mapped."""
    return github_auth(issuer, policies=["ci"], claim_mappings=None, max_ttl="1h")


github = oidc_issuer_fixture()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, github: OIDCIssuer) -> Iterator[BrokerThread]:
    tmp = tmp_path_factory.mktemp("auth-qa4")
    with running_broker(tmp, POLICIES + jwt_method(github), revoke=()) as server:
        yield server


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return hvac.Client(url=broker.url, token=broker.root_token)


def client(broker: BrokerThread, token: str | None = None) -> hvac.Client:
    return hvac.Client(url=broker.url, token=token)


def audit_text(broker: BrokerThread) -> str:
    return Path(broker.audit_path).read_text()


def capabilities(broker: BrokerThread, token: str) -> dict[str, Any]:
    answer = client(broker, token).sys.get_capabilities(paths=list(EXPECTED_CAPABILITIES))
    return {path: answer["data"][path] for path in EXPECTED_CAPABILITIES}


# -- 1. whitespace around a JWT -----------------------------------------------------------
@pytest.mark.parametrize("wrap", ["{}\n", "  {} \r\n", "\t{}\n\n"],
                         ids=["trailing-newline", "spaces-and-crlf", "tab-and-newlines"])
def test_a_jwt_with_whitespace_around_it_logs_in(broker: BrokerThread, github: OIDCIssuer,
                                                 wrap: str, tmp_path: Path) -> None:
    """A token read with open().read() keeps its newline; hvac sends it as it is, and the
    login works as Vault's (go-jose strips whitespace before parsing)."""
    token_file = tmp_path / "token"
    token_file.write_text(wrap.format(github.github_token(repository="acme/app")))
    with open(token_file) as fh:  # as a CI script reads $ACTIONS_ID_TOKEN file
        presented = fh.read()
    me = client(broker)
    auth = me.auth.jwt.jwt_login(role="deploy", jwt=presented, path="github")["auth"]
    assert auth["policies"] == ["ci", "default"]
    assert me.auth.token.lookup_self()["data"]["accessor"] == auth["accessor"]
    assert presented.strip() not in audit_text(broker), "the JWT reached the audit log"


@pytest.mark.parametrize("where", ["header", "payload", "signature"])
def test_whitespace_inside_a_jwt_is_still_refused(broker: BrokerThread, github: OIDCIssuer,
                                                  where: str) -> None:
    """A token broken across lines was mangled on its way: 403, saying why."""
    token = github.github_token(repository="acme/app")
    header, payload, signature = token.split(".")
    parts = {"header": header, "payload": payload, "signature": signature}
    value = parts[where]
    parts[where] = value[: len(value) // 2] + "\n" + value[len(value) // 2:]
    broken = ".".join(parts.values())
    with pytest.raises(hvac.exceptions.Forbidden) as info:
        client(broker).auth.jwt.jwt_login(role="deploy", jwt=broken, path="github")
    message = str(info.value)
    assert "contains whitespace" in message, message
    assert token not in message and payload not in message
    assert token not in audit_text(broker)


# -- 2. "default" in the policies of create / lookup / renew ------------------------------
def test_created_tokens_list_the_default_policy_everywhere(broker: BrokerThread,
                                                           root: hvac.Client,
                                                           github: OIDCIssuer) -> None:
    """As in Vault (token_store.go: SanitizePolicies(policies, addDefault)): "default"
    in create, lookup-self, lookup, lookup-accessor and renew answers."""
    created = root.auth.token.create(policies=["ci"], ttl="10m")["auth"]
    assert created["policies"] == ["ci", "default"] == created["token_policies"]
    token = created["client_token"]
    me = client(broker, token)
    assert me.auth.token.lookup_self()["data"]["policies"] == ["ci", "default"]
    assert root.auth.token.lookup(token)["data"]["policies"] == ["ci", "default"]
    assert root.auth.token.lookup_accessor(created["accessor"])["data"]["policies"] \
        == ["ci", "default"]
    renewed = me.auth.token.renew_self(increment="5m")["auth"]
    assert renewed["policies"] == ["ci", "default"] == renewed["token_policies"]
    assert root.auth.token.renew(token, increment="5m")["auth"]["policies"] == ["ci", "default"]
    # A child that inherits its creator's policies, and one that names "default" itself.
    child = me.auth.token.create(ttl="5m")["auth"]
    assert child["policies"] == ["ci", "default"]
    named = me.auth.token.create(policies=["default", "ci"], ttl="5m")["auth"]
    assert named["policies"] == ["ci", "default"]
    # The JWT login answer already listed it: lookup now agrees with it.
    login = client(broker)
    auth = login.auth.jwt.jwt_login(role="deploy", path="github",
                                    jwt=github.github_token(repository="acme/app"))["auth"]
    assert login.auth.token.lookup_self()["data"]["policies"] == auth["policies"] \
        == ["ci", "default"]
    # Root tokens stay ["root"], as in Vault.
    assert root.auth.token.lookup_self()["data"]["policies"] == ["root"]
    assert root.auth.token.create(policies=["root"], ttl="5m")["auth"]["policies"] == ["root"]
    # Still refused: the engine gives every token "default", so a token claiming to lack
    # it would not (Vault's no_default_policy needs the engine to honour it; see report).
    with pytest.raises(hvac.exceptions.InvalidRequest) as info:
        root.auth.token.create(policies=["ci"], no_default_policy=True)
    assert "no_default_policy is not supported" in str(info.value)


def test_what_a_token_may_do_is_unchanged(broker: BrokerThread, root: hvac.Client) -> None:
    """Listing "default" grants nothing new: the engine has always added it. A row stored
    before (policies ["ci"] only) is shown with it and may do exactly what a new one may."""
    new = root.auth.token.create(policies=["ci"], ttl="10m")["auth"]["client_token"]
    old = "brk.old-row-" + secrets.token_urlsafe(16)
    now = time.time()

    async def insert_old_row() -> None:
        assert broker.state is not None
        await broker.state.store.insert_token(Token(
            accessor="old-row-" + secrets.token_urlsafe(8), token_hash=hash_token(old),
            policies=["ci"], created=now, expire_time=now + 600, max_expire_time=now + 3600,
            creation_ttl=600))

    broker.call(insert_old_row())
    assert client(broker, old).auth.token.lookup_self()["data"]["policies"] == ["ci", "default"]
    assert capabilities(broker, new) == capabilities(broker, old) == EXPECTED_CAPABILITIES


# -- 3./4. renewals capped: the warning, and the limit it names ---------------------------
def test_a_renewal_past_the_max_ttl_is_capped_with_vaults_warning(broker: BrokerThread,
                                                                  root: hvac.Client) -> None:
    """renew-self and renew with an increment past explicit_max_ttl: the capped TTL, and
    Vault's warning (framework.CalculateTTL) naming the token's max TTL."""
    created = root.auth.token.create(policies=["ci"], ttl="10m", explicit_max_ttl="20m")
    token = created["auth"]["client_token"]
    assert created["warnings"] is None
    answer = client(broker, token).auth.token.renew_self(increment="1h")
    assert 1190 <= answer["auth"]["lease_duration"] <= 1200
    (warning,) = answer["warnings"]
    assert warning.startswith('TTL of "1h" exceeded the effective max_ttl of "')
    assert "TTL value is capped accordingly" in warning
    assert "the token's max TTL (20m from its creation" in warning, warning
    # renew (another token, by value) warns the same way.
    other = root.auth.token.renew(token, increment="2h")
    assert 1190 <= other["auth"]["lease_duration"] <= 1200
    assert other["warnings"] and "exceeded the effective max_ttl" in other["warnings"][0]
    # renew-accessor too.
    by_accessor = root.auth.token.renew_accessor(created["auth"]["accessor"], increment="2h")
    assert by_accessor["warnings"] and "max TTL" in by_accessor["warnings"][0]
    # Within the limit: no warning.
    within = client(broker, token).auth.token.renew_self(increment="5m")
    assert within["auth"]["lease_duration"] == 300 and within["warnings"] is None


def test_a_jwt_login_token_renewed_past_token_max_ttl_warns(broker: BrokerThread,
                                                            github: OIDCIssuer) -> None:
    """A login token (token_max_ttl 1h) renewed by 2h gets about 1h, and says so."""
    me = client(broker)
    me.auth.jwt.jwt_login(role="deploy", path="github",
                          jwt=github.github_token(repository="acme/app"))
    answer = me.auth.token.renew_self(increment="2h")
    assert 3590 <= answer["auth"]["lease_duration"] <= 3600
    assert answer["warnings"] and "the token's max TTL (1h from its creation" \
        in answer["warnings"][0], answer["warnings"]


def test_a_renewal_capped_by_the_parent_names_the_parent(broker: BrokerThread,
                                                         root: hvac.Client) -> None:
    """A child's limit is its parent's expiry (a token never outlives its parent): the
    warning says so instead of blaming a max TTL the child never had."""
    parent = root.auth.token.create(policies=["ci"], ttl="10m", explicit_max_ttl="10m")
    parent_token = parent["auth"]["client_token"]
    child = client(broker, parent_token).auth.token.create(ttl="5m")["auth"]
    answer = client(broker, child["client_token"]).auth.token.renew_self(increment="1h")
    assert 590 <= answer["auth"]["lease_duration"] <= 600
    (warning,) = answer["warnings"]
    assert "exceeded the effective max_ttl" in warning
    assert "its parent token's expiry" in warning and "max TTL (" not in warning, warning


def test_a_child_is_not_renewed_past_its_parents_shortened_expiry(broker: BrokerThread,
                                                                  root: hvac.Client) -> None:
    """The parent renewed itself to 60s after the child was made: the child's renewal to
    5m is capped at the parent's expiry, which is what actually ends the child."""
    parent_token = root.auth.token.create(policies=["ci"], ttl="10m")["auth"]["client_token"]
    child = client(broker, parent_token).auth.token.create(ttl="5m")["auth"]["client_token"]
    shortened = client(broker, parent_token).auth.token.renew_self(increment="60")
    assert shortened["auth"]["lease_duration"] == 60
    answer = client(broker, child).auth.token.renew_self(increment="5m")
    assert 55 <= answer["auth"]["lease_duration"] <= 60
    assert answer["warnings"] and "its parent token's expiry" in answer["warnings"][0]
    assert client(broker, child).auth.token.lookup_self()["data"]["ttl"] <= 60


def test_a_child_created_past_its_parents_expiry_says_it_was_capped(
        broker: BrokerThread, root: hvac.Client) -> None:
    """Creating a child with a ttl longer than its parent has left gives the parent's
    expiry, and the answer's warnings say so (docs/api.md promised it; it was silent).
    A child within the parent's time, and an orphan, get no such warning."""
    parent_token = root.auth.token.create(policies=["ci"], ttl="10m")["auth"]["client_token"]
    parent = client(broker, parent_token)
    answer = parent.auth.token.create(ttl="1h")
    assert 590 <= answer["auth"]["lease_duration"] <= 600
    (warning,) = answer["warnings"]
    assert "ttl 1h" in warning and "never outlives its parent" in warning, warning
    assert f"capped at {answer['auth']['lease_duration'] // 60}m" in warning, warning
    within = parent.auth.token.create(ttl="5m")
    assert within["auth"]["lease_duration"] == 300 and not within["warnings"]
    orphan = root.auth.token.create(policies=["ci"], ttl="1h", no_parent=True)
    assert orphan["auth"]["lease_duration"] == 3600 and not orphan["warnings"]
    # No ttl asked for: the child gets what the parent has left, and no warning about
    # a ttl nobody gave ([tokens] max_ttl stood in for it).
    unasked = parent.auth.token.create()
    assert 590 <= unasked["auth"]["lease_duration"] <= 600 and not unasked["warnings"]
    # explicit_max_ttl, not the parent, cut it: no parent warning.
    capped = parent.auth.token.create(ttl="5m", explicit_max_ttl="2m")
    assert capped["auth"]["lease_duration"] == 120 and not capped["warnings"], capped


# -- 5./6. config: a role that binds nothing, misspelt keys -------------------------------
def config_error(tmp_path: Path, body: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, body))
    return info.value


_METHOD = """
[auth.jwt.ci]
jwks_url = "http://127.0.0.1:1/jwks"
bound_issuer = "https://ci.example"
"""


def test_a_role_that_binds_nothing_is_a_config_error(tmp_path: Path) -> None:
    """Vault: "must have at least one bound constraint when creating/updating a role"."""
    error = config_error(tmp_path, _METHOD + '[auth.jwt.ci.roles.open]\ntoken_ttl = "1h"\n')
    assert error.key == "auth.jwt.ci.roles.open", str(error)
    assert "binds nothing" in error.message
    assert "bound_audiences, bound_subject, bound_claims" in error.message
    assert str(error).startswith(f"{tmp_path / 'broker.toml'}: auth.jwt.ci.roles.open: ")
    # An empty list or table binds nothing either.
    empty = config_error(tmp_path, _METHOD + "[auth.jwt.ci.roles.open]\n"
                         "bound_audiences = []\nbound_claims = {}\n")
    assert empty.key == "auth.jwt.ci.roles.open" and "binds nothing" in empty.message
    # Any one bound is enough.
    for bound in ('bound_audiences = ["broker"]', 'bound_subject = "repo:acme/app:ref:main"',
                  'bound_claims = { repository = "acme/*" }'):
        body = _METHOD + f"[auth.jwt.ci.roles.ok]\n{bound}\n"
        assert "ok" in load_config(write_config(tmp_path, body)).auth["jwt"]["ci"]["roles"]


@pytest.mark.parametrize(("body", "key", "message"), [
    ('[auth.jwt.ci]\njwks_url = "http://127.0.0.1:1/jwks"\nbound_isuer = "https://ci.example"\n'
     '[auth.jwt.ci.roles.r]\nbound_audiences = ["b"]\n',
     "auth.jwt.ci.bound_isuer", "unknown key (did you mean bound_issuer?)"),
    (_METHOD + "jwks_cache_tl = 60\n",
     "auth.jwt.ci.jwks_cache_tl", "unknown key (did you mean jwks_cache_ttl?)"),
    (_METHOD + '[auth.jwt.ci.roles.r]\nbound_audience = ["b"]\n',
     "auth.jwt.ci.roles.r.bound_audience", "unknown key (did you mean bound_audiences?)"),
    (_METHOD + '[auth.jwt.ci.roles.r]\nbound_audiences = ["b"]\ntoken_polices = ["ci"]\n',
     "auth.jwt.ci.roles.r.token_polices", "unknown key (did you mean token_policies?)"),
    (_METHOD + 'bound_audiences = ["b"]\n',
     "auth.jwt.ci.bound_audiences", "belongs in a role ([auth.jwt.ci.roles.ROLE])"),
    (_METHOD + '[auth.jwt.ci.roles.r]\nbound_audiences = ["b"]\nbound_issuer = "x"\n',
     "auth.jwt.ci.roles.r.bound_issuer", "belongs in [auth.jwt.ci]"),
], ids=["method-typo-bound_isuer", "method-typo", "role-typo-audience", "role-typo-policies",
        "role-key-in-method", "method-key-in-role"])
def test_a_misspelt_key_is_named_with_a_suggestion(tmp_path: Path, body: str, key: str,
                                                   message: str) -> None:
    """Not "bound_issuer: missing": the key written is named, with the one it most likely
    meant, in config.py's style (FILE: KEY: unknown ... (did you mean ...?))."""
    error = config_error(tmp_path, body)
    assert error.key == key, str(error)
    assert message in error.message, str(error)
    assert "missing" not in error.message


def test_a_claim_holding_a_nul_is_refused(broker: BrokerThread, github: OIDCIssuer) -> None:
    """A NUL in the user claim (here ``sub``, from the repository) is a 403 saying so.
    Request fields refuse NUL already; a claim went into the token's row as it was: a
    PostgreSQL store (JSONB, text) answered 500 with a traceback, SQLite kept it."""
    token = github.github_token(repository="acme/a\x00b")
    with pytest.raises(hvac.exceptions.Forbidden, match="NUL"):
        client(broker).auth.jwt.jwt_login(role="deploy", jwt=token, path="github")
