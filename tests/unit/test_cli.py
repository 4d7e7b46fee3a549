"""The ``broker`` CLI without a broker: parsing, formatting, errors, and the HTTP client.

The client and the commands are exercised against a tiny stdlib HTTP server
running in a thread (a real socket, real HTTP), which answers with canned
Vault-shaped bodies; the live-broker tests are in tests/integration/test_cli.py.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.cli import (
    build_parser,
    creds_env,
    env_for,
    format_env,
    format_table,
    main,
    resolve_settings,
)
from broker.cli import leases as cli_leases
from broker.client import Client, ClientError, _errors_from
from tests.conftest import free_port

# --------------------------------------------------------------------------- a canned HTTP server

Route = Callable[["Seen"], tuple[int, Any]]


class Seen:
    """One request as the server received it."""

    def __init__(
        self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: Any
    ) -> None:
        self.method, self.path, self.query, self.headers, self.body = (
            method,
            path,
            query,
            headers,
            body,
        )


class Canned:
    """Routes ``(METHOD, /v1/path)`` to a function returning (status, JSON body or None)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.seen: list[Seen] = []
        self.address = ""

    def on(self, method: str, path: str, status: int = 200, body: Any = None) -> None:
        self.routes[(method, path)] = lambda _req: (status, body)


def _handler(canned: Canned) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            req = Seen(
                self.command,
                parts.path,
                parse_qs(parts.query),
                self.headers,
                json.loads(raw) if raw else None,
            )
            canned.seen.append(req)
            route = canned.routes.get((self.command, parts.path))
            status, body = route(req) if route else (404, {"errors": [f"no route {parts.path}"]})
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_LIST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def canned() -> Iterator[Canned]:
    """A live HTTP server on a free loopback port that answers what the test configures."""
    state = Canned()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No address/token from the developer's own shell leaks into a test."""
    for name in (
        "BROKER_ADDR",
        "BROKER_TOKEN",
        "VAULT_ADDR",
        "VAULT_TOKEN",
        "BROKER_CACERT",
        "VAULT_CACERT",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


#: the first line on stderr of every command given ``--token VALUE``: ps and shell history
#: show the token, as they show a TOKEN argument (which gets the same warning).
TOKEN_FLAG_WARNING = ("broker: warning: --token TOKEN on the command line is visible in the "
                      "process list (ps) and kept in shell history; use --token - to read it "
                      "from stdin, or --token-file FILE\n")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- parsing


def test_mount_role_splits_at_the_last_slash() -> None:
    """A nested mount keeps its slashes; the role is the last segment."""
    args = build_parser().parse_args(["creds", "team/pg/readonly", "--ttl", "15m"])
    assert args.path == ("team/pg", "creds", "readonly")  # (mount, path kind, role)
    assert args.ttl == 900


def test_connection_flags_work_before_and_after_the_command() -> None:
    """`broker --token T creds ...` and `broker creds ... --token T` both set the token."""
    before = build_parser().parse_args(["--token", "t1", "creds", "pg/ro"])
    after = build_parser().parse_args(["creds", "pg/ro", "--token", "t2"])
    both = build_parser().parse_args(["--token", "t1", "creds", "pg/ro", "--token", "t2"])
    assert (before.token, after.token, both.token) == ("t1", "t2", "t2")


def test_meta_and_policies_accumulate() -> None:
    """--policy and --meta are repeatable; meta splits at the first '='."""
    args = build_parser().parse_args(
        ["token", "create", "--policy", "a", "--policy", "b", "--meta", "k=v=w", "--meta", "x="]
    )
    assert args.policy == ["a", "b"]
    assert args.meta == [("k", "v=w"), ("x", "")]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "required: COMMAND"),
        (["creds", "pg"], "expected MOUNT/ROLE"),
        (["creds", "pg/ro", "--ttl", "soon"], "expected a duration"),
        (["creds", "pg/ro", "--format", "yaml"], "invalid choice"),
        (["token", "create", "--meta", "novalue"], "expected KEY=VALUE"),
        (["server"], "pass --config FILE, or --dev"),
        (["server", "--dev", "--listen", "nowhere"], "expected HOST:PORT"),
        (["server", "--config", "x.toml", "--dev-root-token-id", "r"], "only applies with --dev"),
        (["operator", "init"], "pass --config FILE"),
        (["lease", "revoke", "pg/creds/ro/x", "--force"], "--force only applies with --prefix"),
        (["lease", "revoke"], "give the LEASE_ID"),
        (["lease", "revoke", "x", "--prefix", "pg/"], "not both"),
        (["lease", "list", "/"], "must not be empty"),
        (["bench", "--leases", "-5", "--scenario", "expiry"], "--leases: must be at least 1"),
        (["bench", "--leases", "0"], "--leases: must be at least 1, got 0"),
        (["bench", "--leases", "ten"], "--leases: expected a whole number"),
        (["lease", "irrevocable", "--limit", "-1"], "--limit: must be at least 1"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, argv: list[str], needle: str
) -> None:
    """Every usage mistake prints exactly one `broker: error:` line and exits 2."""
    env.setenv("BROKER_TOKEN", "t")
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("broker: error: ")
    assert needle in err


def test_missing_token_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
) -> None:
    """A remote command without any token says how to give one."""
    code, _, err = run(capsys, "creds", "pg/ro")
    assert code == 2
    assert "BROKER_TOKEN" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--help is not an error."""
    code, out, _ = run(capsys, "lease", "revoke", "--help")
    assert code == 0
    assert "--prefix" in out


# --------------------------------------------------------------------------- settings


def test_address_and_token_precedence() -> None:
    """Flag beats BROKER_* beats VAULT_* beats the default address."""
    empty = argparse.Namespace()
    flags = argparse.Namespace(address="http://flag:1", token="flag-t", tls_ca="flag.pem")
    both = {
        "BROKER_ADDR": "http://broker:2",
        "VAULT_ADDR": "http://vault:3",
        "BROKER_TOKEN": "broker-t",
        "VAULT_TOKEN": "vault-t",
        "BROKER_CACERT": "b.pem",
        "VAULT_CACERT": "v.pem",
    }
    vault = {"VAULT_ADDR": "http://vault:3", "VAULT_TOKEN": "vault-t", "BROKER_ADDR": ""}

    s = resolve_settings(flags, both)
    assert (s.address, s.token, s.ca_file) == ("http://flag:1", "flag-t", "flag.pem")
    s = resolve_settings(empty, both)
    assert (s.address, s.token, s.ca_file) == ("http://broker:2", "broker-t", "b.pem")
    s = resolve_settings(empty, vault)
    assert (s.address, s.token) == ("http://vault:3", "vault-t")
    s = resolve_settings(empty, {})
    assert (s.address, s.token, s.ca_file, s.skip_verify) == (
        "http://127.0.0.1:8200",
        None,
        None,
        False,
    )


def test_bad_address_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
) -> None:
    """An address without a scheme is refused before any request."""
    code, _, err = run(capsys, "creds", "pg/ro", "--token", "t", "--address", "127.0.0.1:8200")
    assert code == 2
    assert "http(s)://HOST:PORT" in err


@pytest.mark.parametrize("address", ["http://[::1", "http://127.0.0.1:abc",
                                     "http://127.0.0.1:99999", "http://127.0.0.1\r:1",
                                     "http://127.0.0.1:1/ x"])
def test_a_malformed_address_is_a_usage_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, address: str
) -> None:
    """Addresses urllib or http.client would choke on are refused in one line, exit 2."""
    code, _, err = run(capsys, "lease", "irrevocable", "--token", "t", "--address", address)
    assert code == 2
    # One error line, after the --token warning.
    assert err.startswith(TOKEN_FLAG_WARNING) and err.count("\n") == 2
    assert "http(s)://HOST:PORT" in err


@pytest.mark.parametrize("address", ["http://u:s3cret@127.0.0.1:1", "https://s3cret@broker:8200"])
def test_an_address_with_a_password_is_refused_without_echoing_it(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, address: str
) -> None:
    """A user name or password in the address: one line, exit 2, the secret not shown
    (it used to be taken for part of the host name and printed in the error)."""
    code, out, err = run(capsys, "creds", "pg/ro", "--token", "t", "--address", address)
    assert (code, out) == (2, "")
    assert err.startswith(TOKEN_FLAG_WARNING) and err.count("\n") == 2
    assert "must not hold a user name or password" in err
    assert "s3cret" not in err


def test_a_token_with_a_windows_line_end_is_stripped(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """`--token "$(cat token.txt)"` of a CR LF file sends the token without the CR."""
    canned.on("GET", "/v1/sys/leases/irrevocable", body={"data": {"leases": []}})
    code, _, err = run(capsys, "--token", " rootlife\r", "--address", canned.address,
                       "lease", "irrevocable", "--format", "json")
    assert code == 0, err
    assert canned.seen[0].headers["X-Vault-Token"] == "rootlife"


@pytest.mark.parametrize("token", ["root\r\nlife", "ro\tot", "ro\x1bot", "r\u00f6\u20acot"])
def test_a_token_with_control_characters_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned, token: str
) -> None:
    """A line break (or tab, ESC, non-ASCII) inside a token: one line, exit 2, token not shown."""
    env.setenv("BROKER_TOKEN", token)
    code, out, err = run(capsys, "--address", canned.address, "lease", "irrevocable")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "the token contains a control" in err
    assert token not in err and "root" not in err and "life" not in err
    assert canned.seen == []


def test_a_token_of_only_whitespace_counts_as_no_token(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
) -> None:
    """An empty token file saved with CR LF is "no token", as an empty variable is."""
    env.setenv("BROKER_TOKEN", " \r\n")
    code, _, err = run(capsys, "lease", "irrevocable")
    assert code == 2 and "no token" in err


# --------------------------------------------------------------------------- env formatting


def test_env_names_per_plugin() -> None:
    """Each backend's fields map to the variables its own tools read."""
    assert env_for("postgres", {"username": "u", "password": "p"}) == {
        "PGUSER": "u",
        "PGPASSWORD": "p",
    }
    assert env_for("mysql", {"username": "u", "password": "p"}) == {
        "MYSQL_USER": "u",
        "MYSQL_PWD": "p",
    }
    assert env_for("aws", {"access_key": "A", "secret_key": "S", "security_token": "T"}) == {
        "AWS_ACCESS_KEY_ID": "A",
        "AWS_SECRET_ACCESS_KEY": "S",
        "AWS_SESSION_TOKEN": "T",
    }


def test_env_unknown_plugin_and_fields() -> None:
    """Unknown plugins/fields become BROKER_<KEY>; None is left out; names are valid."""
    env = env_for("redis", {"username": "u", "db-index": 3, "9lives": "x", "security_token": None})
    assert env == {"BROKER_USERNAME": "u", "BROKER_DB_INDEX": "3", "BROKER__9LIVES": "x"}
    assert env_for("aws", {"access_key": "A", "security_token": None, "arn": "r"}) == {
        "AWS_ACCESS_KEY_ID": "A",
        "BROKER_ARN": "r",
    }


def test_creds_env_adds_the_lease_id() -> None:
    """BROKER_LEASE_ID is always there, for a later renew or revoke."""
    env = creds_env("postgres", {"lease_id": "pg/creds/ro/abc", "data": {"username": "u"}})
    assert env == {"PGUSER": "u", "BROKER_LEASE_ID": "pg/creds/ro/abc"}


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_env_quoting_round_trips_through_a_real_shell() -> None:
    """Quotes, spaces, $, backticks and newlines survive `eval` byte for byte."""
    nasty = {
        "A": "it's a 'quoted' value",
        "B": 'double "quotes" and $HOME and `id` and $(id)',
        "C": "line one\nline two",
        "D": "",
        "E": "plain",
    }
    script = format_env(nasty) + 'printf "%s\\0" "$A" "$B" "$C" "$D" "$E"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=True, text=True).stdout
    assert out.split("\0")[:-1] == list(nasty.values())
    assert format_env({"E": "plain"}) == "export E=plain\n"


def test_table_format() -> None:
    """Durations read as 1h, booleans as true/false, lists joined, None as '-'."""
    text = format_table(
        [
            ("lease_id", "pg/x"),
            ("lease_duration", 5400),
            ("renewable", True),
            ("policies", ["a", "b"]),
            ("meta", None),
        ]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["Key", "Value"]
    assert lines[2].split() == ["lease_id", "pg/x"]
    assert lines[3].split() == ["lease_duration", "1h30m"]
    assert lines[4].split() == ["renewable", "true"]
    assert lines[5].split() == ["policies", "a,", "b"]
    assert lines[6].split() == ["meta", "-"]


# --------------------------------------------------------------------------- client and errors


def test_client_error_is_one_line() -> None:
    """A multi-line server message is folded into one line with the status."""
    err = ClientError(403, ["permission denied\non path pg/creds/x", "second"])
    assert str(err) == "permission denied on path pg/creds/x; second (HTTP 403)"
    assert str(ClientError(0, ["cannot connect"])) == "cannot connect"


def test_error_text_from_answers() -> None:
    """`errors` is used when present; an HTML page is not shown; empty errors give the reason."""
    assert _errors_from(b'{"errors": ["lease not found"]}', "Not Found") == ["lease not found"]
    assert _errors_from(b'{"errors": []}', "Not Found") == ["Not Found"]
    assert _errors_from(b"<html><body>bad gateway</body></html>", "Bad Gateway") == ["Bad Gateway"]
    assert _errors_from(b"plain text problem", "x") == ["plain text problem"]


def test_connection_refused_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
) -> None:
    """No server: one line naming the address, exit 1, no traceback."""
    address = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "lease", "lookup", "x", "--address", address, "--token", "t")
    assert code == 1
    assert out == ""
    assert err == (TOKEN_FLAG_WARNING
                   + f"broker: error: cannot connect to {address}: Connection refused\n")


def test_client_sends_token_list_verb_and_params(canned: Canned) -> None:
    """LIST is sent as is, the token as X-Vault-Token, params URL-encoded, 204 gives None."""
    canned.on("LIST", "/v1/sys/leases/lookup/pg/creds/", body={"data": {"keys": ["ro/"]}})
    canned.on("PUT", "/v1/sys/leases/revoke", status=204)
    canned.on("GET", "/v1/sys/leases/stats", body={"data": {}})
    client = Client(canned.address, "s3cret")
    assert client.request("LIST", "sys/leases/lookup/pg/creds/") == {"data": {"keys": ["ro/"]}}
    assert client.request("PUT", "/v1/sys/leases/revoke", json={"lease_id": "a b"}) is None
    client.request("GET", "sys/leases/stats", params={"prefix": "pg/creds/a&b", "x": None})
    first, second, third = canned.seen
    assert first.method == "LIST" and first.headers["X-Vault-Token"] == "s3cret"
    assert second.body == {"lease_id": "a b"}
    assert third.query == {"prefix": ["pg/creds/a&b"]}


def test_client_raises_with_the_servers_errors(canned: Canned) -> None:
    """A 4xx answer becomes ClientError carrying status and the `errors` text."""
    canned.on("PUT", "/v1/sys/leases/renew", 400, {"errors": ["lease pg/x is revoked"]})
    with pytest.raises(ClientError) as info:
        Client(canned.address, "t").request("PUT", "sys/leases/renew", json={"lease_id": "pg/x"})
    assert info.value.status == 400
    assert str(info.value) == "lease pg/x is revoked (HTTP 400)"


def test_client_does_not_follow_redirects(canned: Canned) -> None:
    """A redirect is an error, so the token is never resent to another host."""
    canned.on("GET", "/v1/sys/mounts", 307, {"errors": ["moved"]})
    with pytest.raises(ClientError) as info:
        Client(canned.address, "t").request("GET", "sys/mounts")
    assert info.value.status == 307
    assert len(canned.seen) == 1


# ------------------------------------------------------------- commands on the canned server


CREDS = {
    "request_id": "r",
    "lease_id": "pg/creds/readonly/abc",
    "lease_duration": 3600,
    "renewable": True,
    "data": {"username": "v-pg-ro-1", "password": "pa ss'word"},
    "warnings": ["ttl capped at max_ttl 1h"],
}


def test_creds_env_uses_the_mounts_plugin(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """--format env reads the mount's plugin first, then prints quoted exports."""
    canned.on("GET", "/v1/sys/internal/ui/mounts/pg", body={"data": {"type": "postgres"}})
    canned.on("GET", "/v1/pg/creds/readonly", body=CREDS)
    env.setenv("BROKER_ADDR", canned.address)
    env.setenv("VAULT_TOKEN", "tok")
    code, out, err = run(capsys, "creds", "pg/readonly", "--format", "env", "--ttl", "2h")
    assert code == 0
    assert out == (
        "export PGUSER=v-pg-ro-1\n"
        "export PGPASSWORD='pa ss'\"'\"'word'\n"
        "export BROKER_LEASE_ID=pg/creds/readonly/abc\n"
    )
    assert err == "broker: warning: ttl capped at max_ttl 1h\n"
    assert [s.path for s in canned.seen] == ["/v1/sys/internal/ui/mounts/pg",
                                             "/v1/pg/creds/readonly"]
    assert canned.seen[1].query == {"ttl": ["7200"]}


def test_creds_env_unsets_a_field_the_credential_leaves_empty(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """An IAM user's key has no session token: --format env unsets AWS_SESSION_TOKEN, so
    a shell's own token is not paired with the new key (every AWS call would fail)."""
    canned.on("GET", "/v1/sys/mounts", body={"data": {"aws/": {"type": "aws"}}})
    canned.on("GET", "/v1/aws/creds/ci", body={
        "lease_id": "aws/creds/ci/abc", "lease_duration": 900, "renewable": False,
        "data": {"access_key": "AKIAEXAMPLE", "secret_key": "s", "security_token": None}})
    env.setenv("BROKER_ADDR", canned.address)
    env.setenv("VAULT_TOKEN", "tok")
    code, out, _ = run(capsys, "creds", "aws/ci", "--format", "env")
    assert code == 0
    assert out == (
        "export AWS_ACCESS_KEY_ID=AKIAEXAMPLE\n"
        "export AWS_SECRET_ACCESS_KEY=s\n"
        "export BROKER_LEASE_ID=aws/creds/ci/abc\n"
        "unset AWS_SESSION_TOKEN\n"
    )


def test_creds_env_falls_back_when_mounts_are_forbidden(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """Without read on sys/mounts the variables are BROKER_*, with a warning saying why."""
    canned.on("GET", "/v1/sys/mounts", 403, {"errors": ["permission denied"]})
    canned.on("GET", "/v1/pg/creds/readonly", body=CREDS)
    code, out, err = run(
        capsys,
        "creds",
        "pg/readonly",
        "--format",
        "env",
        "--address",
        canned.address,
        "--token",
        "t",
    )
    assert code == 0
    assert "export BROKER_USERNAME=v-pg-ro-1\n" in out
    assert "cannot read sys/mounts (permission denied (HTTP 403))" in err


def test_creds_env_unknown_mount_issues_nothing(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """A mount missing from sys/mounts fails before a credential is issued."""
    canned.on("GET", "/v1/sys/mounts", body={"data": {"pg/": {"type": "postgres"}}})
    code, _, err = run(
        capsys,
        "creds",
        "nope/readonly",
        "--format",
        "env",
        "--address",
        canned.address,
        "--token",
        "t",
    )
    assert code == 1
    assert err == TOKEN_FLAG_WARNING + \
        "broker: error: no mount named 'nope' (see GET /v1/sys/mounts)\n"
    assert [s.path for s in canned.seen] == ["/v1/sys/internal/ui/mounts/nope", "/v1/sys/mounts"]


def test_creds_json_is_the_default_off_a_tty(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """Piped output is the server's JSON answer, unchanged."""
    canned.on("GET", "/v1/pg/creds/readonly", body=CREDS)
    code, out, _ = run(capsys, "creds", "pg/readonly", "--address", canned.address, "--token", "t")
    assert code == 0
    assert json.loads(out) == CREDS


def test_server_error_text_is_shown(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """A 4xx answer prints the server's `errors` text on one line, exit 1."""
    canned.on("PUT", "/v1/sys/leases/lookup", 400, {"errors": ["lease pg/creds/ro/x is revoked"]})
    code, out, err = run(
        capsys, "lease", "lookup", "pg/creds/ro/x", "--address", canned.address, "--token", "t"
    )
    assert (code, out) == (1, "")
    assert err == TOKEN_FLAG_WARNING + "broker: error: lease pg/creds/ro/x is revoked (HTTP 400)\n"


def test_lease_list_recursive_walks_to_full_ids(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """--recursive follows every key ending in '/' and prints full lease ids; 404 is empty."""
    base = "/v1/sys/leases/lookup/"
    canned.on("GET", base + "pg/", body={"data": {"keys": ["creds/"]}})
    canned.on("GET", base + "pg/creds/", body={"data": {"keys": ["ro/", "rw/"]}})
    canned.on("GET", base + "pg/creds/ro/", body={"data": {"keys": ["a", "b"]}})
    canned.on("GET", base + "pg/creds/rw/", 404, {"errors": []})
    args = ["--address", canned.address, "--token", "t"]
    code, out, _ = run(capsys, "lease", "list", "pg", "-r", *args)
    assert code == 0
    assert out == "pg/creds/ro/a\npg/creds/ro/b\n"
    code, out, _ = run(capsys, "lease", "list", "pg/creds/", *args)
    assert out == "ro/\nrw/\n"
    assert all(s.query == {"list": ["true"]} for s in canned.seen)


def _revoking_server(canned: Canned, queued: int, timeline: list[dict[str, int]]) -> None:
    """Stats answer `timeline` one entry per poll (the last repeats); the first is 'before'."""
    calls = {"n": 0}

    def stats(_req: Seen) -> tuple[int, Any]:
        i = min(calls["n"], len(timeline) - 1)
        calls["n"] += 1
        return 200, {"data": timeline[i]}

    canned.routes[("GET", "/v1/sys/leases/stats")] = stats
    canned.on("PUT", "/v1/sys/leases/revoke-prefix/pg/", body={"data": {"queued": queued}})
    canned.on("PUT", "/v1/sys/leases/revoke-force/pg/", body={"data": {"queued": queued}})


def _stats(active: int, revoking: int, revoked: int, irrevocable: int = 0) -> dict[str, int]:
    return {
        "pending": 0,
        "active": active,
        "revoking": revoking,
        "revoked": revoked,
        "expired": 7,
        "irrevocable": irrevocable,
    }


def test_revoke_prefix_waits_and_summarises(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """The summary counts only what changed since the call; it polls until nothing is revoking."""
    _revoking_server(
        canned,
        3,
        [
            _stats(3, 0, 10),  # before: 10 leases revoked long ago must not be counted
            _stats(0, 3, 10),
            _stats(0, 1, 12),
            _stats(0, 0, 12, irrevocable=1),
        ],
    )
    code, out, err = run(
        capsys, "lease", "revoke", "--prefix", "pg/", "--address", canned.address, "--token", "t"
    )
    assert code == 1  # an irrevocable lease is a failed part of the operation
    (summary,) = out.splitlines()
    assert summary.startswith("revoked 2, irrevocable 1, in ")
    assert summary.endswith(" s")
    assert err.splitlines()[-1] == (
        "broker: error: 1 lease(s) could not be revoked; see 'broker lease irrevocable pg/'"
    )
    puts = [s for s in canned.seen if s.method == "PUT"]
    assert puts[0].path == "/v1/sys/leases/revoke-prefix/pg/" and puts[0].body == {"sync": False}
    assert all(s.query == {"prefix": ["pg/"]} for s in canned.seen if s.method == "GET")


def test_revoke_prefix_reports_leases_still_irrevocable(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """A second revoke of a prefix whose lease stays irrevocable says so and exits 1."""
    _revoking_server(
        canned,
        1,
        [
            _stats(0, 0, 0, irrevocable=1),  # before: irrevocable from an earlier run
            _stats(0, 1, 0),  # queued again
            _stats(0, 0, 0, irrevocable=1),  # failed again: the count did not change
        ],
    )
    code, out, err = run(
        capsys, "lease", "revoke", "--prefix", "pg/", "--address", canned.address, "--token", "t"
    )
    assert code == 1
    assert out.startswith("revoked 0, irrevocable 1, in ")
    assert err.splitlines()[-1] == (
        "broker: error: 1 lease(s) could not be revoked; see 'broker lease irrevocable pg/'"
    )


def test_revoke_force_sync_does_not_poll(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """--force uses revoke-force; --sync lets the server wait and reads stats once after."""
    _revoking_server(canned, 2, [_stats(2, 0, 0), _stats(0, 0, 2)])
    code, out, _ = run(
        capsys,
        "lease",
        "revoke",
        "--prefix",
        "pg/",
        "--force",
        "--sync",
        "--address",
        canned.address,
        "--token",
        "t",
    )
    assert code == 0
    assert out.startswith("revoked 2, irrevocable 0, in ")
    assert [s.method for s in canned.seen] == ["GET", "PUT", "GET"]
    assert canned.seen[1].path == "/v1/sys/leases/revoke-force/pg/"
    assert canned.seen[1].body == {"sync": True}


def test_revoke_no_wait_only_queues(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """--no-wait prints the queued count and never reads stats."""
    _revoking_server(canned, 5, [_stats(5, 0, 0)])
    code, out, _ = run(
        capsys,
        "lease",
        "revoke",
        "--prefix",
        "pg/",
        "--no-wait",
        "--address",
        canned.address,
        "--token",
        "t",
    )
    assert (code, out) == (0, "5 lease(s) under pg/ queued for revocation\n")
    assert [s.method for s in canned.seen] == ["PUT"]


def test_revoke_stops_waiting_when_nothing_moves(
    canned: Canned, capsys: pytest.CaptureFixture[str]
) -> None:
    """If counts never reach `queued` but nothing is in flight, the wait still ends."""
    _revoking_server(canned, 4, [_stats(4, 0, 0), _stats(1, 0, 3)])
    code = cli_leases._revoke_prefix(
        Client(canned.address, "t"),
        "pg/",
        force=False,
        sync=False,
        wait=True,
        sleep=lambda _s: None,
    )
    assert code == 0
    assert capsys.readouterr().out.startswith("revoked 3, irrevocable 0, in ")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_tty_and_lines_elsewhere() -> None:
    """A TTY gets a redrawn `[###...] n/total` bar; a pipe gets plain lines, not \\r."""
    tty = _Tty()
    bar = cli_leases._Progress(1000, tty)
    bar.update(512)
    bar.update(1000)
    bar.close()
    assert tty.getvalue() == (
        "\r[###############...............] 512/1000\r[##############################] 1000/1000\n"
    )
    pipe = io.StringIO()
    lines = cli_leases._Progress(10, pipe)
    lines.update(4)
    lines.update(5)  # within LINE_EVERY of the previous line: not printed
    lines.last_line = 0.0
    lines.update(10)  # all done: the summary line follows, no progress line
    lines.close()
    assert pipe.getvalue() == "revoking: 4/10\n"


def test_token_create_sends_policies_meta_and_ttl(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """token create maps flags onto Vault's body and prints the auth block as a table."""
    auth = {
        "client_token": "hvs.x",
        "accessor": "acc",
        "policies": ["ci", "default"],
        "token_policies": ["ci", "default"],
        "metadata": {"run": "7"},
        "lease_duration": 1800,
        "renewable": True,
    }
    canned.on("POST", "/v1/auth/token/create", body={"auth": auth})
    code, out, _ = run(
        capsys,
        "token",
        "create",
        "--policy",
        "ci",
        "--ttl",
        "30m",
        "--meta",
        "run=7",
        "--display-name",
        "ci-run",
        "--format",
        "table",
        "--address",
        canned.address,
        "--token",
        "t",
    )
    assert code == 0
    assert canned.seen[0].body == {
        "policies": ["ci"],
        "ttl": 1800,
        "meta": {"run": "7"},
        "display_name": "ci-run",
    }
    rows = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines()[2:]}
    assert rows["token"] == "hvs.x"
    assert rows["token_duration"] == "30m"


def test_token_revoke_self_or_other(
    capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, canned: Canned
) -> None:
    """--self revokes the token in use; with an argument, that token is revoked;
    no argument, or an empty one (an unset "$VAR"), is a usage error that sends
    nothing (it used to revoke the caller, its children and their leases)."""
    canned.on("POST", "/v1/auth/token/revoke-self", 204)
    canned.on("POST", "/v1/auth/token/revoke", 204)
    args = ["--address", canned.address, "--token", "t"]
    for bad in ([], [""], ["  "], ["--self", "other"], ["--self", "--accessor"]):
        code, _, err = run(capsys, "token", "revoke", *bad, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (bad, err)
    assert run(capsys, "token", "revoke", "--self", *args)[0] == 0
    assert run(capsys, "token", "revoke", "other", *args)[0] == 0
    assert [s.path for s in canned.seen] == [
        "/v1/auth/token/revoke-self",
        "/v1/auth/token/revoke",
    ]
    assert canned.seen[1].body == {"token": "other"}


# --------------------------------------------------------------------------- audit verify


async def _write_audit_log(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three events, a rotation (rename + reopen), two more: (old file, new file, key file)."""
    audit = pytest.importorskip("broker.audit")
    log, key = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    writer = await audit.AuditLog.open(str(log), str(key), create_key=True)
    for i in range(3):
        await writer.write(audit.event("issue", lease={"id": f"pg/creds/ro/{i}"}))
    old = tmp_path / "audit.jsonl.1"
    log.rename(old)
    await writer.reopen()
    for i in range(2):
        await writer.write(audit.event("revoke", lease={"id": f"pg/creds/ro/{i}"}))
    await writer.close()
    return old, log, key


async def test_audit_verify_ok_single_and_rotated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real log verifies: 'ok: N lines' for one file, per-file lines for a rotated set."""
    old, new, key = await _write_audit_log(tmp_path)
    code, out, err = run(capsys, "audit", "verify", str(old), "--key-file", str(key))
    assert (code, out, err) == (0, "ok: 3 lines\n", "")
    code, out, err = run(capsys, "audit", "verify", str(old), str(new), "--key-file", str(key))
    assert (code, out) == (0, f"{old}: ok: 3 lines\n{new}: ok: 2 lines\n")
    code, out, err = run(capsys, "audit", "verify", str(new))
    assert (code, out) == (0, "ok: 2 lines\n")
    assert "pass --key-file" in err  # without the key, the user is told what was not checked


async def test_audit_verify_names_the_bad_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An edited last line is found with the key and reported as FILE:LINE: reason, exit 1."""
    old, _, key = await _write_audit_log(tmp_path)
    lines = old.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("pg/creds/ro/2", "pg/creds/ro/X")
    old.write_text("".join(lines))
    code, out, _ = run(capsys, "audit", "verify", str(old), "--key-file", str(key))
    assert code == 1
    assert out.startswith(f"{old}:3: ") and out.count("\n") == 1


def test_audit_verify_unreadable_inputs_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing log or key file is one error line, exit 1."""
    pytest.importorskip("broker.audit")
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    code, _, err = run(capsys, "audit", "verify", str(log), "--key-file", str(tmp_path / "k"))
    assert code == 1 and err.startswith("broker: error: cannot read key file ")
    code, _, err = run(capsys, "audit", "verify", str(tmp_path / "missing.jsonl"))
    assert code == 1
    assert (
        err
        == f"broker: error: cannot read {tmp_path / 'missing.jsonl'}: No such file or directory\n"
    )


# --------------------------------------------------------------------------- exec's own token


def test_exec_keeps_renewing_a_token_whose_last_renewal_got_no_answer(canned: Canned) -> None:
    """A renew-self that timed out may have gone through: past the expiry exec knew of,
    it still tries (and believes the answer), instead of taking the token, and every
    lease with it, for gone, and then skipping their revocation at exit (review)."""
    import time

    from broker.client import Client
    from broker.exec import LoginToken, keep_token

    canned.on("PUT", "/v1/auth/token/renew-self", 200, {"auth": {"lease_duration": 60}})
    client = Client(canned.address, "t")
    now = time.time()
    quiet = LoginToken(expire_at=now - 1)
    keep_token(client, quiet, now + 30)
    assert canned.seen == []  # expired for sure: nothing to renew
    unsure = LoginToken(expire_at=now - 1, failing=True)
    keep_token(client, unsure, now + 30)
    assert [s.path for s in canned.seen] == ["/v1/auth/token/renew-self"]
    assert unsure.expire_at >= now + 59 and not unsure.failing and not unsure.expired(now)
