"""Training losses as pure functions: the Co-LLM marginal likelihood and the weak-supervision terms.

Shapes use ``...`` for any leading dims (``(B, T)`` for padded sequences, ``(N,)`` for cached tokens).
Head logits follow :class:`collm.core.head.DeferralHead`: ``(..., 1)`` with one expert (a sigmoid),
``(..., M+1)`` with M experts (a softmax ordered [base, expert1, ...]).
Everything stays in log space: probabilities of gold tokens are often far below float32's resolution.
"""

from __future__ import annotations

import math

import torch

from collm.core.head import logits_to_log_probs
from collm.errors import CollmError


def defer_log_probs(head_logits: torch.Tensor) -> torch.Tensor:
    """Log π over writers, ``(..., M+1)`` ordered [base, expert1, ...], from head logits.

    One expert: logits ``(..., 1)`` are the log-odds of deferring, so log π = [logσ(−z), logσ(z)].
    The same map the head applies at decoding time, so training and decoding cannot disagree.
    """
    return logits_to_log_probs(head_logits)


def defer_prob(head_logits: torch.Tensor) -> torch.Tensor:
    """P(Z_t ≠ base), ``(...)``: the probability that some expert writes the token."""
    return -torch.expm1(defer_log_probs(head_logits)[..., 0])


def _writer_log_probs(base_logp: torch.Tensor, expert_logp: torch.Tensor) -> torch.Tensor:
    """Stack gold log-probs into ``(..., M+1)``; the experts' are detached (they are fixed targets)."""
    if expert_logp.dim() == base_logp.dim():
        expert_logp = expert_logp.unsqueeze(-1)
    if expert_logp.shape[:-1] != base_logp.shape:
        raise CollmError(f"expert log-probs {tuple(expert_logp.shape)} do not match base {tuple(base_logp.shape)}")
    return torch.cat([base_logp.unsqueeze(-1), expert_logp.detach().to(base_logp.dtype)], dim=-1)


def marginal_token_nll(head_logits: torch.Tensor, base_logp: torch.Tensor, expert_logp: torch.Tensor) -> torch.Tensor:
    """Per-token −log Σ_k π_t,k P_k(x_t), ``(...)``.

    head_logits: ``(..., 1)`` or ``(..., M+1)``; base_logp: ``(...)`` log P_base(gold);
    expert_logp: ``(...)`` for one expert or ``(..., M)``. Computed in float32 at least, because bf16
    logsumexp loses the small mixture terms that carry the gradient for rare deferrals.
    """
    log_pi = defer_log_probs(head_logits.float())
    writers = _writer_log_probs(base_logp.float(), expert_logp.float())
    if log_pi.shape != writers.shape:
        raise CollmError(f"head gives {log_pi.shape[-1]} writers but the scores give {writers.shape[-1]}")
    return -torch.logsumexp(log_pi + writers, dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor,
                num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Σ values·mask / num_tokens (default mask.sum()).

    Pass ``num_tokens`` = completion tokens in the whole accumulation window (all micro-batches, all
    processes) so that the summed micro-batch losses average over tokens, not over micro-batches.
    Masked positions are selected out, not multiplied by 0, so an inf there cannot turn the sum into nan
    (keep them finite anyway: a nan's backward can still leak through the op that made it).
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    if num_tokens is None:
        num_tokens = mask.sum()
    return total / torch.clamp(torch.as_tensor(num_tokens, dtype=values.dtype, device=values.device), min=1)


def marginal_nll(
    head_logits: torch.Tensor,
    base_logp: torch.Tensor,
    expert_logp: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The Co-LLM loss: mean over completion tokens (``mask``) of −log Σ_k π_t,k P_k(x_t). Scalar."""
    return masked_mean(marginal_token_nll(head_logits, base_logp, expert_logp), mask, num_tokens)


def lm_nll(base_logp: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Plain fine-tuning loss (the SFT baseline): mean −log P_base(gold) over completion tokens."""
    return masked_mean(-base_logp.float(), mask, num_tokens)


def weak_labels(
    base_correct: torch.Tensor, expert_correct: torch.Tensor, expert_logp: torch.Tensor | None = None
) -> torch.Tensor:
    """Pseudo-labels Z_t (long, ``(...)``): 0 = base, k = expert k.

    Z_t = k where expert k's argmax is the gold token and the base's is not (the paper's weak supervision).
    base_correct: ``(...)`` bool; expert_correct: ``(...)`` or ``(..., M)`` bool. With several experts right,
    the one giving gold the highest log-prob wins (``expert_logp``), else the first.
    """
    if expert_correct.dim() == base_correct.dim():
        expert_correct = expert_correct.unsqueeze(-1)
    expert_correct = expert_correct.bool()
    if expert_logp is None:
        score = expert_correct.float()
    else:
        if expert_logp.dim() == base_correct.dim():
            expert_logp = expert_logp.unsqueeze(-1)
        score = torch.where(expert_correct, expert_logp.float(), torch.full_like(expert_logp.float(), -torch.inf))
    best = score.argmax(dim=-1) + 1
    any_right = expert_correct.any(dim=-1)
    return torch.where(any_right & ~base_correct.bool(), best, torch.zeros_like(best))


def disagreement_labels(base_correct: torch.Tensor, expert_correct: torch.Tensor,
                        expert_logp: torch.Tensor | None = None, below: float | None = None) -> torch.Tensor:
    """Pseudo-labels Z_t (long, ``(...)``): 1 where exactly one of base and expert has the gold token as argmax.

    On text one of the two models wrote greedily, these are the positions where the other model would have
    written another token: on the base's own solutions, where the expert disagrees with it (labels the paper's
    rule can never give there, since the base is always right on its own greedy text); on the expert's, where
    the base would stray. One expert only: with several, which one should write is not defined by agreement.

    ``below``: where the base has gold as argmax and the expert does not, keep the label only where the expert
    gives gold a probability below ``below`` (``expert_logp``: its gold log-probs), so a disagreement on wording
    the expert also finds likely is not a deferral.
    """
    if expert_correct.dim() > base_correct.dim():
        if expert_correct.shape[-1] != 1:
            raise ValueError("disagreement labels are defined for one expert")
        expert_correct = expert_correct.squeeze(-1)
        expert_logp = None if expert_logp is None else expert_logp.squeeze(-1)
    labels = base_correct.bool() ^ expert_correct.bool()
    if below is not None:
        if expert_logp is None:
            raise ValueError("below needs the expert's gold log-probs")
        rejected = base_correct.bool() & ~expert_correct.bool()
        labels &= ~rejected | (expert_logp < math.log(below))
    return labels.long()


def class_weights(labels: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``(num_classes,)`` normalised so the mean token weight is 1.

    Deferral labels are rare (a few percent); unweighted BCE would learn "never defer".
    Classes absent from the data get weight 0 (no token carries them anyway).
    """
    counts = torch.bincount(labels[mask.bool()].flatten(), minlength=num_classes).float()
    present = counts > 0
    weights = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights


def weak_bce(
    head_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-weighted cross-entropy of the head against pseudo-labels; BCE for one expert. Scalar.

    ``weights`` (``(M+1,)``, from :func:`class_weights`) scale each token by its label's weight;
    the mean is over ``num_tokens`` (default the masked count), as in :func:`masked_mean`.
    """
    log_pi = defer_log_probs(head_logits.float())
    token_nll = -log_pi.gather(-1, labels.long().clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if weights is not None:
        token_nll = token_nll * weights.to(token_nll.device)[labels.long().clamp(min=0)]
    return masked_mean(token_nll, mask, num_tokens)


def gold_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target], ``(...)``, without materialising the full log-softmax.

    logits: ``(..., V)``; targets: ``(...)`` (padding ids may be anything in range).
    """
    return gold_outputs(logits, targets)[0]


# The reference implementation's tie rule: gold is the model's greedy choice when its log-probability is
# isclose to the maximum. bf16/fp16 logits tie exactly often; the lowest-index argmax then labels "wrong".
ARGMAX_RTOL = 1e-5


def argmax_is_gold(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether the gold token is a greedy choice of the model, ``(...)`` bool: its log-probability ties the
    maximum (``isclose``, rtol :data:`ARGMAX_RTOL`), whichever index ``argmax`` would return."""
    return gold_outputs(logits, targets)[1]


def gold_outputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`gold_log_probs`, :func:`argmax_is_gold`) with one logsumexp over the vocabulary."""
    logits = logits.float()
    norm = torch.logsumexp(logits, dim=-1)
    gold = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - norm
    best = logits.max(dim=-1).values - norm
    return gold, torch.isclose(gold, best, rtol=ARGMAX_RTOL)
