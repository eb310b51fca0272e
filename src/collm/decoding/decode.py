"""The collaborative decoding loop: the base steps every token; an expert catches up only where it writes.

Layout: one token matrix ``seq`` (batch, prompt + new) shared by every model, prompts left-padded. The base has
consumed ``n`` columns; expert k has consumed ``seen[k] <= n``. On a deferral expert k runs *one* forward over
columns ``[seen[k], n)`` of every row (its KV cache is append-only, so the prefix is never re-encoded), which
keeps all caches in the same column layout. Rows that do not defer ride along: at batch 1 that is free and at
small batches nearly so, since a decoding step is bound by reading the weights, not by the rows.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from collm.errors import CollmError
from collm.decoding.fused import MAX_EOS, fused_step
from collm.core.head import DeferralHead
from collm.backends.prepack import available, prepacked
from collm.backends.static import StaticModel, runner, supported

MODES = ("collm", "compose", "base", "expert", "proxy")

# router(step, head_log_probs (B, M+1)) -> choice (B,) in 0..M; replaces the threshold rule (benchmarks, baselines).
# A router whose choices are fixed in advance may also carry them as `router.table` (steps, rows or 1), long:
# the fused step (collm.decoding.fused) then reads them on the device instead of calling back into Python.
Router = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Sampling:
    """How the writing model's distribution becomes a token."""

    do_sample: bool = False
    """False: greedy argmax. True: sample with ``temperature`` and ``top_p``."""
    temperature: float = 1.0
    """Divides the logits before sampling; must be > 0."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (0 < top_p <= 1)."""
    seed: int = 0
    """Seeds the sampler: the same seed, prompts and models give the same tokens."""

    def __post_init__(self):
        if not self.temperature > 0:
            raise CollmError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CollmError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Decoded:
    """Raw loop output, one entry per row (new tokens only)."""

    token_ids: list[list[int]]
    sources: list[list[int]]
    defer_probs: list[list[float]]
    stopped_by: list[str | None]
    stats: dict = field(default_factory=dict)


class _Model:
    """One backbone with its own KV cache and the number of ``seq`` columns it has consumed."""

    def __init__(self, model: torch.nn.Module, vocab: int, reencode: bool = False):
        self.model = model
        self.vocab = vocab
        self.reencode = reencode  # the naive baseline: forget the cache and re-read the prefix every call
        self.cache = DynamicCache(config=model.config)
        self.seen = 0
        self.last_logits = None
        self.calls = 0
        self.tokens = 0  # token positions fed to the model, summed over rows that are real (not padding)
        self.prefill_tokens = 0  # the prompt's, where decode has the model read it up front
        self.pads = 0  # the request's left-padding positions (known on the host: counting them costs no sync)

    def advance(self, seq, mask, positions, end: int, hidden: bool = False):
        """Consume columns [seen, end) in one forward; return next-token logits (B, V) and h (B, H) or None.
        Where nothing is new (``end == seen``: a deferral right after the up-front prefill) the last call's
        logits are returned without a forward."""
        if end == self.seen and self.last_logits is not None and not self.reencode:
            return self.last_logits, None
        if self.reencode:
            self.cache, self.seen = DynamicCache(config=self.model.config), 0
        start, self.seen = self.seen, end
        self.calls += 1
        self.tokens += (end - start) * mask.shape[0] - (self.pads if start == 0 else 0)
        out = self.model(
            input_ids=seq[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            cache_position=torch.arange(start, end, device=seq.device),
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=hidden,
            logits_to_keep=1,
        )
        logits = self.last_logits = out.logits[:, -1, : self.vocab].float()
        return logits, (out.hidden_states[-1][:, -1] if hidden else None)


@torch.inference_mode()
def decode(
    base: torch.nn.Module,
    experts: list[torch.nn.Module],
    head: DeferralHead,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    threshold: float,
    sampling: Sampling,
    mode: str = "collm",
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    vocab: int,
    stop_check: Callable[[int, list[int]], str | None] | None = None,
    on_token: Callable[[list[int], list[int], list[bool]], None] | None = None,
    router: Router | None = None,
    reencode_experts: bool = False,
    static: bool | None = None,
    compile: bool = False,
    fused: bool | None = None,
    prepack: bool | None = None,
) -> Decoded:
    """Generate up to ``max_new_tokens`` per prompt; see DESIGN.md "Decoding semantics".

    ``stop_check(row, new_token_ids)`` returns the stop string that ends the row, or None.
    ``on_token(tokens, sources, done)`` is called after every step with each row's new token (for streaming;
    it costs a host copy per token, so only pass it when someone is watching).
    ``reencode_experts`` makes every expert call re-encode the whole prefix: the naive baseline for benchmarks.
    ``static``: use static caches and, on CUDA, captured graphs (collm.backends.static); None picks it where supported.
    ``compile``: on the static CUDA path, torch.compile each step before capturing it (slow first calls).
    ``fused``: on the static path, run each step as one device program (collm.decoding.fused; one graph on CUDA).
    None picks it where it applies: greedy, modes collm/base/expert, and a router (if any) given as a fixed
    ``table``. True where it does not apply raises ValueError.
    ``prepack``: on CPU, run the large float32 (and bfloat16) linear layers on oneDNN with prepacked weights
    (collm.backends.prepack; 2x faster decoding of SmolLM2 here); None picks it on CPU outside the static path.
    """
    device = next(base.parameters()).device
    if prepack is None:
        prepack = available(device) and not static
    seq, mask, positions, prompt_len = _layout(prompts, max_new_tokens, pad_id, device)
    with prepacked([base, *experts]) if prepack else nullcontext():
        writer, helpers = _backbones(base, experts, mode, vocab, mask, static, compile, reencode_experts)
        pads = len(prompts) * prompt_len - sum(len(p) for p in prompts)
        for backbone in (writer, *helpers):
            backbone.pads = pads
        fusable = (isinstance(writer, StaticModel) and mode in ("collm", "base", "expert") and not sampling.do_sample
                   and not reencode_experts and len(eos_ids) <= MAX_EOS
                   and (router is None or getattr(router, "table", None) is not None))
        if fused and not fusable:
            raise ValueError("the fused step needs the static path, greedy decoding, mode collm/base/expert, no "
                             f"re-encoding, at most {MAX_EOS} EOS ids and a router given as a table")
        if fusable if fused is None else fused:
            return _decode_fused(writer, helpers, head, seq, mask, positions, prompt_len, max_new_tokens, threshold,
                                 mode, eos_ids, pad_id, vocab, router, stop_check, on_token)
        return _decode_loop(writer, helpers, head, seq, mask, positions, prompt_len, max_new_tokens, threshold,
                            sampling, mode, eos_ids, pad_id, stop_check, on_token, router, reencode_experts)


def _decode_loop(writer, helpers, head, seq, mask, positions, prompt_len, max_new_tokens, threshold, sampling,
                 mode, eos_ids, pad_id, stop_check, on_token, router, reencode_experts) -> Decoded:
    """The step-by-step loop: every mode and sampler, stop strings and streaming."""
    device, rows = seq.device, seq.shape[0]
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    eos = torch.tensor(eos_ids or [-1], device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    chosen = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    defer_p = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    stopped: list[tuple[str, int] | None] = [None] * rows  # (stop string, tokens kept)
    steps = 0
    started = time.perf_counter()

    use_head = mode in ("collm", "compose")
    base_writes = torch.zeros(rows, dtype=torch.long, device=device)  # the choice when no head is consulted
    # compose and proxy run their helpers every step, the naive baseline re-reads the prefix at every call
    up_front = helpers if mode == "collm" and not reencode_experts else []
    logits, hidden = _read_prompt(writer, up_front, seq, mask, positions, prompt_len, use_head)
    new_ids: list[list[int]] = [[] for _ in range(rows)]  # host copies of each row's tokens, for stop strings
    for step in range(max_new_tokens):
        n = prompt_len + step
        choice = base_writes
        if use_head:
            log_pz = head.log_probs(hidden)  # (B, M+1)
            defer_p[:, step] = -torch.expm1(log_pz[:, 0])
            choice = _route(step, log_pz, defer_p[:, step], threshold, router).masked_fill(done, 0)
        writers, all_done = _host_sync(choice, done, len(helpers))
        if all_done:
            break
        if mode == "compose":
            token, choice = _compose_pick(logits, log_pz, helpers, seq, mask, positions, n, sampling, generator)
        elif mode == "proxy":
            token = _proxy_pick(logits, helpers, seq, mask, positions, n, sampling, generator)
        else:
            for k in writers:
                expert_logits, _ = helpers[k - 1].advance(seq, mask, positions, n)
                logits = torch.where((choice == k)[:, None], expert_logits, logits)
            token = _pick(logits, sampling, generator)
        token = token.masked_fill(done, pad_id)
        seq[:, n] = token
        chosen[:, step] = choice
        if on_token is not None or stop_check is not None:  # one copy; `done` before it takes this step's EOS
            token_host, choice_host, done_before = torch.stack([token, choice, done.long()]).tolist()
            if on_token is not None:
                on_token(token_host, choice_host, [bool(d) for d in done_before])
        done |= torch.isin(token, eos)
        steps = step + 1
        if stop_check is not None and (hits := _stop_hits(token_host, done_before, new_ids, eos_ids, stopped,
                                                          stop_check)):
            done[hits] = True
        if steps < max_new_tokens:
            logits, hidden = writer.advance(seq, mask, positions, n + 1, hidden=use_head)

    seconds = time.perf_counter() - started
    return _collect(seq, chosen, defer_p, prompt_len, steps, eos_ids, stopped, writer, helpers, seconds, mode)


def _decode_fused(writer, helpers, head, seq, mask, positions, prompt_len, max_new_tokens, threshold, mode,
                  eos_ids, pad_id, vocab, router, stop_check, on_token) -> Decoded:
    """The same loop with each step fused into one device program (collm.decoding.fused): per token the host reads one
    small flags vector, launches an expert's catch-up only where a row chose it, and does the host work (stop
    strings, streaming) on the token that came with the flags."""
    started = time.perf_counter()
    use_head = mode == "collm"
    rows, experts = seq.shape[0], len(helpers)
    logits, hidden = _read_prompt(writer, helpers, seq, mask, positions, prompt_len, use_head)
    head = head if use_head else None
    state = fused_step(writer, vocab, experts, head)
    table = getattr(router, "table", None)
    flags = state.start(seq, positions, prompt_len, logits, hidden, head=head,
                        threshold=threshold, eos_ids=eos_ids, pad_id=pad_id,
                        table=None if table is None else table.to(seq.device))
    stopped: list[tuple[str, int] | None] = [None] * rows
    new_ids: list[list[int]] = [[] for _ in range(rows)]  # host copies of each row's tokens, for stop strings
    steps = 0
    for step in range(max_new_tokens):
        if flags[experts]:  # every row has finished
            break
        for k in range(1, experts + 1):
            if flags[k - 1]:
                expert_logits, _ = helpers[k - 1].advance(state.seq, mask, state.positions, prompt_len + step)
                state.set_expert_logits(k, expert_logits)
        steps = step + 1
        flags = state.advance() if steps < max_new_tokens else state.finish()
        token, choice, done_before = (flags[experts + 1 + i * rows : experts + 1 + (i + 1) * rows] for i in range(3))
        if on_token is not None:
            on_token(token, choice, [bool(d) for d in done_before])
        if stop_check is not None:
            hits = _stop_hits(token, done_before, new_ids, eos_ids, stopped, stop_check)
            if hits and steps < max_new_tokens:
                flags = state.stop_rows(hits)
    seconds = time.perf_counter() - started
    return _collect(state.seq, state.chosen, state.defer_p, prompt_len, steps, eos_ids, stopped, writer, helpers,
                    seconds, mode)


def _read_prompt(writer, helpers, seq, mask, positions, prompt_len: int, hidden: bool):
    """The writer reads the prompt, and so do ``helpers``, up front: a deferral then costs one catch-up over the
    tokens written since, not a prompt-length prefill in the middle of decoding. Stats count the helpers'
    prefill apart from the deferrals' calls and tokens. Returns the writer's next-token logits and h."""
    logits, h = writer.advance(seq, mask, positions, prompt_len, hidden=hidden)
    for helper in helpers:
        helper.advance(seq, mask, positions, prompt_len)
        helper.calls, helper.prefill_tokens, helper.tokens = 0, helper.tokens, 0
    return logits, h


def _backbones(base, experts, mode: str, vocab: int, mask: torch.Tensor, static: bool | None, compile: bool,
               reencode: bool):
    """The model that writes every step (the base, or the expert in mode "expert") and the helpers that
    run on demand, each wrapped with its own cache: static (GPU fast path) or growing (plain path)."""
    writer_model = experts[0] if mode == "expert" else base
    helper_models = [] if mode in ("base", "expert") else experts
    if static is None:
        static = mask.device.type == "cuda" and all(supported(m) for m in [writer_model, *helper_models])
    if not static:
        return _Model(writer_model, vocab), [_Model(e, vocab, reencode) for e in helper_models]
    writer = _static(writer_model, vocab, mask, compile)
    helpers = [_static(m, vocab, mask, compile) for m in helper_models]
    for helper in helpers:
        helper.reencode = reencode
    return writer, helpers


def _static(model, vocab: int, mask: torch.Tensor, compile: bool):
    state = runner(model, vocab, mask.shape[0], mask.shape[1], compile=compile)
    state.reset(mask)
    return state


def _layout(prompts: list[list[int]], max_new: int, pad_id: int, device):
    """Left-pad prompts into one (B, P + max_new) matrix; mask and positions cover the new columns too."""
    prompt_len = max(len(p) for p in prompts)
    rows, width = len(prompts), prompt_len + max_new
    seq = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.ones(rows, width, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        seq[row, prompt_len - len(ids) : prompt_len] = torch.tensor(ids, dtype=torch.long)
        mask[row, : prompt_len - len(ids)] = 0
    # The same positions `transformers` gives left-padded rows, so outputs match its `generate` exactly.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return seq, mask, positions, prompt_len


def _route(step: int, log_pz: torch.Tensor, defer_prob: torch.Tensor, threshold: float,
           router: Router | None) -> torch.Tensor:
    """Who writes: 0 for the base, else the most probable expert, where P(Z != base) > threshold."""
    if router is not None:
        return router(step, log_pz)
    return torch.where(defer_prob > threshold, log_pz[:, 1:].argmax(-1) + 1, 0)


def _host_sync(choice: torch.Tensor, done: torch.Tensor, num_experts: int) -> tuple[list[int], bool]:
    """The one device-to-host sync per token: which experts must run this step (1-based), and whether every
    row has finished. Launching an expert forward and stopping are control flow, so the host must know both;
    packing them into one transfer keeps it to one sync (on a GPU each costs a pipeline drain).
    """
    counts = torch.bincount(choice, minlength=num_experts + 1)[1:]
    flags = torch.cat([counts, done.all().long()[None]]).tolist()
    return [k + 1 for k, c in enumerate(flags[:-1]) if c], bool(flags[-1])


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Logits (B, V) -> token (B,): greedy, or temperature + top-p sampling."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    return _sample(F.log_softmax(logits / sampling.temperature, -1), sampling.top_p, generator)


def _sample(log_probs: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    if top_p < 1:
        sorted_lp, order = log_probs.sort(-1, descending=True)
        # drop a token when the tokens above it already reach top_p; the first token always stays
        above = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        sorted_lp = sorted_lp.masked_fill(above >= top_p, float("-inf"))
        log_probs = torch.full_like(log_probs, float("-inf")).scatter(-1, order, sorted_lp)
    return torch.multinomial(log_probs.softmax(-1), 1, generator=generator).squeeze(-1)


def _compose_pick(logits, log_pz, helpers, seq, mask, positions, n, sampling, generator):
    """Pick from the mixture sum_k pi_k P_k; every expert runs every step. Source: argmax_k pi_k P_k(token)."""
    temperature = sampling.temperature if sampling.do_sample else 1.0
    parts = [F.log_softmax(logits / temperature, -1)]
    for helper in helpers:
        expert_logits, _ = helper.advance(seq, mask, positions, n)
        parts.append(F.log_softmax(expert_logits / temperature, -1))
    joint = log_pz[:, :, None] + torch.stack(parts, 1)  # (B, M+1, V)
    mixture = joint.logsumexp(1)
    token = mixture.argmax(-1) if not sampling.do_sample else _sample(mixture, sampling.top_p, generator)
    source = joint.gather(2, token[:, None, None].expand(-1, joint.shape[1], 1)).squeeze(-1).argmax(-1)
    return token, source


def _proxy_pick(logits, helpers, seq, mask, positions, n, sampling, generator):
    """Proxy tuning (Liu et al., 2024): log p_expert + log p_tuned - log p_untuned, where the writer (the
    pair's base) is the tuned small model, helpers[0] the large expert, helpers[1] the untuned small model."""
    temperature = sampling.temperature if sampling.do_sample else 1.0
    expert_logits, _ = helpers[0].advance(seq, mask, positions, n)
    untuned_logits, _ = helpers[1].advance(seq, mask, positions, n)
    scores = sum(sign * F.log_softmax(x / temperature, -1)
                 for sign, x in ((1, expert_logits), (1, logits), (-1, untuned_logits)))
    log_probs = F.log_softmax(scores, -1)
    return log_probs.argmax(-1) if not sampling.do_sample else _sample(log_probs, sampling.top_p, generator)


def _stop_hits(token: list[int], done_before: list[int], new_ids: list[list[int]], eos_ids, stopped: list,
               stop_check) -> list[int]:
    """Append this step's tokens to the host copies of the rows and return the rows that a stop string ends
    now (host work, done only when stop strings are given); rows already done or ending on EOS are skipped."""
    hits = []
    for row, ids in enumerate(new_ids):
        ids.append(token[row])
        if not done_before[row] and token[row] not in eos_ids and (hit := stop_check(row, ids)) is not None:
            stopped[row] = (hit, len(ids))
            hits.append(row)
    return hits


def _collect(seq, chosen, defer_p, prompt_len, steps, eos_ids, stopped, writer, helpers, seconds, mode):
    token_ids, sources, probs = [], [], []
    for row in range(seq.shape[0]):
        ids = seq[row, prompt_len : prompt_len + steps].tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))
        if stopped[row] is not None:
            end = min(end, stopped[row][1])
        token_ids.append(ids[:end])
        src = chosen[row, :end].tolist()
        sources.append([1] * end if mode == "expert" else src)
        probs.append(defer_p[row, :end].tolist())
    new = sum(len(t) for t in token_ids)
    deferred = sum(sum(1 for s in src if s) for src in sources)
    expert_calls = writer.calls if mode == "expert" else sum(h.calls for h in helpers)
    stats = {
        "new_tokens": new,
        "deferred_tokens": deferred,
        "defer_rate": deferred / new if new else 0.0,
        "expert_calls": expert_calls,
        "expert_tokens": writer.tokens if mode == "expert" else sum(h.tokens for h in helpers),
        "expert_prefill_tokens": sum(h.prefill_tokens for h in helpers),
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": new / seconds if seconds > 0 else 0.0,
    }
    return Decoded(token_ids, sources, probs, [s[0] if s else None for s in stopped], stats)
