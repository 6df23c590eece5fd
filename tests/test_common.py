"""common.py: atomic writes keep the old file on failure and give normal (umask) permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lib.common import atomic_path, atomic_write


def test_atomic_path_keeps_the_old_file_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".csv"  # writers that infer the format from the suffix still work
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]  # no temporary left behind


def test_atomic_files_are_readable_by_others_as_with_open(tmp_path: Path) -> None:
    """mkstemp makes owner-only files: a bundle copied into an image would be unreadable to its user."""
    atomic_write(tmp_path / "a.json", "{}")
    (tmp_path / "b.json").write_text("{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode)
    assert mode & stat.S_IROTH
