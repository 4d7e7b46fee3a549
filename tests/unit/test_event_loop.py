"""Choosing the event loop: ``[server] event_loop`` and ``BROKER_EVENT_LOOP``."""

from __future__ import annotations

import asyncio
import sys

import pytest

from broker.event_loop import ENV_VAR, loop_factory, resolve

# uvloop is a dependency everywhere but Windows (pyproject.toml): where it should
# be installed, a missing uvloop fails these tests instead of skipping them.
needs_uvloop = pytest.mark.skipif(sys.platform == "win32", reason="no uvloop on Windows")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


@needs_uvloop
def test_auto_picks_uvloop_where_installed() -> None:
    assert resolve("auto") == "uvloop"


def test_asyncio_is_the_standard_loop() -> None:
    assert resolve("asyncio") == "asyncio"
    assert loop_factory("asyncio") is None


@needs_uvloop
def test_the_factory_makes_a_loop_that_runs_coroutines() -> None:
    import uvloop

    factory = loop_factory("uvloop")
    assert factory is not None

    async def which() -> type[asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(which()) is uvloop.Loop


@needs_uvloop
def test_the_env_overrides_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "asyncio")
    assert resolve("uvloop") == "asyncio"
    monkeypatch.setenv(ENV_VAR, " UVLOOP ")
    assert resolve("asyncio") == "uvloop"


def test_an_unknown_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "trio")
    with pytest.raises(ValueError, match=r"BROKER_EVENT_LOOP: unknown event loop 'trio'"):
        resolve("auto")


def test_uvloop_asked_for_but_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.event_loop as mod

    monkeypatch.setattr(mod, "_uvloop_factory", lambda: None)
    assert resolve("auto") == "asyncio"
    with pytest.raises(ValueError, match=r"server\.event_loop = uvloop, but uvloop is not installed"):
        resolve("uvloop")
