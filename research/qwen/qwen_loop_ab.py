"""Time Co-LLM with lookahead 4 at batch 1 under whichever collm is on PYTHONPATH: an A/B of two checkouts.

Used to compare the engine's drafting with the separate drafting loop it replaced (the commit before faa145e),
on the same machine in one sitting; alternate the checkouts so that the shared machine's drift falls on both:

    git worktree add /tmp/old faa145e~1
    for k in 1 2 3 4; do
      PYTHONPATH=/tmp/old/src python research/qwen/qwen_loop_ab.py old$k 0,5 --out runs/qwen/loop-ab
      PYTHONPATH=src python research/qwen/qwen_loop_ab.py new$k 0,5 --out runs/qwen/loop-ab
    done

Rows are indexes into the 8 test prompts that qwen_speed.py --spread --prompts 8 takes; each answer's wall time
(prefill included) and length are printed and written to <out>/<label>.json. --expert also times the expert alone.
The measured A/B (results/cpu_qwen_loop_ab.json) gathers such runs' printed lines, runs 1-2 with --expert.
"""

import argparse
import json
import time
from pathlib import Path

import collm
from collm.pair import CoLLM

p = argparse.ArgumentParser()
p.add_argument("label")
p.add_argument("rows", help="comma-separated indexes into the 8 spread prompts (a repeat is timed again)")
p.add_argument("--run", default="src/collm/assets/qwen")
p.add_argument("--data", default="runs/qwen/data/gsm/test.jsonl")
p.add_argument("--expert", action="store_true", help="also the expert alone, after each Co-LLM answer")
p.add_argument("--out", type=Path, required=True)
a = p.parse_args()
every = [json.loads(x) for x in Path(a.data).read_text().splitlines() if x.strip()]
spread = every[:: len(every) // 8][:8]
pick = [int(i) for i in a.rows.split(",")]
pair = CoLLM.from_pretrained(a.run, dtype="bfloat16")
ids = pair.encode([spread[i]["prompt"] for i in pick])
modes = [("collm", 4)] + ([("expert", None)] if a.expert else [])
record = {"collm": collm.__file__, "label": a.label, "answers": []}
for i, x in zip(pick, ids):
    for mode, lookahead in modes:
        started = time.perf_counter()
        out = pair.generate([x], max_new_tokens=320, mode=mode, threshold=pair.threshold, lookahead=lookahead)
        seconds = time.perf_counter() - started
        record["answers"].append({"row": i, "mode": mode, "seconds": seconds, "tokens": len(out.token_ids[0])})
        print(a.label, i, mode, round(seconds, 2), len(out.token_ids[0]), flush=True)
a.out.mkdir(parents=True, exist_ok=True)
(a.out / f"{a.label}.json").write_text(json.dumps(record, indent=1))
