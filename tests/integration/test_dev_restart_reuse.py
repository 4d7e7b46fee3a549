"""``broker server --dev`` restarts: the previous run's root token stays, revoked, so a
client still sending it is audited as ``reuse_attempt`` like any revoked token (its row
was deleted, and it was an unknown token: ``auth_failure``). A root id chosen again
(``--dev-root-token-id``) is still free for the new run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from broker.audit import hash_value, load_key
from broker.server import DEV_ROOT_NAME, revoke_dev_roots
from tests.integration.broker_harness import BrokerThread, noop_broker
from tests.integration.token_fixtures import audit_events

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with noop_broker(tmp_path_factory.mktemp("dev-restart-reuse"), "") as server:
        yield server


def dev_root(broker: BrokerThread, token_id: str | None = None) -> tuple[str, str]:
    """A root token as ``--dev`` makes it: (value, accessor)."""
    assert broker.state is not None
    value, record = broker.call(broker.state.tokens.create(
        policies=["root"], ttl=None, display_name=DEV_ROOT_NAME, token_id=token_id))
    return value, record.accessor


def test_the_old_dev_root_is_audited_as_a_reuse_attempt(broker: BrokerThread) -> None:
    """A random dev root token of the previous run: 403, and a reuse_attempt line naming
    its accessor (as an HMAC); no auth_failure."""
    assert broker.state is not None
    value, accessor = dev_root(broker)
    broker.call(revoke_dev_roots(broker.state))
    answer = requests.get(f"{broker.url}/v1/auth/token/lookup-self",
                          headers={"X-Vault-Token": value}, timeout=30)
    assert answer.status_code == 403
    mac = hash_value(load_key(broker.config.audit.hmac_key_file), accessor)
    [reuse] = [e for e in audit_events(broker, "reuse_attempt")
               if e.get("token_accessor") == mac]
    assert reuse["token_state"] == "revoked"
    assert audit_events(broker, "auth_failure") == []


def test_a_chosen_root_id_is_free_again(broker: BrokerThread) -> None:
    """`--dev-root-token-id ID` on both runs: the old row goes, the new run's root token
    with the same value is made and works."""
    assert broker.state is not None
    dev_root(broker, "dev-chosen-root-id")
    broker.call(revoke_dev_roots(broker.state, "dev-chosen-root-id"))
    value, _ = dev_root(broker, "dev-chosen-root-id")
    answer = requests.get(f"{broker.url}/v1/auth/token/lookup-self",
                          headers={"X-Vault-Token": value}, timeout=30)
    assert answer.status_code == 200, answer.text
