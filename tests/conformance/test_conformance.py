"""The backend conformance suite, run over every harness in ``harnesses.HARNESSES``."""

from __future__ import annotations

import pytest

from broker.conformance import ConformanceSuite, HarnessFactory, resolve_harness
from tests.conformance.harnesses import HARNESSES

pytestmark = pytest.mark.integration


@pytest.fixture(params=sorted(HARNESSES))
def harness_factory(request: pytest.FixtureRequest) -> HarnessFactory:
    """One harness per registered backend."""
    return resolve_harness(HARNESSES[request.param])


class TestConformance(ConformanceSuite):
    """Every built-in backend passes the same suite."""

    @pytest.fixture
    def harness_factory(self, harness_factory: HarnessFactory) -> HarnessFactory:
        return harness_factory
