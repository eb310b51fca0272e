"""Ship the Qwen run: the router's head, collm.json, training config and its training rows, results, speed and plots.

    python research/qwen/qwen_package.py --runs runs/qwen --router router --out src/collm/assets/qwen

The package (--out) gets only what the commands read: the run (collm.json, head, a LoRA adapter where there is
one) and what `collm demo --pair qwen` shows: ``problems.json`` (three held-out problems where Co-LLM is right
and its base wrong first) and ``results.md`` (the table of the evaluation), with a ``manifest.json`` of sha256s.
Everything else measured (answers, speed, plots, training config and rows) goes to --study, beside the study's
scripts, with its own manifest. The shipped results keep every answer's text and sources but
not its per-token ids and probabilities (the full files stay in the run folder), so the folder stays small.
Files this packaging shipped before and no longer ships (its own file names, listed in the old manifest)
are removed; any other file in the folder is left alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from collm.atomic import write_json
from collm.demo import write_manifest
from collm.demo.package import pick_examples
from collm.evaluation.evaluate import markdown_table

ADAPTER = ("base_adapter/adapter_config.json", "base_adapter/adapter_model.safetensors")
HEAVY = ("tokens", "defer_probs")  # per-token lists: kept in the run folder, not shipped
WRITTEN = {"test_results.json", "problems.json", "results.md"}  # made here, not copied
PACKAGED = {"collm.json", "head.safetensors", "problems.json", "results.md"}  # what the commands read
# Names the packaging step wrote before this script (qwen.sh's inline packaging): removed when still there.
EARLIER = {"test44_results.json", "test44_results.md", "test220_results.json", "test220_results.md"}


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
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--study", type=Path, default=Path("research/qwen/results/run"),
                   help="where the measured files that no command reads go")
    a = p.parse_args()
    runs, out, study = a.runs, a.out, a.study
    results_path = runs / a.eval / "results.json"
    if not results_path.exists():
        raise SystemExit(f"{results_path} is missing: run the evaluation stage first")
    old = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {"files": {}}
    out.mkdir(parents=True, exist_ok=True)
    files = {runs / a.router / n: n for n in ("collm.json", "head.safetensors", "train_config.json")}
    files |= {runs / a.router / n: n for n in ADAPTER}  # a router that tuned the base (LoRA) ships its adapter
    files |= {runs / a.calibration: "calibration.png", runs / f"{a.speed}.json": "speed.json",
              runs / f"{a.speed}.md": "speed.md", train_rows(runs / a.router): "train_rows.jsonl",
              runs / f"{a.plots}_accuracy_vs_deferral.png": "accuracy_vs_deferral.png",
              runs / f"{a.plots}_accuracy_vs_ms.png": "accuracy_vs_ms.png",
              runs / a.eval / "results.md": "test_results.md"}
    shipped = set()
    for src, name in files.items():
        if src.exists():
            where = out if name in PACKAGED or name in ADAPTER else study
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, where / name)
            shipped.add(name)
    results = json.loads(results_path.read_text())
    light = {**results, "systems": [{**s, "examples": [{k: v for k, v in e.items() if k not in HEAVY}
                                                       for e in s["examples"]]} for s in results["systems"]]}
    study.mkdir(parents=True, exist_ok=True)
    write_json(study / "test_results.json", light)
    rows = results["systems"][0]["examples"]
    write_json(out / "problems.json", {"problems": [{"prompt": rows[i]["prompt"], "answer": rows[i]["answer"]}
                                                    for i in pick_examples(results)],
                                       "chosen": "held-out test templates: Co-LLM right and its base wrong first"})
    # notes as footnotes: a Note column wraps the demo's terminal table into a column of words
    (out / "results.md").write_text(f"### Held-out test templates ({results['rows']} problems, threshold "
                                    f"{results['threshold']:g})\n\n" + markdown_table(results, footnotes=True))
    shipped |= WRITTEN
    ours = set(files.values()) | WRITTEN | EARLIER  # a name this packaging writes; anything else is not ours
    for name in sorted((set(old["files"]) & ours) - shipped):  # shipped before, and not now
        (out / name).unlink(missing_ok=True)
        print("removed", name, "(listed in the old manifest, not shipped now)")
    write_manifest(study)
    print(write_manifest(out)["total_bytes"], "bytes shipped")


if __name__ == "__main__":
    main()
