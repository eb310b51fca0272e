"""CPU decoding with the large linear layers' weights prepacked for oneDNN.

A decoding step on a CPU is a chain of matrix-vector products, and a catch-up a chain of products with a few
rows. PyTorch's default float32 `linear` (MKL sgemm on the row-major weight) is slow at both on this project's
2-core machine: it reads a 256 MB weight at 21 GB/s for one row and takes 3.4 times as long for ten rows,
though the machine's roofline (184 GFLOP/s, 21 GB/s) puts the compute-bound crossover at ~17 rows. oneDNN
with the weight reordered once into its blocked layout runs the same product 1.5x faster for one row and
1.4x slower for ten than for one (bench/README.md has the table). Reordering costs one copy of the weight,
kept beside the layer and redone only when the weight changes.

Small layers stay as they are: converting the input and output for oneDNN costs ~20 us a call, more than a
matrix of under ~200K parameters takes to read (measured break-even ~180K; MIN_PARAMS leaves a margin).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

MIN_PARAMS = 1 << 18  # weights below this stay on the default kernel (measured break-even ~180K)


def available(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


@contextmanager
def prepacked(models: Iterable[nn.Module]) -> Iterator[int]:
    """Within the block, float32 ``nn.Linear`` layers of ``models`` with at least MIN_PARAMS weights run on
    oneDNN with prepacked weights (inference only: the packed copy has no autograd). Yields how many layers
    were switched; every layer gets its own ``forward`` back on exit, also after an error. The packed copies
    stay cached on the layers (one copy of each weight) and are rebuilt when a weight is changed in place
    or replaced."""
    switched: list[nn.Linear] = []
    try:
        for model in models:
            for layer in model.modules():
                if _eligible(layer) and "forward" not in layer.__dict__:
                    layer.forward = _packed_forward(layer)
                    switched.append(layer)
        yield len(switched)
    finally:
        for layer in switched:
            del layer.forward


def _eligible(layer: nn.Module) -> bool:
    return (type(layer) is nn.Linear and layer.weight.dtype == torch.float32 and layer.weight.device.type == "cpu"
            and layer.weight.numel() >= MIN_PARAMS)


def _packed_forward(layer: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_grad_enabled():
            return nn.Linear.forward(layer, x)
        weight, bias = _packed(layer)
        rows = x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn()
        out = torch._C._nn.mkldnn_linear(rows, weight, bias).to_dense()
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


def _packed(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight (and bias) in oneDNN's layout, rebuilt if the weight was swapped or written since."""
    weight, bias = layer.weight, layer.bias
    key = (_stamp(weight), None if bias is None else _stamp(bias))
    cached = layer.__dict__.get("_collm_packed")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            packed = (weight.detach().to_mkldnn(), None if bias is None else bias.detach().to_mkldnn())
        cached = layer.__dict__["_collm_packed"] = (key, packed)
    return cached[1]


def _stamp(tensor: torch.Tensor) -> tuple[int, int]:
    """Where the tensor lives and how often it was written in place (inference tensors keep no count)."""
    try:
        return tensor.data_ptr(), tensor._version
    except RuntimeError:
        return tensor.data_ptr(), -1
