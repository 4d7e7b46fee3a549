"""The token API against a real broker over HTTP (hvac where a Vault client is the point):
who may set a token's identity, orphans, renewal TTLs, Vault's answers and routes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from broker.lease import Token
from broker.store import open_store
from broker.tokens import TokenManager, hash_token
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker
from tests.integration.store_fixtures import fresh_postgres_database, store_before
from tests.integration.token_fixtures import audit_events, broker_on_store, client

pytestmark = pytest.mark.integration

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.acme-ro]
default_ttl = "1h"
max_ttl = "24h"

[mounts.noop.roles.evil-ro]
default_ttl = "1h"
max_ttl = "24h"

# A CI pipeline's policy: everything it reaches is named by its own token metadata.
[policies.ci]
"noop/creds/{{identity.metadata.repository_owner}}-ro" = ["read"]
"sys/leases/revoke-by/run_id/{{identity.metadata.run_id}}" = ["update"]
"auth/token/create" = ["update"]
"auth/token/create-orphan" = ["update"]

[policies.creator]
"auth/token/create" = ["update"]

[policies.sudo-creator]
"auth/token/create" = ["update", "sudo"]

[policies.inspector]
"auth/token/lookup-accessor" = ["update"]
"auth/token/renew" = ["update"]
"""

RUN_111 = {"repository_owner": "acme", "run_id": "111"}
RUN_222 = {"repository_owner": "acme", "run_id": "222"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with noop_broker(tmp_path_factory.mktemp("token-api"), CONFIG) as server:
        yield server


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, ROOT_TOKEN)


def ci_token(root: hvac.Client, meta: dict[str, str], **extra: Any) -> str:
    """A CI run's token as a login would make it: policy ci, metadata from its claims."""
    auth = root.auth.token.create(policies=["ci"], meta=meta, ttl="1h",
                                  display_name="github-acme", **extra)["auth"]
    return str(auth["client_token"])


def raw(broker: BrokerThread, method: str, path: str, *, token: str | bytes = ROOT_TOKEN,
        body: bytes | None = None, headers: dict[str, Any] | None = None
        ) -> requests.Response:
    return requests.request(method, f"{broker.url}/v1/{path}", data=body, timeout=30,
                            headers={"X-Vault-Token": token, **(headers or {})})


# -- 1. token identity: only root sets metadata and display_name ---------------------


def test_child_cannot_forge_metadata_to_reach_another_owner(broker: BrokerThread,
                                                            root: hvac.Client) -> None:
    """A CI token's child (or orphan) with another repository_owner is refused (403):
    before, it read evil's credentials through the templated policy."""
    ci = client(broker, ci_token(root, RUN_111))
    with pytest.raises(hvac.exceptions.Forbidden, match="only a root token can set token metadata"):
        ci.auth.token.create(policies=["ci"], meta={"repository_owner": "evil"})
    with pytest.raises(hvac.exceptions.Forbidden, match="only a root token can set token metadata"):
        ci.auth.token.create_orphan(policies=["ci"], meta={"repository_owner": "evil"})
    with pytest.raises(hvac.exceptions.Forbidden, match="only a root token can set token metadata"):
        ci.auth.token.create(policies=["ci"], meta={"team": "x"})  # a key the caller lacks
    denied = audit_events(broker, "policy_denied")
    assert any("token metadata" in str(e.get("error")) for e in denied)
    # the caller itself still reaches only its own owner's paths
    assert ci.read("noop/creds/acme-ro")["lease_id"]
    with pytest.raises(hvac.exceptions.Forbidden):
        ci.read("noop/creds/evil-ro")


def test_child_cannot_forge_run_id_to_revoke_another_run(broker: BrokerThread,
                                                         root: hvac.Client) -> None:
    """Run 111's token cannot mint a run_id=222 child, so run 222's leases survive."""
    run_222 = client(broker, ci_token(root, RUN_222))
    lease_id = run_222.read("noop/creds/acme-ro")["lease_id"]
    run_111 = client(broker, ci_token(root, RUN_111))
    with pytest.raises(hvac.exceptions.Forbidden, match="only a root token"):
        run_111.auth.token.create(policies=["ci"], meta={"run_id": "222"})
    with pytest.raises(hvac.exceptions.Forbidden):
        run_111.write("sys/leases/revoke-by", metadata={"run_id": "222"}, sync=True)
    looked = root.sys.read_lease(lease_id)["data"]
    assert looked["ttl"] > 0 and looked["metadata"]["run_id"] == "222"


def test_child_inherits_the_callers_metadata_and_display_name(broker: BrokerThread,
                                                              root: hvac.Client) -> None:
    """hvac's defaults (display_name "token") and a meta that repeats the caller's pairs
    are accepted; the child carries the caller's identity, and so do its leases."""
    ci = client(broker, ci_token(root, RUN_111))
    plain = ci.auth.token.create(policies=["ci"])["auth"]
    same = ci.auth.token.create(policies=["ci"], meta={"run_id": "111"},
                                display_name="github-acme")["auth"]
    for auth in (plain, same):
        assert auth["metadata"] == RUN_111
        child = client(broker, auth["client_token"])
        me = child.auth.token.lookup_self()["data"]
        assert me["meta"] == RUN_111 and me["display_name"] == "github-acme"
        lease_id = child.read("noop/creds/acme-ro")["lease_id"]
        assert root.sys.read_lease(lease_id)["data"]["metadata"]["run_id"] == "111"


def test_display_name_is_root_only(broker: BrokerThread, root: hvac.Client) -> None:
    """A non-root caller cannot rename its child (policies resolve identity.display_name)."""
    ci = client(broker, ci_token(root, RUN_111))
    with pytest.raises(hvac.exceptions.Forbidden, match="display_name"):
        ci.auth.token.create(policies=["ci"], display_name="github-evil")


def test_root_sets_metadata_and_display_name(broker: BrokerThread, root: hvac.Client) -> None:
    """Root tokens still choose both freely."""
    auth = root.auth.token.create(policies=["ci"], meta={"repository_owner": "evil"},
                                  display_name="ops")["auth"]
    me = client(broker, auth["client_token"]).auth.token.lookup_self()["data"]
    assert me["meta"] == {"repository_owner": "evil"} and me["display_name"] == "ops"


# -- 3. undecodable tokens and strings ------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "auth/token/lookup-self"), ("PUT", "sys/leases/lookup"),
    ("GET", "noop/creds/acme-ro"), ("POST", "auth/token/create"),
])
def test_a_non_utf8_token_header_is_403_not_500(broker: BrokerThread, method: str,
                                                path: str) -> None:
    """A token header holding a byte that is not UTF-8 is an invalid token (403)."""
    for headers in ({"X-Vault-Token": b"\xff\xfe-not-utf8"},
                    {"X-Vault-Token": "", "Authorization": b"Bearer \xc3\x28abc"}):
        resp = requests.request(method, f"{broker.url}/v1/{path}", headers=headers, timeout=30)
        assert resp.status_code == 403, resp.text
        assert resp.json() == {"errors": ["permission denied: invalid token"]}


def test_hash_token_takes_any_string() -> None:
    """Lone surrogates (surrogateescape'd bytes, or "\\ud800" from JSON) hash; no exception."""
    assert hash_token("\udcff") != hash_token("\ud800") != hash_token("x")


@pytest.mark.parametrize(("path", "field"), [
    ("auth/token/lookup", "token"), ("auth/token/revoke", "token"),
    ("auth/token/revoke-accessor", "accessor"), ("auth/token/lookup-accessor", "accessor"),
    ("auth/token/renew", "token"), ("auth/token/create", "display_name"),
])
def test_a_lone_surrogate_in_a_body_field_is_400(broker: BrokerThread, path: str,
                                                 field: str) -> None:
    """A JSON "\\ud800" (valid JSON, not text) is 400, not 500."""
    body = b'{"' + field.encode() + b'": "\\ud800"}'
    resp = raw(broker, "POST", path, body=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["errors"]


# -- 4. orphans -------------------------------------------------------------------------


def test_create_orphan_by_a_non_root_token_makes_an_orphan(broker: BrokerThread,
                                                           root: hvac.Client) -> None:
    """Via auth/token/create-orphan the path's policy is enough (as in Vault): the new
    token has no parent and outlives the revoked caller."""
    caller_token = ci_token(root, RUN_111)
    auth = client(broker, caller_token).auth.token.create_orphan(policies=["ci"])["auth"]
    assert auth["orphan"] is True
    orphan = client(broker, auth["client_token"])
    assert orphan.auth.token.lookup_self()["data"]["orphan"] is True
    root.auth.token.revoke(caller_token)
    assert orphan.auth.token.lookup_self()["data"]["meta"] == RUN_111


def test_no_parent_needs_root_or_sudo(broker: BrokerThread, root: hvac.Client) -> None:
    """no_parent=true on auth/token/create: 403 for a plain token (it used to make a child
    silently); an orphan for sudo on the path and for root."""
    creator = root.auth.token.create(policies=["creator"], ttl="1h")["auth"]["client_token"]
    with pytest.raises(hvac.exceptions.Forbidden, match="no_parent"):
        client(broker, creator).auth.token.create(policies=["creator"], no_parent=True)
    sudo = root.auth.token.create(policies=["sudo-creator"], ttl="1h")["auth"]["client_token"]
    made = client(broker, sudo).auth.token.create(policies=["sudo-creator"], no_parent=True)
    assert made["auth"]["orphan"] is True
    assert root.auth.token.create(policies=["ci"], no_parent=True)["auth"]["orphan"] is True
    assert root.auth.token.create(policies=["ci"])["auth"]["orphan"] is False


# -- 5. unsupported create options ------------------------------------------------------


@pytest.mark.parametrize(("option", "message"), [
    ({"type": "batch"}, "type is not supported"),
])
def test_unsupported_create_options_are_refused(root: hvac.Client, option: dict[str, Any],
                                                message: str) -> None:
    """batch tokens answer 400 instead of being ignored (num_uses is supported:
    test_token_num_uses.py; period too: test_token_period.py)."""
    with pytest.raises(hvac.exceptions.InvalidRequest, match=message):
        root.auth.token.create(policies=["ci"], **option)


def test_their_neutral_values_are_accepted(root: hvac.Client) -> None:
    """num_uses=0 (hvac always sends it), type=service and period 0 change nothing."""
    auth = root.auth.token.create(policies=["ci"], num_uses=0, type="service", period="0")
    assert auth["auth"]["client_token"]


# -- 6. lookup of a token that is not there ---------------------------------------------


def test_lookup_of_an_unknown_or_dead_token_is_403(broker: BrokerThread,
                                                   root: hvac.Client) -> None:
    """As in Vault: 403 "bad token" (hvac: Forbidden), for unknown and revoked alike."""
    with pytest.raises(hvac.exceptions.Forbidden, match="bad token"):
        root.auth.token.lookup("brk.no-such-token")
    dead = ci_token(root, RUN_111)
    root.auth.token.revoke(dead)
    with pytest.raises(hvac.exceptions.Forbidden, match="bad token"):
        root.auth.token.lookup(dead)


def test_revoking_unknown_tokens(broker: BrokerThread) -> None:
    """revoke of an unknown token is a no-op (204) and revoke-accessor of an unknown
    accessor a 400, as in Vault."""
    assert raw(broker, "POST", "auth/token/revoke",
               body=b'{"token": "brk.no-such-token"}').status_code == 204
    assert raw(broker, "POST", "auth/token/revoke-accessor",
               body=b'{"accessor": "no-such-accessor"}').status_code == 400


# -- 7. lookup-accessor and renew ---------------------------------------------------------


def test_lookup_accessor_with_hvac(broker: BrokerThread, root: hvac.Client) -> None:
    """hvac's lookup_accessor answers the token's properties, never the token itself."""
    auth = root.auth.token.create(policies=["ci"], meta=RUN_111, ttl="1h")["auth"]
    inspector = root.auth.token.create(policies=["inspector"], ttl="1h")["auth"]
    data = client(broker, inspector["client_token"]).auth.token.lookup_accessor(
        auth["accessor"])["data"]
    assert data["accessor"] == auth["accessor"] and data["id"] == ""
    assert data["meta"] == RUN_111 and data["policies"] == ["ci", "default"]
    assert 3590 < data["ttl"] <= 3600 and data["creation_ttl"] == 3600
    target = broker.state.audit.hmac(auth["accessor"])  # accessors are HMAC'd in the log
    assert any(e.get("target") == target for e in audit_events(broker, "token_lookup"))
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid accessor"):
        root.auth.token.lookup_accessor("no-such-accessor")
    with pytest.raises(hvac.exceptions.Forbidden):  # the path's policy decides
        client(broker, auth["client_token"]).auth.token.lookup_accessor(auth["accessor"])


def test_renew_with_hvac(broker: BrokerThread, root: hvac.Client) -> None:
    """hvac's renew(token, increment) extends another token and answers Vault's auth shape."""
    token = root.auth.token.create(policies=["ci"], ttl="10m")["auth"]["client_token"]
    inspector = root.auth.token.create(policies=["inspector"], ttl="1h")["auth"]
    auth = client(broker, inspector["client_token"]).auth.token.renew(token, increment="30m")
    assert auth["auth"]["client_token"] == token and auth["auth"]["lease_duration"] == 1800
    assert 1790 < root.auth.token.lookup(token)["data"]["ttl"] <= 1800
    renewals = audit_events(broker, "token_renew")
    assert renewals[-1]["target"] == broker.state.audit.hmac(auth["auth"]["accessor"])
    with pytest.raises(hvac.exceptions.InvalidRequest, match="token not found"):
        root.auth.token.renew("brk.no-such-token")
    with pytest.raises(hvac.exceptions.Forbidden):
        client(broker, token).auth.token.renew(token)


# -- 8. response shapes ----------------------------------------------------------------


def test_create_and_renew_self_report_the_ttl_granted(broker: BrokerThread,
                                                      root: hvac.Client) -> None:
    """create ttl=1h answers 3600 (not 3599); renew-self answers 600 and the caller's token."""
    auth = root.auth.token.create(policies=["ci"], ttl="1h")["auth"]
    assert auth["lease_duration"] == 3600
    renewed = client(broker, auth["client_token"]).auth.token.renew_self(increment="600")
    assert renewed["auth"]["lease_duration"] == 600
    assert renewed["auth"]["client_token"] == auth["client_token"]
    capped = root.auth.token.create(policies=["ci"], ttl="2h", explicit_max_ttl="1h")["auth"]
    assert capped["lease_duration"] == 3600


# -- 2. renew-self without an increment keeps the creation TTL, on both stores ----------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store_broker(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> Iterator[BrokerThread]:
    with broker_on_store(request, tmp_path) as server:
        yield server


def test_renew_self_without_increment_does_not_grow(any_store_broker: BrokerThread) -> None:
    """A 1h token renewed without an increment stays a 1h token (it used to get 1h, then
    1h plus the time since its creation, more on each renewal).

    The old renewal extended by expire_time - created, which each renewal pushes out by
    the time since the creation: the second renewal answered 3601, not 3600. The
    answer is computed from the renewal's own clock read, so 3600 is exact whatever the
    machine's speed, and a stall only widens the growth the test looks for. (It was a 4s
    token renewed every 1.1 s: a 3 s stall between two renewals expired it.)
    """
    root = client(any_store_broker, ROOT_TOKEN)
    token = root.auth.token.create(policies=["default"], ttl="1h")["auth"]["client_token"]
    me = client(any_store_broker, token)
    for _ in range(3):
        time.sleep(1.1)  # at least this long since the last renewal: the growth it would add
        assert me.auth.token.renew_self()["auth"]["lease_duration"] == 3600
    data = me.auth.token.lookup_self()["data"]
    assert data["ttl"] <= 3600 and data["creation_ttl"] == 3600


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_token_from_before_the_migration_renews_by_its_lifetime(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The migration adds creation_ttl as NULL for old rows; renewing one extends it by
    expire_time - created (its TTL, if never renewed before) and the store upgrades."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        url = asyncio.run(fresh_postgres_database(request))
    old = Token(accessor="old-acc", token_hash=hash_token("brk.old"), policies=["default"],
                created=1000.0, expire_time=1300.0)

    async def scenario() -> tuple[int | None, int, float | None]:
        await store_before(url, "ADD COLUMN creation_ttl", old)
        store = open_store(url)
        await store.open()
        try:
            record = await store.token_by_hash(old.token_hash)
            assert record is not None
            manager = TokenManager(store, clock=lambda: 1200.0)
            _, granted = await manager.renew(record, None)
            again = await store.token_by_accessor("old-acc")
            return record.creation_ttl, granted, again.expire_time if again else None
        finally:
            await store.close()

    creation_ttl, granted, expire = asyncio.run(scenario())
    assert creation_ttl is None
    assert granted == 300 and expire == 1500.0


# -- 9. the CLI --------------------------------------------------------------------------


def test_a_short_dev_root_token_id_is_a_one_line_error(tmp_path: Path) -> None:
    """`broker server --dev --dev-root-token-id abc`: one error line, non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "broker.cli", "server", "--dev", "--dev-root-token-id", "abc"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
             "HOME": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "at least 8 characters" in proc.stderr
