"""Ship the Qwen run: the router's head, collm.json, training config and its training rows, results, speed and plots.

    python research/qwen/qwen_package.py --runs runs/qwen --router router --out src/collm/assets/qwen

The package (--out) gets only what the commands read: the run (collm.json, head, a LoRA adapter where there is
one) and what `collm demo --pair qwen` shows: ``problems.json`` (three held-out problems where Co-LLM is right
and its base wrong first) and ``results.md`` (the table of the evaluation), with a ``manifest.json`` of sha256s.
Everything else measured (answers, speed, plots, training config and rows) goes to --study, beside the study's
scripts, with its own manifest. The shipped results keep every answer's text and sources but
not its per-token ids and probabilities (the full files stay in the run folder), so the folder stays small.
Both folders are written by `collm.demo.package.ship`, the packager the SmolLM2 run uses too: a file an earlier
packaging listed in a folder's manifest and this one does not write is removed; a folder holding a file no
manifest lists is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from collm.demo.package import pick_examples, ship
from collm.evaluation.evaluate import markdown_table

ADAPTER = "base_adapter"  # a router that tuned the base (LoRA) ships its adapter folder
HEAVY = ("tokens", "defer_probs")  # per-token lists: kept in the run folder, not shipped


def train_rows(run: Path) -> Path:
    """The rows the router was trained on, as its train_config.json names them."""
    data = Path(json.loads((run / "train_config.json").read_text())["data"])
    if not data.exists():
        raise SystemExit(f"{data} (the training rows named in {run}/train_config.json) is missing: run from the "
                         "repository root, where the run was trained")
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--router", default="router")
    p.add_argument("--eval", default="eval-test220", help="the evaluation folder in --runs")
    p.add_argument("--speed", default="speed", help="the speed results in --runs (<name>.json and .md)")
    p.add_argument("--calibration", default="calibration.png", help="the calibration plot in --runs")
    p.add_argument("--plots", default="plot", help="prefix of the two plots in --runs (<prefix>_accuracy_vs_*.png)")
    p.add_argument("--adapter", type=Path, help="a LoRA adapter folder to ship as the base (a router trained on a "
                   "frozen base that is itself an adapter, such as the fact-tuned base: its collm.json is rewritten "
                   "to the adapter's base model with base_weights lora)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--study", type=Path, default=Path("research/qwen/results/run"),
                   help="where the measured files that no command reads go")
    a = p.parse_args()
    runs, router = a.runs, a.runs / a.router
    results_path = runs / a.eval / "results.json"
    if not results_path.exists():
        raise SystemExit(f"{results_path} is missing: run the evaluation stage first")
    results = json.loads(results_path.read_text())
    # the package: what the commands read
    package = {n: router / n for n in ("collm.json", "head.safetensors")}
    texts = {}
    if a.adapter is not None:
        config = json.loads((router / "collm.json").read_text())
        adapter_base = json.loads((a.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        texts["collm.json"] = _json(config | {"base": adapter_base, "base_weights": "lora",
                                              "base_adapter_from": str(a.adapter)})
        package = {"head.safetensors": router / "head.safetensors", ADAPTER: a.adapter}
    elif (router / ADAPTER).is_dir():
        package[ADAPTER] = router / ADAPTER
    rows = results["systems"][0]["examples"]
    problems = {"problems": [{"prompt": rows[i]["prompt"], "answer": rows[i]["answer"]}
                             for i in pick_examples(results)],
                "chosen": "held-out test templates: Co-LLM right and its base wrong first"}
    # notes as footnotes: a Note column wraps the demo's terminal table into a column of words
    table = (f"### Held-out test templates ({results['rows']} problems, threshold {results['threshold']:g})\n\n"
             + markdown_table(results, footnotes=True))
    shipped = ship(a.out, package, texts | {"problems.json": _json(problems), "results.md": table})
    # the study: everything else measured, beside the study's scripts
    study = {"train_config.json": router / "train_config.json", "train_rows.jsonl": train_rows(router),
             "test_results.md": runs / a.eval / "results.md"}
    optional = {"calibration.png": runs / a.calibration, "speed.json": runs / f"{a.speed}.json",
                "speed.md": runs / f"{a.speed}.md",
                "accuracy_vs_deferral.png": runs / f"{a.plots}_accuracy_vs_deferral.png",
                "accuracy_vs_ms.png": runs / f"{a.plots}_accuracy_vs_ms.png"}
    study |= {name: path for name, path in optional.items() if path.exists()}
    light = {**results, "systems": [{**s, "examples": [{k: v for k, v in e.items() if k not in HEAVY}
                                                       for e in s["examples"]]} for s in results["systems"]]}
    ship(a.study, study, {"test_results.json": _json(light)})
    print(shipped["total_bytes"], "bytes shipped")


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    main()
