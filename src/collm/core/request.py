"""What a caller asks of the decoding engine, and what it gets back per step: plain types, no models, no I/O."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from collm.core.seed import check_seed
from collm.errors import CollmError

MODES = ("collm", "compose", "base", "expert", "proxy")
"""collm: the head routes each token; compose: sample the mixture (1-pi) P_base + pi P_expert (every expert
runs every step); base / expert: one model alone (baselines); proxy: proxy tuning (see collm.pair.proxy_tuning)."""

# router(step, head_log_probs (B, M+1)) -> choice (B,) in 0..M; replaces the threshold rule (benchmarks, baselines).
# A router with `reads_tokens = True` is called as router(step, head_log_probs, last_tokens (B,)): each row's newest
# token (the prompt's last at step 0), for rules that depend on what has been written.
# A router whose choices are fixed in advance may also carry them as `router.table` (steps, rows or 1), long:
# the fused step (collm.decoding.fused) then reads them on the device instead of calling back into Python.
Router = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Sampling:
    """How the writing model's distribution becomes a token."""

    do_sample: bool = False
    """False: greedy argmax. True: sample with ``temperature`` and ``top_p``."""
    temperature: float = 1.0
    """Divides the logits before sampling; must be > 0."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (0 < top_p <= 1)."""
    seed: int = 0
    """Seeds the row's sampler: the same seed, prompt and models give the same tokens, whatever else is batched."""

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0 or math.isinf(self.temperature):
            raise CollmError(f"temperature must be > 0 (and finite), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise CollmError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_seed(self.seed)


@dataclass(frozen=True)
class Request:
    """One row's decoding settings. Rows of one batch may differ in everything but ``mode`` and ``router``."""

    max_new_tokens: int = 128
    """Most new tokens to write (> 0)."""
    threshold: float = 0.5
    """Defer where P(Z != base) > threshold, in [0, 1]: 1 never defers, 0 defers wherever P > 0."""
    sampling: Sampling = field(default_factory=Sampling)
    mode: str = "collm"
    """One of MODES."""
    stop: tuple[str, ...] = ()
    """Strings that end the row; the text returned stops before the first one."""
    lookahead: int = 1
    """Draft past deferrals: at a deferral the base writes on, up to this many tokens, and the expert checks the
    draft in one read (1: each deferral is checked at once, plain Co-LLM). Greedy rows get greedy Co-LLM's
    tokens; sampling rows keep Co-LLM's distribution (speculative sampling's acceptance rule)."""
    rewind: float = 0.0
    """Backtracking, base to expert: where the expert, reading the base's tokens, gives one of them a probability
    below this, the answer is cut back to it and the expert writes there (0: off). The base's tokens then stay
    pending until an expert has read them (a check at least every ``lookahead`` tokens)."""
    yield_below: float = 0.0
    """Backtracking, expert to base: where the expert's probability of its own token at a deferral is below this,
    the base's token is written instead (0: off)."""
    max_rewinds: int = 8
    """Most rewinds (either rule) per answer; then the row decodes as without them."""

    def __post_init__(self):
        check_threshold(self.threshold)
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise CollmError(f"max_new_tokens must be a positive integer, got {n!r}")
        if self.mode not in MODES:
            raise CollmError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise CollmError("stop strings must be non-empty (a list of strings)")
        check_lookahead(self.lookahead)
        for name in ("rewind", "yield_below"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise CollmError(f"{name} must be a probability in [0, 1], got {value!r}")
        if isinstance(self.max_rewinds, bool) or not isinstance(self.max_rewinds, int) or self.max_rewinds < 0:
            raise CollmError(f"max_rewinds must be a whole number >= 0, got {self.max_rewinds!r}")
        if (self.lookahead > 1 or self.rewind or self.yield_below) and self.mode in ("compose", "proxy"):
            raise CollmError(f"lookahead drafts Co-LLM (mode collm, or expert for speculative decoding); mode "
                             f"{self.mode!r} cannot draft: drop lookahead")


OPTIONS = ("max_new_tokens", "threshold", "do_sample", "temperature", "top_p", "seed", "stop", "mode", "lookahead",
           "rewind", "yield_below", "max_rewinds")
"""A request's fields as flat keyword options: what ``CoLLM.generate``/``stream``, the CLI and the server take."""


KEEP_IF_NONE = ("threshold", "stop", "lookahead", "rewind", "yield_below", "max_rewinds")


def make_request(request: Request | None = None, **options) -> Request:
    """``request`` (default: ``Request()``) with flat ``options`` (OPTIONS) replacing its fields: the one place a
    request is built and checked. an option in KEEP_IF_NONE given as None keeps the request's; ``stop`` may
    be one string. Raises CollmError for an unknown option or a value out of range."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise CollmError(f"unknown option {unknown[0]!r}: choose from {', '.join(OPTIONS)}")
    request = request or Request()
    options = {k: v for k, v in options.items() if not (k in KEEP_IF_NONE and v is None)}
    sampling = {k: options.pop(k) for k in ("do_sample", "temperature", "top_p", "seed") if k in options}
    if "stop" in options:
        stop = options["stop"]
        options["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, **sampling), **options)


def check_lookahead(lookahead) -> int:
    """The lookahead as an int; raises CollmError unless it is a whole number of tokens >= 1."""
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 1:
        raise CollmError(f"lookahead must be a whole number of tokens >= 1, got {lookahead!r}")
    return lookahead


def check_threshold(threshold) -> float:
    """The threshold as a float; raises CollmError unless it is a number in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or not 0 <= threshold <= 1:
        raise CollmError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one row, as the engine writes it."""

    row: int
    """The row's handle: its index in the prompts given to ``stream``/``generate``, or what ``Engine.add`` gave."""
    token_id: int
    text: str
    """What this token adds to the row's text ("" while it holds only part of a character, or after a stop
    string); the pieces of a row join to exactly its final text."""
    source: int
    """Who wrote it: 0 = base, k = expert k (1-based)."""
    defer_prob: float
    """The head's P(Z != base) at this position (0 where no head was consulted)."""
    finished: bool
    """True on the row's last event."""
    finish_reason: str | None = None
    """On the last event: "stop" (EOS or a stop string) or "length" (max_new_tokens reached)."""
    stopped_by: str | None = None
    """The stop string that ended the row, if one did."""
