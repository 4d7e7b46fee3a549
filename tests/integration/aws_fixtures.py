"""Shared set-up of the aws plugin's integration tests, against moto in server mode.

The aws test files (test_aws_backend, test_aws_qa_*, test_review_aws_iam,
test_review_exec_aws, test_api_mysql_aws) each used to build the same pieces by
hand: the same policy documents, the same ``[mounts.aws.roles.*]`` blocks, the
same assumable IAM role in moto, the same broker start and lease clean-up. They
live here once, so a change to how a role is written or cleaned up is made in
one place. Everything talks to the ``moto_endpoint`` fixture of tests/conftest.py;
the mount itself is ``broker_harness.aws_mount``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hvac
from botocore.exceptions import ClientError

from broker.backend import MountSpec, RoleSpec
from plugins import aws_sts
from tests.integration.broker_harness import (
    BrokerThread,
    aws_client,
    start_broker,
    write_config,
)

#: moto's default account id: the one every ARN it hands out names.
ACCOUNT = "123456789012"
#: moto's dummy key id and secret (any value works; these act as the account's root).
DUMMY = "testing"

#: The policy the tests' iam_user and federation_token roles grant: one harmless read.
#: A dict for plugin-level RoleSpecs; READ_ONLY is the same document as JSON text.
READ_ONLY_DOC: dict[str, Any] = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}
READ_ONLY = json.dumps(READ_ONLY_DOC)


def trust_policy(*actions: str) -> str:
    """An IAM trust policy (JSON) letting the account's root do ``actions`` on the role.

    The mounts sign with moto's dummy keys, which are that root, so a role with this
    trust policy is one the broker may assume. ``actions`` defaults to sts:AssumeRole
    (one action is written as a string, several as a list, as IAM accepts both).
    """
    actions = actions or ("sts:AssumeRole",)
    action: str | list[str] = actions[0] if len(actions) == 1 else list(actions)
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
        "Action": action}]})


#: The trust policy of the roles assumed_role leases assume: sts:AssumeRole by the root.
TRUST = trust_policy()


def aws_role(name: str, credential_type: str, *, default_ttl: str = "15m",
             max_ttl: str = "1h", role_arns: Sequence[str] | None = None,
             policy_document: str | None = None,
             username_template: str | None = None) -> str:
    """The TOML block ``[mounts.aws.roles.NAME]`` of a role on ``broker_harness.aws_mount``.

    Only the options given are written. ``policy_document`` is JSON text (written as a
    TOML literal string, so its double quotes need no escaping); ``username_template``
    is written as is (``{{random 8}}`` and such are the broker's template syntax).
    Append the blocks to ``aws_mount(endpoint)`` to make a config body.
    """
    lines = [f"\n[mounts.aws.roles.{name}]", f'credential_type = "{credential_type}"']
    if role_arns is not None:
        lines.append(f"role_arns = {json.dumps(list(role_arns))}")
    if policy_document is not None:
        lines.append(f"policy_document = '{policy_document}'")
    if username_template is not None:
        lines.append(f'username_template = "{username_template}"')
    lines += [f'default_ttl = "{default_ttl}"', f'max_ttl = "{max_ttl}"']
    return "\n".join(lines) + "\n"


def create_role(endpoint: str, name: str, *, trust: str = TRUST, **extra: Any) -> dict[str, Any]:
    """Create the IAM role ``name`` in moto, assumable by the mount's keys; AWS's Role record.

    The record holds ``Arn`` (what ``role_arns`` lists) and ``RoleId`` (what the deny
    policy of a revoked session names). ``extra``: more CreateRole parameters, e.g.
    ``MaxSessionDuration``.
    """
    role: dict[str, Any] = aws_client(endpoint, "iam").create_role(
        RoleName=name, AssumeRolePolicyDocument=trust, **extra)["Role"]
    return role


def delete_role(endpoint: str, name: str) -> None:
    """Delete the IAM role ``name``, first with the deny policy an STS revoke may have put
    on it (IAM refuses to delete a role that still has an inline policy)."""
    iam = aws_client(endpoint, "iam")
    try:
        iam.delete_role_policy(RoleName=name, PolicyName=aws_sts.DENY_POLICY_NAME)
    except ClientError:
        pass  # no lease of the role was revoked early: there is no deny policy
    iam.delete_role(RoleName=name)


@contextmanager
def moto_role(endpoint: str, name: str) -> Iterator[str]:
    """An assumable IAM role ``name`` for the block: its ARN; deleted (see delete_role) after."""
    arn = str(create_role(endpoint, name)["Arn"])
    try:
        yield arn
    finally:
        delete_role(endpoint, name)


def mount_spec(endpoint: str, roles: Mapping[str, RoleSpec], *, secret: str | None = DUMMY,
               **options: Any) -> MountSpec:
    """The plugin-level twin of ``aws_mount``: an ``aws`` MountSpec for ``AWSBackend``.

    It talks to ``endpoint`` in us-east-1 and signs with moto's dummy keys; ``secret``
    and ``options`` (``access_key``, ``iam_path``, ...) replace or add mount options.
    """
    opts = {"region": "us-east-1", "endpoint_url": endpoint, "access_key": DUMMY, **options}
    return MountSpec(name="aws", plugin="aws", roles=dict(roles), secret=secret, options=opts)


def revoke_leases(broker: BrokerThread, prefixes: Sequence[str] = ("aws/",), *,
                  force: bool = False) -> None:
    """Revoke every lease under ``prefixes`` and wait for it (``sync``), so no IAM user
    or database user a test issued outlives it; ``force`` also drops the leases a backend
    cannot revoke early (STS credentials). hvac raises if the broker refuses."""
    client = hvac.Client(url=broker.url, token=broker.root_token, timeout=120)
    body: dict[str, bool] = {"sync": True}
    if force:
        body["force"] = True
    for prefix in prefixes:
        client.adapter.put(f"/v1/sys/leases/revoke-prefix/{prefix}", json=body)


@contextmanager
def aws_broker(tmp_path: Path, body: str, *, prefixes: Sequence[str] = ("aws/",),
               force: bool = False) -> Iterator[BrokerThread]:
    """A broker (a BrokerThread, see broker_harness) on ``write_config(tmp_path, body)``.

    On the way out its leases are revoked (see revoke_leases) and then it stops, even
    when the block failed: the IAM users it made in moto must not pile up across tests.
    """
    server = start_broker(write_config(tmp_path, body))
    try:
        yield server
    finally:
        try:
            revoke_leases(server, prefixes, force=force)
        finally:
            server.stop()


class SlowProxy:
    """An HTTP proxy in front of moto that holds chosen requests for ``delay`` s.

    It holds every request (``hold_all``) or those of the IAM/STS actions in ``slow``,
    which a test may fill and clear as it goes. The holding happens in the proxy's own
    threads: a caller that blocks on AWS is what the tests look for (an issue outliving
    ``backend_timeout``, an event loop that must keep running), not the proxy.
    """

    def __init__(self, upstream: str, delay: float, *, hold_all: bool = False) -> None:
        target = urlsplit(upstream)
        self.delay = delay
        self.hold_all = hold_all
        #: the actions (e.g. "CreateUser") to hold when not hold_all.
        self.slow: set[str] = set()
        #: actions whose (held or not) answer has gone back to the client, in order.
        self.answered: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else b""
                # boto3 sends IAM and STS calls as form posts: Action=CreateUser&...
                fields = dict(p.split("=", 1) for p in body.decode().split("&") if "=" in p)
                action = fields.get("Action", "")
                if proxy.hold_all or action in proxy.slow:
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port,
                                                  timeout=60)
                # http.client writes its own Host and keeps its own connection.
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in {"connection", "host"}}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                proxy.answered.append(action)

            do_GET = do_POST = _forward

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """The proxy's endpoint: what a mount's endpoint_url names instead of moto's."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_answered(self, action: str, timeout: float = 20) -> None:
        """Wait until the answer to an ``action`` request has gone back to its caller."""
        deadline = time.monotonic() + timeout
        while action not in self.answered:
            assert time.monotonic() < deadline, f"{action} never answered"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
