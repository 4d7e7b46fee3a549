"""broker/periodic.py: the broker's periodic jobs, as APScheduler ran them before."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from broker.periodic import Periodic

#: The tests reason in ticks; 0.2 s, not 0.05 s: a 50 ms tick left margins of 25-100 ms,
#: which one stall of a loaded CI machine (CPU steal, a GC pause) ate. Every bound below
#: is a number of ticks, so a longer tick keeps what each test tells apart.
TICK = 0.2


async def test_first_run_one_interval_after_start_then_at_a_fixed_rate() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    runs: list[float] = []

    async def job() -> None:
        runs.append(loop.time() - started)
        await asyncio.sleep(TICK * 0.4)  # a run that takes time must not push the next one

    periodic = Periodic()
    periodic.add("tick", job, TICK)
    periodic.start()
    await asyncio.sleep(TICK * 6.5)
    periodic.shutdown()
    await asyncio.sleep(TICK)  # the run under way, if any, ends before the test does
    assert runs[0] >= TICK * 0.9  # not at once
    assert 4 <= len(runs) <= 7, runs
    # Start to start, not end to start: 1.0 interval apart on average, not 1.4.
    mean = (runs[-1] - runs[0]) / (len(runs) - 1)
    assert mean < TICK * 1.2, runs


async def test_a_slow_run_is_never_doubled_and_missed_runs_collapse() -> None:
    running = 0
    most = 0
    runs = 0

    async def slow() -> None:
        nonlocal running, most, runs
        running += 1
        most = max(most, running)
        runs += 1
        await asyncio.sleep(TICK * 2.5)  # spans two more due times
        running -= 1

    periodic = Periodic()
    periodic.add("slow", slow, TICK)
    periodic.start()
    await asyncio.sleep(TICK * 8)
    periodic.shutdown()
    await asyncio.sleep(TICK * 3)  # the run under way, if any, ends before the test does
    assert most == 1
    # Runs at ~1, ~4 (1 + 2.5, rounded up to the next due time), ~7 intervals.
    assert 2 <= runs <= 3, runs


async def test_shutdown_stops_the_schedule_and_lets_a_run_finish() -> None:
    release = asyncio.Event()
    finished: list[bool] = []
    runs = 0

    async def blocking() -> None:
        nonlocal runs
        runs += 1
        await release.wait()
        finished.append(True)

    periodic = Periodic()
    periodic.add("blocking", blocking, TICK)
    periodic.start()
    await asyncio.sleep(TICK * 1.5)
    assert runs == 1
    periodic.shutdown()
    release.set()
    await asyncio.sleep(TICK * 3)
    assert finished == [True]  # the run under way was not cancelled
    assert runs == 1  # and no other started


async def test_a_failing_run_is_logged_and_the_schedule_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    runs = 0

    async def failing() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("boom")

    periodic = Periodic()
    periodic.add("failing", failing, TICK)
    periodic.start()
    await asyncio.sleep(TICK * 3.5)
    periodic.shutdown()
    assert runs >= 2
    assert "periodic job failing failed" in caplog.text


def test_an_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Periodic().add("never", lambda: asyncio.sleep(0), 0)


async def test_finish_lets_a_quick_run_end_and_cancels_a_hung_one() -> None:
    """At shutdown a run under way gets ``grace`` to end; one still going is cancelled and
    unwound (its clean-up runs), not left pending for the loop's close to destroy, which
    skipped the clean-up of a connection being opened (an unclosed socket)."""
    started = {"quick": asyncio.Event(), "hung": asyncio.Event()}
    ended: list[str] = []

    def job(name: str, seconds: float) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            started[name].set()
            try:
                await asyncio.sleep(seconds)
                ended.append(f"{name} done")
            finally:
                ended.append(f"{name} cleaned up")
        return run

    periodic = Periodic()
    periodic.add("quick", job("quick", TICK), TICK)
    periodic.add("hung", job("hung", 3600), TICK)
    periodic.start()
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), TICK * 10)
    periodic.shutdown()
    await periodic.finish(TICK * 3)
    assert sorted(ended) == ["hung cleaned up", "quick cleaned up", "quick done"], ended
