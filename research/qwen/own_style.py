"""Training rows in a model's own style: its greedy solutions to training problems, kept where the answer is right.

Both Qwen2.5-Coder instruct models write markdown solutions, far from GSM8K's ``<<a=b>>`` notes; a head trained
on GSM's gold text learns where the expert predicts *GSM's* next token, not where the base goes wrong in its own
writing. So the head trains on the expert's own solutions (the base is scored on them too).

With ``--run`` a trained Co-LLM pair writes instead (greedy, at the run's threshold): its mixed answers are the
prefixes a router really reads at decoding time (on-policy rows; keep them all with ``--keep all``).

    python research/qwen/own_style.py --model qwen2.5-coder-1.5b-instruct --data runs/qwen/data/gsm/train.jsonl \
        --rows 160 --out runs/qwen/own_style

Writes ``chunk-NNN.jsonl`` (every generated row, with ``correct`` and ``finished``) one batch at a time, so a
killed run resumes at the next batch, then ``train.jsonl``: the rows that are right and ended before the token
limit, as ``{"prompt", "completion", "answer", "template"}``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from collm.atomic import atomic_write
from collm.backends.models import load_model
from collm.data.answer import is_correct
from collm.pair import CoLLM


def pick_rows(path: Path, n: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="the model that writes alone (a model spec)")
    group.add_argument("--run", type=Path, help="a trained run folder: its Co-LLM pair writes, at its threshold")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", choices=("right", "all"), default="right",
                   help="right: rows whose answer is right and that ended (training text in the model's style); "
                        "all: every row, as written (the base's own trajectories, where a router decides)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = pick_rows(a.data, a.rows, a.seed)
    pair = None
    for k, start in enumerate(range(0, len(rows), a.batch_size)):
        chunk = a.out / f"chunk-{k:03d}.jsonl"
        if chunk.exists():
            continue
        if pair is None and a.run:
            pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
        elif pair is None:  # one model writes alone: the same object serves as base, no expert ever runs
            model, tokenizer = load_model(a.model, dtype=a.dtype)
            pair = CoLLM(base=model, experts=[model], head=None, tokenizer=tokenizer)
        batch = rows[start:start + a.batch_size]
        t = time.time()
        out = pair.generate([r["prompt"] for r in batch], max_new_tokens=a.max_new_tokens,
                            mode="collm" if a.run else "base")
        lines = [json.dumps({"prompt": r["prompt"], "completion": text, "answer": r["answer"],
                             "template": r.get("template"), "correct": is_correct(text, r["answer"]),
                             "finished": len(ids) < a.max_new_tokens,
                             "deferred": sum(1 for s in sources if s) / max(len(ids), 1)})
                 for r, text, ids, sources in zip(batch, out.texts, out.token_ids, out.sources)]
        atomic_write(chunk, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        print(f"batch {k}: {sum(json.loads(x)['correct'] for x in lines)}/{len(batch)} right, "
              f"{out.stats.get('new_tokens')} tokens in {time.time() - t:.0f} s", flush=True)
    done = [json.loads(line) for c in sorted(a.out.glob("chunk-*.jsonl")) for line in c.read_text().splitlines()]
    kept = [{k: r[k] for k in ("prompt", "completion", "answer", "template")} for r in done
            if a.keep == "all" or (r["correct"] and r["finished"])]
    atomic_write(a.out / "train.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
    print(json.dumps({"generated": len(done), "right": sum(r["correct"] for r in done), "kept": len(kept)}))


if __name__ == "__main__":
    main()
