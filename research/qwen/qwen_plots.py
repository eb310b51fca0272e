"""The Qwen study's plots from measured files only: accuracy against deferral rate, and accuracy against ms/token.

    python research/qwen/qwen_plots.py --eval runs/qwen/eval-test44/results.json --speed runs/qwen/speed.json \
        --calibration runs/qwen/weak/collm.json --out research/qwen/results/cpu_qwen

Accuracy comes from the evaluation, ms/token from the batch-1 speed run. Speculative decoding is plotted at
the expert's accuracy: greedy assisted generation writes the expert's own greedy tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPEED_NAMES = {"base alone": "base alone", "expert alone": "expert alone", "Co-LLM": "Co-LLM (eta=",
               "tuned base alone": "tuned base alone", "proxy tuning": "proxy tuning"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", type=Path, required=True)
    p.add_argument("--speed", type=Path, required=True)
    p.add_argument("--calibration", type=Path, required=True, help="run collm.json holding the calibration points")
    p.add_argument("--out", required=True, help="prefix of the two PNG files")
    a = p.parse_args()
    systems = {s["name"]: s for s in json.loads(a.eval.read_text())["systems"] if s.get("accuracy") is not None}
    speed = {s["system"]: s["ms_per_token"] for s in json.loads(a.speed.read_text())["systems"]}
    points = json.loads(a.calibration.read_text())["calibration"]["points"]

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([q["defer_rate"] for q in points], [q["accuracy"] for q in points], "o-",
            label=f"Co-LLM, validation ({points[0]['total']} problems)")
    for i, q in enumerate(points):  # alternate above and below: neighbouring η often share an accuracy
        ax.annotate(f"η={q['threshold']:g}", (q["defer_rate"], q["accuracy"]), textcoords="offset points",
                    xytext=(4, 4) if i % 2 == 0 else (4, -12))
    for name, marker in (("Co-LLM", "s"), ("random deferral", "x"), ("Co-LLM, weak-supervision head", "P"),
                         ("base alone", "v"), ("expert alone", "^"), ("tuned base alone", "<")):
        if name in systems:
            s = systems[name]
            ax.plot(s["defer_rate"], s["accuracy"], marker, label=f"{name}, test ({s['total']})")
    ax.set_xlabel("deferral rate")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{a.out}_accuracy_vs_deferral.png", dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, prefix in SPEED_NAMES.items():
        ms = next((v for k, v in speed.items() if k.startswith(prefix)), None)
        if name in systems and ms is not None:
            ax.plot(ms, systems[name]["accuracy"], "o", label=name)
    spec = next((v for k, v in speed.items() if k.startswith("speculative")), None)
    if spec is not None and "expert alone" in systems:
        ax.plot(spec, systems["expert alone"]["accuracy"], "D", label="speculative decoding (= expert's tokens)")
    ax.set_xlabel("ms/token, batch 1")
    ax.set_ylabel("accuracy (held-out test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{a.out}_accuracy_vs_ms.png", dpi=120)


if __name__ == "__main__":
    main()
