"""CPU decoding with the linear layers' weights prepacked for oneDNN.

A decoding step on a CPU is a chain of matrix-vector products, and a catch-up a chain of products with a few
rows. PyTorch's default float32 `linear` (MKL sgemm on the row-major weight) is slow at both on this project's
2-core machine: a 1408x512 weight takes 189 us for one row and 355 for ten, though the machine's roofline
(184 GFLOP/s, 21 GB/s) puts the compute-bound crossover at ~17 rows. oneDNN's linear on the weight reordered
once into its blocked layout (what inductor's CPU freezing pass does) takes 45 and 77 us (bench/README.md has
the table). Reordering costs one copy of the weight, kept beside the layer and redone only when the weight
changes: memory for speed (the demo's peak goes from 1.6 to 2.7 GB), so copies that would take more than a
quarter of the machine's memory are not made. Layers under 2^16 weights stay as they are: there the two
kernels tie.

bfloat16 layers are prepacked too where the CPU has native bfloat16 instructions (oneDNN reports them):
SmolLM2-135M in bfloat16 decodes at 16.2 ms/token instead of 20.5 (float32 prepacked: 22.4; bench/README.md).
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

MIN_PARAMS = 1 << 16  # weights below this stay on the default kernel (a tie at one row)
ROWS_HINT = 16  # the reorder's batch-size hint: any hint from 4 to 256 measured the same for 1 to 64 rows
MEMORY_SHARE = 0.25  # packed copies may take at most this share of physical memory


def available(device: torch.device) -> bool:
    ops = torch.ops.mkldnn
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))


@contextmanager
def prepacked(models: Iterable[nn.Module]) -> Iterator[int]:
    """Within the block, float32 (and, see above, bfloat16) ``nn.Linear`` layers of ``models`` with at least
    MIN_PARAMS weights run on oneDNN with prepacked weights (inference only: the packed copy has no autograd;
    an input of another dtype takes the default path). Yields how many layers were switched; every layer
    gets its own ``forward`` back when the last block using it exits, also after an error, so blocks may nest
    and two engines over the same models (in two threads) never undo each other's switch. The packed copies
    live in this module's registry (``PACKED``, one copy of each weight, dropped with the layer), never on
    the layers, and are rebuilt when a weight is changed in place or replaced. Where the copies would take
    more than MEMORY_SHARE of physical memory, nothing switches."""
    layers = list(dict.fromkeys(layer for model in models for layer in model.modules()  # a model may come twice
                                if _eligible(layer)))
    if sum(layer.weight.nbytes for layer in layers) > MEMORY_SHARE * _physical_memory():
        layers = []
    switched: list[nn.Linear] = []
    try:
        for layer in layers:
            with _LOCK:
                if _USERS.get(layer, 0) == 0:
                    layer.forward = _packed_forward(layer)
                _USERS[layer] = _USERS.get(layer, 0) + 1
            switched.append(layer)
        yield len(switched)
    finally:
        with _LOCK:
            for layer in switched:
                users = _USERS.get(layer, 1) - 1  # at interpreter exit the registry may be gone already
                if users > 0:
                    _USERS[layer] = users
                else:
                    _USERS.pop(layer, None)
                    layer.__dict__.pop("forward", None)


# The packed copies (layer -> (weight stamp, packed weight)) and how many open blocks use each layer's switch.
PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()
_USERS: "weakref.WeakKeyDictionary[nn.Linear, int]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no limit known
        return 1 << 62


def _eligible(layer: nn.Module) -> bool:
    return (type(layer) is nn.Linear and layer.weight.dtype in _packable_dtypes()
            and layer.weight.device.type == "cpu" and layer.weight.numel() >= MIN_PARAMS
            and ("forward" not in layer.__dict__ or layer in _USERS))  # a forward someone else replaced: leave it


@functools.cache
def _packable_dtypes() -> tuple[torch.dtype, ...]:
    """float32 always; bfloat16 where oneDNN has native bfloat16 kernels on this CPU (else it would emulate)."""
    native_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if native_bf16 is not None and native_bf16() else (torch.float32,)


def _packed_forward(layer: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != layer.weight.dtype or torch.is_grad_enabled():
            return nn.Linear.forward(layer, x)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), _packed(layer), layer.bias, "none", [], "")

    return forward


def _packed(layer: nn.Linear) -> torch.Tensor:
    """The layer's weight in oneDNN's layout, rebuilt if the weight was swapped or written since."""
    key = _stamp(layer.weight)
    cached = PACKED.get(layer)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = PACKED[layer] = (key, torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), ROWS_HINT))
    return cached[1]


def _stamp(tensor: torch.Tensor) -> tuple[int, int]:
    """Where the tensor lives and how often it was written in place (inference tensors keep no count)."""
    try:
        return tensor.data_ptr(), tensor._version
    except RuntimeError:
        return tensor.data_ptr(), -1
