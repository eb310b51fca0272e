"""Rewinds on the Qwen pair: accuracy, deferral, tokens re-written and wall time per token at several settings.

Each setting answers the same validation problems with the shipped router-policy (greedy, bf16, 320 new tokens
at most) through `collm.evaluation.evaluate.run_system`; settings are rewind=δ, yield_below=γ and lookahead
as `name:rewind:yield_below:lookahead`. The first setting is the baseline (rewinds off); ms/token of every
setting is compared with it in the same run. A finished setting is written to the JSON at once and skipped
when the script is run again, so a killed run resumes.

    OMP_NUM_THREADS=1 python research/qwen/qwen_rewind.py --data runs/qwen/data/gsm/validation.jsonl \\
        --json research/qwen/results/rewind.json --markdown research/qwen/results/rewind.md
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from collm.atomic import write_json, write_text
from collm.evaluation.evaluate import EvalConfig, read_rows, run_system
from collm.pair import CoLLM

SETTINGS = "off:0:0:1,rewind0.02:0.02:0:1,rewind0.1:0.1:0:1,yield0.3:0:0.3:1,rewind0.02-d4:0.02:0:4"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="qwen")
    p.add_argument("--data", required=True)
    p.add_argument("--settings", default=SETTINGS, help="name:rewind:yield_below:lookahead, comma-separated")
    p.add_argument("--threshold", type=float, default=None, help="default: the run's")
    p.add_argument("--max-rewinds", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=55)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--markdown", type=Path)
    a = p.parse_args()
    done = json.loads(a.json.read_text())["settings"] if a.json.exists() else {}
    pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
    rows = read_rows(a.data, a.limit)
    threshold = a.threshold if a.threshold is not None else pair.threshold
    for spec in a.settings.split(","):
        name, rewind, yield_below, lookahead = spec.split(":")
        if name in done:
            continue
        config = EvalConfig(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, lookahead=int(lookahead),
                            rewind=float(rewind), yield_below=float(yield_below), max_rewinds=a.max_rewinds)
        changed = {"rewritten": 0, "yielded": 0}
        result = run_system(_Counting(pair, changed), rows, name, config, threshold=threshold)
        entry = {k: v for k, v in asdict(result).items() if k != "examples"}
        entry |= changed | {"rewind": float(rewind), "yield_below": float(yield_below), "lookahead": int(lookahead),
                            "answers": [e["text"] for e in result.examples]}
        done[name] = entry
        write_json(a.json, {"run": a.run, "data": a.data, "threshold": threshold, "dtype": a.dtype,
                            "max_new_tokens": a.max_new_tokens, "rows": len(rows), "settings": done})
        print(name, f"{result.correct}/{result.total}", f"defer {result.defer_rate:.3f}", changed, flush=True)
    if a.markdown:
        write_text(a.markdown, markdown(done))
    print(markdown(done))


class _Counting:
    """The pair, adding up the rewinds each generate call reports."""

    def __init__(self, pair, changed: dict):
        self._pair, self._changed = pair, changed

    def __getattr__(self, name):
        return getattr(self._pair, name)

    def generate(self, *args, **kwargs):
        out = self._pair.generate(*args, **kwargs)
        for key in self._changed:
            self._changed[key] += out.stats.get(key, 0)
        return out


def markdown(settings: dict) -> str:
    names = list(settings)
    base = settings[names[0]] if names else None
    lines = ["| setting | rewind δ | yield_below γ | lookahead | correct | accuracy (95%) | deferral | re-written |"
             " yielded | expert calls | ms/token | × baseline time |", "|" + " --- |" * 12]
    for name in names:
        s = settings[name]
        ms = 1000 * s["seconds"] / s["new_tokens"]
        ratio = ms / (1000 * base["seconds"] / base["new_tokens"])
        lines.append(f"| {name} | {s['rewind']} | {s['yield_below']} | {s['lookahead']} | {s['correct']}/{s['total']}"
                     f" | {s['accuracy']:.3f} ({s['ci_low']:.3f}–{s['ci_high']:.3f}) | {s['defer_rate']:.3f} |"
                     f" {s['rewritten']} | {s['yielded']} | {s['expert_calls']} | {ms:.1f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
