"""Does drafting past deferrals (``lookahead``) change Co-LLM's answers? Held-out problems at batch 1, each
answered by the engine and with the lookahead, compared token for token, answer for answer, and with the
shipped evaluation's answers (the engine at batch 55).

    OMP_NUM_THREADS=2 python research/qwen/qwen_lookahead.py --run src/collm/assets/qwen \
        --data runs/qwen/data/gsm/test.jsonl --rows 16 --lookahead 4 --out runs/qwen/lookahead4.json

In exact arithmetic the two decoders write the same tokens (tests/test_speculative.py, float32). In bfloat16 a
read of several tokens rounds differently from reads of one, so where the expert's top two logits tie the two
can part; this measures how often, and whether it moves accuracy. One row at a time, written after each row, so
the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from collm.atomic import write_json
from collm.data.answer import is_correct
from collm.pair import CoLLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="the held-out test JSONL the shipped results were decoded on")
    p.add_argument("--results", default=None, help="the shipped results (default: RUN/test_results.json)")
    p.add_argument("--rows", type=int, default=16, help="rows evenly spaced over the file")
    p.add_argument("--offset", type=int, default=5)
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    every = [json.loads(x) for x in Path(a.data).read_text().splitlines() if x.strip()]
    index = list(range(a.offset, len(every), max(1, len(every) // a.rows)))[: a.rows]
    shipped = json.loads(Path(a.results or Path(a.run) / "test_results.json").read_text())
    engine55 = next(s for s in shipped["systems"] if s["name"] == "Co-LLM")["examples"]
    if len(engine55) != len(every) or any(engine55[i]["prompt"] != every[i]["prompt"] for i in index):
        raise SystemExit(f"{a.data} is not the file the shipped results were decoded on: pass --data or --results")
    done = json.loads(a.out.read_text()) if a.out.exists() else {"settings": vars(a) | {"out": str(a.out)}, "rows": []}
    if done["settings"] != vars(a) | {"out": str(a.out)}:
        raise SystemExit(f"{a.out} was written with other settings: pass another --out")
    pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
    for i in index[len(done["rows"]):]:
        row, ids = every[i], pair.encode([every[i]["prompt"]])
        t0 = time.perf_counter()
        plain = pair.generate(ids, max_new_tokens=a.max_new_tokens)
        t1 = time.perf_counter()
        drafted = pair.generate(ids, max_new_tokens=a.max_new_tokens, lookahead=a.lookahead)
        t2 = time.perf_counter()
        ref = engine55[i]
        same = plain.token_ids[0] == drafted.token_ids[0]
        part = None if same else next((j for j, (x, y) in enumerate(zip(plain.token_ids[0], drafted.token_ids[0]))
                                       if x != y), min(len(plain.token_ids[0]), len(drafted.token_ids[0])))
        done["rows"].append({
            "row": i, "answer": row["answer"],
            "engine_b1_correct": is_correct(plain.texts[0], row["answer"]),
            "lookahead_correct": is_correct(drafted.texts[0], row["answer"]),
            "engine_b55_correct": ref["correct"],
            "lookahead_same_as_engine_b1": same, "parted_at": part,
            "engine_b1_same_as_b55": plain.texts[0] == ref["text"],
            "tokens": [len(plain.token_ids[0]), len(drafted.token_ids[0])],
            "seconds": [t1 - t0, t2 - t1],
            "expert_calls": [plain.stats["expert_calls"], drafted.stats["expert_calls"]],
        })
        write_json(a.out, done)
        print(json.dumps(done["rows"][-1]), flush=True)
    rows = done["rows"]
    summary = {k: sum(r[k] for r in rows) for k in ("engine_b1_correct", "lookahead_correct", "engine_b55_correct",
                                                    "lookahead_same_as_engine_b1", "engine_b1_same_as_b55")}
    summary["rows"] = len(rows)
    summary["seconds"] = [sum(r["seconds"][0] for r in rows), sum(r["seconds"][1] for r in rows)]
    summary["tokens"] = [sum(r["tokens"][0] for r in rows), sum(r["tokens"][1] for r in rows)]
    done["summary"] = summary
    write_json(a.out, done)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
