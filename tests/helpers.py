"""Decoding helpers shared by the test modules: ragged prompts, random heads, and the slow reference loop."""

from __future__ import annotations

import torch
from conftest import EOS_ID

from collm import DeferralHead

PROMPTS = [[1, 40, 41, 42, 60, 61], [1, 50, 51], [1, 70, 71, 72, 73, 74, 75, 76, 77]]  # ragged on purpose
NEW = 24


def random_head(hidden: int, num_experts: int = 1, scale: float = 3.0, seed: int = 7) -> DeferralHead:
    """A head with random weights whose defer probabilities straddle 0.5, so routing is mixed."""
    torch.manual_seed(seed)
    head = DeferralHead(hidden, num_experts)
    with torch.no_grad():
        head.linear.weight.normal_(0, scale / hidden**0.5)
    return head


@torch.no_grad()
def reference(base, experts, head, prompt, new, threshold) -> tuple[list[int], list[int]]:
    """The slow loop: every step re-encodes the whole prefix with each model, no caches at all."""
    seq, tokens, sources = list(prompt), [], []
    for _ in range(new):
        x = torch.tensor([seq])
        out = base(x, output_hidden_states=True)
        log_pz = head.log_probs(head.inputs(out.hidden_states[-1][:, -1], out.logits[:, -1]))[0]
        defer_prob = 1 - log_pz[0].exp()
        source = int(log_pz[1:].argmax()) + 1 if defer_prob > threshold else 0
        logits = out.logits[0, -1] if source == 0 else experts[source - 1](x).logits[0, -1]
        token = int(logits.argmax())
        seq.append(token), tokens.append(token), sources.append(source)
        if token == EOS_ID:
            break
    return tokens, sources


@torch.no_grad()
def feature_head(base, num_experts: int = 1) -> DeferralHead:
    """A random head that also reads the base's entropy, top probability and margin, weighted by their spread
    on the prompts so that they move the routing (a head on the hidden state alone routes differently)."""
    from collm.core.head import distribution_features

    hidden = base.config.hidden_size
    head = DeferralHead(hidden, num_experts, "entropy,max_prob,margin")
    logits = torch.cat([base(torch.tensor([p])).logits[0] for p in PROMPTS])
    f = distribution_features(logits, head.features)
    weights = torch.tensor([2.0, 0.0, -1.0]) / f.std(0)
    torch.manual_seed(3)
    head.linear.weight.normal_(0, 1.0 / hidden**0.5)
    head.linear.weight[:, hidden:] = weights
    head.linear.bias.fill_(-float(weights @ f.mean(0)))
    return head
