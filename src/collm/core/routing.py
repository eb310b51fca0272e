"""The routing rule: who writes the next token, from the head's log-probabilities. One place, used by the
step-by-step loop, the fused device step and the evaluation's baselines."""

from __future__ import annotations

import torch


def defer_prob(log_pz: torch.Tensor) -> torch.Tensor:
    """Head log-probs (..., M+1) over [base, experts] -> P(Z != base) (...,), computed as 1 - P(base)."""
    return -torch.expm1(log_pz[..., 0])


def most_probable_expert(log_pz: torch.Tensor) -> torch.Tensor:
    """(..., M+1) -> the 1-based index of the most probable expert (...,); ties go to the lowest index."""
    return log_pz[..., 1:].argmax(-1) + 1


def route(log_pz: torch.Tensor, threshold: torch.Tensor | float,
          defer_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Who writes: 0 (the base), or the most probable expert where P(Z != base) > threshold.
    ``threshold`` is a number or a per-row tensor; ``defer_probs`` may pass :func:`defer_prob` already computed."""
    defer_probs = defer_prob(log_pz) if defer_probs is None else defer_probs
    return torch.where(defer_probs > threshold, most_probable_expert(log_pz), 0)
