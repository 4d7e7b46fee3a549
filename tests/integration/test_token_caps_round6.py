"""Token caps as clients see them: exec with a child token, a JWT login's explicit_max_ttl.

Real broker, real PostgreSQL, real OIDC issuer; hvac for the lookups, ``broker exec``
as a subprocess.

- A child token's lookup shows its own ``explicit_max_ttl`` (as Vault does), while
  its renewals stop at its parent's expiry. exec read how far its token can live
  from ``explicit_max_ttl`` alone, so with a child of a short-lived parent it did not
  warn that the lease ends before ``--ttl``. Lookups now show ``max_expire_time``
  (an extension: how far a renewal can take the token now), and exec reads it.
- A JWT login's token showed ``min(token_max_ttl, token_explicit_max_ttl)`` as
  ``explicit_max_ttl``; it now shows the role's ``token_explicit_max_ttl`` (0 if
  unset), as Vault does. The cap the token is held to did not change.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import hvac
import pytest

from broker.server import reload
from tests.integration.broker_harness import BrokerThread
from tests.integration.jwt_fixtures import (
    cli_environ,
    jwt_role,
    oidc_issuer_fixture,
    oidc_method,
    running_broker,
)
from tests.integration.test_api_postgres import pg_mount
from tests.oidc_issuer import OIDCIssuer

pytestmark = pytest.mark.integration


def _role(name: str, *, ttl: str, max_ttl: str, explicit: str | None = None) -> str:
    """A github login role (jwt_role's defaults) with ``token_explicit_max_ttl``, if given."""
    text = jwt_role(name, ttl=ttl, max_ttl=max_ttl)
    return text + (f'token_explicit_max_ttl = "{explicit}"\n' if explicit else "")


#: token_max_ttl 2h, no explicit max: Vault shows explicit_max_ttl 0.
PLAIN = _role("plain", ttl="30m", max_ttl="2h")
#: the explicit max (1h) comes first.
HARD = _role("hard", ttl="30m", max_ttl="2h", explicit="1h")
#: token_max_ttl (1h) comes first; the explicit max (3h) is still what lookup shows.
LOOSE = _role("loose", ttl="30m", max_ttl="1h", explicit="3h")
#: exec's login roles: tokens of 4 s, held to 20 s by one setting or the other.
BRIEF_MAX = _role("brief-max", ttl="4s", max_ttl="20s")
BRIEF_EXPLICIT = _role("brief-explicit", ttl="4s", max_ttl="1h", explicit="20s")
ROLES = PLAIN + HARD + LOOSE + BRIEF_MAX + BRIEF_EXPLICIT


issuer = oidc_issuer_fixture()


@pytest.fixture
def broker(tmp_path: Path, postgres_dsn: str, issuer: OIDCIssuer) -> Iterator[BrokerThread]:
    with running_broker(tmp_path, pg_mount(postgres_dsn) + oidc_method(issuer) + ROLES
                        ) as server:
        yield server


def _client(broker: BrokerThread, token: str | None = None) -> hvac.Client:
    return hvac.Client(url=broker.url, token=token or broker.root_token)


def _login(broker: BrokerThread, issuer: OIDCIssuer, role: str) -> hvac.Client:
    """An hvac client logged in at auth/github as ``role``, as a CI job would."""
    client = hvac.Client(url=broker.url)
    client.auth.jwt.jwt_login(role=role, path="github",
                              jwt=issuer.github_token(repository="acme/app", run_id="61"))
    return client


def _self(client: hvac.Client) -> dict[str, Any]:
    data: dict[str, Any] = client.auth.token.lookup_self()["data"]
    return data


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _reach(data: dict[str, Any]) -> float:
    """How far the token's renewals can go (``max_expire_time``), from its issue time."""
    return _ts(data["max_expire_time"]) - _ts(data["issue_time"])


def _parent_and_child(broker: BrokerThread) -> tuple[str, str]:
    """A parent token of 1 min (made by root) and its child asking for 1h, explicit max 1h."""
    parent = _client(broker).auth.token.create(policies=["app"], ttl="1m")["auth"]
    child = _client(broker, parent["client_token"]).auth.token.create(
        policies=["app"], ttl="1h", explicit_max_ttl="1h")["auth"]
    return parent["client_token"], child["client_token"]


def _exec(broker: BrokerThread, tmp: Path, dsn: str, *args: str,
          environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``broker exec ARGS pg/readonly -- sh -c 'echo lease ids'``, to its end."""
    argv = [sys.executable, "-m", "broker.cli", "exec", *args, "pg/readonly", "--",
            "sh", "-c", 'echo "$BROKER_LEASE_IDS"']
    return subprocess.run(argv, env=cli_environ(broker, dsn, **(environ or {})),
                          capture_output=True, text=True, timeout=120, cwd=tmp)


# -- 1. a child token: lookup shows how far it can go, exec warns ------------------------
def test_a_childs_lookup_shows_its_parents_expiry_as_max_expire_time(
        broker: BrokerThread) -> None:
    """A 1 min parent's child (explicit max 1h): lookup-self shows explicit_max_ttl 3600
    and max_expire_time at the parent's expiry, which moves when the parent is renewed;
    a token made by root shows its own cap there."""
    parent, child = _parent_and_child(broker)
    mine = _self(_client(broker, child))
    assert mine["explicit_max_ttl"] == 3600, mine
    parents = _self(_client(broker, parent))
    assert mine["max_expire_time"] == parents["expire_time"], (mine, parents)
    # The child's renewals are held to the parent's current expiry: so is the field.
    _client(broker, parent).auth.token.renew_self(increment="5m")
    renewed = _self(_client(broker, parent))["expire_time"]
    assert _ts(renewed) > _ts(parents["expire_time"])
    assert _self(_client(broker, child))["max_expire_time"] == renewed
    # Root never expires: the parent's own cap is its limit (its explicit_max_ttl, here
    # [tokens] max_ttl, 768h by default).
    assert abs(_reach(parents) - parents["explicit_max_ttl"]) < 0.01, parents
    # lookup-accessor answers the same.
    by_accessor = _client(broker).auth.token.lookup_accessor(mine["accessor"])["data"]
    assert by_accessor["max_expire_time"] == renewed


def test_exec_with_a_child_token_warns_that_its_parents_expiry_ends_the_lease(
        broker: BrokerThread, tmp_path: Path, postgres_dsn: str) -> None:
    """broker exec --token CHILD --ttl 10m, the child's parent ending in 1 min: exec warns
    that the parent's expiry ends the lease before --ttl, and names that time. (It read
    the child's reach from its explicit max TTL, 1h, and said nothing.)"""
    parent, child = _parent_and_child(broker)
    parent_end = _ts(_self(_client(broker, parent))["expire_time"])
    done = _exec(broker, tmp_path, postgres_dsn, "--token", child, "--ttl", "10m")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "before --ttl" in line]
    assert len(lines) == 1, done.stderr
    assert "the broker token's parent token expires at" in lines[0], lines[0]
    assert "a token never outlives its parent" in lines[0], lines[0]
    said = lines[0].split("expires at ")[1].split("Z")[0]
    shown = datetime.strptime(said, "%H:%M:%S")
    seconds = shown.hour * 3600 + shown.minute * 60 + shown.second
    # exec's clock, whole seconds, erring early: within a few seconds of the parent's end
    # (compared as times of day: the warning shows no date).
    off = (seconds - parent_end) % 86400
    assert min(off, 86400 - off) < 3, (said, parent_end)


# -- 2. a JWT login's explicit_max_ttl is its role's token_explicit_max_ttl ---------------
@pytest.mark.parametrize(("role", "explicit", "reach"), [
    ("plain", 0, 7200),       # token_max_ttl only: Vault shows 0
    ("hard", 3600, 3600),     # the explicit max comes first
    ("loose", 10800, 3600),   # token_max_ttl comes first; the explicit max is shown
])
def test_a_jwt_login_token_shows_the_roles_token_explicit_max_ttl(
        broker: BrokerThread, issuer: OIDCIssuer, role: str, explicit: int,
        reach: int) -> None:
    """hvac jwt_login + lookup_self: explicit_max_ttl is the role's token_explicit_max_ttl
    (0 if unset), not the smaller of it and token_max_ttl; max_expire_time is the cap the
    token is held to, the smaller of the two."""
    data = _self(_login(broker, issuer, role))
    assert data["explicit_max_ttl"] == explicit, data
    assert abs(_reach(data) - reach) < 0.01, data
    assert data["path"] == "auth/github/login"


def test_a_login_token_is_still_held_to_token_max_ttl(broker: BrokerThread,
                                                      issuer: OIDCIssuer) -> None:
    """The loose role's token (explicit max 3h shown) renewed by 3h gets its 1h
    token_max_ttl at most, with the capping warning: lookup changed, enforcement did not."""
    client = _login(broker, issuer, "loose")
    answer = client.auth.token.renew_self(increment="3h")
    assert answer["auth"]["lease_duration"] <= 3600, answer
    assert answer["warnings"] and "the token's max TTL (1h from its creation" \
        in answer["warnings"][0], answer


def test_a_login_token_whose_role_changed_shows_the_cap_it_was_given(
        broker: BrokerThread, issuer: OIDCIssuer) -> None:
    """A reload raises the hard role's explicit max to 90m: a token logged in before still
    shows (and is held to) its 1h, not the role's new value; a new login shows 90m."""
    before = _login(broker, issuer, "hard")
    config = Path(broker.config.source)
    config.write_text(config.read_text().replace(HARD, _role("hard", ttl="30m", max_ttl="2h",
                                                             explicit="90m")))
    assert broker.state is not None
    assert broker.call(reload(broker.state)) is True  # what SIGHUP runs
    old = _self(before)
    assert old["explicit_max_ttl"] == 3600 and abs(_reach(old) - 3600) < 0.01, old
    assert _self(_login(broker, issuer, "hard"))["explicit_max_ttl"] == 5400


# -- exec's cap for its own login token, whichever setting sets it -----------------------
@pytest.mark.parametrize(("role", "setting"), [
    ("brief-max", "token_max_ttl"),
    ("brief-explicit", "token_explicit_max_ttl"),
])
def test_exec_warns_with_the_setting_that_caps_its_login_token(
        broker: BrokerThread, issuer: OIDCIssuer, tmp_path: Path, postgres_dsn: str,
        role: str, setting: str) -> None:
    """--heartbeat 0 --ttl 60s, the login token held to 20 s: exec still sees the cap
    (lookup's explicit_max_ttl is now 0 for brief-max) and names the setting that sets it."""
    jwt = issuer.github_token(repository="acme/app", run_id="62")
    done = _exec(broker, tmp_path, postgres_dsn, "--heartbeat", "0", "--ttl", "60s",
                 "--jwt-env", "CI_JWT", "--auth-role", role, "--auth-path", "github",
                 environ={"CI_JWT": jwt})
    assert done.returncode == 0, done.stderr
    assert f"the login token's max TTL ({setting}) ends the lease at" in done.stderr, \
        done.stderr
    assert "before --ttl" in done.stderr
