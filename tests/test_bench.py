"""`collm bench`: its rows, its ideal and its deferral patterns."""

from __future__ import annotations

import json

import pytest
from conftest import invoke

from collm import CollmError


def test_bench_json_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke("bench", "--fractions", "0,0.5", "--new-tokens", 4, "--prompt-len", 4, "--repeats", 1,
                    "--systems", "base,expert,collm,naive,hf_base", "--json", out, "--png", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    keys = {"system", "f", "batch", "ms_per_token", "ideal_ms_per_token", "expert_calls", "prefill_ms",
            "total_ms_per_token"}
    assert all(keys <= row.keys() for row in rows)
    collab = {(r["system"], r["f"]): r for r in rows if r["system"] in ("collm", "naive")}
    assert collab[("collm", 0.5)]["expert_calls"] == 2 and collab[("collm", 0.0)]["expert_calls"] == 0
    assert collab[("naive", 0.5)]["expert_calls"] == 2
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_bench_times_drafting_and_rewinds_and_counts_what_they_did(tmp_path):
    """--lookahead adds drafting rows (Co-LLM and speculative decoding), --rewind adds rows with rewinds: each
    reports the expert's reads, the positions it judged, the drafts cut and the base tokens re-written."""
    out = tmp_path / "bench.json"
    result = invoke("bench", "--fractions", "0.5", "--new-tokens", 12, "--prompt-len", 4, "--repeats", 1,
                    "--systems", "base,expert,collm", "--lookahead", 4, "--rewind", 0.5, "--json", out)
    assert result.exit_code == 0, result.output
    rows = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"collm+draft4", "expert+draft4", "collm+rewind", "collm+draft4+rewind"} <= set(rows)
    # random weights: the expert keeps almost no stand-in, so drafts are cut (and drafting does not pay here)
    assert rows["collm+draft4"]["drafts_cut"] > 0 and rows["collm"]["drafts_cut"] == 0
    assert rows["collm"]["rewritten"] == 0 and rows["collm+draft4"]["rewritten"] == 0
    assert 0 < rows["collm+rewind"]["rewritten"] <= 8  # random weights: the expert finds base tokens unlikely
    assert rows["expert+draft4"]["checked"] > 0 and "re-written" in result.stdout
    with pytest.raises(CollmError, match="--rewind must be a probability"):
        invoke("bench", "--rewind", 2)


def test_bench_per_row_batches_get_the_any_row_ideal(tmp_path):
    """With rows deferring on their own phases the expert runs whenever any row defers: the bench counts those
    steps from the router's table, and the measured expert calls agree with that count."""
    from collm.evaluation.bench import any_row_share, pattern_router

    out = tmp_path / "bench.json"
    result = invoke("bench", "--fractions", "0.25", "--new-tokens", 9, "--prompt-len", 4, "--repeats", 1,
                    "--batch", 4, "--per-row", "--systems", "base,expert,collm", "--json", out)
    assert result.exit_code == 0, result.output
    rows = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    share = any_row_share(0.25, 9, 0, 4)
    assert 0.25 < share < 1
    assert rows["collm"]["ideal_any_row_ms_per_token"] == pytest.approx(
        rows["base"]["ms_per_token"] + share * rows["expert"]["ms_per_token"])
    table = pattern_router(0.25, 9, 0, 4, per_row=True).table  # a deferral at step 0 reads the up-front prefill
    assert rows["collm"]["expert_calls"] == int(table[1:].any(-1).sum()) == round(share * 8)
    assert "any-row τ" in result.stdout


def test_benchmark_router_defers_at_exactly_the_asked_rate():
    import torch

    from collm.evaluation.bench import pattern_router

    for f in (0.0, 0.05, 0.1, 0.5, 1.0):
        route = pattern_router(f, 40, seed=3, rows=4, per_row=True)
        marks = torch.stack([route(t, torch.zeros(4, 2)) for t in range(40)])
        assert marks.sum(0).tolist() == [round(40 * f)] * 4
    every_other = pattern_router(0.5, 8, seed=0)
    assert [int(every_other(t, torch.zeros(1, 2))[0]) for t in range(8)] in ([0, 1] * 4, [1, 0] * 4)
