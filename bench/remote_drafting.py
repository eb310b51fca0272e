"""Requests and wall time per answer with a served expert: one request per deferral against one per checked draft.

    python bench/remote_drafting.py                       # SmolLM2-135M served by vLLM, GSM test prompts
    python bench/remote_drafting.py --lookahead 1,4,8 --batch 1,4 --prompts 8 --new-tokens 128

The base (SmolLM2-135M-Instruct, in process) writes with the shipped GSM head at ``--threshold``; the expert is the
same model served by a real vLLM (the CPU build in .venv-vllm/, prefix caching on) on loopback. Each setting
answers the same prompts, greedy: with lookahead 1 each deferral is one completions request (``max_tokens`` 1);
with lookahead k the base drafts past a deferral and one request (``prompt_logprobs``) checks every row's draft.
Reports requests (expert calls) and wall time per answer, the deferral rate, and whether the answers are
lookahead 1's token for token. Writes bench/results/remote_drafting.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback server helper the tests use
from vllm_server import VllmServer  # noqa: E402

from collm.atomic import write_json, write_text  # noqa: E402
from collm.backends.models import EMBEDDED_DEFAULT, hf_folder  # noqa: E402
from collm.demo.shipped import ASSETS  # noqa: E402
from collm.pair import CoLLM  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "runs" / "qwen" / "data" / "gsm" / "test.jsonl"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--lookahead", default="1,4,8")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--threshold", type=float, default=0.005,
                   help="the head's threshold: the GSM head on the plain base gives small P(defer); 0.005 defers ~25%%")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "remote_drafting"))
    a = p.parse_args()
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines()]
    step = max(1, len(rows) // a.prompts)
    prompts = [rows[i]["prompt"] for i in range(0, step * a.prompts, step)][:a.prompts]
    results = []
    with VllmServer(hf_folder(EMBEDDED_DEFAULT), "smol") as server:
        pair = CoLLM.load(EMBEDDED_DEFAULT, [server.spec], str(ASSETS / "head.safetensors"), threshold=a.threshold)
        pair.generate(prompts[:1], max_new_tokens=4)  # warm both sides
        for batch in (int(b) for b in a.batch.split(",")):
            reference = None
            for k in (int(x) for x in a.lookahead.split(",")):
                tokens, calls, deferred, new, seconds = [], 0, 0, 0, 0.0
                for start in range(0, len(prompts), batch):
                    t0 = time.perf_counter()
                    out = pair.generate(prompts[start:start + batch], max_new_tokens=a.new_tokens, lookahead=k)
                    seconds += time.perf_counter() - t0
                    tokens += out.token_ids
                    calls += out.stats["expert_calls"]
                    deferred += out.stats.get("deferred_tokens", 0)
                    new += out.stats["new_tokens"]
                reference = reference or tokens
                results.append({"batch": batch, "lookahead": k, "answers": len(prompts), "requests": calls,
                                "requests_per_answer": calls / len(prompts), "s_per_answer": seconds / len(prompts),
                                "defer_rate": deferred / new if new else 0.0, "new_tokens": new,
                                "same_as_lookahead_1": sum(x == y for x, y in zip(tokens, reference))})
                print(json.dumps(results[-1]), flush=True)
    config = vars(a) | {"threads": torch.get_num_threads()}
    write_json(Path(a.out + ".json"), {"config": config, "rows": results})
    write_text(Path(a.out + ".md"), markdown(results, a))


def markdown(results: list[dict], a) -> str:
    lines = ["| batch | lookahead | requests per answer | s per answer | × lookahead 1's time | deferral rate |"
             " same answers |", "|" + " --- |" * 7]
    for r in results:
        base = next(x for x in results if x["batch"] == r["batch"] and x["lookahead"] == 1)
        lines.append(f"| {r['batch']} | {r['lookahead']} | {r['requests_per_answer']:.1f} | {r['s_per_answer']:.2f} |"
                     f" {r['s_per_answer'] / base['s_per_answer']:.2f} | {r['defer_rate']:.3f} |"
                     f" {r['same_as_lookahead_1']}/{r['answers']} |")
    return "\n".join(lines) + f"\n\n{a.prompts} GSM test prompts, {a.new_tokens} new tokens at most, threshold " \
                              f"{a.threshold}, SmolLM2-135M-Instruct in process and served by vLLM (float32)\n"


if __name__ == "__main__":
    main()
