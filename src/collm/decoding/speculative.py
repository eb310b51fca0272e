"""Co-LLM's greedy answer with fewer expert reads: the base drafts past a deferral and the expert checks the draft.

At a deferred position plain Co-LLM (collm.decoding.engine) calls the expert once for that one token, so a
token costs t_base + f * t_expert. But the expert's greedy token there is often the base's own, and at batch 1
a model reads several tokens in about the time it reads one (its weights are read once either way). So here,
at a deferral, the base writes on: it drafts up to ``lookahead`` tokens from the deferred one, its head routing
each as usual, with its own greedy token standing in at deferred positions. Each expert then reads the draft in
one call and gives its greedy token at every position routed to it. The draft is kept up to the first deferred
position where the expert writes another token; that token is written, the rest of the draft is dropped, and
every cache is cut back to the tokens kept.

This is speculative decoding with Co-LLM itself as the target: the tokens, and who wrote each, are exactly those
of greedy Co-LLM (tested against the engine in float32). In bfloat16 a read of several tokens rounds otherwise
than reads of one, so where the expert's top two logits tie the two can part, as a batch's padding parts the
engine's own answers. ``lookahead=1`` checks each deferral at once: plain Co-LLM's schedule. A head that
defers everywhere (``generate(mode="expert", lookahead=k)``) makes this plain speculative decoding: the base
drafts every token and the answer is the expert's. It applies where speculative decoding does: greedy, one
answer at a time (prompts are answered in turn), in-process models (a completions server gives no
token-by-token greedy verdict over a draft).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from collm.backends.hf import output_logits, split_decoder
from collm.backends.prepack import available, prepacked
from collm.core.head import DeferralHead
from collm.core.routing import defer_prob, route
from collm.decoding.detok import Detokenizer
from collm.errors import CollmError


@dataclass
class SpecStats:
    """What the drafting saved and cost (summed over the prompts)."""

    base_reads: int = 0
    """Forward calls of the base after the prompt (one per drafted or written token, plus one per re-read)."""
    expert_calls: int = 0
    """Expert reads that checked a draft (at most one per expert per check; none where the expert's last read
    already gave its token)."""
    expert_tokens: int = 0
    """Token positions those reads covered."""
    expert_prefill_tokens: int = 0
    checked: int = 0
    """Deferred positions the experts checked."""
    rejected: int = 0
    """Checks that ended at a position where the expert wrote another token than the base's draft."""
    discarded: int = 0
    """Drafted tokens dropped after such a position (the base's wasted work)."""
    steps: int = 0
    seconds: float = 0.0


class _Model:
    """One in-process causal LM on its own cache, one row, no padding: read columns, give per-column outputs, cut.

    A column's *output* is what the next-token logits are made from: the last hidden state where the logits are
    the output embedding applied to it (computed only for the columns whose token is needed), else the logits."""

    def __init__(self, model: torch.nn.Module, vocab: int):
        self.model, self.vocab = model, vocab
        self.cache = DynamicCache(config=model.config)
        self.seen = 0
        self.decoder = split_decoder(model)
        self.hidden: torch.Tensor | None = None  # the last read's last hidden states (len, H)

    def read(self, ids: list[int]) -> torch.Tensor:
        """Read ``ids`` at columns [seen, seen + len); returns their outputs (len, ...)."""
        device = next(self.model.parameters()).device
        start, end = self.seen, self.seen + len(ids)
        kwargs = dict(input_ids=torch.tensor([ids], device=device),
                      attention_mask=torch.ones(1, end, dtype=torch.long, device=device),
                      position_ids=torch.arange(start, end, device=device)[None], cache=self.cache, use_cache=True)
        self.seen = end
        if self.decoder is not None:
            self.hidden = self.decoder(**kwargs).last_hidden_state[0]
            return self.hidden
        out = self.model(**kwargs, output_hidden_states=True, logits_to_keep=0)
        self.hidden = out.hidden_states[-1][0]
        return out.logits[0, :, : self.vocab].float()

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """(n, vocab) float32 next-token logits from outputs (n, ...) that ``read`` returned."""
        if self.decoder is None:
            return outputs
        return output_logits(self.model, outputs, self.vocab)

    def cut(self, columns: int) -> None:
        """Forget every column from ``columns`` on."""
        if columns >= self.seen:
            return
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[:, :, :columns], layer.values[:, :, :columns]
        self.seen = columns


def check_lookahead(lookahead) -> None:
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 1:
        raise CollmError(f"lookahead must be a whole number of tokens >= 1, got {lookahead!r}")


def check_settings(lookahead, *, do_sample=False, stop=(), mode="collm", router=None, compile=False) -> None:
    """Refuse a lookahead with settings the drafting cannot keep (before any model is loaded)."""
    check_lookahead(lookahead)
    unsupported = [name for name, used in (("sampling", do_sample), ("stop strings", stop),
                                           ("a router", router is not None), ("compile", compile),
                                           (f"mode {mode!r}", mode not in ("collm", "expert"))) if used]
    if unsupported:
        raise CollmError(f"lookahead drafts greedy Co-LLM (or the expert's answer, mode 'expert') only; it cannot "
                         f"be combined with {unsupported[0]}: drop lookahead for that")


def check(base, experts, head: DeferralHead | None, lookahead: int) -> None:
    """Refuse what the drafting cannot do, in one line each."""
    check_lookahead(lookahead)
    if not experts or head is None:
        raise CollmError("speculative Co-LLM needs an expert and a head")
    for name, model in [("base", base), *((f"expert {k}", m) for k, m in enumerate(experts, 1))]:
        if not isinstance(model, torch.nn.Module):
            raise CollmError(f"speculative Co-LLM needs in-process models; the {name} is served elsewhere: "
                             "drop lookahead to decode with it")
        if getattr(model.config, "is_encoder_decoder", False):
            raise CollmError(f"the {name} is not a causal LM")


@torch.inference_mode()
def speculative_decode(base, experts: list, head: DeferralHead, prompts: list[list[int]], *, max_new_tokens: int,
                       threshold: float, vocab: int, eos_ids: tuple[int, ...] = (), tokenizer=None,
                       lookahead: int = 4, prepack: bool | None = None, pad_id: int = 0, on_token=None):
    """Greedy Co-LLM over ``prompts``, one at a time, with the expert checking drafts of up to ``lookahead``
    tokens. Returns :class:`collm.decoding.decode.Decoded` with the same tokens, sources and defer
    probabilities as :func:`collm.decoding.decode.decode` gives greedily, and its stats plus the drafting's.
    ``on_token(tokens, sources, done)`` as for ``decode``, once per token as it is kept (after a check, the
    draft's kept tokens come at once), with the rows not being answered marked done."""
    from collm.decoding.decode import Decoded  # the collected output type (decode imports the engine)

    check(base, experts, head, lookahead)
    device = next(base.parameters()).device
    use_prepack = available(device) if prepack is None else prepack
    stats = SpecStats()
    out = Decoded([], [], [], [None] * len(prompts), [])
    with prepacked([base, *experts]) if use_prepack else nullcontext():
        for row, prompt in enumerate(prompts):
            emit = None
            if on_token is not None:
                def emit(token: int, source: int, row=row) -> None:
                    tokens, sources = [pad_id] * len(prompts), [0] * len(prompts)
                    tokens[row], sources[row] = token, source
                    on_token(tokens, sources, [r != row for r in range(len(prompts))])
            started = time.perf_counter()
            tokens, sources, probs = _one(base, experts, head, list(prompt), max_new_tokens, threshold, vocab,
                                          set(eos_ids), lookahead, stats, emit)
            stats.seconds += time.perf_counter() - started
            out.token_ids.append(tokens)
            out.sources.append(sources)
            out.defer_probs.append(probs)
            out.texts.append(_text(tokenizer, tokens))
    new = sum(len(t) for t in out.token_ids)
    deferred = sum(sum(1 for s in src if s) for src in out.sources)
    out.stats = {"new_tokens": new, "deferred_tokens": deferred, "defer_rate": deferred / new if new else 0.0,
                 **{k: getattr(stats, k) for k in SpecStats.__dataclass_fields__},
                 "tokens_per_s": new / stats.seconds if stats.seconds else 0.0, "lookahead": lookahead}
    return out


def _text(tokenizer, tokens: list[int]) -> str:
    if tokenizer is None:
        return ""
    detok = Detokenizer(tokenizer)
    return "".join(detok.add(t) for t in tokens) + detok.flush()


def _one(base, experts, head, prompt, max_new, threshold, vocab, eos, lookahead, stats, emit=None):
    """One answer. ``seq`` is the prompt and the tokens kept; ``draft`` the positions after it, each
    (writer, P(defer), the base's greedy token, or None where it was not needed)."""
    b = _Model(base, vocab)
    out = b.read(prompt)[-1:]  # the base's output at the last column: its state before the next position
    ex = [_Model(e, vocab) for e in experts]
    tails = []  # each expert's output at its last column read: its prediction for column ``seen``
    for e in ex:
        tails.append(e.read(prompt)[-1])
        stats.expert_prefill_tokens += len(prompt)
    seq, tokens, sources, probs = list(prompt), [], [], []
    draft: list[tuple[int, float, int | None]] = []
    while len(tokens) < max_new:
        stats.steps += 1
        hidden = b.hidden[-1:]
        logits = b.logits(out) if head.needs_logits or b.decoder is None else None
        log_pz = head.log_probs(head.inputs(hidden, logits))
        p = float(defer_prob(log_pz)[0])
        writer = int(route(log_pz, threshold)[0])
        room = len(tokens) + len(draft) + 1 < max_new
        go_on = room and len(draft) + 1 < lookahead
        guess = None
        if writer == 0 or go_on:  # the base's own token: written, or the draft's stand-in for the expert's
            logits = b.logits(out) if logits is None else logits
            guess = int(logits[0].argmax())
        if writer == 0 and not draft:  # no deferral pending: the base's token is final
            seq.append(guess), tokens.append(guess), sources.append(0), probs.append(p)
            if emit is not None:
                emit(guess, 0)
            if guess in eos:
                break
            if room:
                out = b.read([guess])
                stats.base_reads += 1
            continue
        draft.append((writer, p, guess))
        if go_on and guess not in eos:
            out = b.read([guess])
            stats.base_reads += 1
            continue
        # check the draft: each expert reads it once, up to its last position routed to it
        start = len(seq)
        guesses = [g for _, _, g in draft]
        verdict: dict[int, int] = {}
        for k, e in enumerate(ex, 1):
            mine = [i for i, (w, _, _) in enumerate(draft) if w == k]
            if not mine:
                continue
            last = start + mine[-1]  # the expert reads columns [seen, last) for its token at column ``last``
            before = e.seen
            outputs = e.read(seq[before:] + guesses[: mine[-1]]) if last > before else None  # columns [before, last)
            stats.expert_calls += outputs is not None
            stats.expert_tokens += last - before
            rows = [tails[k - 1] if start + i == before else outputs[start + i - before - 1] for i in mine]
            picked = e.logits(torch.stack(rows)).argmax(-1).tolist()
            if outputs is not None:
                tails[k - 1] = outputs[-1]
            verdict.update(zip(mine, picked))
            stats.checked += len(mine)
        kept, finished, rejected = 0, False, False
        for i, (w, p_i, g) in enumerate(draft):
            token = g if w == 0 else verdict[i]
            seq.append(token), tokens.append(token), sources.append(w), probs.append(p_i)
            kept += 1
            if emit is not None:
                emit(token, w)
            if token in eos:
                finished = True
                break
            if w and token != g:  # the expert writes another token (or the draft ended here): drop the rest
                rejected = True
                stats.rejected += g is not None
                break
        stats.discarded += len(draft) - kept
        draft = []
        if finished or len(tokens) >= max_new:
            break
        # every cache keeps only the columns whose tokens were kept; then the base reads what it lacks
        valid = len(seq) - 1 if rejected else len(seq)
        for k, e in enumerate(ex, 1):
            if e.seen > valid:
                e.cut(valid)
                tails[k - 1] = None  # not needed: the next check starts past column ``valid`` and re-reads it
        b.cut(valid)
        out = b.read(seq[b.seen:])[-1:]
        stats.base_reads += 1
    return tokens, sources, probs
