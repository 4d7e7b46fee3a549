"""Shared set-up of the ``broker exec`` and JWT-login integration tests.

test_exec, test_exec_token_lifetime, test_exec_qa_round4, test_jwt_exec_qa_fixes,
test_auth_qa_round4, test_mount_info and test_jwt_login each wrote these pieces out
again: the ``[auth.jwt.NAME]`` blocks of a CI login, the module's OIDC issuer, a
broker that revokes its leases when the tests are done with it, the environment of a
``broker`` subprocess, and starting, waiting for and killing ``broker exec``. They
live here once; what the copies varied (policies, bound claims, TTLs ...) is a
parameter, so a test's config still says what is special about it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.integration.broker_harness import BrokerThread, start_broker, write_config
from tests.oidc_issuer import OIDCIssuer

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- config

#: The bound claim of the GitHub-shaped test roles: any repository of ``acme`` (the
#: OIDCIssuer's GitHub tokens are for acme/app unless a test says otherwise).
ACME_REPOSITORIES: Mapping[str, str] = MappingProxyType({"repository": "acme/*"})
#: The claim mapping of the exec tests' roles: the job's run id goes into the token's
#: metadata, and from there into every lease it issues.
RUN_ID: Mapping[str, str] = MappingProxyType({"run_id": "run_id"})


def _toml(value: str | Sequence[str] | Mapping[str, str]) -> str:
    """``value`` as a TOML value: a string, an array of strings or an inline table."""
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    return "[" + ", ".join(_toml(item) for item in value) + "]"


def oidc_method(issuer: OIDCIssuer, name: str = "github") -> str:
    """``[auth.jwt.NAME]``: a JWT login method (at auth/NAME) trusting ``issuer``, whose
    keys the broker finds through the issuer's OIDC discovery document."""
    return f"""
[auth.jwt.{name}]
oidc_discovery_url = {_toml(issuer.url)}
"""


def jwt_role(role: str, *, method: str = "github", policies: Sequence[str] = ("app",),
             bound_audiences: Sequence[str] = ("broker",),
             bound_claims: Mapping[str, str] | None = ACME_REPOSITORIES,
             claim_mappings: Mapping[str, str] | None = RUN_ID,
             ttl: str | None = "30m", max_ttl: str | None = None) -> str:
    """``[auth.jwt.METHOD.roles.ROLE]``: a role of a JWT login method.

    The defaults are the CI role most tests log in as: audience ``broker``, any acme
    repository, the run id mapped, policy ``app``, tokens of 30 min. ``None`` leaves a
    key out (the broker's default then applies: no claim mapping, no max TTL ...).
    """
    lines = [f"[auth.jwt.{method}.roles.{role}]",
             f"bound_audiences = {_toml(bound_audiences)}"]
    if bound_claims is not None:
        lines.append(f"bound_claims = {_toml(bound_claims)}")
    if claim_mappings is not None:
        lines.append(f"claim_mappings = {_toml(claim_mappings)}")
    lines.append(f"token_policies = {_toml(policies)}")
    if ttl is not None:
        lines.append(f"token_ttl = {_toml(ttl)}")
    if max_ttl is not None:
        lines.append(f"token_max_ttl = {_toml(max_ttl)}")
    return "\n" + "\n".join(lines) + "\n"


def github_auth(issuer: OIDCIssuer, **deploy: Any) -> str:
    """A GitHub-shaped JWT login at auth/github trusting ``issuer``, with one role,
    ``deploy``. ``deploy`` takes :func:`jwt_role`'s keywords; by default its tokens get
    policy ``app`` (read on pg/creds/readonly) for 30 min, the run id mapped."""
    return oidc_method(issuer) + jwt_role("deploy", **deploy)


#: A second role of the github login whose tokens live 4 s (renewable to 20 s): shorter
#: than the ``--ttl`` the tests give exec, so exec has to renew its login token.
BRIEF_ROLE = jwt_role("brief", ttl="4s", max_ttl="20s")


def second_pg_mount(dsn: str) -> str:
    """``[mounts.pg2]``: a second postgres mount on the same server beside
    test_api_postgres.pg_mount's ``pg``, with one role, readonly (1 h, at most 2 h)."""
    return f"""
[mounts.pg2]
plugin = "postgres"
connection_url = "{dsn}"

[mounts.pg2.roles.readonly]
default_ttl = "1h"
max_ttl = "2h"
"""


# --------------------------------------------------------------------------- fixtures


def oidc_issuer_fixture(*, tls: bool = False) -> Callable[..., Any]:
    """A module-scoped fixture: a real OIDC issuer (tests/oidc_issuer.py) on loopback,
    over TLS with ``tls``, started once for the module's tests.

    Assign it in the test module, e.g. ``issuer = oidc_issuer_fixture()``: pytest names
    a fixture after the module attribute holding it. (An imported fixture would work
    too, but ruff then takes every test's argument of that name for a redefinition.)
    """

    @pytest.fixture(scope="module")
    def fixture() -> Iterator[OIDCIssuer]:
        with OIDCIssuer(tls=tls) as oidc:
            yield oidc

    return fixture


@contextmanager
def running_broker(tmp: Path, config: str, *, revoke: Sequence[str] = ("pg/",)
                   ) -> Iterator[BrokerThread]:
    """An in-process broker on ``config`` (storage and audit in ``tmp``). On exit every
    lease under the mount prefixes ``revoke`` is revoked, waiting for it (the shared
    PostgreSQL server must keep no role of a test), then the broker stops."""
    server = start_broker(write_config(tmp, config))
    try:
        yield server
    finally:
        for prefix in revoke:
            requests.put(f"{server.url}/v1/sys/leases/revoke-prefix/{prefix}",
                         json={"sync": True}, headers={"X-Vault-Token": server.root_token},
                         timeout=120)
        server.stop()


@dataclass
class ExecEnv:
    """One exec test's world: the in-process broker, the test's tmp dir (exec's cwd,
    where child.py and what it reports live), the PostgreSQL server's DSN and the OIDC
    issuer. A test module subclasses it with its own ways to run exec.

    Its lookups read the broker's store directly: the API would need a token that may
    still ask, and says less about a revoked lease or token.
    """

    broker: BrokerThread
    tmp: Path
    dsn: str
    issuer: OIDCIssuer

    def lease(self, lease_id: str) -> Any:
        """The stored lease (None if there is none)."""
        assert self.broker.state is not None
        return self.broker.call(self.broker.state.store.get(lease_id))

    def token_state(self, accessor: str) -> str | None:
        """The state ("active", "revoked" ...) of the token with ``accessor``, if any."""
        assert self.broker.state is not None
        token = self.broker.call(self.broker.state.store.token_by_accessor(accessor))
        return token.state.value if token else None


# --------------------------------------------------------------------------- processes


def cli_environ(broker: BrokerThread, dsn: str | None = None, *, drop: Sequence[str] = (),
                **extra: str) -> dict[str, str]:
    """The environment of a ``broker`` CLI subprocess talking to ``broker``.

    This process's environment less every ``BROKER_*``, ``VAULT_*`` and ``PG*``
    variable and those starting with ``drop`` (a developer's own token or database
    must not leak into the test), plus ``BROKER_ADDR`` and ``PYTHONPATH`` (this
    checkout's broker); with ``dsn``, ``TEST_PG_HOST``/``TEST_PG_PORT``, where
    test_exec.CHILD logs in; then ``extra``.
    """
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("BROKER_", "VAULT_", "PG", *drop))}
    environ |= {"BROKER_ADDR": broker.url, "PYTHONPATH": str(REPO)}
    if dsn is not None:
        parts = urlsplit(dsn)
        environ |= {"TEST_PG_HOST": parts.hostname or "127.0.0.1",
                    "TEST_PG_PORT": str(parts.port or 5432)}
    return environ | extra


def start_exec(argv: Sequence[str], environ: Mapping[str, str], cwd: Path
               ) -> subprocess.Popen[bytes]:
    """Start ``argv`` (a ``broker exec``) in the background, its stderr to
    cwd/exec.stderr and its stdout dropped. A session of its own: no terminal, and
    :func:`kill_group` can end exec and whatever its command left behind."""
    with open(cwd / "exec.stderr", "wb") as err:
        return subprocess.Popen(list(argv), env=dict(environ), stdout=subprocess.DEVNULL,
                                stderr=err, cwd=cwd, start_new_session=True)


def wait_for_report(path: Path, proc: subprocess.Popen[bytes], stderr: Path,
                    timeout: float = 30) -> dict[str, Any]:
    """The JSON the command under exec (test_exec.CHILD) writes to ``path`` once it runs.

    Fails at once, with exec's ``stderr``, when exec ends first (it did not start
    the command), and after ``timeout`` seconds when the file does not appear."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            said = stderr.read_text() if stderr.exists() else ""
            raise AssertionError(f"exec ended early ({proc.returncode}): {said}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout}s")
        time.sleep(0.05)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session a :func:`start_exec` process leads (exec, and any command it
    left orphaned) and reap exec: a failed test leaves no process behind."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)
