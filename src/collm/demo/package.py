"""Building the shipped folder from a reproduction's runs (``python -m collm.demo package``): the numbers it
reports (`summarise`), the examples it shows, the results it writes, its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from collm.demo.shipped import ASSETS, write_manifest
from collm.errors import CollmError
from collm.evaluation.evaluate import deferral_summary
from collm.evaluation.report import system_table
from collm.run import MANIFEST


def provenance_text(example: dict) -> str:
    """An answer with each expert-written run of tokens in [[double brackets]] (plain-text provenance)."""
    out, open_ = [], False
    for piece, source in zip(example["tokens"], example["sources"]):
        if bool(source) != open_:
            out.append("[[" if source else "]]")
            open_ = bool(source)
        out.append(piece)
    return "".join(out) + ("]]" if open_ else "")


def _system(results: dict, name: str) -> dict:
    return next(s for s in results["systems"] if s["name"] == name)


def table(results: dict) -> str:
    """Markdown rows: accuracy with its 95% Wilson interval and the deferral rate; notes as footnotes."""
    return system_table(results, ("accuracy", "ci", "defer"), footnotes=True)


def summarise(results: dict) -> dict:
    """Headline numbers of one evaluation: Co-LLM against max(SFT base, expert), deferral statistics."""
    collm = _system(results, "Co-LLM")
    rivals = {n: _system(results, n)["accuracy"] for n in ("SFT base alone", "expert alone")}
    best = max((v for v in rivals.values() if v is not None), default=None)
    return {"collm_accuracy": collm["accuracy"], "best_single": best,
            "margin_points": None if best is None else round(100 * (collm["accuracy"] - best), 1),
            **deferral_summary(collm)}


def pick_examples(results: dict, count: int = 3) -> list[int]:
    """Illustrative rows: first where Co-LLM is right, its base alone wrong and every ``<<a=b>>`` note of
    Co-LLM's answer true; then the other rows where Co-LLM is right and the base wrong; then other
    disagreements; then the first rows."""
    from collm.training.expert import notes_correct

    collm, base = _system(results, "Co-LLM")["examples"], _system(results, "base alone")["examples"]
    fixed = [i for i, (a, b) in enumerate(zip(collm, base)) if a["correct"] and not b["correct"]]
    clean = [i for i in fixed if notes_correct(collm[i]["text"])]
    differ = [i for i, (a, b) in enumerate(zip(collm, base)) if a["correct"] != b["correct"]]
    order = clean + fixed + differ + list(range(len(collm)))
    return list(dict.fromkeys(order))[:count]


# ---------------------------------------------------------------- packaging

EVALUATIONS = {"new-number variants of training templates": "eval-new-numbers.json",
               "held-out test templates": "eval-test.json"}


def package(runs: Path, out: Path = ASSETS, evaluations: dict[str, Path] | None = None, *,
            sft: Path | None = None, expert: Path | None = None, results: Path | None = None) -> dict:
    """Build the shipped folder from a reproduction: adapters, head, run config, the demo's problems and table;
    then the manifest. What no command reads (``results.json``, the trimmed results of every evaluation, and
    the calibration plot) goes to ``results`` where one is given.

    `runs` holds collm/ (the Co-LLM run) and the evaluations (`evaluations`: label -> results JSON of
    `collm eval`; the first one supplies the demo's problems and examples). The expert's adapter is taken from
    `expert` (default ``runs/expert``). A run whose base was tuned with its head ships its ``base_adapter``; a
    run whose head was trained on a frozen SFT base ships that run's adapter (`sft`) as ``sft_base``.
    """
    from collm.atomic import write_json
    from collm.run import read_run_config

    evaluations = evaluations or {label: runs / name for label, name in EVALUATIONS.items()}
    config = read_run_config(runs / "collm")
    if config.get("base_weights") not in ("lora", "original") or (config.get("base_weights") == "original"
                                                                  and sft is None):
        raise CollmError("package ships a LoRA-tuned base, or a frozen SFT base given with --sft")
    copies = {"expert": Path(expert or runs / "expert") / "base_adapter",
              "head.safetensors": runs / "collm" / "head.safetensors"}
    if config["base_weights"] == "lora":
        copies["base_adapter"] = runs / "collm" / "base_adapter"
    else:
        copies["sft_base"] = Path(sft) / "base_adapter"
        config["base"] = "sft_base"  # the adapter beside it, loaded (and merged) as the base
    config["experts"] = ["expert"]  # the adapter beside it; the trained run named a merged folder
    config["training"].pop("data_stats", None)
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        if (runs / "calibration.png").is_file():
            shutil.copy(runs / "calibration.png", results / "calibration.png")
    loaded = {label: json.loads(path.read_text()) for label, path in evaluations.items() if path.is_file()}
    if not loaded:
        raise CollmError(f"no evaluation results in {runs} (expected {', '.join(EVALUATIONS.values())})")
    first_label, first = next(iter(loaded.items()))
    chosen = pick_examples(first)
    problems = [{"prompt": first["systems"][0]["examples"][i]["prompt"],
                 "answer": first["systems"][0]["examples"][i]["answer"]} for i in chosen]
    texts = {"collm.json": _json(config),
             "problems.json": _json({"problems": problems, "chosen": f"{first_label}: rows where Co-LLM is right, "
                                     "its base alone wrong and Co-LLM's <<a=b>> notes all true"})}
    trimmed = {label: {**{k: v for k, v in r.items() if k != "systems"}, "summary": summarise(r),
                       "systems": [{k: v for k, v in s.items() if k != "examples"} for s in r["systems"]]}
               for label, r in loaded.items()}
    trimmed["calibration"] = config.get("calibration")
    trimmed["examples"] = [{"prompt": _system(first, "Co-LLM")["examples"][i]["prompt"],
                            **{name: _system(first, name)["examples"][i]["text"]
                               for name in ("base alone", "expert alone")},
                            "Co-LLM": provenance_text(_system(first, "Co-LLM")["examples"][i]),
                            "answer": _system(first, "Co-LLM")["examples"][i]["answer"]} for i in chosen]
    if results is not None:
        write_json(results / "results.json", trimmed)
    return ship(out, copies, texts | {"results.md": results_markdown(trimmed)})


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def ship(out: Path, copies: dict[str, Path], texts: dict[str, str] | None = None) -> dict:
    """Write a shipped folder: ``copies`` (name in the folder -> source file or folder), ``texts`` (name ->
    content), then the manifest. A file an earlier shipping listed in the manifest and this one does not write is
    removed; a file no manifest lists is never touched: a folder holding one is refused. Returns the manifest."""
    from collm.atomic import write_text
    from collm.run import read_json

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} if out.exists() else set()
    listed: set[str] = set()
    if (out / MANIFEST).is_file():
        manifest = read_json(out / MANIFEST)
        listed = set(manifest.get("files", {})) | {MANIFEST} if isinstance(manifest, dict) else set()
    foreign = sorted(files - listed)
    if foreign:
        raise CollmError(f"{out} holds files that no packaging wrote (e.g. {foreign[0]}): give another "
                         "output folder or move them out")
    wanted: dict[str, Path] = {}
    for name, source in copies.items():
        source = Path(source)
        if source.is_dir():
            wanted |= {f"{name}/{p.relative_to(source).as_posix()}": p for p in sorted(source.rglob("*"))
                       if p.is_file()}
        elif source.is_file():
            wanted[name] = source
        else:
            raise CollmError(f"{source} is missing: it is to be shipped as {name}")
    written = set(wanted) | set(texts or {})
    for name in sorted(listed - written - {MANIFEST}):  # shipped before by a packaging, not now
        (out / name).unlink(missing_ok=True)
    for name, source in wanted.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / name)
    for name, text in (texts or {}).items():
        write_text(out / name, text)
    for folder in sorted({p for p in out.rglob("*") if p.is_dir()}, reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()  # emptied by a removal above
    return write_manifest(out)


def results_markdown(trimmed: dict) -> str:
    """The shipped results as Markdown: one table per evaluation, the calibration sweep, three examples."""
    parts = []
    for label, results in trimmed.items():
        if label in ("calibration", "examples"):
            continue
        s = results["summary"]
        parts += [f"### {label} ({results['rows']} problems, threshold {results['threshold']})", "",
                  table(results), "",
                  f"Co-LLM − max(SFT base, expert) = {s['margin_points']} points; deferral rate "
                  f"{s['defer_rate']:.3f}; {s['share_in_numbers']:.1%} of deferred tokens are inside numbers.", ""]
    calibration = trimmed.get("calibration") or {}
    if calibration.get("points"):
        parts += [f"### Accuracy against deferral rate (threshold choice, {calibration['rows']} problems)", "",
                  "| threshold | deferral rate | accuracy |", "| --- | --- | --- |"]
        parts += [f"| {p['threshold']:g} | {p['defer_rate']:.3f} | {p['accuracy']:.3f} |"
                  for p in calibration["points"]]
        parts += ["", f"Base alone {calibration['baselines'].get('base alone')}, expert alone "
                      f"{calibration['baselines'].get('expert alone')}; chosen threshold "
                      f"{calibration['chosen']['threshold']:g} (budget: deferral rate <= "
                      f"{calibration['config']['max_defer']}).", ""]
    for n, example in enumerate(trimmed.get("examples", []), 1):
        parts += [f"### Example {n} (gold {example['answer']}); [[expert-written tokens]]", "",
                  f"> {example['prompt']}", ""]
        parts += [f"**{name}:**\n\n```\n{example[name]}\n```\n" for name in ("base alone", "expert alone", "Co-LLM")]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m collm.demo package RUNS [OUT] [--sft DIR] [--expert DIR] [--results DIR]``: build the shipped
    folder (OUT) and the results beside the docs (DIR)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m collm.demo")
    parser.add_argument("command", choices=["package"])
    parser.add_argument("runs", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=ASSETS)
    parser.add_argument("--sft", type=Path, help="SFT run whose adapter is the frozen base of RUNS/collm")
    parser.add_argument("--expert", type=Path, help="the expert's run (default RUNS/expert)")
    parser.add_argument("--results", type=Path, default=Path("docs/results/smollm2"),
                        help="where the full results and the calibration plot go (not shipped in the package)")
    args = parser.parse_args(argv)
    manifest = package(args.runs, args.out, sft=args.sft, expert=args.expert, results=args.results)
    print(json.dumps({"files": len(manifest["files"]), "total_bytes": manifest["total_bytes"]}))
