"""Atomic file writes: a kill mid-write never leaves a half-written file where a reader expects a whole one.

Also what every writer shares: a full disk becomes a one-line :class:`CollmError` (the command can be run
again once there is space), files get the mode the user's umask gives (``mkstemp`` alone gives 0600), and
the temporary names a killed write can leave behind are known, so a command removes only its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from collm.errors import CollmError

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# safetensors (Rust) reports a full disk as SafetensorError with the OS message inside.
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded")
# mkstemp / mkdtemp add 8 characters from this alphabet to the prefix.
TEMP_SUFFIX = r"[a-z0-9_]{8}"


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` means the disk (or the user's quota) is full, whatever library raised it."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    return any(text in str(error) for text in _DISK_FULL_TEXT)


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn a full disk while writing ``path`` into a one-line CollmError; other errors pass unchanged."""
    try:
        yield
    except CollmError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
        if is_disk_full(e):
            raise CollmError(f"no space left on the device while writing {path}: free some space, then run "
                             f"the same command again") from None
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def user_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def temp_siblings(path: str | Path) -> list[Path]:
    """Temporary files or folders that :func:`atomic_write` / :func:`atomic_folder` for ``path`` may have
    left behind when killed: ``.NAME.XXXXXXXX`` beside it. Only these, never anything else in the folder."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{TEMP_SUFFIX}")
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def remove(path: Path) -> None:
    """Remove a file or folder this program wrote (callers prove that first)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename into place, so a kill never leaves a half-written file.

    The file gets the umask's mode; a full disk raises CollmError (the temporary file is removed).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, user_mode())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8), atomically."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log; a full disk raises CollmError (readers drop a torn last line)."""
    with writing(path), open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")


def atomic_folder(target: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_dir)`` then swap the folder into place: readers see the old folder or the new one.

    Meant for folders this program owns (``target`` is replaced whole). A full disk raises CollmError.
    """
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            write(tmp)
            os.chmod(tmp, user_mode(directory=True))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
