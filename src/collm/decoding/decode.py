"""A fixed batch of prompts through the engine: ``run`` yields each step's events, ``decode`` collects them.

``decode`` is the low-level call behind :meth:`collm.CoLLM.generate` and ``CoLLM.stream``: the prompts
form one batch from start to end (finished rows ride along writing padding), so a router's per-row tables
and the static GPU runners stay in place. For greedy decoding on the static GPU path each step is one device
program (collm.decoding.fused); everything else steps through collm.decoding.engine.
"""

from __future__ import annotations

import struct
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from collm.backends.prepack import available, prepacked
from collm.backends.static import runner, supported
from collm.core.head import DeferralHead
from collm.core.request import Request, Router, Sampling, TokenEvent
from collm.decoding.engine import Engine, Stats, layout
from collm.decoding.fused import MAX_EOS, fused_step
from collm.errors import CollmError


@dataclass
class Options:
    """How to run a batch (not what to write: that is the Request)."""

    vocab: int
    """Logits past this index (a padded embedding matrix) are never picked."""
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    tokenizer: object = None
    """For text pieces and stop strings; without one, pieces are "" and stop strings cannot be used."""
    router: Router | None = None
    """Replaces the threshold rule (benchmarks, baselines)."""
    reencode_experts: bool = False
    """Every expert call re-encodes the whole prefix: the naive baseline for benchmarks."""
    static: bool | None = None
    """Static caches and, on CUDA, captured graphs (collm.backends.static); None: where supported (CUDA)."""
    compile: bool = False
    """On the static CUDA path, torch.compile each step before capturing it (slow first calls)."""
    fused: bool | None = None
    """On the static path, one device program per greedy step; None: where it applies; True elsewhere raises."""
    prepack: bool | None = None
    """On CPU, prepacked oneDNN linear layers (collm.backends.prepack); None: on CPU off the static path."""
    runners: dict = field(default_factory=dict)
    """Static runners and fused steps, kept by their owner (a CoLLM) so captured graphs outlive a request."""


@dataclass
class Decoded:
    """Raw loop output, one entry per row (new tokens only)."""

    token_ids: list[list[int]]
    sources: list[list[int]]
    defer_probs: list[list[float]]
    stopped_by: list[str | None]
    texts: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def run(base, experts: list, head: DeferralHead, prompts: list[list[int]], request: Request,
        options: Options) -> Iterator[list[TokenEvent]]:
    """Yield each step's events for the batch of ``prompts`` (rows 0..B-1); the generator's return value is
    the run's Stats. Raises ValueError where ``options.fused`` is True but the fused step cannot run."""
    device = next(base.parameters()).device
    mode = request.mode
    if mode == "expert" and (getattr(experts[0], "remote", False) or getattr(experts[0], "translates", False)
                             or request.lookahead > 1):
        # A remote expert (or one with another tokenizer) picks tokens but has no logits to write with alone,
        # and speculative decoding needs the base to draft: the base leads and the request's mode routes every
        # row to expert 1 (the engine's per-row override), so the expert writes every token.
        mode = "collm"
    writer = experts[0] if mode == "expert" else base
    expert_models = [] if mode in ("base", "expert") else list(experts)
    static = options.static
    drafts = request.lookahead > 1 or request.rewind > 0 or request.yield_below > 0
    if static is None:  # the static runners cannot cut a cache back: drafting runs on growing caches
        static = device.type == "cuda" and not drafts and all(supported(m) for m in [writer, *expert_models])
    elif static and drafts:
        raise CollmError("lookahead and rewinds run on growing caches: drop static (or them)")
    prepack = available(device) and not static if options.prepack is None else options.prepack
    fusable = (static and mode in ("collm", "base", "expert") and not request.sampling.do_sample
               and not options.reencode_experts and len(options.eos_ids) <= MAX_EOS
               and (options.router is None or getattr(options.router, "table", None) is not None)
               and not (mode == "collm" and head is not None and head.needs_logits))
    if options.fused and not fusable:
        raise ValueError("the fused step needs the static path, greedy decoding, mode collm/base/expert, no "
                         f"re-encoding, at most {MAX_EOS} EOS ids, a router given as a table and a head on the "
                         "hidden state alone (no --head-features)")
    in_process = [m for m in (base, *experts) if isinstance(m, torch.nn.Module)]  # not a remote expert
    with prepacked(in_process) if prepack else nullcontext():
        backbones = _static_backbones(prompts, request, options, device) if static else None
        if fusable if options.fused is None else options.fused:
            return (yield from _run_fused(base, experts, head, prompts, request, options, backbones))
        engine = Engine(base, experts, head, vocab=options.vocab, eos_ids=options.eos_ids, pad_id=options.pad_id,
                        tokenizer=options.tokenizer, mode=mode, router=options.router,
                        reencode_experts=options.reencode_experts, backbones=backbones, elastic=False)
        for prompt in prompts:
            engine.add(prompt, request)
        while engine.active:
            if events := engine.step():
                yield events
        return engine.stats


def decode(base, experts: list, head: DeferralHead, prompts: list[list[int]], *, max_new_tokens: int,
           threshold: float, sampling: Sampling = Sampling(), mode: str = "collm", stop: tuple[str, ...] = (),
           on_token: Callable[[list[int], list[int], list[bool]], None] | None = None, lookahead: int = 1,
           rewind: float = 0.0, yield_below: float = 0.0, max_rewinds: int = 8, **options) -> Decoded:
    """Decode ``prompts`` as one batch and collect the output; see DESIGN.md "Decoding semantics".
    ``options``: the fields of :class:`Options`. ``on_token(tokens, sources, done)`` is called for every new
    token of any row, in order (after a step, once per token a check settled): each row's new token (the pad id
    for rows without one), its writer and whether the row has no token in this call."""
    request = Request(max_new_tokens, threshold, sampling, mode, tuple(stop), lookahead, rewind, yield_below,
                      max_rewinds)
    opts = Options(**options)
    rows = len(prompts)
    out = Decoded([[] for _ in range(rows)], [[] for _ in range(rows)], [[] for _ in range(rows)], [None] * rows,
                  [""] * rows)
    stream = run(base, experts, head, prompts, request, opts)
    while True:
        try:
            events = next(stream)
        except StopIteration as end:
            stats = end.value
            break
        for e in events:
            out.token_ids[e.row].append(e.token_id)
            out.sources[e.row].append(e.source)
            out.defer_probs[e.row].append(e.defer_prob)
            out.texts[e.row] += e.text
            if e.stopped_by:
                out.stopped_by[e.row] = e.stopped_by
        if on_token is not None:
            for layer in _layers(events):
                on_token(*_step_view(layer, rows, opts.pad_id))
    out.stats = summary(out, stats, mode) | {"lookahead": lookahead}
    return out


def summary(out: Decoded, stats: Stats, mode: str) -> dict:
    """The stats a caller sees: the loop's counters and the output's totals."""
    new = sum(len(t) for t in out.token_ids)
    deferred = sum(sum(1 for s in src if s) for src in out.sources)
    return {
        "new_tokens": new,
        "deferred_tokens": deferred,
        "defer_rate": deferred / new if new else 0.0,
        "expert_calls": stats.expert_calls,
        "expert_tokens": stats.expert_tokens,
        "expert_prefill_tokens": stats.expert_prefill_tokens,
        "steps": stats.steps,
        "drafted": stats.drafted,
        "checked": stats.checked,
        "drafts_cut": stats.drafts_cut,
        "discarded": stats.discarded,
        "rewritten": stats.rewritten,
        "yielded": stats.yielded,
        "seam_windows": stats.seam_windows,
        "seam_cutbacks": stats.seam_cutbacks,
        "cross_forwards": stats.cross_forwards,
        "seam_seconds": stats.seam_seconds,
        "seconds": stats.seconds,
        "tokens_per_s": new / stats.seconds if stats.seconds > 0 else 0.0,
    }


def _layers(events: list[TokenEvent]) -> list[list[TokenEvent]]:
    """A step's events as layers of at most one per row (a check can settle several tokens of one row)."""
    layers: list[list[TokenEvent]] = []
    count: dict[int, int] = {}
    for e in events:
        k = count[e.row] = count.get(e.row, -1) + 1
        if k == len(layers):
            layers.append([])
        layers[k].append(e)
    return layers


def _step_view(events: list[TokenEvent], rows: int, pad_id: int):
    """One step's events as every row's (token, source, done-before) lists, for ``on_token``."""
    tokens, sources, done = [pad_id] * rows, [0] * rows, [True] * rows
    for e in events:
        tokens[e.row], sources[e.row], done[e.row] = e.token_id, e.source, False
    return tokens, sources, done


def _static_backbones(prompts, request: Request, options: Options, device):
    """Static runners sized to this request, from the owner's cache; a function (model, role) -> backbone."""
    cols = layout(prompts, options.pad_id, device, extra=request.max_new_tokens)
    batch, width = cols.seq.shape

    def make(model, role: str):
        state = runner(options.runners, model, options.vocab, batch, width, compile=options.compile)
        state.reset(cols.mask)
        state.reencode = options.reencode_experts and role == "expert"
        return state

    return make


def _run_fused(base, experts, head, prompts, request: Request, options: Options, backbones):
    """The fixed batch with each greedy step fused into one device program (collm.decoding.fused): per token
    the host reads one small vector (flags, the step's tokens and sources, and P(defer)), launches an expert's
    catch-up only where a row chose it, and does the host work (text pieces, stop strings) on what came."""
    stats = Stats()
    mode = request.mode
    engine = Engine(base, experts, head, vocab=options.vocab, eos_ids=options.eos_ids, pad_id=options.pad_id,
                    tokenizer=options.tokenizer, mode=mode, reencode_experts=False, backbones=backbones,
                    elastic=False)
    engine.stats = stats
    for prompt in prompts:
        engine.add(prompt, request)
    engine._boundary()  # the prompts are read (the writer, and the experts up front in mode collm)
    writer, expert_backbones, prompt_len = engine.writer, engine.expert_backbones, engine.n
    # the fused step owns its token matrix, with the new columns' positions laid out up front
    cols = layout(prompts, options.pad_id, engine.device, extra=request.max_new_tokens)
    num_experts, rows = len(expert_backbones), len(prompts)
    use_head = mode == "collm"
    state = fused_step(options.runners, writer, options.vocab, num_experts, head if use_head else None)
    table = getattr(options.router, "table", None)
    flags = state.start(cols.seq, cols.positions, prompt_len, engine.logits, engine.hidden,
                        head=head if use_head else None, threshold=request.threshold, eos_ids=options.eos_ids,
                        pad_id=options.pad_id, table=None if table is None else table.to(cols.seq.device))
    row_state = engine.rows
    for step in range(request.max_new_tokens):
        if flags[num_experts]:  # every row has finished
            break
        routed_p = _floats(flags[num_experts + 1 + 3 * rows :])
        for k in range(1, num_experts + 1):
            if flags[k - 1]:
                expert = expert_backbones[k - 1]
                if prompt_len + step > expert.seen:  # else the up-front read's logits serve, no forward
                    stats.expert_calls += 1
                    stats.expert_tokens += engine._real(expert.seen, prompt_len + step)
                state.set_expert_logits(k, expert.read(_Cols(state), prompt_len + step).logits)
        stats.steps = step + 1
        last = stats.steps == request.max_new_tokens
        flags = state.finish() if last else state.advance()
        if mode == "expert" and not last:
            stats.expert_calls += 1
            stats.expert_tokens += rows
        token, choice, done_before = (flags[num_experts + 1 + i * rows : num_experts + 1 + (i + 1) * rows]
                                      for i in range(3))
        events = [engine._event(row, token[i], choice[i], routed_p[i]) for i, row in enumerate(row_state)
                  if not done_before[i]]
        yield events
        hits = [e.row for e in events if e.stopped_by]  # a stop string is host work: tell the device
        if hits and not last:
            flags = state.stop_rows(hits)
    return stats


class _Cols:
    """The fused step's own token matrix, seen as Columns (the experts read it on their catch-ups)."""

    def __init__(self, state):
        self.seq, self.positions, self.mask = state.seq, state.positions, state.writer.mask


def _floats(bits: list[int]) -> list[float]:
    """float32 values sent as their bit patterns in a long vector (one transfer with the flags)."""
    return [struct.unpack("<f", struct.pack("<i", b))[0] for b in bits]
