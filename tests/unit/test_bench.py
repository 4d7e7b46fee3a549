"""Smoke test of ``broker bench``: every scenario runs end to end at --quick sizes.

The figures at these sizes mean nothing; what is checked is that each scenario
still starts its brokers, drives them, and reads back outcomes that are right
(every lease revoked, nothing marked done without a delete).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from broker.bench.harness import Bench, BrokerProcess, broker_config, worker_counts
from broker.bench.noop import register
from broker.bench.pgcluster import local_initdb
from broker.bench.report import Row
from broker.bench.runner import SCENARIOS, run_bench
from broker.cli import main as cli_main
from tests.bench import ab_cpu, ab_pg_issue, issue_timeline
from tests.conftest import server_missing


def _by_metric(rows: list[Row]) -> dict[str, Row]:
    return {r.metric: r for r in rows}


@pytest.fixture
def bench(tmp_path: Path, postgres_dsn: str) -> Bench:
    register()
    return Bench(workdir=tmp_path, quick=True, pg_dsn=postgres_dsn, leases=200,
                 log=lambda _msg: None)


def _check(name: str, rows: list[Row]) -> None:
    assert rows, f"{name} produced no rows"
    failed = [r.note for r in rows if r.metric == "scenario failed"]
    assert not failed, failed
    assert not [r for r in rows if r.skipped], "PostgreSQL was given: nothing may be skipped"
    by = _by_metric(rows)
    workers = worker_counts()[-1]
    if name == "overhead":
        for op in ("issue", "renew", "revoke"):
            row = by[f"{op} rate, sqlite, c=32"]
            assert row.value and row.baseline and not row.note, row
            if workers > 1:
                row = by[f"{op} rate, sqlite, {workers} workers, c=32"]
                assert row.value and row.baseline and not row.note, row
                assert row.extra["workers"] == workers
    elif name == "pg-issue":
        row = by["issue rate, c=8"]
        assert row.value and row.baseline and "errors" not in row.note, row
        if local_initdb() and len(os.sched_getaffinity(0)) > 1:
            # Judged on a private cluster with a core of its own; the shared server after.
            assert row.note.startswith("private PostgreSQL on CPU "), row
            shared = by["issue rate, c=8, shared cores"]
            assert shared.value and shared.baseline and "errors" not in shared.note, shared
            assert shared.target is None and row.target is not None
    elif name == "expiry":
        # (A note that the broker came up after the leases were due is load, not a defect.)
        assert "never revoked" not in by["lag p99, no-op, N=200"].note
        if workers > 1:
            assert "never revoked" not in by[f"lag p99, no-op, {workers} workers, N=200"].note
        for metric in ("revocations/s, postgres, N=40",
                       "revocations/s, postgres, least-privilege admin, N=40"):
            pg_note = by[metric].note
            assert "never revoked" not in pg_note and "still exist" not in pg_note, pg_note
    elif name == "startup":
        assert by["peak RSS, sqlite, 2,000 leases"].value
        assert by["to healthy, postgresql, 2,000 leases"].value
    elif name == "revoke-prefix":
        assert by["all revoked, sqlite, 1,000 leases"].value is not None
        assert by["all revoked, postgresql, 1,000 leases"].value is not None
    elif name == "ha":
        assert by["never revoked"].value == 0
        assert by["ended without a delete"].value == 0
        assert "too late" not in by["revoked once, N=200"].note, "the kill was not mid-burst"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario_runs_at_quick_size(bench: Bench, name: str) -> None:
    """Each scenario runs at tiny sizes against real brokers and reads back correct outcomes."""
    _check(name, await run_bench(bench, [name]))


@pytest.mark.timeout(60)
def test_cli_prints_table_and_writes_json(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``broker bench --quick --json`` prints the table, writes JSON, skips a missing PostgreSQL."""
    out = tmp_path / "bench.json"
    # Nothing listens on port 1: the PostgreSQL half is reported as skipped, not failed.
    code = cli_main(["bench", "--quick", "--scenario", "revoke-prefix", "--json", str(out),
                     "--postgres-dsn", "postgresql://postgres@127.0.0.1:1/postgres"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "revoke-prefix" in printed and "PASS" in printed and "SKIP" in printed
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["machine"]["cpus"]
    assert {r["status"] for r in doc["rows"]} == {"PASS", "-", "SKIP"}
    assert any(r["extra"].get("progress") for r in doc["rows"])


def test_cli_rejects_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown scenario name is a usage error (exit 2) naming the valid ones."""
    assert cli_main(["bench", "--scenario", "nope"]) == 2
    assert "overhead" in capsys.readouterr().err


def test_a_bench_broker_runs_the_code_pythonpath_names(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The before/after tools pick a code tree with PYTHONPATH; a checkout as the
    working directory must not win (``python -m`` puts it first on sys.path)."""
    tree = tmp_path / "tree"
    (tree / "broker" / "bench").mkdir(parents=True)
    (tree / "broker" / "__init__.py").write_text("")
    (tree / "broker" / "bench" / "__init__.py").write_text("")
    marker = tmp_path / "ran-the-named-tree"
    (tree / "broker" / "bench" / "server.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the checkout, as when run by hand
    broker = BrokerProcess(broker_config(tmp_path), {"PYTHONPATH": str(tree)}).start()
    assert broker.proc is not None
    try:
        broker.proc.wait(timeout=30)
    finally:
        if broker.proc.poll() is None:
            broker.proc.kill()
    assert marker.exists(), broker.log_path.read_text()


def _private_cluster_possible() -> None:
    if not local_initdb() or len(os.sched_getaffinity(0)) < 2:
        server_missing("a local initdb and two CPUs (the bench's private PostgreSQL cluster)")


def test_issue_timeline_stamps_every_step_of_an_issue() -> None:
    """tests/bench/issue_timeline.py: its hooks wrap the broker's own methods; a
    rename there must show up here, not the next time someone profiles."""
    _private_cluster_possible()
    before = os.sched_getaffinity(0)
    timeline = asyncio.run(issue_timeline.measure(seconds=0.5))
    assert os.sched_getaffinity(0) == before  # pinned only while it ran
    assert timeline.requests > 0 and timeline.broker_p50 > 0 and timeline.raw_p50 > 0
    at = timeline.medians_ms
    # In the order an issue takes them (the pending row runs beside the
    # server's statements; the activation and the issue's audit line beside
    # the COMMIT, so only their ends are ordered).
    order = ["authenticate>", "audit>", "audit<", "authenticate<", "policy>", "engine>",
             "stage_user>", "begin_create>", "begin_create<", "commit>", "audit>2",
             "audit<2", "engine<", "json>", "json<", "answered"]
    assert [at[step] for step in order] == sorted(at[step] for step in order), at
    # The pending row runs beside the server's statements, so which ends first is the
    # machine's say (a loaded one's fsync lost to the CREATE ROLE): what is certain is
    # that it is durable before the role is committed.
    assert at["intent<"] < at["commit>"], at
    assert at["activate<"] < at["engine<"] and at["commit<"] < at["engine<"], at


def test_ab_pg_issue_runs_both_trees_against_raw() -> None:
    _private_cluster_possible()
    repo = str(Path(__file__).resolve().parents[2])
    result = asyncio.run(ab_pg_issue.compare(repo, repo, rounds=1, seconds=0.3))
    assert result.before > 0 and result.after > 0 and result.rounds == 1


def test_ab_cpu_measures_a_broker_of_the_tree_it_is_given() -> None:
    repo = str(Path(__file__).resolve().parents[2])
    got = asyncio.run(ab_cpu.one_run({"PYTHONPATH": repo}, 0.2, "sqlite"))
    assert set(got) == {"issue", "renew", "revoke"}
    assert all(rate > 0 and cpu > 0 for rate, cpu in got.values()), got
