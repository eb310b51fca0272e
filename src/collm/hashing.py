"""The one file hasher: sha256 of a file's bytes, read in blocks (model weights do not fit in memory twice)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def update_with_file(h, path: str | Path) -> None:
    """Feed the bytes of ``path`` into the hash object ``h``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the bytes of ``path``."""
    h = hashlib.sha256()
    update_with_file(h, path)
    return h.hexdigest()
