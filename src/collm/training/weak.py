"""The base's own pass over the data, and the weak-supervision start of the deferral head.

Pseudo-labels (Shen et al. 2024, §3.3): Z_t = 1 where the expert's argmax is the gold token and the base's
is not. The head is fitted to them on the base's hidden states with class-weighted BCE, inside the training
process (the paper's code found the head in a first run ending in ``sys.exit()``), and the marginal
likelihood then starts from a head that already defers roughly where it should.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from collm.core.head import DeferralHead
from collm.data.rows import Example
from collm.training.loss import class_weights, defer_prob, weak_bce
from collm.training.score import pad_batch, target_outputs, token_batches


@dataclass
class RowOutputs:
    """The base's outputs at one row's targets (CPU tensors)."""

    base_logp: torch.Tensor  # (n,) float32
    base_hit: torch.Tensor  # (n,) bool
    hidden: torch.Tensor | None  # (n, H) float32 (the head's input, (n, H + F) with features), when asked for


@torch.inference_mode()
def base_pass(model, examples: list[Example], rows: list[int], *, batch_tokens: int, pad_id: int, device,
              hidden: bool, autocast=None, features: tuple[str, ...] = ()) -> dict[int, RowOutputs]:
    """Run the (current) base over ``rows`` without gradients; returns outputs by row index.

    Used for the pseudo-labels (base argmax), the weak start (hidden states) and the frozen-base cache. With a
    head's ``features`` the hidden states come with those features of the base's distribution appended.
    """
    order = sorted(rows, key=lambda i: (-len(examples[i].input_ids), i))
    out = {}
    for batch in token_batches(order, examples, batch_tokens):
        ids, attention, targets = pad_batch([examples[i] for i in batch], pad_id)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            logp, hit, h = target_outputs(model, ids.to(device), attention.to(device), targets.to(device),
                                          features=features)
        counts = [examples[i].num_targets for i in batch]
        parts = zip(logp.float().cpu().split(counts), hit.cpu().split(counts), h.float().cpu().split(counts))
        for i, (a, b, c) in zip(batch, parts):
            out[i] = RowOutputs(a.clone(), b.clone(), c.clone() if hidden else None)
    return out


@dataclass
class WeakFit:
    """What the weak start did, for the log and the run config."""

    tokens: int
    positive_rate: float
    """Fraction of target tokens labelled "defer" (any expert right where the base is wrong)."""
    loss: float
    defer_rate: float
    """Fraction of tokens where the fitted head's P(defer) > 0.5."""


def fit_weak_start(head: DeferralHead, hidden: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float,
                   batch: int, seed: int) -> WeakFit:
    """Fit ``head`` in place to pseudo-labels on cached hidden states (N, H) with class-weighted BCE.

    Runs on the head's device; deterministic for a given seed. Rare positives are up-weighted so the head
    does not settle on "never defer".
    """
    device = head.linear.weight.device
    hidden, labels = hidden.to(device), labels.to(device)
    mask = torch.ones_like(labels, dtype=torch.bool)
    weights = class_weights(labels, mask, head.num_experts + 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    for _ in range(steps):
        pick = torch.randint(0, n, (min(batch, n),), generator=generator).to(device)
        loss = weak_bce(head(hidden[pick]), labels[pick], mask[pick], weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.zero_grad(set_to_none=True)  # leftover grads would leak into the first training step
    with torch.no_grad():
        logits = head(hidden)
        loss = float(weak_bce(logits, labels, mask, weights))
        defer_rate = float((defer_prob(logits) > 0.5).float().mean())
    return WeakFit(n, float((labels > 0).float().mean()), loss, defer_rate)
