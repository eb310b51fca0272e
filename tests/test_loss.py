"""The loss identities: the marginal likelihood's limits, masking, a float64 brute force, M experts, gradients."""

import math

import pytest
import torch

from collm.errors import CollmError
from collm.training.loss import (
    class_weights,
    defer_prob,
    disagreement_labels,
    gold_log_probs,
    lm_nll,
    marginal_nll,
    marginal_token_nll,
    weak_bce,
    weak_labels,
)


def _case(b=3, t=7, m=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    base_logp = torch.log_softmax(torch.randn(b, t, 11, generator=g), -1)[..., 0]
    expert_logp = torch.log_softmax(torch.randn(b, t, m, 11, generator=g), -1)[..., 0]
    head = torch.randn(b, t, 1 if m == 1 else m + 1, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    return head, base_logp, expert_logp.squeeze(-1) if m == 1 else expert_logp, mask


def test_pi_to_zero_gives_base_nll():
    _, base, expert, mask = _case()
    head = torch.full(mask.shape + (1,), -60.0)
    assert torch.allclose(marginal_nll(head, base, expert, mask), lm_nll(base, mask), atol=1e-6)


def test_pi_to_one_gives_expert_nll():
    _, base, expert, mask = _case()
    head = torch.full(mask.shape + (1,), 60.0)
    assert torch.allclose(marginal_nll(head, base, expert, mask), lm_nll(expert, mask), atol=1e-6)


def test_masked_positions_are_ignored():
    head, base, expert, mask = _case()
    junk = torch.where(mask, base, torch.full_like(base, -1e4))
    junk_expert = torch.where(mask, expert, torch.full_like(expert, math.inf))
    assert torch.equal(marginal_nll(head, base, expert, mask), marginal_nll(head, junk, junk_expert, mask))


def test_matches_float64_brute_force():
    head, base, expert, mask = _case(seed=1)
    total, count = 0.0, 0
    for i, j in zip(*torch.nonzero(mask, as_tuple=True)):
        pi = 1 / (1 + math.exp(-float(head[i, j, 0])))
        p = (1 - pi) * math.exp(float(base[i, j])) + pi * math.exp(float(expert[i, j]))
        total, count = total - math.log(p), count + 1
    assert float(marginal_nll(head, base, expert, mask)) == pytest.approx(total / count, rel=1e-5)


def test_m_experts_match_brute_force_and_softmax_limits():
    head, base, expert, mask = _case(m=3, seed=2)
    want = []
    for i, j in zip(*torch.nonzero(mask, as_tuple=True)):
        pi = torch.softmax(head[i, j].double(), -1)
        p = torch.cat([base[i, j].view(1), expert[i, j]]).double().exp()
        want.append(-math.log(float((pi * p).sum())))
    assert float(marginal_nll(head, base, expert, mask)) == pytest.approx(sum(want) / len(want), rel=1e-5)
    only_second = torch.full_like(head, -60.0)
    only_second[..., 2] = 60.0
    assert torch.allclose(marginal_nll(only_second, base, expert, mask), lm_nll(expert[..., 1], mask), atol=1e-6)


def test_external_token_count_makes_micro_batches_sum_to_the_full_mean():
    head, base, expert, mask = _case(b=4, seed=3)
    full = marginal_nll(head, base, expert, mask)
    n = mask.sum()
    parts = sum(marginal_nll(head[k : k + 2], base[k : k + 2], expert[k : k + 2], mask[k : k + 2], n) for k in (0, 2))
    assert torch.allclose(full, parts, atol=1e-6)


def test_gradients_are_finite_and_experts_get_none():
    head, base, expert, mask = _case()
    head = (head * 30).requires_grad_()  # saturated sigmoids: where a naive log(σ) would give inf
    base = (base * 50).requires_grad_()
    expert = expert.clone().requires_grad_()
    marginal_nll(head, base, expert, mask).backward()
    assert torch.isfinite(head.grad).all() and torch.isfinite(base.grad).all()
    assert expert.grad is None
    assert (head.grad[~mask] == 0).all()


def test_extreme_log_probs_stay_finite():
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = marginal_nll(torch.zeros(1, 2, 1), torch.full((1, 2), -1e4), torch.full((1, 2), -2e4), mask)
    assert torch.isfinite(loss) and float(loss) == pytest.approx(1e4 + math.log(2), rel=1e-6)


def test_mismatched_writer_count_is_refused():
    head, base, expert, mask = _case(m=2)
    with pytest.raises(CollmError):
        marginal_token_nll(head[..., :2], base, expert)


def test_defer_prob():
    assert torch.allclose(defer_prob(torch.zeros(2, 1)), torch.full((2,), 0.5))
    assert torch.allclose(defer_prob(torch.tensor([[0.0, 0.0, 0.0]])), torch.tensor([2 / 3]))


def test_weak_labels():
    base_ok = torch.tensor([True, False, False, False])
    expert_ok = torch.tensor([True, True, False, True])
    assert weak_labels(base_ok, expert_ok).tolist() == [0, 1, 0, 1]
    two = torch.tensor([[True, True], [False, True], [True, False], [False, False]])
    logp = torch.tensor([[-1.0, -0.1], [-1.0, -0.1], [-1.0, -0.1], [-1.0, -0.1]])
    assert weak_labels(torch.zeros(4, dtype=torch.bool), two, logp).tolist() == [2, 2, 1, 0]


def test_disagreement_labels_mark_where_exactly_one_model_has_gold():
    base_ok = torch.tensor([True, True, False, False])
    expert_ok = torch.tensor([True, False, True, False])
    assert disagreement_labels(base_ok, expert_ok).tolist() == [0, 1, 1, 0]
    # On the base's own greedy text the base is always right, so the paper's rule never defers; this one
    # defers where the expert would have written something else.
    assert weak_labels(base_ok[:2], expert_ok[:2]).tolist() == [0, 0]
    assert disagreement_labels(base_ok, expert_ok.unsqueeze(-1)).tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="one expert"):
        disagreement_labels(base_ok, torch.stack([expert_ok, expert_ok], -1))


def test_disagreement_labels_below_keeps_only_tokens_the_expert_rejects():
    base_ok = torch.tensor([True, True, True, False, True])
    expert_ok = torch.tensor([False, False, True, True, False])
    logp = torch.log(torch.tensor([0.02, 0.3, 0.9, 0.8, 0.05]))
    # positions 0, 1 and 4: the base wrote its argmax, the expert prefers another token, giving it 2%, 30%, 5%
    assert disagreement_labels(base_ok, expert_ok).tolist() == [1, 1, 0, 1, 1]
    assert disagreement_labels(base_ok, expert_ok, logp, below=0.1).tolist() == [1, 0, 0, 1, 1]
    assert disagreement_labels(base_ok, expert_ok, logp, below=0.03).tolist() == [1, 0, 0, 1, 0]
    # the expert's own argmax tokens (position 3) stay labelled whatever the threshold
    assert disagreement_labels(base_ok, expert_ok.unsqueeze(-1), logp.unsqueeze(-1), below=0.01).tolist() == \
        [0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="log-probs"):
        disagreement_labels(base_ok, expert_ok, below=0.1)


def test_class_weighted_bce_balances_rare_positives():
    labels = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0])
    mask = torch.ones(8, dtype=torch.bool)
    w = class_weights(labels, mask, 2)
    assert torch.allclose(w * torch.tensor([7.0, 1.0]), torch.full((2,), 4.0))  # 8 / (2 · count)
    # Balanced: at π = 0.5 the one positive pulls the logit up as hard as the seven negatives push it down,
    # so "never defer" is no longer where the loss is lowest.
    logit = torch.zeros(8, 1, requires_grad=True)
    weak_bce(logit, labels, mask, w).backward()
    assert float(logit.grad.sum()) == pytest.approx(0.0, abs=1e-6) and logit.grad[0, 0] < 0
    plain = torch.nn.functional.binary_cross_entropy_with_logits(torch.full((8,), 0.3), labels.float())
    assert float(weak_bce(torch.full((8, 1), 0.3), labels, mask)) == pytest.approx(float(plain), rel=1e-6)


def test_gold_log_probs_matches_log_softmax():
    logits = torch.randn(2, 5, 13)
    targets = torch.randint(0, 13, (2, 5))
    want = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(gold_log_probs(logits, targets), want, atol=1e-6)


def test_gold_that_ties_the_maximum_counts_as_the_argmax():
    """The reference rule (isclose to the maximum log-prob, rtol 1e-5): a gold token tied with a lower index
    is the model's choice too; the lowest-index argmax alone said it was not."""
    from collm.training.loss import argmax_is_gold

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0],  # exact tie, gold at the higher index
                           [1.0, 3.0, 3.0, 0.0],  # exact tie, gold at the lower index
                           [1.0, 3.0, 2.9, 0.0],  # a clear loser
                           [1.0, 3.0, 3.0 - 1e-6, 0.0],  # equal to float32 rounding, within rtol
                           [0.0, 0.0, 0.0, 0.0]])  # all tied
    targets = torch.tensor([2, 1, 2, 2, 3])
    assert argmax_is_gold(logits, targets).tolist() == [True, True, False, True, True]
    # bf16 logits: distinct float32 values that round to one bf16 value tie exactly
    bf16 = torch.tensor([[5.0, 5.01, -1.0]]).to(torch.bfloat16)
    assert bf16[0, 0] == bf16[0, 1] and argmax_is_gold(bf16, torch.tensor([1])).tolist() == [True]


def test_weak_labels_follow_the_tie_rule():
    """Pseudo-labels made from scores: with gold tied at both models' maximum, both are right: no deferral;
    with only the expert tied, defer."""
    from collm.training.loss import argmax_is_gold

    base = torch.tensor([[2.0, 2.0, 0.0], [2.0, 2.0, 0.0]])
    expert = torch.tensor([[1.0, 4.0, 4.0], [1.0, 4.0, 4.0]])
    gold = torch.tensor([1, 2])
    labels = weak_labels(argmax_is_gold(base, gold), argmax_is_gold(expert, gold))
    assert labels.tolist() == [0, 1]  # row 2: base's max is tokens 0/1, gold 2 is the expert's (tied) choice
