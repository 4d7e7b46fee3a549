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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the aws renew check as a known failure while the plugin declares can_renew.

    ``can_renew`` means "renew_user pushes a new expiry to the backend"; IAM users
    have none, and the aws plugin's renew_user is a no-op, so the kit's check
    cannot pass. strict: once it passes, the marker must go.
    """
    wanted = [
        item for item in items
        if getattr(item, "originalname", "") == "test_renew_pushes_server_expiry"
        and getattr(getattr(item, "callspec", None), "params", {}).get("harness_factory") == "aws"
    ]
    if not wanted:
        return
    from tests.conformance.aws_harness import declares_renew_without_server_expiry

    if declares_renew_without_server_expiry():
        for item in wanted:
            item.add_marker(pytest.mark.xfail(
                strict=True,
                # Only the kit's "must implement server_expiry" failure is expected;
                # a setup error or any other failure still shows as one.
                raises=pytest.fail.Exception,
                reason="plugins/aws.py declares can_renew=True for iam_user, but IAM users "
                       "have no server-side expiry and renew_user pushes nothing "
                       "(Capabilities.can_renew; mysql declares False for the same reason)",
            ))
