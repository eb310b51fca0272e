"""The fast path: a static KV cache per model and one CUDA graph per catch-up length bucket.

The plain path (collm.backends.hf) calls the `transformers` forward with a growing cache: simple, exact, and on a
GPU dominated by Python and kernel-launch overhead (~20 ms/token for a 1B model where reading its weights
takes < 1 ms). Here each model keeps a preallocated cache and input buffers sized to the request; a forward
over L new tokens is padded on the right to a bucket length (1, 2, 4, ... ``max_bucket``), so one captured
graph serves every L in its bucket. Padding is harmless: the padded positions come after every real query
(causal attention never looks at them) and the next call overwrites their cache slots before reading them.
Longer catch-ups (the expert's first, which includes the prompt) run eagerly on the same cache.
"""

from __future__ import annotations

import torch
from transformers import StaticCache

from collm.backends.base import Columns, Next
from collm.errors import CollmError

# Families whose logits are exactly lm_head(last_hidden_state): no logit scaling or soft-capping.
MAX_BUCKET = 64  # longest catch-up served by a captured graph; longer ones run eagerly

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite"}


def supported(model) -> bool:
    return getattr(model.config, "model_type", None) in SUPPORTED and hasattr(model, "get_decoder")


class StaticModel:
    """One backbone on a static cache (the Backbone protocol, collm.backends.base), for a fixed batch: rows
    cannot join or leave (``fresh``/``extend``/``keep`` refuse).

    ``graphs=True`` (CUDA only) captures one graph per bucket on first use; ``graphs=False`` runs the same
    bucketed code eagerly, which is how the CPU tests check that bucketing changes no token.
    """

    def __init__(self, model, vocab: int, batch: int, width: int, *, max_bucket: int = MAX_BUCKET,
                 graphs: bool = True, compile: bool = False):
        self.model, self.vocab, self.batch = model, vocab, batch
        self.backbone, self.lm_head = model.get_decoder(), model.get_output_embeddings()
        self.max_bucket = max_bucket
        self.capacity = width + max_bucket  # room for the padding of a bucket that starts near the end
        device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=self.capacity)
        self.ids = torch.zeros(batch, max_bucket, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, max_bucket, dtype=torch.long, device=device)
        self.mask = torch.ones(batch, self.capacity, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.last = torch.zeros((), dtype=torch.long, device=device)
        self.graphs_on = graphs and device.type == "cuda"
        # torch.compile fuses the many small eager kernels (norms, rotary, activations) that dominate a
        # memory-bound step; the graph captured around the compiled code removes the launches that remain.
        self.compiled = compile and self.graphs_on
        if self.compiled:  # one compiled graph per bucket length: more than dynamo's default 8 recompiles
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._step = torch.compile(self._forward, dynamic=False) if self.compiled else self._forward
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.seen = 0
        self.last_logits = None
        self.reencode = False

    picks = False

    def reset(self, mask: torch.Tensor) -> None:
        """Start a new request: its padding mask (B, width) goes into the static mask buffer."""
        self.mask.fill_(1)
        self.mask[:, : mask.shape[1]].copy_(mask)
        self.seen = 0
        self.last_logits = None

    def read(self, cols: Columns, end: int, *, hidden: bool = False, rows=None, sampling=None, step: int = 0) -> Next:
        """Consume columns [seen, end) of ``cols``; next-token logits (B, V) float32 and h (B, H)."""
        logits, h = self._advance(cols.seq, cols.positions, end, hidden)
        return Next(logits=logits, hidden=h)

    def keep(self, rows) -> None:
        raise CollmError("static runners serve a fixed batch: rows cannot leave")

    def pad_left(self, columns: int) -> None:
        raise CollmError("static runners serve a fixed batch: columns cannot move")

    def fresh(self, rows: int = 0):
        raise CollmError("static runners serve a fixed batch: rows cannot join")

    def extend(self, other) -> None:
        raise CollmError("static runners serve a fixed batch: rows cannot join")

    def _advance(self, seq, positions, end: int, hidden: bool):
        if end == self.seen and self.last_logits is not None and not self.reencode:
            return self.last_logits, None  # nothing new: valid until this model's next forward
        if self.reencode:  # the naive baseline: throw the cache away, re-read the prefix
            self.seen = 0
        start, length = self.seen, end - self.seen
        self.seen = end
        if start == 0 or length > self.max_bucket:  # prefill and long catch-ups: exact length, eagerly
            return self._eager(seq[:, start:end], positions[:, start:end], start, hidden)
        bucket = 1 << (length - 1).bit_length()
        chunk = seq[:, start : start + bucket]
        self.ids[:, : chunk.shape[1]].copy_(chunk)  # columns past the request's width keep stale ids: harmless
        pos = positions[:, start : start + bucket]
        self.pos[:, : pos.shape[1]].copy_(pos)
        self.start.fill_(start)
        self.last.fill_(length - 1)
        if not self.graphs_on:
            logits, h = self._forward(bucket)
        else:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(bucket)
            graph, (logits, h) = self.graphs[bucket]
            graph.replay()
        self.last_logits = logits[:, : self.vocab].float()
        return self.last_logits, (h.clone() if hidden else None)

    def _eager(self, ids, pos, start: int, hidden: bool):
        self.start.fill_(start)
        self.last.fill_(ids.shape[1] - 1)
        logits, h = self._forward(ids.shape[1], ids, pos)
        self.last_logits = logits[:, : self.vocab].float()
        return self.last_logits, (h if hidden else None)

    def _forward(self, length: int, ids=None, pos=None):
        """Forward ``length`` buffered tokens at cache offset ``self.start``; logits and h at ``self.last``."""
        for layer in self.cache.layers:  # the cache writes at its own counter: point it at this call's start
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.copy_(self.start)
            else:
                layer.cumulative_length = self.start.clone()
        out = self.backbone(
            input_ids=self.ids[:, :length] if ids is None else ids,
            attention_mask=self.mask,
            position_ids=self.pos[:, :length] if pos is None else pos,
            cache=self.cache,
            use_cache=True,
        )
        states = out.last_hidden_state  # (B, L, H), after the final norm
        h = states.index_select(1, self.last.view(1)).squeeze(1)
        return self.lm_head(h), h

    def _capture(self, bucket: int):
        """Warm up on a side stream (the warm-up writes only the slots this call overwrites), then capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step(bucket)
        return graph, out


def runner(runners: dict, model, vocab: int, batch: int, width: int, graphs: bool = True,
           compile: bool = False) -> StaticModel:
    """The model's static runner for this batch size from ``runners`` (a cache the caller owns: the engine's,
    never the model's), reused while the request fits, so captured graphs outlive one request. Capacity grows
    in steps of 256 columns; one runner per model is kept."""
    width = -(-width // 256) * 256
    current = runners.get(id(model))
    if current is None or current.model is not model or current.batch != batch \
            or current.capacity < width + current.max_bucket or current.max_bucket != MAX_BUCKET \
            or current.compiled != (compile and current.graphs_on):
        current = StaticModel(model, vocab, batch, width, max_bucket=MAX_BUCKET, graphs=graphs, compile=compile)
        runners[id(model)] = current
    return current
