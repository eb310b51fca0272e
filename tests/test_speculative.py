"""Speculative Co-LLM (`lookahead`): the base drafts past a deferral and the expert checks the draft in one read.
The tokens, their writers and their defer probabilities must be exactly greedy Co-LLM's (the engine's)."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS_ID, make_llama
from helpers import PROMPTS, feature_head, random_head, reference

from collm import CoLLM, CollmError
from collm.backends import hf
from collm.decoding import speculative

NEW = 40


def same_as_engine(pair, prompts, lookahead, threshold=0.5, new=NEW):
    ref = pair.generate(prompts, max_new_tokens=new, threshold=threshold)
    out = pair.generate(prompts, max_new_tokens=new, threshold=threshold, lookahead=lookahead)
    assert out.token_ids == ref.token_ids
    assert out.sources == ref.sources
    for mine, theirs in zip(out.defer_probs, ref.defer_probs):
        assert mine == pytest.approx(theirs, abs=1e-5)
    assert out.texts == ref.texts
    assert out.stats["new_tokens"] == ref.stats["new_tokens"]
    return ref, out


@pytest.mark.parametrize("lookahead", [1, 2, 3, 8])
def test_equals_the_engine_token_for_token(models, tokenizer, lookahead):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size), tokenizer)
    ref, out = same_as_engine(pair, PROMPTS, lookahead)
    assert 0 < ref.stats["deferred_tokens"] < ref.stats["new_tokens"]  # routing is mixed
    if lookahead == 1:  # each deferral checked at once: plain Co-LLM's schedule, nothing drafted in vain
        assert out.stats["discarded"] == out.stats["rejected"] == 0
        assert out.stats["checked"] == ref.stats["deferred_tokens"]
        # one read per deferral, but none at a deferral on the first token (the prompt's read gave it)
        first = sum(1 for src in out.sources if src[0])
        assert out.stats["expert_calls"] == ref.stats["deferred_tokens"] - first
    else:  # two random models disagree: drafts get cut, and the cut is where the expert's token goes
        assert out.stats["rejected"] > 0 and out.stats["discarded"] > 0


@pytest.mark.parametrize("lookahead", [2, 4, 16])
def test_an_expert_that_agrees_is_called_less_often(models, lookahead):
    """With the base as its own expert every draft is kept: fewer expert calls, each token read once."""
    base, _ = models
    pair = CoLLM(base, [base], random_head(base.config.hidden_size))
    ref, out = same_as_engine(pair, PROMPTS, lookahead)
    plain = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5, lookahead=1)  # one call per deferral
    assert out.stats["rejected"] == out.stats["discarded"] == 0
    assert out.stats["checked"] == ref.stats["deferred_tokens"]
    assert out.stats["expert_calls"] <= (0.8 if lookahead == 2 else 0.6) * plain.stats["expert_calls"]
    new = [len(t) for t in out.token_ids]
    # the expert reads no column twice: at most every token but the last of each answer
    assert out.stats["expert_tokens"] <= sum(n - 1 for n in new)


def test_two_experts_equal_the_reference():
    base, experts = make_llama(0), [make_llama(1), make_llama(2)]
    head = random_head(base.config.hidden_size, num_experts=2, scale=4.0)
    out = CoLLM(base, experts, head).generate(PROMPTS, max_new_tokens=24, threshold=0.5, lookahead=4)
    used = set()
    for prompt, ids, src in zip(PROMPTS, out.token_ids, out.sources):
        assert (ids, src) == reference(base, experts, head, prompt, 24, 0.5)
        used |= set(src)
    assert used == {0, 1, 2}


def test_a_head_reading_the_base_s_distribution(models):
    base, expert = models
    same_as_engine(CoLLM(base, [expert], feature_head(base)), PROMPTS, 4)


def test_models_without_a_separate_output_embedding(models, monkeypatch):
    """Where logits are not the output embedding of the hidden state alone, every read keeps its logits."""
    base, expert = models
    pair = CoLLM(base, [base], random_head(base.config.hidden_size))
    monkeypatch.setattr(hf, "plain_logits", lambda model: False)
    same_as_engine(pair, PROMPTS, 4)


def test_answers_end_at_eos_inside_a_draft(models):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size, scale=1.0))
    candidates = [[1, k] for k in range(6, 60)]
    ref = pair.generate(candidates, max_new_tokens=NEW, threshold=0.4)
    ended = [i for i, ids in enumerate(ref.token_ids) if ids[-1] == EOS_ID]
    assert ended, "no answer ends at EOS: pick other prompts"
    prompts = [candidates[i] for i in ended[:6]]
    for lookahead in (2, 8):
        same_as_engine(pair, prompts, lookahead, threshold=0.4)


def test_one_token_and_a_deferral_at_the_first_token(models):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size))
    always = CoLLM(base, [expert], random_head(base.config.hidden_size, scale=0.0))  # P(defer) = 0.5 everywhere
    for lookahead in (1, 4):
        same_as_engine(pair, PROMPTS, lookahead, new=1)
        same_as_engine(always, PROMPTS, lookahead, threshold=0.4, new=7)  # the expert writes every token


@pytest.mark.parametrize("lookahead", [1, 4])
def test_mode_expert_is_speculative_decoding(models, tokenizer, lookahead):
    """The head defers everywhere: the base drafts, and the answer is the expert's own greedy answer."""
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size), tokenizer)
    for threshold in (0.5, 1.0):  # the threshold does not matter: the expert writes every token
        ref = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=threshold, mode="expert")
        out = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=threshold, mode="expert", lookahead=lookahead)
        assert (out.token_ids, out.sources, out.defer_probs) == (ref.token_ids, ref.sources, ref.defer_probs)
        assert out.texts == ref.texts and {s for src in out.sources for s in src} == {1}
    # with a base that agrees (itself as the expert) every draft is kept: one expert read per `lookahead` tokens
    agreeing = CoLLM(base, [base], random_head(base.config.hidden_size))
    out = agreeing.generate(PROMPTS, max_new_tokens=NEW, mode="expert", lookahead=lookahead)
    assert out.token_ids == agreeing.generate(PROMPTS, max_new_tokens=NEW, mode="base").token_ids
    assert out.stats["rejected"] == out.stats["discarded"] == 0
    calls = sum(-(-(len(t) - 1) // lookahead) for t in out.token_ids)  # the first token comes from the prompt's read
    assert out.stats["expert_calls"] <= calls


@pytest.mark.parametrize("kwargs, message", [
    (dict(lookahead=0), "lookahead must be a whole number"),
    (dict(lookahead=2.5), "lookahead must be a whole number"),
    (dict(lookahead=4, do_sample=True), "cannot be combined with sampling"),
    (dict(lookahead=4, stop=["x"]), "cannot be combined with stop strings"),
    (dict(lookahead=4, mode="base"), "cannot be combined with mode 'base'"),
])
def test_what_it_cannot_do_is_one_line(models, tokenizer, kwargs, message):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size), tokenizer)
    with pytest.raises(CollmError, match=message) as err:
        pair.generate(PROMPTS, max_new_tokens=4, threshold=0.5, **kwargs)
    assert "\n" not in str(err.value)


def test_a_served_expert_is_refused():
    base = make_llama(0)
    with pytest.raises(CollmError, match="in-process models"):
        speculative.check(base, [object()], random_head(base.config.hidden_size), 4)


def test_prompts_are_answered_in_turn_and_each_alone_is_the_same(models):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size))
    batch = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5, lookahead=4)
    for row, prompt in enumerate(PROMPTS):
        alone = pair.generate([prompt], max_new_tokens=NEW, threshold=0.5, lookahead=4)
        assert alone.token_ids[0] == batch.token_ids[row] and alone.sources[0] == batch.sources[row]
    assert torch.is_inference_mode_enabled() is False


def test_on_token_streams_every_kept_token_in_order(models):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size))
    seen = []
    out = pair.generate(PROMPTS[:2], max_new_tokens=NEW, threshold=0.5, lookahead=4,
                        on_token=lambda tokens, sources, done: seen.append((tokens, sources, done)))
    for row in range(2):
        mine = [(t[row], s[row]) for t, s, d in seen if not d[row]]
        assert mine == list(zip(out.token_ids[row], out.sources[row]))
    assert all(d.count(False) == 1 for _, _, d in seen)  # one answer at a time
