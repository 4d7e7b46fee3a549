"""Fixtures of the conformance suite: moto with IAM authentication, for the aws harness.

The shared ``moto_endpoint`` (tests/conftest.py) accepts any key, which other
tests rely on; the aws harness needs a moto that checks keys, so it gets its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conformance.aws_harness import MotoAuth


@pytest.fixture(scope="session")
def moto_auth() -> Iterator[MotoAuth]:
    """A moto server enforcing IAM auth, and an admin access key bootstrapped into it."""
    # Imported here: boto3 and the harness load only when the aws harness runs.
    from tests.conformance.aws_harness import moto_with_auth

    with moto_with_auth() as auth:
        yield auth
