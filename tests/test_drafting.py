"""Drafting past deferrals (`lookahead`), inside the engine: the base drafts past a deferral and the experts check
every row's pending draft in one read. Greedy: the tokens, their writers and their defer probabilities must be
exactly greedy Co-LLM's without drafting (float32), in a batch, with rows joining and leaving, stop strings and
streaming. Sampling: the tokens must follow Co-LLM's own distribution (speculative sampling's rule)."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS_ID, make_llama
from helpers import PROMPTS, feature_head, random_head, reference

from collm import CoLLM, CollmError
from collm.backends import hf
from collm.core.request import Request, Sampling
from collm.decoding.engine import Engine

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
    if lookahead == 1:  # each deferral checked at once: plain Co-LLM's schedule, nothing drafted
        assert out.stats["discarded"] == out.stats["drafts_cut"] == out.stats["drafted"] == 0
        assert out.stats["checked"] == ref.stats["deferred_tokens"]
        assert out.stats == ref.stats | {"seconds": out.stats["seconds"], "tokens_per_s": out.stats["tokens_per_s"]}
    else:  # two random models disagree: drafts get cut, and the cut is where the expert's token goes
        assert out.stats["drafts_cut"] > 0 and out.stats["discarded"] > 0


@pytest.mark.parametrize("lookahead", [2, 4, 16])
def test_an_expert_that_agrees_is_called_less_often(models, lookahead):
    """With the base as its own expert every draft is kept: fewer expert calls, each token read once."""
    base, _ = models
    pair = CoLLM(base, [base], random_head(base.config.hidden_size))
    ref, out = same_as_engine(pair, PROMPTS, lookahead)
    plain = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5, lookahead=1)  # one call per deferral
    assert out.stats["drafts_cut"] == out.stats["discarded"] == 0
    assert out.stats["checked"] == ref.stats["deferred_tokens"]
    assert out.stats["expert_calls"] <= (0.8 if lookahead == 2 else 0.6) * plain.stats["expert_calls"]
    for prompt in PROMPTS:  # alone (no finished rows riding along), the expert reads no column twice
        alone = pair.generate([prompt], max_new_tokens=NEW, threshold=0.5, lookahead=lookahead)
        assert alone.stats["expert_tokens"] <= alone.stats["new_tokens"] - 1


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
    assert out.stats["drafts_cut"] == out.stats["discarded"] == 0
    calls = sum(-(-(len(t) - 1) // lookahead) for t in out.token_ids)  # the first token comes from the prompt's read
    assert out.stats["expert_calls"] <= calls


@pytest.mark.parametrize("kwargs, message", [
    (dict(lookahead=0), "lookahead must be a whole number"),
    (dict(lookahead=2.5), "lookahead must be a whole number"),
    (dict(lookahead=4, mode="compose"), "mode 'compose' cannot draft"),
])
def test_what_it_cannot_do_is_one_line(models, tokenizer, kwargs, message):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size), tokenizer)
    with pytest.raises(CollmError, match=message) as err:
        pair.generate(PROMPTS, max_new_tokens=4, threshold=0.5, **kwargs)
    assert "\n" not in str(err.value)


def test_a_sampling_row_cannot_draft_with_a_served_expert():
    base = make_llama(0)

    class Served:  # what the engine knows of a remote expert before it reads: it is served elsewhere
        remote = True

    engine = Engine(base, [Served()], random_head(base.config.hidden_size), vocab=base.config.vocab_size)
    with pytest.raises(CollmError, match="sampling row cannot draft"):
        engine.add([1, 2], Request(lookahead=4, sampling=Sampling(do_sample=True)))
    engine.add([1, 2], Request(lookahead=4))  # greedy drafts are checked on the server's top tokens


def test_a_batch_is_each_prompt_alone(models):
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
    out = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5, lookahead=4,
                        on_token=lambda tokens, sources, done: seen.append((tokens, sources, done)))
    for row in range(len(PROMPTS)):
        mine = [(t[row], s[row]) for t, s, d in seen if not d[row]]
        assert mine == list(zip(out.token_ids[row], out.sources[row]))


def test_stream_events_are_final_tokens_and_join_to_the_text(models, tokenizer):
    """An event is sent only for a token that is final: the pieces and ids of a streamed answer are the answer."""
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size), tokenizer)
    ref = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5)
    ids, text, sources = ([[] for _ in PROMPTS] for _ in range(3))
    for events in pair.stream(PROMPTS, max_new_tokens=NEW, threshold=0.5, lookahead=4):
        for e in events:
            ids[e.row].append(e.token_id), text[e.row].append(e.text), sources[e.row].append(e.source)
    assert ids == ref.token_ids and sources == ref.sources
    assert ["".join(t) for t in text] == ref.texts


def test_stop_strings_end_a_draft(models, tokenizer):
    base, expert = models
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size), tokenizer)
    free = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5)
    stops = [t[len(t) // 2 : len(t) // 2 + 2] for t in free.texts if len(t) > 4]  # text the answers do write
    assert stops
    ref = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5, stop=stops)
    assert any(ref.stopped_by)
    for lookahead in (2, 6):
        out = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5, stop=stops, lookahead=lookahead)
        assert (out.texts, out.token_ids, out.sources, out.stopped_by) == \
            (ref.texts, ref.token_ids, ref.sources, ref.stopped_by)


def _serve(engine, schedule, steps=400):
    """Run an elastic engine where rows join at given steps (``schedule``: step -> [(prompt, request)]) and
    return each handle's (tokens, sources)."""
    out, step = {}, 0
    while step < steps and (engine.active or any(k >= step for k in schedule)):
        for prompt, request in schedule.get(step, []):
            out[engine.add(prompt, request)] = ([], [])
        for e in engine.step():
            out[e.row][0].append(e.token_id), out[e.row][1].append(e.source)
        step += 1
    assert not engine.active
    return out


@pytest.mark.parametrize("lookahead", [3, 5])
def test_rows_join_and_leave_while_others_draft(models, lookahead):
    """The serving engine: rows with different lookaheads, lengths and modes join while others are mid-draft
    and leave when done; every row's answer is the one the engine writes without drafting."""
    base, expert = models
    head = random_head(base.config.hidden_size)

    def schedule(k):
        return {0: [(PROMPTS[0], Request(30, lookahead=k)), (PROMPTS[1], Request(12, lookahead=k))],
                2: [(PROMPTS[2], Request(25, lookahead=max(1, k - 1)))],
                5: [([1, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90], Request(20, lookahead=k)),
                    (PROMPTS[1], Request(16, mode="expert", lookahead=k))],
                9: [([1, 44], Request(18, lookahead=k))]}

    def engine():
        return Engine(base, [expert], head, vocab=base.config.vocab_size, eos_ids=(EOS_ID,))

    ref, out = _serve(engine(), schedule(1)), _serve(engine(), schedule(lookahead))
    assert out == ref
    assert any(s for tokens, sources in ref.values() for s in sources)


def test_sampling_follows_co_llm_s_distribution():
    """Seeded sampling rows draft and are checked by speculative sampling's rule: the empirical distributions of
    the first and of the second token match the exact Co-LLM distributions (by enumeration) as closely as plain
    sampling's do; a rule that kept every stand-in (the base's distribution at deferrals) is far from them."""
    base, expert = make_llama(0), make_llama(1)
    head = random_head(base.config.hidden_size, scale=0.0)  # P(defer) = 0.5: threshold 0.4 defers everywhere
    prompt, rows, temperature = [1, 40, 41], 3000, 0.5
    exact, kept_all = _first_two(base, expert, prompt, temperature)

    def empirical(lookahead):
        engine = Engine(base, [expert], head, vocab=base.config.vocab_size, eos_ids=())
        for seed in range(rows):
            engine.add(prompt, Request(2, threshold=0.4, lookahead=lookahead,
                                       sampling=Sampling(do_sample=True, temperature=temperature, seed=seed)))
        counts = torch.zeros_like(exact)
        pending: dict[int, list[int]] = {}
        while engine.active:
            for e in engine.step():
                pending.setdefault(e.row, []).append(e.token_id)
        for first, second in pending.values():
            counts[first, second] += 1
        return counts / rows, engine.stats

    plain, _ = empirical(1)
    drafted, stats = empirical(4)
    assert stats.drafted > 0 and stats.drafts_cut > 0  # stand-ins were drafted, and some were not kept
    for axis in (1, 0):  # the first token's marginal, then the second's
        def tv(joint):
            return float(0.5 * (joint.sum(axis) - exact.sum(axis)).abs().sum())

        assert tv(kept_all) > 0.6  # the test can tell the two apart
        assert tv(drafted) < max(1.5 * tv(plain), 0.06) and tv(drafted) < tv(kept_all) / 5


@torch.no_grad()
def _first_two(base, expert, prompt, temperature):
    """P(first two tokens) of the expert writing both (every position deferred), exactly; and the same where
    the base's stand-in were always kept (the base's own distribution)."""
    def joint(model):
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        vocab = first.shape[0]
        seqs = torch.tensor([prompt + [t] for t in range(vocab)])
        second = torch.softmax(model(seqs).logits[:, -1] / temperature, -1)
        return first[:, None] * second

    return joint(expert), joint(base)


@torch.no_grad()
def _rewind_reference(base, expert, head, prompt, new, threshold, rewind, yield_below, max_rewinds):
    """Greedy Co-LLM with both rewind rules, position by position, re-encoding the prefix (no caches): a deferral
    takes the expert's token unless its top probability is below ``yield_below`` (then the base's); a base token
    the expert gives a probability below ``rewind`` is the expert's token instead; at most ``max_rewinds``."""
    seq, tokens, sources, used = list(prompt), [], [], 0
    for _ in range(new):
        x = torch.tensor([seq])
        out = base(x, output_hidden_states=True)
        log_pz = head.log_probs(head.inputs(out.hidden_states[-1][:, -1], out.logits[:, -1]))[0]
        mine, theirs = out.logits[0, -1], expert(x).logits[0, -1]
        probs = theirs.softmax(-1)
        if 1 - log_pz[0].exp() > threshold:
            token, source = int(theirs.argmax()), 1
            if used < max_rewinds and yield_below and float(probs.max()) < yield_below:
                token, source, used = int(mine.argmax()), 0, used + 1
        else:
            token, source = int(mine.argmax()), 0
            if used < max_rewinds and rewind and float(probs[token]) < rewind:
                token, source, used = int(theirs.argmax()), 1, used + 1
        seq.append(token), tokens.append(token), sources.append(source)
        if token == EOS_ID:
            break
    return tokens, sources


@pytest.mark.parametrize("rewind, yield_below, max_rewinds", [(0.02, 0.0, 8), (0.0, 0.08, 8), (0.03, 0.07, 3)])
@pytest.mark.parametrize("lookahead", [1, 4])
def test_rewinds_re_write_what_the_reference_re_writes(rewind, yield_below, max_rewinds, lookahead):
    """Backtracking: the expert re-writes base tokens it finds implausible, the base writes where the expert is
    unsure, at most max_rewinds per answer; the same tokens and writers as the position-by-position rule."""
    base, expert = make_llama(0), make_llama(1)
    head = random_head(base.config.hidden_size)
    pair = CoLLM(base, [expert], head)
    out = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5, lookahead=lookahead, rewind=rewind,
                        yield_below=yield_below, max_rewinds=max_rewinds)
    for prompt, ids, src in zip(PROMPTS, out.token_ids, out.sources):
        assert (ids, src) == _rewind_reference(base, expert, head, prompt, NEW, 0.5, rewind, yield_below,
                                               max_rewinds)
    changed = out.stats["rewritten"] + out.stats["yielded"]
    assert 0 < changed <= max_rewinds * len(PROMPTS)
    assert bool(out.stats["rewritten"]) == bool(rewind) and bool(out.stats["yielded"]) == bool(yield_below)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rewind=1.5), "rewind must be a probability"),
    (dict(yield_below=-0.1), "yield_below must be a probability"),
    (dict(max_rewinds=-1), "max_rewinds must be a whole number"),
    (dict(rewind=0.1, mode="compose"), "cannot draft"),
])
def test_bad_rewind_settings_are_one_line(kwargs, message):
    base, expert = make_llama(0), make_llama(1)
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size))
    with pytest.raises(CollmError, match=message):
        pair.generate(PROMPTS, max_new_tokens=4, **kwargs)
