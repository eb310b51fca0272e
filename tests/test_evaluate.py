"""Evaluation: Wilson intervals, the random router, and the systems table on tiny models."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_llama

from collm.errors import CollmError
from collm.evaluation.evaluate import (
    EvalConfig,
    evaluate,
    markdown_table,
    random_router,
    read_rows,
    run_system,
    save_results,
    wilson_interval,
)
from collm.pair import CoLLM


@pytest.mark.parametrize(("correct", "total", "low", "high"),
                         [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
                          (81, 100, 0.7222, 0.8749)])
def test_wilson_interval_known_values(correct, total, low, high):
    got = wilson_interval(correct, total)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_random_router_defers_at_the_rate_and_is_seeded():
    log_pz = torch.log(torch.full((4000, 2), 0.5))
    assert random_router(0.0, 0)(0, log_pz).sum() == 0
    assert (random_router(1.0, 0)(0, log_pz) == 1).all()
    picks = random_router(0.3, 1)(0, log_pz)
    assert abs(picks.float().mean().item() - 0.3) < 0.03
    assert torch.equal(picks, random_router(0.3, 1)(0, log_pz))


class ScriptedPair:
    """Stands in for CoLLM: answers from a script, so exact match is checked without a model."""

    threshold = 0.5
    tokenizer = None

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, **kwargs):
        texts = [self.answers[p] for p in prompts]
        ids = [[1, 2, 3] for _ in texts]
        return SimpleNamespace(texts=texts, token_ids=ids, sources=[[0, 1, 0] for _ in texts],
                               defer_probs=[[0.1, 0.9, 0.2] for _ in texts],
                               stats={"new_tokens": 3 * len(texts), "deferred_tokens": len(texts),
                                      "expert_calls": len(texts), "seconds": 0.5})


def test_run_system_scores_by_exact_match_and_sums_stats():
    rows = [{"prompt": "a", "answer": "18"}, {"prompt": "b", "answer": "1,200"}, {"prompt": "c", "answer": 7}]
    pair = ScriptedPair({"a": "so #### 18", "b": "The final answer is $1200.00.", "c": "I think 8"})
    result = run_system(pair, rows, "scripted", EvalConfig(batch_size=2))
    assert (result.correct, result.total) == (2, 3)
    assert result.defer_rate == pytest.approx(1 / 3)
    assert result.expert_calls == 3 and result.new_tokens == 9
    assert result.tokens_per_s == pytest.approx(9 / 1.0)  # two batches of 0.5 s
    assert [e["correct"] for e in result.examples] == [True, True, False]
    assert result.share_in_numbers == 1.0  # the deferred token's text is "2": a digit


def test_read_rows_errors(tmp_path):
    with pytest.raises(CollmError, match="does not exist"):
        read_rows(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": 1}\n{"prompt": 3}\n')
    with pytest.raises(CollmError, match="bad.jsonl:2"):
        read_rows(bad)


@pytest.fixture(scope="module")
def tiny_pair():
    from conftest import make_tokenizer

    return CoLLM(make_llama(0), [make_llama(1)], None, make_tokenizer(), threshold=0.4)


def test_evaluate_table_on_tiny_models(tiny_pair, tmp_path):
    rows = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "And 4+4?", "answer": "8"}]
    results = evaluate(tiny_pair, rows, EvalConfig(max_new_tokens=4, batch_size=2), weak_run="runs/weak",
                       load_run=lambda folder: tiny_pair)
    by_name = {s["name"]: s for s in results["systems"]}
    assert by_name["base alone"]["defer_rate"] == 0 and by_name["expert alone"]["defer_rate"] == 1
    assert by_name["Co-LLM"]["defer_rate"] == 1  # zero head: P(expert) = 0.5 > 0.4 everywhere
    assert by_name["random deferral"]["defer_rate"] == 1
    assert by_name["Co-LLM, weak-supervision head"]["accuracy"] is not None
    assert by_name["SFT base alone"]["accuracy"] is None and "not run" in by_name["SFT base alone"]["note"]
    assert by_name["proxy tuning"]["accuracy"] is None
    table = markdown_table(results)
    assert all(name in table for name in by_name)
    save_results(results, tmp_path / "r.json", tmp_path / "r.md")
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == 2
    assert (tmp_path / "r.md").read_text() == table


def test_proxy_tuning_row_runs_when_an_sft_run_is_given(tiny_pair, tmp_path):
    from conftest import make_tokenizer, save_tiny

    original = save_tiny(make_llama(0), make_tokenizer(), tmp_path / "original")
    sft = CoLLM(make_llama(5), [make_llama(1)], None, make_tokenizer(),
                info={"base": original, "base_weights": "full", "dtype": "float32"})
    rows = [{"prompt": "What is 2+3?", "answer": "5"}]
    results = evaluate(tiny_pair, rows, EvalConfig(max_new_tokens=4), sft_run="runs/sft", load_run=lambda f: sft)
    proxy = {s["name"]: s for s in results["systems"]}["proxy tuning"]
    assert proxy["accuracy"] is not None and proxy["total"] == 1
    assert proxy["expert_calls"] == 2 * proxy["new_tokens"] and original in proxy["note"]


def test_proxy_tuning_loads_the_untuned_base_in_the_tuned_base_s_dtype(tiny_pair, tmp_path, monkeypatch):
    """collm.json records the training dtype (float32); an evaluation in bfloat16 must subtract a bfloat16
    untuned base from the bfloat16 tuned one."""
    from conftest import make_tokenizer, save_tiny

    import collm.backends.models as models

    original = save_tiny(make_llama(0), make_tokenizer(), tmp_path / "original")
    sft = CoLLM(make_llama(5).to(torch.bfloat16), [make_llama(1)], None, make_tokenizer(),
                info={"base": original, "base_weights": "full", "dtype": "float32"})
    asked, real = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec, **kw: asked.append(kw["dtype"]) or real(spec, **kw))
    evaluate(tiny_pair, [{"prompt": "What is 2+3?", "answer": "5"}], EvalConfig(max_new_tokens=2),
             sft_run="runs/sft", load_run=lambda f: sft)
    assert asked == ["bfloat16"]


def test_sft_row_reuses_base_alone_when_the_run_decodes_the_sft_base_frozen(tiny_pair, tmp_path):
    sft_run = tmp_path / "sft"
    tiny_pair.specs = {"base": str(sft_run / "base_adapter")}  # a head trained on that run's base, frozen
    sft = CoLLM(make_llama(0), [make_llama(1)], None, tiny_pair.tokenizer, info={"base_weights": "original"})
    rows = [{"prompt": "What is 2+3?", "answer": "5"}]
    results = evaluate(tiny_pair, rows, EvalConfig(max_new_tokens=4), sft_run=sft_run, load_run=lambda f: sft)
    by_name = {s["name"]: s for s in results["systems"]}
    base, row = by_name["base alone"], by_name["SFT base alone"]
    assert {k: v for k, v in row.items() if k not in ("name", "note")} == \
        {k: v for k, v in base.items() if k not in ("name", "note")}
    assert "same model as base alone" in row["note"]
    tiny_pair.specs = {"base": str(tmp_path / "elsewhere")}
    results = evaluate(tiny_pair, rows, EvalConfig(max_new_tokens=4), sft_run=sft_run, load_run=lambda f: sft)
    assert "same model" not in {s["name"]: s for s in results["systems"]}["SFT base alone"]["note"]


def test_prompts_longer_than_the_context_are_refused_before_decoding():
    from conftest import make_gpt2, make_tokenizer

    pair = CoLLM(make_gpt2(0), [make_gpt2(1)], None, make_tokenizer())  # 512 positions
    calls = []
    pair.generate = lambda *a, **k: calls.append(1)
    rows = [{"prompt": "2+3?", "answer": "5"}, {"prompt": "x" * 500, "answer": "1"}]
    with pytest.raises(CollmError, match=r"1 of 2 rows have a prompt that with --max-new-tokens 20 exceeds the "
                                         r"base's context of 512 tokens"):
        evaluate(pair, rows, EvalConfig(max_new_tokens=20, batch_size=1))
    assert calls == []
