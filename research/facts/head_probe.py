"""Where a trained head would defer on gold solutions: pi at every completion token of some rows, its quantiles,
and pi at the tokens of the fact sentences (the completion's first lines state the facts) against the rest.

    python research/facts/head_probe.py --run runs/facts/collm-tuned-qa \
        --data runs/facts/data/validation.jsonl --every 4

A quick check before calibrating: which thresholds give which deferral rates on gold text (decoding writes its
own text, so calibration measures the real rate), and whether the head leaves the fact tokens to the base.
"""

from __future__ import annotations

import argparse
import json

import torch

from collm.pair import CoLLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--every", type=int, default=1, help="every k-th row")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
    tok = pair.tokenizer
    rows = [json.loads(line) for line in open(a.data)][:: a.every][: a.limit]
    fact_pi, other_pi, value_pi = [], [], []
    for row in rows:
        prompt = pair.encode(row["prompt"])[0]
        facts = row.get("facts_text", "")
        completion = row["completion"]
        ids = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
        full = torch.tensor([prompt + ids["input_ids"]])
        with torch.inference_mode():
            out = pair.base(input_ids=full, output_hidden_states=True)
            hidden = out.hidden_states[-1][0]
            # the head at position t decides who writes token t+1
            pi = 1 - pair.head.probs(hidden.float())[..., 0]
        for i, (start, _) in enumerate(ids["offset_mapping"]):
            value = float(pi[len(prompt) + i - 1])
            in_facts = facts and completion.startswith(facts) and start < len(facts)
            if in_facts and any(ch.isdigit() for ch in completion[start:ids["offset_mapping"][i][1]]):
                value_pi.append(value)  # a number in the fact sentences: a fact's value
            (fact_pi if facts and completion.startswith(facts) and start < len(facts) else other_pi).append(value)
    every = torch.tensor(fact_pi + other_pi)
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    print("tokens", len(every), "fact-sentence tokens", len(fact_pi))
    print("pi quantiles", {q: round(float(every.quantile(q)), 3) for q in qs})
    print("mean pi: fact sentences", round(sum(fact_pi) / max(len(fact_pi), 1), 3), "others",
          round(sum(other_pi) / max(len(other_pi), 1), 3))
    print("mean pi at the facts' numbers", round(sum(value_pi) / max(len(value_pi), 1), 3), len(value_pi))
    for eta in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98):
        f = sum(v > eta for v in fact_pi) / max(len(fact_pi), 1)
        o = sum(v > eta for v in other_pi) / max(len(other_pi), 1)
        v = sum(x > eta for x in value_pi) / max(len(value_pi), 1)
        print(f"eta {eta}: deferred {float((every > eta).float().mean()):.3f} (fact sentences {f:.3f}, their "
              f"numbers {v:.3f}, others {o:.3f})")


if __name__ == "__main__":
    main()
