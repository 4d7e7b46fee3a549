"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.audit import AuditLog


@pytest.fixture
async def alog(paths: tuple[str, str]) -> AsyncIterator[AuditLog]:
    """An audit log (and a new key) at the requesting module's ``paths`` fixture."""
    log = await AuditLog.open(*paths, create_key=True)
    yield log
    await log.close()
