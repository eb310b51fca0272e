"""The one way collm writes safetensors files: atomically, and byte for byte the same for the same tensors.

``safetensors`` serialises its header from a hash map, so the order of the metadata (and so the file's sha256)
changes from process to process: a resumed run and an uninterrupted one wrote different bytes for equal tensors.
Here the header is re-serialised with sorted keys; the tensor data, whose offsets the header gives relative to
the end of the header, is left as the library wrote it (its order is fixed: by alignment, then name).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from collm.atomic import atomic_write


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of ``tensors`` with a canonical header (sorted keys, no spaces)."""
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes with trailing spaces
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``path`` atomically, deterministically."""
    blob = tensor_bytes(tensors, metadata)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(blob))
