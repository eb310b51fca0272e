"""Logits -> tokens: greedy for every greedy row at once, and seeded temperature / top-p sampling per row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from collm.core.request import Sampling


def pick(logits: torch.Tensor, sampling: list[Sampling], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Logits (B, V) -> tokens (B,). Each sampling row draws from its own generator, so a row's tokens do not
    depend on what else is in the batch."""
    tokens = logits.argmax(-1)
    for row, (settings, generator) in enumerate(zip(sampling, generators)):
        if settings.do_sample:
            log_probs = F.log_softmax(logits[row : row + 1] / settings.temperature, -1)
            tokens[row] = sample(log_probs, settings.top_p, generator)[0]
    return tokens


def pick_log_probs(log_probs: torch.Tensor, sampling: list[Sampling],
                   generators: list[torch.Generator | None]) -> torch.Tensor:
    """Like :func:`pick` for scores that are already log-probabilities at the rows' temperatures."""
    tokens = log_probs.argmax(-1)
    for row, (settings, generator) in enumerate(zip(sampling, generators)):
        if settings.do_sample:
            tokens[row] = sample(log_probs[row : row + 1], settings.top_p, generator)[0]
    return tokens


def generator_for(settings: Sampling, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(settings.seed) if settings.do_sample else None


def sample(log_probs: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Draw from (B, V) log-probabilities, keeping the nucleus of mass ``top_p``."""
    return torch.multinomial(nucleus(log_probs, top_p).softmax(-1), 1, generator=generator).squeeze(-1)


def nucleus(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) log-probabilities with the tokens outside the nucleus of mass ``top_p`` set to -inf."""
    if top_p >= 1:
        return log_probs
    sorted_lp, order = log_probs.sort(-1, descending=True)
    # drop a token when the tokens above it already reach top_p; the first token always stays
    above = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    sorted_lp = sorted_lp.masked_fill(above >= top_p, float("-inf"))
    return torch.full_like(log_probs, float("-inf")).scatter(-1, order, sorted_lp)


def distribution(logits: torch.Tensor, settings: Sampling) -> torch.Tensor:
    """(V,) the probabilities a sampling row draws its token from, given the model's logits (V,): what
    :func:`pick` samples from. Speculative sampling compares two of them (collm.decoding.engine)."""
    return nucleus(F.log_softmax(logits[None] / settings.temperature, -1), settings.top_p)[0].softmax(-1)
