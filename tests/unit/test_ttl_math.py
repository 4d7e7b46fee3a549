"""TTL math as Vault does it: increments from now, capped at issue + max_ttl."""

from __future__ import annotations

import pytest

from broker.errors import BadRequest
from broker.lease import Lease, issue_ttl, new_lease_id, renew_expiry, renewal_capped


def lease(issue: float = 1000.0, max_ttl: int = 3600, renewable: bool = True) -> Lease:
    return Lease(id="pg/creds/r/x", mount="pg", role="r", owner="a", issue_time=issue,
                 expire_time=issue + 60, max_expire_time=issue + max_ttl, renewable=renewable)


def test_issue_uses_default_when_no_ttl_requested() -> None:
    """No ttl in the request means the role's default_ttl."""
    assert issue_ttl(None, 600, 3600) == 600
    assert issue_ttl(0, 600, 3600) == 600


def test_issue_caps_requested_ttl_at_max() -> None:
    """A requested ttl over max_ttl is capped on issue (Vault warns, does not refuse)."""
    assert issue_ttl(7200, 600, 3600) == 3600
    assert issue_ttl(120, 600, 3600) == 120


def test_issue_refuses_negative_ttl() -> None:
    """A negative ttl is bad input."""
    with pytest.raises(BadRequest):
        issue_ttl(-1, 600, 3600)


def test_renew_counts_from_now() -> None:
    """The increment is added to now, not to the old expiry."""
    assert renew_expiry(lease(), 300, 600, now=2000.0) == 2300.0


def test_renew_without_increment_uses_default_ttl() -> None:
    """An omitted increment renews by the role's default_ttl."""
    assert renew_expiry(lease(), None, 600, now=2000.0) == 2600.0


def test_renew_past_max_is_capped_with_vaults_warning() -> None:
    """An increment past issue + max_ttl is capped there with Vault's warning
    (CalculateTTL), saying what was asked and what is left."""
    assert renew_expiry(lease(), 3000, 600, now=3000.0) == 4600.0
    warning = renewal_capped(lease(), 3000, 600, now=3000.0)
    assert warning == ('TTL of "3000s" exceeded the effective max_ttl of "1600s"; '
                       "TTL value is capped accordingly")
    assert renewal_capped(lease(), 1600, 600, now=3000.0) is None  # lands on the cap


def test_renew_at_max_is_refused() -> None:
    """With less than a second left before the max expiry there is nothing to renew
    (Vault: "past the max TTL, cannot renew"), with or without an increment."""
    for increment in (None, 0, 60):
        with pytest.raises(BadRequest, match="past its max TTL"):
            renew_expiry(lease(), increment, 600, now=4599.5)


def test_renew_without_increment_stops_at_max_with_a_warning() -> None:
    """No increment asks for nothing past the cap: the renewal is capped, not refused
    (a lease capped by its token has less than default_ttl left most of its life)."""
    assert renew_expiry(lease(), None, 600, now=4400.0) == 4600.0
    assert renew_expiry(lease(), 0, 600, now=4400.0) == 4600.0
    warning = renewal_capped(lease(), None, 600, now=4400.0)
    assert warning is not None and "200s left" in warning
    assert renewal_capped(lease(), None, 600, now=2000.0) is None  # not cut short
    assert renewal_capped(lease(), 100, 600, now=4400.0) is None  # within the cap


def test_renew_exactly_to_max_is_allowed() -> None:
    """An increment that lands exactly on the cap is fine."""
    assert renew_expiry(lease(), 1600, 600, now=3000.0) == 4600.0


def test_renew_of_non_renewable_lease_is_refused() -> None:
    """STS-style leases declared non-renewable cannot be renewed."""
    with pytest.raises(BadRequest, match="not renewable"):
        renew_expiry(lease(renewable=False), 10, 600, now=1001.0)


def test_lease_ids_have_vaults_shape() -> None:
    """Lease ids are mount/creds/role/random and unique."""
    ids = {new_lease_id("pg", "readonly") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("pg/creds/readonly/") and len(i.split("/")[3]) == 24 for i in ids)
