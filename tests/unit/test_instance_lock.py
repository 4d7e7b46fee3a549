"""The one-broker-per-SQLite-store lock holds whatever path the URL names the store by."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.instance_lock import InstanceLocked, hold


def test_a_symlink_to_the_store_is_the_same_store(tmp_path: Path) -> None:
    """A second broker given a symlink to a served store started and served it (QA)."""
    store = tmp_path / "b1" / "broker.db"
    store.parent.mkdir()
    store.touch()
    (tmp_path / "link.db").symlink_to(store)
    fd = hold(f"sqlite:///{store}")
    assert fd is not None
    try:
        for other in (f"sqlite:///{tmp_path / 'link.db'}",
                      f"sqlite:///{tmp_path / 'b1' / '..' / 'b1' / 'broker.db'}"):
            with pytest.raises(InstanceLocked, match="another broker is serving the store"):
                hold(other)
    finally:
        os.close(fd)
    again = hold(f"sqlite:///{tmp_path / 'link.db'}")  # free once the first one let go
    assert again is not None
    os.close(again)
