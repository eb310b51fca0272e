"""An expert of another family in a batch: its forward over every row of the batch against only the rows that
have new tokens (`HFBackbone.read_rows`), same prompts, same process, one run per table.

B held-out prompts (spread over the file) are answered together, greedy, to ``--new-tokens`` by Co-LLM at the
run's threshold twice: once with the expert reading only the rows with new tokens (collm's path), once with
every forward over all rows (the read before it, restored for this measurement by turning ``read_rows`` off),
and the expert alone as the reference. tokens/s = the batch's new tokens over the call's wall time; the table
also says whether the two Co-LLM answers are token for token the same, and what the seam cost: the windows
re-tokenized, the expert's cache cut back, its forward passes, and the seconds spent on the text (decoding the
base's tokens, re-tokenizing, mapping spans) against the call's. With ``--batch 1`` each of ``--prompts``
answers is decoded alone (one forward always holds every row there, so only Co-LLM and the expert run).

    python bench/cross_rows.py --run runs/cross/router --data runs/cross/data/gsm/test.jsonl --batch 55 \\
        --new-tokens 128 --markdown bench/results/cross_rows.md
    python bench/cross_rows.py --run runs/cross/router --data runs/cross/data/gsm/test.jsonl --batch 1 \\
        --prompts 8 --new-tokens 320 --markdown bench/results/cross_seam_b1.md

Run it on a quiet machine: the systems run back to back.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from collm.atomic import write_json, write_text
from collm.backends.cross import CrossExpert
from collm.pair import CoLLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run folder whose expert has another tokenizer")
    p.add_argument("--data", required=True, help="JSONL with prompts")
    p.add_argument("--batch", type=int, default=55)
    p.add_argument("--prompts", type=int, default=8, help="with --batch 1: answers decoded one at a time")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threshold", type=float, default=None, help="Co-LLM's threshold; default: the run's")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    a = p.parse_args()
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines() if x.strip()]
    count = a.prompts if a.batch == 1 else a.batch
    picked = rows[:: max(1, len(rows) // count)][:count]
    pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
    eta = pair.threshold if a.threshold is None else a.threshold
    expert = pair.experts[0]
    if not isinstance(expert, CrossExpert):
        raise SystemExit(f"{a.run}: its expert shares the base's tokenizer; this benchmark is for one that does not")
    ids = pair.encode([r["prompt"] for r in picked])
    pair.generate(ids[:2], max_new_tokens=4, threshold=eta)  # warm-up

    groups = [[one] for one in ids] if a.batch == 1 else [ids]
    counted = ("seam_windows", "seam_cutbacks", "cross_forwards", "seam_seconds", "deferred_tokens")

    def timed(name: str, **kwargs) -> dict:
        start = time.perf_counter()
        tokens, sums, token_ids, sources = 0, dict.fromkeys(counted, 0.0), [], []
        for group in groups:
            out = pair.generate(group, max_new_tokens=a.new_tokens, threshold=eta, **kwargs)
            tokens += sum(len(t) for t in out.token_ids)
            token_ids += out.token_ids
            sources += out.sources
            for key in counted:
                sums[key] += out.stats.get(key, 0)
        seconds = time.perf_counter() - start
        print(f"{name}: {tokens} tokens in {seconds:.1f} s", flush=True)
        return {"system": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "defer_rate": sums["deferred_tokens"] / max(tokens, 1), **sums, "ids": token_ids,
                "sources": sources}

    runs = [timed("Co-LLM, the expert reads the rows with new tokens")]
    if a.batch > 1:
        expert.row_reads = False  # every forward over all rows
        try:
            runs.append(timed("Co-LLM, every expert forward over all rows"))
        finally:
            expert.row_reads = True
    runs.append(timed("expert alone", mode="expert"))
    same = runs[0]["ids"] == runs[1]["ids"] and runs[0]["sources"] == runs[1]["sources"] if a.batch > 1 else None
    results = [{k: v for k, v in r.items() if k not in ("ids", "sources")} for r in runs]
    lines = ["| system | tokens | s | tokens/s | × expert alone | deferral rate | windows re-tokenized | cut-backs | "
             "expert forwards | s on the text (share of the call) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['system']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.2f} | "
                     f"{r['tokens_per_s'] / results[-1]['tokens_per_s']:.2f} | {r['defer_rate']:.3f} | "
                     f"{r['seam_windows']:.0f} | {r['seam_cutbacks']:.0f} | {r['cross_forwards']:.0f} | "
                     f"{r['seam_seconds']:.2f} ({r['seam_seconds'] / r['seconds']:.1%}) |")
    shape = f"{len(picked)} answers one at a time" if a.batch == 1 else f"batch {len(picked)}"
    lines += ["", f"{a.run}, eta {eta:g}, {shape}, {a.new_tokens} new tokens at most, {a.dtype}"
              + ("" if same is None else f"; the two Co-LLM answers token for token the same: {same}")]
    print("\n".join(lines))
    if a.json:
        write_json(a.json, {"results": results, "same_tokens": same, "batch": len(picked), "eta": eta,
                            "new_tokens": a.new_tokens, "dtype": a.dtype, "run": str(a.run)})
    if a.markdown:
        write_text(a.markdown, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
