"""Scoring across tokenizers: the expert's probability of the base's tokens, from its probability of the same text.

The objective needs P_expert(x_t) for each of the base's completion tokens x_t. An expert with another tokenizer
cuts the same completion text into other tokens, so each row is aligned by characters:

- the completion is written once per tokenizer (its own chat template); the text both writings share from the
  start (the answer itself) is aligned character by character, and what follows it (each template's end of
  turn, an appended EOS) is the "end" of both;
- each expert token's log-probability is spread over the base tokens its characters fall in, in proportion to
  how many of its characters each one holds (an expert token inside one base token gives all of it to that
  token; one that straddles a base boundary — the seam — splits), and the expert's end tokens are spread evenly
  over the base's end tokens.

So Σ_t log P_expert(x_t) over a row is the expert's log-probability of the whole completion as it writes it: the
objective compares the two models on the same text, the seam splits a token's probability instead of counting
it twice or not at all, and a row where both tokenizers agree gets exactly the per-token scores of one
tokenizer. "The expert's argmax is gold" holds for a base token where it holds for every expert token that
reaches it. This is the character-level alignment of cross-tokenizer distillation, chosen over aligning words
(GSM solutions are mostly numbers and symbols, which word alignment handles worst) and over the exact
marginal over the expert's tokenizations of a base token's text (exponentially many, and not what the expert
writes when it decodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from collm.data.rows import DataConfig, Example, read_rows, render_row, target_positions
from collm.errors import CollmError


@dataclass
class Aligned:
    """One row for the expert: its own tokens (``example``, targets = its completion tokens), and ``weights``
    (base targets, expert targets): the share of each expert target's log-probability each base target gets."""

    example: Example
    weights: torch.Tensor


def spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``text``'s token ids (no special tokens added) and each token's character span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def weights(base: list[tuple[int, int]], expert: list[tuple[int, int]], shared: int) -> torch.Tensor:
    """(len(base), len(expert)) weights: expert token j's characters below ``shared`` go to the base tokens
    holding them, its characters past ``shared`` (the end of turn) evenly to the base tokens that reach past it
    (the last base token where none does). A token without characters goes where it stands. Each column sums
    to 1."""
    w = torch.zeros(len(base), len(expert), dtype=torch.float64)
    if not base:
        return w
    end_rows = [t for t, (a, b) in enumerate(base) if b > shared or a >= shared] or [len(base) - 1]
    for j, (s, e) in enumerate(expert):
        if e <= s:  # no characters (a special token): to the base token at its place
            holder = next((t for t, (a, b) in enumerate(base) if a <= s < b), None) if s < shared else None
            rows = [holder] if holder is not None else end_rows
            w[rows, j] = 1.0 / len(rows)
            continue
        for t, (a, b) in enumerate(base):
            overlap = min(b, e, shared) - max(a, s)
            if overlap > 0:
                w[t, j] = overlap / (e - s)
        past = e - max(s, shared)
        if past > 0:
            w[end_rows, j] += past / (e - s) / len(end_rows)
    return w


def align_row(row: dict, base_tokenizer, expert_tokenizer, config: DataConfig, where: str = "row") -> Aligned:
    """The expert's example of ``row`` and the weights from its completion tokens to the base's targets (the
    base's example as :func:`collm.data.rows.encode_file` makes it: same truncation, same targets)."""
    b_prompt, b_special, b_text, b_eos = render_row(row, base_tokenizer, config, where)
    e_prompt, e_special, e_text, e_eos = render_row(row, expert_tokenizer, config, where)
    b_prompt_len = len(base_tokenizer(b_prompt, add_special_tokens=b_special)["input_ids"])
    e_prompt_ids = list(expert_tokenizer(e_prompt, add_special_tokens=e_special)["input_ids"])
    b_ids, b_spans = spans(base_tokenizer, b_text)
    e_ids, e_spans = spans(expert_tokenizer, e_text)
    if b_eos is not None:
        b_ids, b_spans = b_ids + [b_eos], b_spans + [(len(b_text), len(b_text))]
    if e_eos is not None:
        e_ids, e_spans = e_ids + [e_eos], e_spans + [(len(e_text), len(e_text))]
    shared = 0
    while shared < min(len(b_text), len(e_text)) and b_text[shared] == e_text[shared]:
        shared += 1
    # end-of-text tokens (an appended EOS) lie past the shared text even when the texts are equal
    b_spans = [(a, b) if not (a == b == len(b_text)) else (shared, shared + 1) for a, b in b_spans]
    e_spans = [(a, b) if not (a == b == len(e_text)) else (shared, shared + 1) for a, b in e_spans]
    w = weights(b_spans, e_spans, shared)
    b_targets = target_positions(b_prompt_len, len(b_ids), config.max_len)
    e_targets = target_positions(len(e_prompt_ids), len(e_ids), len(e_prompt_ids) + len(e_ids))
    if len(e_targets) < len(e_ids):
        raise CollmError(f"{where}: the expert's prompt is empty in its own tokenization; give rows with a prompt")
    ids = e_prompt_ids + e_ids
    mask = [False] * len(e_prompt_ids) + [True] * len(e_ids)
    return Aligned(Example(ids, mask), w[b_targets].float())


def align_file(path: str | Path, base_tokenizer, expert_tokenizer, config: DataConfig) -> list[Aligned]:
    """Every row of ``path`` that keeps a base target (the rows :func:`collm.data.rows.encode_file` keeps, in
    its order), aligned for the expert."""
    out = []
    for i, row in enumerate(read_rows(path)):
        aligned = align_row(row, base_tokenizer, expert_tokenizer, config, f"{path} row {i + 1}")
        if aligned.weights.shape[0]:
            out.append(aligned)
    return out


def base_outputs(aligned: Aligned, gold: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The base targets' (log P_expert, argmax-is-gold) from the expert targets' ``gold`` and ``right``."""
    w = aligned.weights.to(gold.device)
    logp = w @ gold.float()
    reached = w > 0
    return logp, ~(reached & ~right.bool()[None, :]).any(1)
