"""Atomic writes: the user's umask decides the mode, a full disk is one line, and temp names are known."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from collm.atomic import atomic_folder, atomic_write, temp_siblings, write_json
from collm.errors import CollmError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_umask_mode_not_0600(tmp_path, umask_022):
    write_json(tmp_path / "a.json", {"x": 1})
    atomic_write(tmp_path / "b.txt", lambda tmp: open(tmp, "w").write("b"))
    atomic_folder(tmp_path / "folder", lambda tmp: (tmp / "c.txt").write_text("c"))
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.txt") == 0o644
    assert mode(tmp_path / "folder") == 0o755 and mode(tmp_path / "folder" / "c.txt") == 0o644


def test_disk_full_is_one_line_and_leaves_no_temp_file(tmp_path):
    def fill(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CollmError) as e:
        atomic_write(tmp_path / "out.json", fill)
    assert "no space left on the device while writing" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CollmError, match="no space left"):
        atomic_folder(tmp_path / "dir", lambda tmp: fill(tmp / "x"))
    assert list(tmp_path.iterdir()) == []


def test_temp_siblings_are_only_the_writer_s_own(tmp_path):
    for name in (".out.json.ab12_x9z", ".out.json.toolong12", ".env", "out.json", ".other.json.ab12_x9z"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in temp_siblings(tmp_path / "out.json")] == [".out.json.ab12_x9z"]
