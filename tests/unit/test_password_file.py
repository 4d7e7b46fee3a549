"""replace_password_file: rotate-root's rewrite of a mount's password_file."""

from __future__ import annotations

import stat
from pathlib import Path

from broker.config import read_secret_file
from broker.password_file import replace_password_file


def test_a_symlink_stays_a_link_and_its_target_gets_the_secret(tmp_path: Path) -> None:
    target = tmp_path / "secrets" / "pg-admin"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o644)
    link = tmp_path / "admin.pw"
    link.symlink_to(target)

    replace_password_file(str(link), "new-secret")

    assert link.is_symlink() and link.resolve() == target
    assert read_secret_file(str(link)) == "new-secret"
    assert target.read_text() == "new-secret\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # never wider than owner-only
    assert sorted(p.name for p in target.parent.iterdir()) == ["pg-admin"]  # no temp left


def test_a_narrower_mode_is_kept(tmp_path: Path) -> None:
    pw = tmp_path / "admin.pw"
    pw.write_text("old\n")
    pw.chmod(0o400)
    replace_password_file(str(pw), "new")
    assert stat.S_IMODE(pw.stat().st_mode) == 0o400 and pw.read_text() == "new\n"
