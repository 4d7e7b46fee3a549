"""One broker per SQLite store: a second ``broker server`` stops before touching it.

Before, the second one opened the store and the audit log, rolled back the
first one's issues in flight as crashed ones (credentials already handed out
were dropped), and with ``--dev`` deleted the running root token, all before
it found the port taken. Now the store's instance lock (broker/instance_lock.py)
and the port are taken first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.broker_harness import config_url, free_port, write_config
from tests.integration.test_workers import _broker, _call, _served

pytestmark = pytest.mark.integration


def test_a_second_broker_on_the_same_store_stops_before_touching_it(tmp_path: Path) -> None:
    first = write_config(tmp_path, "")
    port = config_url(first).rsplit(":", 1)[1]
    # Same store and audit log, another port: only the store's lock can stop it.
    other_port = tmp_path / "other-port.toml"
    other_port.write_text(first.read_text().replace(f"127.0.0.1:{port}",
                                                    f"127.0.0.1:{free_port()}"))
    audit = tmp_path / "audit.jsonl"
    with _served(first) as (_, token, url, _log):
        assert _call(url, token, "POST", "auth/token/create", {"ttl": "1h"})[0] == 200
        written = audit.read_bytes()
        for config in (other_port, first):
            out = _broker("server", "--config", str(config), timeout=60)
            assert out.returncode == 1, out.stderr
            assert "another broker is serving the store" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
        assert audit.read_bytes() == written  # not one line from the second broker
        assert _call(url, token, "GET", "auth/token/lookup-self")[0] == 200
