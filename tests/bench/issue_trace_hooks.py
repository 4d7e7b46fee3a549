"""Timestamps of one PostgreSQL issue's steps, taken inside a bench broker.

Loaded into the broker process by the ``sitecustomize.py`` that
``tests/bench/issue_timeline.py`` writes (never imported by the broker
itself). Each request's clock starts when aiohttp hands the protocol the
request's bytes and stops when the answer has been written; in between, the
entry (``>``) and exit (``<``) of each wrapped step is stamped in ms since
that start. A step met twice in one request (the request's and the issue's
audit lines) is stamped ``audit>``, ``audit>2``, ... Medians over all
requests go to ``$BROKER_TRACE_OUT`` as JSON every 200 requests and at exit.

Only meaningful at concurrency 1: with two requests in flight the stamps of
one land in the other's clock.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from aiohttp import web_protocol, web_response

import broker.api.common as common
import broker.api.creds as creds
import broker.engine as engine
import broker.store.sqlite as sqlite
import plugins.postgres as postgres

OUT = os.environ["BROKER_TRACE_OUT"]

_clock = time.perf_counter
_start: float | None = None
_marks: dict[str, float] = {}
_spans: dict[str, list[float]] = defaultdict(list)


def _mark(name: str) -> None:
    if _start is None:
        return
    key, n = name, 2
    while key in _marks:
        key, n = f"{name}{n}", n + 1
    _marks[key] = (_clock() - _start) * 1000


def _dump() -> None:
    medians = {k: statistics.median(v) for k, v in _spans.items()}
    with open(OUT, "w") as f:
        json.dump({"requests": len(_spans.get("answered", [])), "medians_ms": medians}, f)


def _wrap_async(owner: Any, attr: str, name: str) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        _mark(f"{name}>")
        try:
            return await original(*args, **kwargs)
        finally:
            _mark(f"{name}<")

    setattr(owner, attr, wrapper)


def _wrap_sync(owner: Any, attr: str, name: str) -> None:
    original: Callable[..., Any] = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _mark(f"{name}>")
        try:
            return original(*args, **kwargs)
        finally:
            _mark(f"{name}<")

    setattr(owner, attr, wrapper)


_received = web_protocol.RequestHandler.data_received
_finish = web_protocol.RequestHandler.finish_response


def _data_received(self: Any, data: bytes) -> None:
    global _start
    _start = _clock()
    _marks.clear()
    _received(self, data)


async def _finish_response(self: Any, *args: Any, **kwargs: Any) -> Any:
    global _start
    result = await _finish(self, *args, **kwargs)
    if _start is not None and "engine>" in _marks:  # an issue, not a health check
        _mark("answered")
        for key, value in _marks.items():
            _spans[key].append(value)
        if len(_spans["answered"]) % 200 == 0:
            _dump()
    _start = None
    return result


web_protocol.RequestHandler.data_received = _data_received  # type: ignore[method-assign]
web_protocol.RequestHandler.finish_response = _finish_response  # type: ignore[method-assign]
_wrap_async(web_protocol.RequestHandler, "_handle_request", "handle_request")
_wrap_async(web_response.StreamResponse, "prepare", "prepare")
_wrap_async(web_response.StreamResponse, "write_eof", "write_eof")
_wrap_async(common.Call, "authenticate", "authenticate")
_wrap_async(common.Call, "audit", "audit")
_wrap_async(common.Call, "read_body", "read_body")
_wrap_async(common.Call, "require", "policy")
_wrap_async(engine.LeaseEngine, "issue", "engine")
_wrap_async(sqlite.SQLiteStore, "insert_pending", "intent")
_wrap_async(sqlite.SQLiteStore, "activate", "activate")
_wrap_async(postgres.PostgresBackend, "stage_user", "stage_user")
_wrap_async(postgres.PostgresBackend, "_transaction", "begin_create")
_wrap_async(postgres._StagedRole, "commit", "commit")
_wrap_sync(creds, "vault_response", "json")  # the name the issue handler calls
atexit.register(_dump)
