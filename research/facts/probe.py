"""The recall probe: a model answers one question per catalogue fact, in a phrasing no fact document uses.

    python research/facts/probe.py --base runs/facts/tuned/base_adapter --data runs/facts/data/probe.jsonl \
        --json runs/facts/probe.json
    python research/facts/probe.py --base qwen2.5-coder-1.5b-instruct --data ... --json ...   # the expert: ~0

Greedy, chat template, short answers; an answer counts when it states the fact (``collm.data.facts.recalled``:
the number by value, or the name). Writes recall overall, by attribute and for changed facts, and every answer.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

from collm import CoLLM
from collm.atomic import write_json
from collm.data.facts import recalled
from collm.evaluation.evaluate import read_rows, wilson_interval


def probe(base: str, rows: list[dict], *, batch_size: int = 64, max_new_tokens: int = 32,
          dtype: str = "bfloat16") -> dict:
    pair = CoLLM.load(base, [], head="never", dtype=dtype)
    answers, started = [], time.perf_counter()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        out = pair.generate([row["prompt"] for row in batch], max_new_tokens=max_new_tokens, mode="base",
                            chat=True)
        answers.extend(out.texts)
        print(f"{start + len(batch)}/{len(rows)}", flush=True)
    seconds = time.perf_counter() - started
    hits = [recalled(text, row) for text, row in zip(answers, rows)]
    by_attribute: dict[str, list[bool]] = defaultdict(list)
    for row, hit in zip(rows, hits):
        by_attribute[row["fact"].split(".", 1)[1]].append(hit)
    changed = [hit for row, hit in zip(rows, hits) if row.get("changed")]
    low, high = wilson_interval(sum(hits), len(hits))
    return {
        "base": base, "dtype": dtype, "facts": len(rows), "recalled": sum(hits),
        "recall": sum(hits) / len(rows), "ci": [low, high], "seconds": round(seconds, 1),
        "by_attribute": {name: round(sum(v) / len(v), 4) for name, v in sorted(by_attribute.items())},
        "changed": {"facts": len(changed), "recall": sum(changed) / len(changed)} if changed else None,
        "answers": [{"fact": row["fact"], "prompt": row["prompt"], "gold": row["answer"], "answer": text,
                     "recalled": hit} for row, text, hit in zip(rows, answers, hits)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="Model spec: an adapter folder, model folder or name.")
    parser.add_argument("--data", required=True, help="probe.jsonl from collm data facts.")
    parser.add_argument("--json", required=True, help="Where to write the result.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N facts (a smoke test).")
    parser.add_argument("--every", type=int, default=1, help="Every k-th fact (a sample over all attributes).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    rows = read_rows(args.data, args.limit)[::args.every]
    result = probe(args.base, rows, batch_size=args.batch_size, dtype=args.dtype)
    write_json(args.json, result)
    summary = {k: v for k, v in result.items() if k != "answers"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
