"""Decoding semantics, token for token: against `transformers` greedy and a slow re-encoding reference loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import EOS_ID, PAD_ID, make_llama
from helpers import NEW, PROMPTS, feature_head, random_head, reference

from collm import CoLLM, DeferralHead


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    """What `transformers` greedy `generate` writes for one prompt, cut after EOS like collm's output."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=EOS_ID,
                         pad_token_id=PAD_ID, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    ids = out[0, len(prompt):].tolist()
    return ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else ids


def test_threshold_one_is_base_greedy(models):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size))
    out = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=1.0)
    for prompt, ids, src in zip(PROMPTS, out.token_ids, out.sources):
        assert ids == hf_greedy(base, prompt, NEW)
        assert set(src) == {0}
    assert out.stats["expert_calls"] == 0


def test_threshold_zero_with_zero_head_is_expert_greedy(models):
    base, expert = models
    pair = CoLLM(base, [expert])  # head=None: zero head, P(defer) = 0.5 > 0
    out = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.0)
    for prompt, ids, src in zip(PROMPTS, out.token_ids, out.sources):
        assert ids == hf_greedy(expert, prompt, NEW)
        assert set(src) == {1}


def generate_as_reference(base, expert, head):
    """The pair's greedy answers at η = 0.5, checked against the re-encoding reference, with at least two rows
    written by both models."""
    out = CoLLM(base, [expert], head).generate(PROMPTS, max_new_tokens=NEW, threshold=0.5)
    mixed = 0
    for prompt, ids, src in zip(PROMPTS, out.token_ids, out.sources):
        assert (ids, src) == reference(base, [expert], head, prompt, NEW, 0.5)
        mixed += 0 < sum(s > 0 for s in src) < len(src)
    assert mixed >= 2, "the head should route some tokens to each model"
    return out


def test_mixed_routing_equals_reencoding_reference(models):
    base, expert = models
    generate_as_reference(base, expert, random_head(base.config.hidden_size))


def test_a_head_reading_the_base_s_distribution_routes_as_the_reference(models):
    """The head reads the base's entropy, top probability and margin: the loop computes the base's logits at
    every step for it (also where the expert writes), on the plain and on the static path."""
    from collm.decoding.decode import Sampling, decode

    base, expert = models
    head = feature_head(base)
    out = generate_as_reference(base, expert, head)
    plain = DeferralHead(base.config.hidden_size)
    plain.load_state_dict({"linear.weight": head.linear.weight[:, :-3], "linear.bias": head.linear.bias})
    assert CoLLM(base, [expert], plain).generate(PROMPTS, max_new_tokens=NEW, threshold=0.5).sources != out.sources
    args = dict(sampling=Sampling(), eos_ids=(EOS_ID,), pad_id=PAD_ID, vocab=base.config.vocab_size, max_new_tokens=NEW,
                threshold=0.5, static=True)
    fast = decode(base, [expert], head, PROMPTS, **args)  # the fused step cannot read features: the loop runs
    assert (fast.token_ids, fast.sources) == (out.token_ids, out.sources)
    with pytest.raises(ValueError, match="head on the hidden state alone"):
        decode(base, [expert], head, PROMPTS, fused=True, **args)


def test_head_features_are_the_distribution_s_entropy_top_probability_and_margin():
    from collm.core.head import distribution_features

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    p = logits.softmax(-1)
    got = distribution_features(logits, ("entropy", "max_prob", "margin"))
    assert torch.allclose(got[:, 0], -(p * p.log()).sum(-1))
    assert torch.allclose(got[:, 1], p.max(-1).values)
    assert torch.allclose(got[:, 2], torch.tensor([1.0, 0.0]))
    head = DeferralHead(4, 1, "margin, entropy")  # any order in, FEATURES order kept
    assert head.features == ("entropy", "margin") and head.linear.in_features == 6
    assert torch.equal(head.inputs(torch.ones(2, 4), logits)[:, 4:], got[:, [0, 2]])
    with pytest.raises(Exception, match="unknown head feature 'perplexity'"):
        DeferralHead(4, 1, "perplexity")
    with pytest.raises(Exception, match="pass the base's logits"):
        head.inputs(torch.ones(2, 4))


def test_two_experts_equal_reference():
    base, experts = make_llama(0), [make_llama(1), make_llama(2)]
    head = random_head(base.config.hidden_size, num_experts=2, scale=4.0)
    out = CoLLM(base, experts, head).generate(PROMPTS, max_new_tokens=NEW, threshold=0.5)
    used = set()
    for prompt, ids, src in zip(PROMPTS, out.token_ids, out.sources):
        assert (ids, src) == reference(base, experts, head, prompt, NEW, 0.5)
        used |= set(src)
    assert used == {0, 1, 2}


class CountingForward:
    """Records how many token positions each forward call of a model receives."""

    def __init__(self, model):
        self.calls: list[int] = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(kwargs["input_ids"].shape[1])


def test_expert_sees_each_token_once(models):
    base, expert = models
    head = random_head(base.config.hidden_size)
    counter = CountingForward(expert)
    prompt = PROMPTS[0]
    out = CoLLM(base, [expert], head).generate([prompt], max_new_tokens=NEW, threshold=0.5)
    deferred_at = [t for t, s in enumerate(out.sources[0]) if s == 1]
    assert len(deferred_at) >= 2
    # the prompt once, up front, with the base; then one forward per deferral (none at a deferral on the
    # first token, whose logits the prompt's forward already gave)
    assert counter.calls[0] == len(prompt)
    assert len(counter.calls) - 1 == len([t for t in deferred_at if t > 0]) == out.stats["expert_calls"]
    # no prefix re-encoding: in total it consumed the prompt plus every token before the last deferral
    assert sum(counter.calls) == len(prompt) + deferred_at[-1]
    assert counter.calls[1] == deferred_at[1 if deferred_at[0] == 0 else 0]


def test_batch_equals_each_prompt_alone(models):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size))
    batch = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5)
    assert batch.stats["expert_prefill_tokens"] == sum(len(p) for p in PROMPTS)  # real tokens, not padding
    lengths = set()
    for row, prompt in enumerate(PROMPTS):
        alone = pair.generate([prompt], max_new_tokens=NEW, threshold=0.5)
        assert alone.token_ids[0] == batch.token_ids[row]
        assert alone.sources[0] == batch.sources[row]
        assert alone.defer_probs[0] == pytest.approx(batch.defer_probs[row], abs=1e-5)
        lengths.add(len(alone.token_ids[0]))


def test_rows_finish_independently(models):
    base, expert = models
    pair = CoLLM(base, [expert], DeferralHead.constant(base.config.hidden_size, 0.0))
    candidates = [[1, k] for k in range(6, 102)]
    lengths = [len(ids) for ids in pair.generate(candidates, max_new_tokens=NEW).token_ids]
    early = candidates[next(i for i, n in enumerate(lengths) if n < NEW // 2)]
    full = candidates[lengths.index(NEW)]
    alone = [hf_greedy(base, early, NEW), hf_greedy(base, full, NEW)]
    assert alone[0][-1] == EOS_ID and EOS_ID not in alone[1]
    out = pair.generate([early, full], max_new_tokens=NEW)
    assert out.token_ids == alone
    assert len(out.sources[0]) == len(out.defer_probs[0]) == len(alone[0])


def test_seeded_sampling_repeats_and_seed_matters(models):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size))
    kwargs = dict(max_new_tokens=NEW, threshold=0.5, do_sample=True, temperature=1.3, top_p=0.9)
    a = pair.generate(PROMPTS, seed=3, **kwargs)
    b = pair.generate(PROMPTS, seed=3, **kwargs)
    c = pair.generate(PROMPTS, seed=4, **kwargs)
    assert a.token_ids == b.token_ids and a.sources == b.sources
    assert a.token_ids != c.token_ids


def test_top_p_tiny_is_greedy(models):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size))
    greedy = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5)
    nucleus = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5, do_sample=True, top_p=1e-6, seed=9)
    assert nucleus.token_ids == greedy.token_ids


def test_compose_picks_argmax_of_mixture():
    base, expert = make_llama(0), make_llama(1)
    head = random_head(base.config.hidden_size)
    out = CoLLM(base, [expert], head).generate([PROMPTS[0]], max_new_tokens=8, mode="compose")
    seq = list(PROMPTS[0])
    with torch.no_grad():
        for token in out.token_ids[0]:
            x = torch.tensor([seq])
            b = base(x, output_hidden_states=True)
            log_pz = head.log_probs(b.hidden_states[-1][:, -1])[0]
            mixture = torch.logsumexp(torch.stack([log_pz[0] + F.log_softmax(b.logits[0, -1], -1),
                                                   log_pz[1] + F.log_softmax(expert(x).logits[0, -1], -1)]), 0)
            assert token == int(mixture.argmax())
            seq.append(token)


def test_stop_string_ends_row_and_trims_text(tokenizer):
    base, expert = make_llama(0), make_llama(1)
    pair = CoLLM(base, [expert], DeferralHead.constant(32, 0.0), tokenizer)
    full = pair.generate(["abc"], max_new_tokens=NEW)
    text = full.texts[0]
    stop = text[5:7]
    assert len(stop) == 2 and text.index(stop) == 5
    out = pair.generate(["abc"], max_new_tokens=NEW, stop=[stop])
    assert out.texts[0] == text[:5]
    assert out.stopped_by == [stop]
    assert len(out.token_ids[0]) == 7


def test_base_and_expert_modes_run_one_model_only(models):
    base, expert = models
    base_counter, expert_counter = CountingForward(base), CountingForward(expert)
    pair = CoLLM(base, [expert])
    alone = pair.generate([PROMPTS[1]], max_new_tokens=NEW, mode="expert")
    assert base_counter.calls == [] and alone.token_ids[0] == hf_greedy(expert, PROMPTS[1], NEW)
    expert_counter.calls.clear()
    pair.generate([PROMPTS[1]], max_new_tokens=NEW, mode="base")
    assert expert_counter.calls == []


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("max_bucket", [4, 64])
def test_static_cache_path_changes_no_token(monkeypatch, max_bucket, fused):
    """The fast path's bucketed static caches, run eagerly on CPU, write exactly what the plain path writes;
    with max_bucket=4 long catch-ups take the eager branch and short ones the padded-bucket branch."""
    import collm.backends.static

    monkeypatch.setattr(collm.backends.static, "MAX_BUCKET", max_bucket)
    base, expert = make_llama(0), make_llama(1)
    head = random_head(base.config.hidden_size, scale=2.0, seed=11)
    pair = CoLLM(base, [expert], head)
    kwargs = dict(max_new_tokens=40, threshold=0.6)
    plain = pair.generate(PROMPTS, **kwargs)
    from collm.decoding.decode import Sampling, decode

    fast = decode(base, [expert], head, PROMPTS, sampling=Sampling(), eos_ids=(EOS_ID,), pad_id=PAD_ID,
                  vocab=pair.vocab, static=True, fused=fused, **kwargs)
    assert (fast.token_ids, fast.sources) == (plain.token_ids, plain.sources)
    assert fast.stats["expert_calls"] == plain.stats["expert_calls"] >= 3


@pytest.mark.parametrize("mode", ["collm", "base", "expert"])
@pytest.mark.parametrize("num_experts", [1, 2])
def test_fused_step_writes_what_the_step_by_step_loop_writes(mode, num_experts):
    """One device program per step (collm.decoding.fused, eager on CPU) against the step-by-step loop on the same
    static caches: the same tokens, sources and defer probabilities to the bit, the same expert calls. A
    second EOS id that the models write mid-answer ends rows at different steps, so finished rows, padding
    and the all-done stop are exercised."""
    from collm.decoding.decode import Sampling, decode

    base, experts = make_llama(0), [make_llama(1), make_llama(2)][:num_experts]
    head = random_head(base.config.hidden_size, num_experts, scale=2.0, seed=11)
    args = dict(max_new_tokens=40, threshold=0.6, sampling=Sampling(), pad_id=PAD_ID, mode=mode,
                vocab=base.config.vocab_size, static=True)
    first = decode(base, experts, head, PROMPTS, eos_ids=(EOS_ID,), fused=False, **args)
    stop = first.token_ids[0][12]  # a token row 0 writes; other rows meet it at other steps or never
    loop = decode(base, experts, head, PROMPTS, eos_ids=(EOS_ID, stop), fused=False, **args)
    fused = decode(base, experts, head, PROMPTS, eos_ids=(EOS_ID, stop), fused=True, **args)
    assert (fused.token_ids, fused.sources, fused.defer_probs) == (loop.token_ids, loop.sources, loop.defer_probs)
    assert len({len(t) for t in loop.token_ids}) > 1
    for key in ("expert_calls", "expert_tokens", "expert_prefill_tokens", "deferred_tokens", "steps"):
        assert fused.stats[key] == loop.stats[key], key
    if mode == "collm":
        assert 0 < loop.stats["deferred_tokens"] < loop.stats["new_tokens"]


@pytest.mark.parametrize("mode", ["collm", "expert"])
def test_fused_step_stops_on_strings_and_streams_like_the_loop(mode):
    """Stop strings and streaming are host work on the token that comes with the fused step's one flags read:
    the same rows stop at the same steps (later steps routed as if they had), and the streaming callback
    sees the same tokens, sources and done flags, step by step."""
    from collm.decoding.decode import Sampling, decode

    base, expert = make_llama(0), make_llama(1)
    head = random_head(base.config.hidden_size, scale=2.0, seed=11)
    args = dict(max_new_tokens=40, threshold=0.6, sampling=Sampling(), pad_id=PAD_ID, eos_ids=(EOS_ID,),
                vocab=base.config.vocab_size, static=True, mode=mode)
    first = decode(base, [expert], head, PROMPTS, fused=False, **args)
    # a token row 1 writes after a few steps that some other row never writes: rows stop at different steps or not
    marker = next(t for t in first.token_ids[1][4:] if any(t not in ids for ids in first.token_ids))

    runs = {}
    for fused in (False, True):
        seen = []
        out = decode(base, [expert], head, PROMPTS, fused=fused, stop=(f"<{marker}>",), tokenizer=BracketTokenizer(),
                     on_token=lambda *step: seen.append(step), **args)
        runs[fused] = (out.token_ids, out.sources, out.defer_probs, out.stopped_by, out.texts, seen,
                       out.stats["expert_calls"], out.stats["steps"])
    assert runs[True] == runs[False]
    stopped_by = runs[False][3]
    assert f"<{marker}>" in stopped_by and None in stopped_by


class BracketTokenizer:
    """Token t reads "<t>": stop strings on whole tokens, for models without a tokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def test_fused_step_follows_a_router_table_and_refuses_what_it_cannot_run():
    """The benchmark's per-row deferral pattern, read from its table on the device, routes exactly as the
    router called step by step; asking for the fused step with sampling is an error, not a silent fallback."""
    from collm.decoding.decode import Sampling, decode
    from collm.evaluation.bench import pattern_router

    base, expert = make_llama(0), make_llama(1)
    head = random_head(base.config.hidden_size)
    router = pattern_router(0.3, 30, seed=3, rows=len(PROMPTS), per_row=True)
    args = dict(max_new_tokens=30, threshold=0.5, pad_id=PAD_ID, eos_ids=(), vocab=base.config.vocab_size,
                static=True, router=router)
    loop = decode(base, [expert], head, PROMPTS, sampling=Sampling(), fused=False, **args)
    fused = decode(base, [expert], head, PROMPTS, sampling=Sampling(), fused=True, **args)
    assert (fused.token_ids, fused.sources) == (loop.token_ids, loop.sources)
    assert [sum(s) for s in fused.sources] == [int(router.table[:, r].sum()) for r in range(len(PROMPTS))]
    with pytest.raises(ValueError, match="greedy"):
        decode(base, [expert], head, PROMPTS, sampling=Sampling(do_sample=True), fused=True, **args)


def test_naive_reencoding_baseline_writes_the_same_tokens(models):
    from collm.decoding.decode import Sampling, decode

    base, expert = models
    head = random_head(base.config.hidden_size)
    args = dict(max_new_tokens=NEW, threshold=0.5, sampling=Sampling(), eos_ids=(EOS_ID,), pad_id=PAD_ID,
                vocab=base.config.vocab_size)
    cached = decode(base, [expert], head, PROMPTS, **args)
    naive = decode(base, [expert], head, PROMPTS, reencode_experts=True, **args)
    assert naive.token_ids == cached.token_ids
    assert naive.stats["expert_tokens"] > cached.stats["expert_tokens"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_path_matches_plain_path(compile, fused):
    base, expert = make_llama(0).cuda(), make_llama(1).cuda()
    head = random_head(base.config.hidden_size, scale=2.0, seed=11).cuda()
    from collm.decoding.decode import Sampling, decode

    args = dict(max_new_tokens=48, threshold=0.6, sampling=Sampling(), eos_ids=(EOS_ID,), pad_id=PAD_ID,
                vocab=base.config.vocab_size)
    plain = decode(base, [expert], head, PROMPTS, static=False, **args)
    for _ in range(2):  # the second run replays graphs captured by the first
        fast = decode(base, [expert], head, PROMPTS, static=True, compile=compile, fused=fused, **args)
        assert (fast.token_ids, fast.sources) == (plain.token_ids, plain.sources)


def test_proxy_tuning_picks_argmax_of_expert_plus_tuned_minus_untuned():
    from collm.pair import proxy_tuning

    expert, tuned, untuned = make_llama(1), make_llama(0), make_llama(2)
    out = proxy_tuning(expert, tuned, untuned).generate([PROMPTS[0]], max_new_tokens=8, mode="proxy")
    seq = list(PROMPTS[0])
    with torch.no_grad():
        for token in out.token_ids[0]:
            x = torch.tensor([seq])
            scores = sum(sign * F.log_softmax(m(x).logits[0, -1], -1)
                         for sign, m in ((1, expert), (1, tuned), (-1, untuned)))
            assert token == int(scores.argmax())
            seq.append(token)
    assert out.stats["expert_calls"] == 2 * len(out.token_ids[0])  # both helpers, every step


class AfterToken:
    """A router that reads the written tokens: the expert writes right after each ``token``."""

    reads_tokens = True

    def __init__(self, token: int):
        self.token = token

    def __call__(self, step, log_pz, last):
        return (last == self.token).long().to(log_pz.device)


def test_a_router_that_reads_tokens_sees_each_row_s_newest_token(models):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size))
    free = pair.generate(PROMPTS, max_new_tokens=24, threshold=1.0)
    token = max(set(t for row in free.token_ids for t in row), key=lambda t: sum(r.count(t) for r in free.token_ids))
    out = pair.generate(PROMPTS, max_new_tokens=24, router=AfterToken(token))
    for prompt, ids, sources in zip(PROMPTS, out.token_ids, out.sources):
        before = [prompt[-1], *ids[:-1]]
        assert sources == [int(t == token) for t in before]
    assert any(any(s) for s in out.sources)
