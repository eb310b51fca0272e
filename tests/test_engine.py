"""The engine as a stream of step events, with rows that join and leave between steps."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from helpers import PROMPTS, random_head

from collm import CoLLM
from collm.core.request import Request, Sampling
from collm.decoding.detok import Detokenizer

NEW = 20


@pytest.fixture(scope="module")
def pair():
    base, expert = make_llama(0), make_llama(1)
    return CoLLM(base, [expert], random_head(base.config.hidden_size, scale=2.0, seed=11))


def collect(events_by_step):
    rows: dict[int, list] = {}
    for events in events_by_step:
        for e in events:
            rows.setdefault(e.row, []).append(e)
    return rows


def test_stream_joins_to_generate(tokenizer):
    """The stream's pieces join to generate's texts, with the same tokens, sources and defer probabilities;
    each row's last event (and only that) says it finished, and why."""
    base, expert = make_llama(0), make_llama(1)
    pair = CoLLM(base, [expert], random_head(base.config.hidden_size, scale=2.0, seed=11), tokenizer)
    prompts = ["abc", "hello there", "x"]
    out = pair.generate(prompts, max_new_tokens=NEW, threshold=0.5)
    rows = collect(pair.stream(prompts, max_new_tokens=NEW, threshold=0.5))
    assert sorted(rows) == [0, 1, 2]
    for row, events in rows.items():
        assert "".join(e.text for e in events) == out.texts[row]
        assert out.texts[row] == tokenizer.decode(out.token_ids[row], skip_special_tokens=True)
        assert [e.token_id for e in events] == out.token_ids[row]
        assert [e.source for e in events] == out.sources[row]
        assert [e.defer_prob for e in events] == out.defer_probs[row]
        assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
        assert events[-1].finish_reason in ("stop", "length")
    assert any(s for src in out.sources for s in src) and any(not s for src in out.sources for s in src)


def run_engine(engine, arrivals: dict[int, list[tuple[list[int], Request]]], drops: dict[int, list[int]] = {}):
    """Step the engine, adding rows before the steps named in ``arrivals``; returns each handle's events."""
    handles, events_by_step, step = [], [], 0
    while step <= max(arrivals) or engine.active:
        for prompt, request in arrivals.get(step, []):
            handles.append(engine.add(prompt, request))
        for index in drops.get(step, []):
            engine.drop(handles[index])
        events_by_step.append(engine.step())
        step += 1
    return handles, collect(events_by_step)


def test_rows_joining_mid_decode_write_what_they_write_alone(pair):
    """Rows that arrive while others decode (longer and shorter prompts than the batch's, other thresholds and
    lengths) join at a step boundary and write, token for token, what each writes alone."""
    requests = [Request(NEW, 0.5), Request(7, 0.3), Request(NEW, 0.7), Request(12, 0.5)]
    arrivals = {0: [(PROMPTS[1], requests[0])], 3: [(PROMPTS[2], requests[1]), (PROMPTS[0], requests[2])],
                9: [(PROMPTS[1][:2], requests[3])]}
    handles, rows = run_engine(pair.engine(), arrivals)
    flat = [item for step in sorted(arrivals) for item in arrivals[step]]
    for handle, (prompt, request) in zip(handles, flat):
        alone = pair.generate([prompt], max_new_tokens=request.max_new_tokens, threshold=request.threshold)
        assert [e.token_id for e in rows[handle]] == alone.token_ids[0]
        assert [e.source for e in rows[handle]] == alone.sources[0]
    assert any(e.source for events in rows.values() for e in events)


def test_dropped_row_stops_and_frees_its_place(pair):
    """A row dropped mid-decode gets no more events and leaves the batch; the others carry on unchanged."""
    engine = pair.engine()
    arrivals = {0: [(PROMPTS[0], Request(NEW, 0.5)), (PROMPTS[2], Request(NEW, 0.5))]}
    handles, rows = run_engine(engine, arrivals, drops={5: [1]})
    assert len(rows[handles[1]]) == 5 and not rows[handles[1]][-1].finished
    alone = pair.generate([PROMPTS[0]], max_new_tokens=NEW, threshold=0.5)
    assert [e.token_id for e in rows[handles[0]]] == alone.token_ids[0]
    assert engine.active == 0 and engine.step() == [] and engine.rows == []


def test_sampled_rows_do_not_depend_on_the_batch(pair):
    """Each sampling row draws from its own seeded generator: batched or alone, the same tokens."""
    sampling = Sampling(do_sample=True, temperature=1.5, top_p=0.9, seed=5)
    batch = pair.generate(PROMPTS, max_new_tokens=NEW, threshold=0.5, do_sample=True, temperature=1.5, top_p=0.9,
                          seed=5)
    for row, prompt in enumerate(PROMPTS):
        alone = pair.generate([prompt], max_new_tokens=NEW, threshold=0.5, do_sample=True, temperature=1.5,
                              top_p=0.9, seed=sampling.seed)
        assert alone.token_ids[0] == batch.token_ids[row]


def byte_level_tokenizer():
    """A small byte-level BPE (GPT-2 style), where multi-byte characters span several tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, 12 + 7 = 19"] * 10, vocab_size=280, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def test_detokenizer_pieces_join_to_the_decoded_text():
    """Incremental pieces equal a full decode, also for characters split across byte-level tokens, and each
    piece is known once its character is complete (no replacement characters on the way)."""
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("héllo wörld ✓ 12 + 7 = 19 日本", add_special_tokens=False)["input_ids"] * 3
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some characters take several tokens
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces) and "" in pieces


def test_generate_accepts_input_ids(pair):
    ids = torch.tensor([PROMPTS[0]])
    assert pair.generate(input_ids=ids, max_new_tokens=5).token_ids == pair.generate(ids, max_new_tokens=5).token_ids


def test_engine_refuses_bad_rows_when_they_are_added(pair):
    from collm.errors import CollmError

    engine = pair.engine()
    for prompt, message in [([], "empty"), ([1, pair.vocab], "outside the vocabulary"), ([1, -1], "outside")]:
        with pytest.raises(CollmError, match=message):
            engine.add(prompt, Request(4))
    with pytest.raises(CollmError, match="cannot join"):
        engine.add([1, 2], Request(4, mode="compose"))
    assert engine.active == 0


def test_joining_rows_do_not_make_the_experts_catch_up(pair):
    """A row joining a batch whose expert has not read the latest columns gets an expert cache only as far as
    the batch's (its prompt's tail is read with the next real deferral): with a head that never defers, the
    experts read nothing but prompts, however rows arrive."""
    from collm.core.head import DeferralHead

    never = CoLLM(pair.base, pair.experts, DeferralHead.constant(pair.head.hidden_size, 0.0))
    engine = never.engine()
    arrivals = {0: [(PROMPTS[1], Request(NEW))], 4: [(PROMPTS[2], Request(NEW))], 7: [(PROMPTS[0][:2], Request(9))]}
    run_engine(engine, arrivals)
    assert engine.stats.expert_calls == 0 and engine.stats.expert_tokens == 0


def test_writer_logits_are_computed_only_for_the_tokens_it_writes(pair, monkeypatch):
    """In mode collm the head routes from the writer's hidden state first; the writer's output embedding (a
    quarter of a 0.5B model's weights) runs only at steps where some row takes the writer's token. Tokens,
    sources and defer probabilities equal those of the always-computed logits: greedy and sampled rows, rows
    joining and leaving."""
    from collm.backends import hf

    calls = []
    real = hf.HFBackbone.logits_for
    monkeypatch.setattr(hf.HFBackbone, "logits_for", lambda self, h: calls.append(h.shape[0]) or real(self, h))
    out = pair.generate([PROMPTS[0]], max_new_tokens=NEW, threshold=0.5)
    sources = out.sources[0]
    assert 0 < sum(sources) < len(sources)
    assert len(calls) == sum(1 for s in sources[1:] if s == 0)  # the first token's logits come with the prompt

    def decode():
        requests = [Request(NEW, 0.5), Request(7, 0.3), Request(NEW, 0.7, sampling=Sampling(do_sample=True, seed=3)),
                    Request(12, 0.5)]
        arrivals = {0: [(PROMPTS[1], requests[0])], 3: [(PROMPTS[2], requests[1]), (PROMPTS[0], requests[2])],
                    9: [(PROMPTS[1][:2], requests[3])]}
        _, rows = run_engine(pair.engine(), arrivals)
        return {h: [(e.token_id, e.source, e.defer_prob) for e in events] for h, events in rows.items()}

    lazy = decode()
    monkeypatch.setattr(hf, "plain_logits", lambda model: False)  # the writer's logits at every read
    assert decode() == lazy
