"""A copy of a run whose head's logits are divided by a temperature: the same ranking of tokens, so a threshold
on the tempered probability is a threshold on the head's logit, but thresholds below 1 can now reach tokens whose
probability was 1.0 in float32.

    python research/facts/temper_head.py --run runs/facts/collm-tuned-qa --temperature 10 \
        --out runs/facts/collm-tuned-qa-t10

The marginal-likelihood head on the fact-tuned base defers 86% of the gold solutions' tokens with pi = 1.0 for
three quarters of them (the 1.5B explains everything but the facts' values better), so no threshold in [0, 1)
brings its deferral under 80%; tempered, the threshold can pick the rate (research/facts/head_probe.py shows which).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from collm.atomic import write_json
from collm.core.head import DeferralHead
from collm.run import read_run_config, seal


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--temperature", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.temperature <= 0:
        raise SystemExit("--temperature must be positive")
    if a.out.exists():
        raise SystemExit(f"{a.out} exists: choose a new --out")
    config = read_run_config(a.run)
    head = DeferralHead.load(a.run / "head.safetensors")
    with torch.no_grad():
        head.linear.weight /= a.temperature
        head.linear.bias /= a.temperature
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(a.run, tmp, ignore=shutil.ignore_patterns("checkpoints", "manifest.json"))
    head.save(tmp / "head.safetensors")
    write_json(tmp / "collm.json", config | {"head_temperature": a.temperature, "tempered_from": str(a.run)})
    seal(tmp)
    tmp.rename(a.out)
    print(f"{a.out}: the head of {a.run} at temperature {a.temperature:g}")


if __name__ == "__main__":
    main()
