"""Secrets on the ``broker`` command line: every argument that takes a token (or another
secret) reads it from stdin when given ``-``, and warns when given the value itself,
which ``ps`` shows to every user and the shell keeps in its history.

The real CLI (a subprocess) against a real broker (in-process, on a real port).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker_fixture
from tests.integration.token_fixtures import client

pytestmark = pytest.mark.integration

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.a]
default_ttl = "1h"

[policies.app]
"noop/creds/a" = ["read"]
"""

#: the one warning line a secret on the command line gets.
_WARNING = re.compile(r"\Abroker: warning: [^\n]*visible in the process list[^\n]*\n\Z")
_ONE_LINE_ERROR = re.compile(r"\Abroker: error: [^\n]+\n\Z")


broker = noop_broker_fixture(CONFIG, "hygiene-cli")


@pytest.fixture
def root(broker: BrokerThread) -> hvac.Client:
    return client(broker, ROOT_TOKEN)


def cli(broker: BrokerThread, *args: str, stdin: str = "",
        token: str | None = ROOT_TOKEN) -> subprocess.CompletedProcess[str]:
    """``broker ARGS`` with ``stdin``, BROKER_TOKEN set to ``token`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_"))}
    env["BROKER_ADDR"] = broker.url
    if token is not None:
        env["BROKER_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=60)


def child(root: hvac.Client) -> tuple[str, str]:
    """A fresh token with the ``app`` policy: (token, accessor)."""
    auth = root.auth.token.create(policies=["app"], ttl="1h")["auth"]
    return str(auth["client_token"]), str(auth["accessor"])


def test_token_lookup_reads_the_token_from_stdin(broker: BrokerThread,
                                                 root: hvac.Client) -> None:
    """`broker token lookup -` looks up the token on stdin's first line, without a
    warning; it used to send "-" itself as the token (403)."""
    token, accessor = child(root)
    done = cli(broker, "token", "lookup", "-", "--format", "json", stdin=f"{token}\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data"]["accessor"] == accessor
    assert done.stderr == ""


def test_token_revoke_reads_the_token_from_stdin(broker: BrokerThread,
                                                 root: hvac.Client) -> None:
    """`broker token revoke -` revokes the token on stdin (a CR LF line too)."""
    token, _ = child(root)
    done = cli(broker, "token", "revoke", "-", stdin=f"{token}\r\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    with pytest.raises(hvac.exceptions.Forbidden):
        client(broker, token).auth.token.lookup_self()


def test_token_capabilities_reads_the_token_from_stdin(broker: BrokerThread,
                                                       root: hvac.Client) -> None:
    """`broker token capabilities - PATH` asks for the token on stdin."""
    token, _ = child(root)
    done = cli(broker, "token", "capabilities", "-", "noop/creds/a", "--format", "json",
               stdin=token)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"noop/creds/a": ["read"]}
    assert done.stderr == ""


@pytest.mark.parametrize("command", [["token", "lookup", "{token}"],
                                     ["token", "capabilities", "{token}", "noop/creds/a"],
                                     ["token", "revoke", "{token}"]])
def test_a_token_argument_still_works_with_a_warning(broker: BrokerThread, root: hvac.Client,
                                                     command: list[str]) -> None:
    """The positional TOKEN still works (compatibility), with one warning line on stderr
    that names the risk and the `-` way, and never the token."""
    token, _ = child(root)
    done = cli(broker, *(part.format(token=token) for part in command))
    assert done.returncode == 0, done.stderr
    assert _WARNING.match(done.stderr), done.stderr
    assert "shell history" in done.stderr and "give - instead" in done.stderr
    assert token not in done.stderr


def test_an_accessor_gets_no_warning(broker: BrokerThread, root: hvac.Client) -> None:
    """An accessor is not a secret: `--accessor ACCESSOR` forms print no warning."""
    _, accessor = child(root)
    done = cli(broker, "token", "capabilities", "--accessor", accessor, "noop/creds/a")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    done = cli(broker, "token", "revoke", "--accessor", accessor)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_the_token_option_reads_stdin(broker: BrokerThread, root: hvac.Client) -> None:
    """`--token -` takes the caller's token from stdin (it used to send "-" as the
    token); `--token TOKEN` works as before, with the one warning line a TOKEN argument
    gets (it used to have none: only its --help said that ps shows it)."""
    token, accessor = child(root)
    for where in (["--token", "-", "token", "lookup"], ["token", "lookup", "--token", "-"]):
        done = cli(broker, *where, "--format", "json", stdin=f"{token}\n", token=None)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["data"]["accessor"] == accessor
        assert done.stderr == ""
    done = cli(broker, "--token", token, "token", "lookup", "--format", "json", token=None)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data"]["accessor"] == accessor
    assert _WARNING.match(done.stderr) and "--token -" in done.stderr, done.stderr
    assert token not in done.stderr


def test_stdin_holds_one_value(broker: BrokerThread, root: hvac.Client) -> None:
    """Two `-` on one command line, or an empty stdin: one usage error line, exit 2."""
    token, _ = child(root)
    both = cli(broker, "--token", "-", "token", "lookup", "-", stdin=f"{token}\n{token}\n",
               token=None)
    assert both.returncode == 2 and _ONE_LINE_ERROR.match(both.stderr), both.stderr
    assert "both read stdin" in both.stderr
    empty = cli(broker, "token", "revoke", "-", stdin="")
    assert empty.returncode == 2 and _ONE_LINE_ERROR.match(empty.stderr), empty.stderr
    assert "stdin" in empty.stderr


def test_exec_token_from_stdin_leaves_the_rest_to_the_command(broker: BrokerThread) -> None:
    """`broker exec --token -` reads only the first line: the command gets the rest of
    stdin, and no warning about a token in the process list (there is none)."""
    done = cli(broker, "--token", "-", "exec", "noop/a", "--", sys.executable, "-c",
               "import sys; print(sys.stdin.read().strip())",
               stdin=f"{ROOT_TOKEN}\nfor the command\n", token=None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "for the command"
    assert "--token" not in done.stderr, done.stderr


def test_audit_hash_warns_about_values_on_the_command_line(broker: BrokerThread) -> None:
    """`broker audit hash VALUE` warns (the value is a token or a secret); `-`, like no
    VALUE, reads them from stdin, one per line, and both give the same HMAC."""
    key = str(Path(broker.config.audit.hmac_key_file))
    given = cli(broker, "audit", "hash", "--key-file", key, "s3cret-value")
    assert given.returncode == 0 and _WARNING.match(given.stderr), given.stderr
    assert "s3cret-value" not in given.stderr
    piped = cli(broker, "audit", "hash", "--key-file", key, "-", stdin="s3cret-value\n")
    assert (piped.returncode, piped.stderr) == (0, "")
    assert piped.stdout == given.stdout and piped.stdout.startswith("hmac-sha256:")


def test_dev_root_token_id_reads_stdin_and_warns_when_given(tmp_path: Path) -> None:
    """`--dev-root-token-id -` takes the id from stdin (checked as one given on the
    command line); a given id gets the warning, after its check. No server starts here:
    each command stops at a one-line error before it would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_"))}
    env.update(HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))

    def server(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker.cli", "server", "--dev", *args],
                              input=stdin, env=env, capture_output=True, text=True,
                              timeout=60)

    short = server("--dev-root-token-id", "-", stdin="abc\n")  # read, then refused: too short
    assert short.returncode == 2 and _ONE_LINE_ERROR.match(short.stderr), short.stderr
    assert "--dev-root-token-id" in short.stderr and "abc" not in short.stderr
    # A good id on the command line: warned about; --listen off loopback then stops it.
    given = server("--dev-root-token-id", "a-good-root-id", "--listen", "0.0.0.0:1")
    lines = given.stderr.splitlines(keepends=True)
    assert given.returncode == 2 and len(lines) == 2, given.stderr
    assert _WARNING.match(lines[0]) and "--dev-root-token-id -" in lines[0], given.stderr
    assert "a-good-root-id" not in given.stderr
    piped = server("--dev-root-token-id", "-", "--listen", "0.0.0.0:1", stdin="a-good-root-id")
    assert piped.returncode == 2 and _ONE_LINE_ERROR.match(piped.stderr), piped.stderr
