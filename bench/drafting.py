"""Drafting past deferrals in the engine, in a batch: tokens/s of whole answers on real prompts, one run per table.

For each batch size B, B held-out prompts (spread over the file) are answered together by each system, greedy,
to ``--new-tokens`` (an answer may end at EOS before): the base alone, the expert alone, Co-LLM at the run's
threshold, Co-LLM drafting past deferrals at each ``--lookahead`` k, and speculative decoding in the same loop
(mode expert with lookahead k: the base drafts every token, the expert checks). tokens/s = the batch's new tokens
over the call's wall time (prefill included). Each row also reports the expert's reads, the deferred positions it
judged, the drafts it cut, the drafted tokens dropped, and whether the answers are token for token those of the
same system without drafting (greedy Co-LLM's, or the expert's for speculative decoding).

    python bench/drafting.py --run qwen --data runs/qwen/data/gsm/test.jsonl --batch 1,4,8 --lookahead 4,8 \\
        --json bench/results/drafting_qwen.json --markdown bench/results/drafting_qwen.md

Run it on a quiet machine: the systems of one batch size run back to back, so a slow spell shifts their ratios.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from collm.atomic import write_json, write_text
from collm.pair import CoLLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder or shipped run name (qwen, smollm2)")
    p.add_argument("--data", required=True, help="JSONL with prompts")
    p.add_argument("--batch", default="1,4,8", help="batch sizes, comma-separated")
    p.add_argument("--lookahead", default="4,8", help="draft lengths, comma-separated")
    p.add_argument("--new-tokens", type=int, default=320)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threshold", type=float, default=None, help="Co-LLM's threshold; default: the run's")
    p.add_argument("--systems", default="base,expert,collm,collm-draft,expert-draft",
                   help="comma-separated, from base, expert, collm, collm-draft, expert-draft")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    a = p.parse_args()
    batches = [int(x) for x in a.batch.split(",") if x.strip()]
    lookaheads = [int(x) for x in a.lookahead.split(",") if x.strip()]
    chosen = {x.strip() for x in a.systems.split(",") if x.strip()}
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines() if x.strip()]
    pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
    eta = pair.threshold if a.threshold is None else a.threshold
    pair.generate(pair.encode([rows[0]["prompt"]]), max_new_tokens=4, mode="collm", threshold=eta)  # warm-up
    results = []
    for batch in batches:
        picked = rows[:: max(1, len(rows) // batch)][:batch]
        ids = pair.encode([r["prompt"] for r in picked])
        systems = [(name, mode, 1) for name, mode in (("base alone", "base"), ("expert alone", "expert"),
                                                     (f"Co-LLM (eta={eta:g})", "collm")) if mode in chosen]
        systems += [(f"Co-LLM (eta={eta:g}), lookahead {k}", "collm", k) for k in lookaheads
                    if "collm-draft" in chosen]
        systems += [(f"speculative decoding (expert, lookahead {k})", "expert", k) for k in lookaheads
                    if "expert-draft" in chosen]
        plain: dict[str, list] = {}
        for name, mode, k in systems:
            started = time.perf_counter()
            out = pair.generate(ids, max_new_tokens=a.new_tokens, mode=mode, threshold=eta, lookahead=k)
            seconds = time.perf_counter() - started
            s = out.stats
            if k == 1:
                plain[mode] = out.token_ids
            row = {"system": name, "batch": batch, "lookahead": k, "tokens_per_s": s["new_tokens"] / seconds,
                   "seconds": seconds, "new_tokens": s["new_tokens"],
                   "defer_rate": s["defer_rate"] if mode == "collm" else None,
                   **{key: s[key] for key in ("expert_calls", "expert_tokens", "checked", "drafts_cut", "discarded",
                                              "steps")}}
            if k > 1 and mode in plain:
                row["same_answers"] = sum(x == y for x, y in zip(out.token_ids, plain[mode]))
            print(json.dumps(row), flush=True)
            results.append(row)
    summary = {"run": a.run, "threshold": eta, "new_tokens": a.new_tokens, "dtype": a.dtype,
               "threads": torch.get_num_threads(), "rows": results}
    if a.json:
        write_json(a.json, summary)
    if a.markdown:
        write_text(a.markdown, markdown(summary))
    print(markdown(summary))


def markdown(summary: dict) -> str:
    lines = ["| batch | system | tokens/s | × expert alone | defer rate | expert reads | judged | drafts cut | "
             "dropped | same answers |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    expert = {r["batch"]: r["tokens_per_s"] for r in summary["rows"] if r["system"] == "expert alone"}
    for r in summary["rows"]:
        ratio = f"{r['tokens_per_s'] / expert[r['batch']]:.2f}" if r["batch"] in expert else "–"
        rate = f"{r['defer_rate']:.3f}" if r["defer_rate"] is not None else ""
        same = f"{r['same_answers']}/{r['batch']}" if "same_answers" in r else ""
        lines.append(f"| {r['batch']} | {r['system']} | {r['tokens_per_s']:.2f} | {ratio} | {rate} | "
                     f"{r['expert_calls']} | {r['checked']} | {r['drafts_cut']} | {r['discarded']} | {same} |")
    return "\n".join(lines) + (f"\n\n{summary['dtype']}, {summary['threads']} thread(s), {summary['new_tokens']} "
                               f"new tokens at most, threshold {summary['threshold']:g}, run {summary['run']}\n")


if __name__ == "__main__":
    main()
