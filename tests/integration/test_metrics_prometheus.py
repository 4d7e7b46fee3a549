"""``GET /v1/sys/metrics?format=prometheus``: the metrics as a Prometheus scraper reads them.

A real broker over HTTP, scraped the way Prometheus does (a bearer token in
``Authorization``), its answer read by ``prometheus_client``'s own parser,
and every figure compared with the JSON answer of the same moment.
"""

from __future__ import annotations

import hvac
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from broker import metrics_text
from tests.integration.broker_harness import ROOT_TOKEN, BrokerThread, noop_broker_fixture

pytestmark = pytest.mark.integration

CONFIG = """
[mounts.noop]
plugin = "bench-noop"

[mounts.noop.roles.a]
default_ttl = "1h"

[policies.scraper]
"sys/metrics" = ["read"]
"""


broker = noop_broker_fixture(CONFIG, "metrics-prom")


def _scrape(broker: BrokerThread, token: str, **params: str) -> requests.Response:
    return requests.get(f"{broker.url}/v1/sys/metrics", params=params, timeout=10,
                        headers={"Authorization": f"Bearer {token}"})


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_a_scrape_reads_the_same_figures_as_the_json(broker: BrokerThread) -> None:
    root = hvac.Client(url=broker.url, token=ROOT_TOKEN)
    leases = [root.read("noop/creds/a")["lease_id"] for _ in range(3)]
    root.sys.renew_lease(leases[0])
    root.sys.revoke_lease(leases[1])
    scraper = root.auth.token.create(policies=["scraper"])["auth"]["client_token"]

    resp = _scrape(broker, scraper, format="prometheus")
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == metrics_text.CONTENT_TYPE
    families = {f.name: f.type for f in text_string_to_metric_families(resp.text)}
    # (the parser reports a counter's family without its _total suffix)
    assert families == {
        "broker_leases": "gauge", "broker_leases_overdue": "gauge",
        "broker_leases_overdue_oldest_seconds": "gauge", "broker_sweeper_busy": "gauge",
        "broker_sweeper_dropped_claims": "counter", "broker_backend_calls": "counter",
        "broker_backend_errors": "counter", "broker_backend_call_seconds": "counter",
        "broker_backend_call_max_seconds": "gauge", "broker_mount_healthy": "gauge",
        "broker_audit_healthy": "gauge", "broker_store_healthy": "gauge",
        "broker_workers": "gauge", "broker_start_time_seconds": "gauge"}
    got = _samples(resp.text)

    as_json = _scrape(broker, scraper).json()["data"]
    for state, count in as_json["leases"].items():
        assert got[("broker_leases", (("state", state),))] == count
    assert got[("broker_leases", (("state", "active"),))] == 2
    for op, figures in as_json["backends"]["noop"].items():
        labels = (("mount", "noop"), ("op", op))
        assert got[("broker_backend_calls_total", labels)] == figures["calls"]
        assert got[("broker_backend_errors_total", labels)] == figures["errors"]
        assert got[("broker_backend_call_max_seconds", labels)] * 1000 == pytest.approx(
            figures["max_ms"], abs=0.001)
    assert got[("broker_backend_calls_total", (("mount", "noop"), ("op", "new_user")))] == 3
    assert got[("broker_mount_healthy", (("mount", "noop"),))] == 1
    assert got[("broker_audit_healthy", ())] == 1
    assert got[("broker_store_healthy", ())] == 1
    assert got[("broker_workers", ())] == 1
    assert got[("broker_start_time_seconds", ())] > 1.7e9


def test_a_scrape_needs_read_on_sys_metrics(broker: BrokerThread) -> None:
    root = hvac.Client(url=broker.url, token=ROOT_TOKEN)
    nobody = root.auth.token.create(policies=["default"])["auth"]["client_token"]
    resp = _scrape(broker, nobody, format="prometheus")
    assert resp.status_code == 403 and resp.json()["errors"], resp.text
    assert _scrape(broker, "not-a-token", format="prometheus").status_code == 403


def test_an_unknown_format_is_a_400(broker: BrokerThread) -> None:
    resp = _scrape(broker, ROOT_TOKEN, format="statsd")
    assert resp.status_code == 400
    assert resp.json() == {"errors": ["format 'statsd': use prometheus, or leave it out for JSON"]}


def test_label_values_are_escaped() -> None:
    """A mount name is free text in the config: quotes, backslashes and newlines are escaped."""
    odd = 'a"b\\c\nd'
    text = metrics_text.render(
        leases={"active": 1}, started=1.5e9, workers=1, audit_healthy=True,
        store_healthy=False, mounts_healthy={odd: False},
        total={"sweeper_busy": 0, "sweeper_dropped_claims": 0,
               "backends": {odd: {"new_user": {"calls": 2, "errors": 1,
                                               "total_seconds": 0.25, "max_seconds": 0.2}}}})
    got = _samples(text)
    assert got[("broker_mount_healthy", (("mount", odd),))] == 0
    assert got[("broker_backend_call_seconds_total", (("mount", odd), ("op", "new_user")))] == 0.25
    assert got[("broker_store_healthy", ())] == 0
