"""Where Co-LLM's decoding time goes, call by call: every forward of the base and of the expert timed inside
collm's loop, at batch 1, on whole answers to held-out prompts.

    OMP_NUM_THREADS=2 python research/qwen/qwen_calls.py --run runs/qwen/router --data runs/qwen/data/gsm/test.jsonl

For each prompt (the same rows as ``research/qwen/qwen_speed.py --spread``): new tokens, deferred tokens, decoding
ms/token (prefill excluded), the base's reads (count, mean ms), the expert's catch-up reads of one token and of
several (count, mean ms), and what the loop spends outside the models per token. τ(f) = t_base + f·t_expert
holds when each deferral costs one expert read and nothing else grows; this shows whether it does.
"""

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from collm.pair import CoLLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="trained run folder (collm.json with the calibrated threshold)")
    p.add_argument("--data", required=True, help="JSONL with prompts (held-out test problems)")
    p.add_argument("--prompts", type=int, default=8, help="prompts, evenly spaced over the file")
    p.add_argument("--new-tokens", type=int, default=320)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", type=Path, help="write the per-prompt rows here")
    a = p.parse_args()
    every = [json.loads(x) for x in Path(a.data).read_text().splitlines() if x.strip()]
    rows = every[::max(1, len(every) // a.prompts)][:a.prompts]
    pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
    calls: list[tuple[str, int, float]] = []

    def timed(model, name):
        """Time every forward of ``model`` with PyTorch's module hooks (the model object is not replaced)."""
        began = {}

        def before(module, args, kwargs):
            began["t"], began["n"] = time.perf_counter(), kwargs["input_ids"].shape[1]

        def after(module, args, kwargs, output):
            calls.append((name, began["n"], time.perf_counter() - began["t"]))

        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, with_kwargs=True)

    timed(pair.base, "base")
    timed(pair.experts[0], "expert")
    prompts = pair.encode([r["prompt"] for r in rows])
    pair.generate([prompts[0]], max_new_tokens=4)  # warm-up: first calls allocate and pick kernels
    results = []
    for ids in prompts:
        calls.clear()
        started = time.perf_counter()
        out = pair.generate([ids], max_new_tokens=a.new_tokens)
        total = time.perf_counter() - started
        prefill = sum(dt for *_, dt in calls[:2])  # both models read the prompt up front
        groups = defaultdict(list)
        for name, width, dt in calls[2:]:
            groups[name if name == "base" else f"expert, {'1 token' if width == 1 else '2+ tokens'}"].append(dt)
        n = len(out.token_ids[0])
        row = {"prompt_tokens": len(ids), "new_tokens": n, "deferred": sum(1 for s in out.sources[0] if s),
               "ms_per_token": 1000 * (total - prefill) / n,
               "reads": {k: {"count": len(v), "mean_ms": 1000 * sum(v) / len(v)} for k, v in sorted(groups.items())},
               "outside_models_ms_per_token": 1000 * (total - sum(dt for *_, dt in calls)) / n}
        print(json.dumps(row), flush=True)
        results.append(row)
    new = sum(r["new_tokens"] for r in results)
    summary = {"prompts": len(results), "new_tokens": new, "deferral_rate": sum(r["deferred"] for r in results) / new,
               "ms_per_token": sum(r["ms_per_token"] * r["new_tokens"] for r in results) / new}
    print(json.dumps(summary))
    if a.json:
        from collm.atomic import write_json
        write_json(a.json, {"rows": results, "summary": summary, "run": str(a.run), "dtype": a.dtype})


if __name__ == "__main__":
    main()
