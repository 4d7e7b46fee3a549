"""QA round 6: messages and warnings that said the wrong thing, against a real broker.

- ``POST /v1/auth/token/login`` says that ``token`` is the token auth method (no login),
  not to configure ``[auth.jwt.token]`` (which is refused as a reserved name);
- ``broker operator init`` with an audit path under a regular file says so;
- a mistyped mount or role key gets a ``did you mean ...?`` like the JWT keys;
- ``broker server --check`` prints the warnings the server logs at load;
- issuing with a token as long-lived as the role's default TTL gives no "capped at the
  token's expiry" warning for the few seconds the token is older; a real cut still does;
- the CLI cuts an over-long server message at a word, never in one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hvac
import pytest
import requests

from broker.client import ClientError
from broker.config import ConfigError, load_config
from tests.integration.broker_harness import (
    ROOT_TOKEN,
    BrokerThread,
    noop_broker_fixture,
    write_config,
)

pytestmark = pytest.mark.integration

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.r]
default_ttl = "1h"
max_ttl = "2h"
"""


broker = noop_broker_fixture(CONFIG, "qa6")


def _broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_"))}
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


# -- the token auth method has no login ------------------------------------------------------


def test_login_at_auth_token_says_token_has_no_login(broker: BrokerThread) -> None:
    """404 naming the token auth method; it used to suggest [auth.jwt.token], a config
    the loader refuses."""
    resp = requests.post(f"{broker.url}/v1/auth/token/login", json={"role": "x", "jwt": "y"},
                         timeout=30)
    assert resp.status_code == 404
    [error] = resp.json()["errors"]
    assert "'token' is the token auth method, which has no login" in error, error
    assert "[auth.jwt.token]" not in error, error
    # Any other name keeps its message.
    other = requests.post(f"{broker.url}/v1/auth/gh/login", json={}, timeout=30)
    assert other.status_code == 404
    assert other.json()["errors"] == ["no auth method 'gh' is configured ([auth.jwt.gh])"]


def test_auth_jwt_token_is_refused_as_reserved(tmp_path: Path) -> None:
    """[auth.jwt.token]: the reason is the reserved name, not "one path segment"."""
    path = write_config(tmp_path, '[auth.jwt.token]\noidc_discovery_url = "https://a"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "auth.jwt.token"
    assert info.value.message.startswith("'token' is reserved: it is the token auth method")
    assert "path segment" not in info.value.message


# -- operator init: an audit path under a file -----------------------------------------------


def test_operator_init_under_a_file_says_it_is_not_a_directory(tmp_path: Path) -> None:
    """The audit path's parent is a regular file: one line naming that file, nothing about
    requests (init has none); it used to print "cannot open (File exists); requests are
    refused until it is writable"."""
    blocker = tmp_path / "logs"
    blocker.write_text("not a directory\n")
    path = write_config(tmp_path, "")
    text = path.read_text().replace(str(tmp_path / "audit.jsonl"),
                                    str(blocker / "audit.jsonl"))
    path.write_text(text)
    done = _broker_cli("operator", "init", "--config", str(path))
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"{blocker} is not a directory" in done.stderr, done.stderr
    assert "requests are refused" not in done.stderr, done.stderr
    assert "no root token was made" in done.stderr, done.stderr


# -- did you mean, for mount and role keys ---------------------------------------------------


@pytest.mark.parametrize(("body", "key", "hint"), [
    ('[mounts.pg]\nplugin = "postgres"\nconnection_url = "postgresql://a@127.0.0.1/b"\n'
     '[mounts.pg.roles.readonly2]\ncreation_statement = ["CREATE ROLE \\"{{name}}\\""]\n',
     "mounts.pg.roles.readonly2.creation_statement", "did you mean creation_statements?"),
    ('[mounts.pg]\nplugin = "postgres"\nconnection_url = "postgresql://a@127.0.0.1/b"\n'
     'pasword_file = "x"\n',
     "mounts.pg.pasword_file", "did you mean password_file?"),
    ('[mounts.aws]\nplugin = "aws"\nregoin = "eu-west-1"\n',
     "mounts.aws.regoin", "did you mean region?"),
    ('[mounts.aws]\nplugin = "aws"\n[mounts.aws.roles.d]\ncredential_type = "assumed_role"\n'
     'role_arn = ["arn:aws:iam::123456789012:role/d"]\n',
     "mounts.aws.roles.d.role_arn", "did you mean role_arns?"),
    ('[leases]\ndefualt_ttl = "1h"\n', "leases.defualt_ttl", "did you mean default_ttl?"),
])
def test_a_mistyped_key_gets_a_suggestion(tmp_path: Path, body: str, key: str,
                                          hint: str) -> None:
    """As the [auth.jwt] keys do: "unknown key ... (did you mean X?)"."""
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, body))
    assert info.value.key == key, str(info.value)
    assert info.value.message.endswith(f"({hint})"), str(info.value)


def test_a_bad_value_of_a_known_key_gets_no_suggestion(tmp_path: Path) -> None:
    """Only an unknown key is matched against the others: a wrong value is left as said."""
    body = ('[mounts.aws]\nplugin = "aws"\n[mounts.aws.roles.d]\ncredential_type = '
            '"assumed_role"\nrole_arns = ["not-an-arn"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, body))
    assert "did you mean" not in str(info.value)


# -- server --check prints the load warnings -------------------------------------------------


def test_server_check_prints_the_load_warnings(tmp_path: Path) -> None:
    """A templated rule followed by '*': the warning `broker server` logs at load, on
    stderr, and still exit 0; it used to print only "config ok"."""
    path = write_config(tmp_path, '[policies.ci]\n"pg/creds/{{identity.metadata.o}}-*" = '
                                  '["read"]\n')
    done = _broker_cli("server", "--check", "--config", str(path))
    assert done.returncode == 0, done
    assert done.stdout == f"config ok: {path}\n"
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("broker: warning: policy 'ci' path "), lines
    assert "followed by '*'" in lines[0], lines
    # A plain config: nothing on stderr.
    plain = _broker_cli("server", "--check", "--config", str(write_config(tmp_path, "")))
    assert (plain.returncode, plain.stderr) == (0, "")


# -- the token cap warning -------------------------------------------------------------------


def test_no_cap_warning_for_a_token_as_long_as_the_lease(broker: BrokerThread) -> None:
    """README flow: a 1h token, then a 1h role's lease: the seconds the token is older are
    no news; it used to warn "lease TTL capped at the token's expiry" on every issue."""
    root = hvac.Client(url=broker.url, token=ROOT_TOKEN)
    token = root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    app = hvac.Client(url=broker.url, token=token)
    resp = app.read("noop/creds/r")
    assert resp is not None
    assert not resp["warnings"], resp
    assert 3590 <= resp["lease_duration"] <= 3600, resp
    # A real cut (a 10m token, a 1h lease) still warns, saying by how much.
    short = root.auth.token.create(policies=["root"], ttl="10m")["auth"]["client_token"]
    capped = hvac.Client(url=broker.url, token=short).read("noop/creds/r")
    assert capped is not None and capped["lease_duration"] <= 600, capped
    [warning] = capped["warnings"]
    assert warning.startswith("lease TTL capped at the token's expiry: "), warning
    assert warning.endswith("s instead of 3600s"), warning
    root.sys.revoke_prefix("noop/")


# -- num_uses as api.md says ----------------------------------------------------------------


@pytest.mark.parametrize(("value", "status", "message"), [
    ("1", 200, None),  # a one-use token since num_uses is supported
    ("one", 400, "num_uses must be a whole number, not a string"),
    ("0", 200, None),
])
def test_num_uses_text_is_read_as_api_md_says(broker: BrokerThread, value: str, status: int,
                                              message: str | None) -> None:
    """Decimal text is the number (as in Vault), other text the type error (api.md)."""
    resp = requests.post(f"{broker.url}/v1/auth/token/create", json={"num_uses": value},
                         headers={"X-Vault-Token": ROOT_TOKEN}, timeout=30)
    assert resp.status_code == status, resp.text
    if message is not None:
        assert resp.json()["errors"] == [message] or message in resp.json()["errors"][0]
    else:
        assert resp.json()["auth"]["num_uses"] == int(value)


# -- the CLI cuts a long message at a word ---------------------------------------------------


def test_a_long_server_message_is_cut_at_a_word() -> None:
    """Up to 1000 characters are shown whole; past that the cut falls between words."""
    whole = " ".join(["irrevocable"] * 80)  # 959 characters
    assert str(ClientError(502, [whole])) == f"{whole} (HTTP 502)"
    long = " ".join(["sys/leases/irrevocable"] * 60)
    shown = str(ClientError(502, [long])).removesuffix(" (HTTP 502)")
    assert shown.endswith("sys/leases/irrevocable ..."), shown[-60:]
    assert len(shown) <= 1000
