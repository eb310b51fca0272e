"""The embedded default: a Co-LLM run shipped with the package, and what `collm demo` shows with it.

``assets/gsm/`` holds a run made by ``scripts/reproduce.sh``: the math expert as a LoRA adapter
(``expert/``), the Co-LLM base's LoRA adapter (``base_adapter/``), the deferral head, ``collm.json``, the
measured results (``results.md``, ``results.json``, ``calibration.png``) and the held-out problems the demo
answers. ``manifest.json`` records every file's sha256; `verify` refuses to load a run that does not match.
`package` builds the folder from a reproduction's runs; `summarise` computes the numbers it reports.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from collm.errors import CollmError
from collm.evaluation.evaluate import deferral_summary, in_number  # noqa: F401 - re-exported for the package step
from collm.evaluation.report import system_table

ASSETS = Path(__file__).parent / "assets" / "gsm"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------- integrity


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict:
    """Record the sha256 and size of every file under `folder` (but the manifest) in manifest.json."""
    from collm.atomic import write_json

    files = {str(p.relative_to(folder)): {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"files": files, "total_bytes": sum(f["bytes"] for f in files.values())}
    write_json(folder / MANIFEST, manifest)
    return manifest


def verify(folder: Path = ASSETS) -> dict:
    """Check every file recorded in the manifest is there with its sha256; CollmError naming the first that
    is missing or differs. Returns the manifest."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CollmError(f"{folder} has no {MANIFEST}: the shipped run is missing; run scripts/reproduce.sh")
    manifest = json.loads(path.read_text())
    for name, record in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CollmError(f"shipped file {file} is missing")
        if sha256(file) != record["sha256"]:
            raise CollmError(f"shipped file {file} does not match its recorded sha256 (changed or corrupt)")
    return manifest


# ---------------------------------------------------------------- loading


def load_pair(folder: Path = ASSETS, device: str = "cpu"):
    """The shipped Co-LLM (embedded SmolLM2 + its base adapter, the expert adapter, the head), after
    checking every file against the manifest."""
    from collm.pair import CoLLM

    verify(folder)
    return CoLLM.from_pretrained(folder, device=device)


# ---------------------------------------------------------------- numbers


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
            sft: Path | None = None, expert: Path | None = None) -> dict:
    """Build the shipped folder from a reproduction: adapters, head, run config, results; then the manifest.

    `runs` holds collm/ (the Co-LLM run) and the evaluations (`evaluations`: label -> results JSON of
    `collm eval`; the first one supplies the demo's problems and examples). The expert's adapter is taken from
    `expert` (default ``runs/expert``). A run whose base was tuned with its head ships its ``base_adapter``; a
    run whose head was trained on a frozen SFT base ships that run's adapter (`sft`) as ``sft_base``.
    """
    from collm.atomic import atomic_write, write_json
    from collm.pair import read_run_config

    evaluations = evaluations or {label: runs / name for label, name in EVALUATIONS.items()}
    config = read_run_config(runs / "collm")
    if config.get("base_weights") not in ("lora", "original") or (config.get("base_weights") == "original"
                                                                  and sft is None):
        raise CollmError("package ships a LoRA-tuned base, or a frozen SFT base given with --sft")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if config["base_weights"] == "lora":
        shutil.copytree(runs / "collm" / "base_adapter", out / "base_adapter")
    else:
        shutil.copytree(Path(sft) / "base_adapter", out / "sft_base")
        config["base"] = "sft_base"  # the adapter beside it, loaded (and merged) as the base
    shutil.copytree(Path(expert or runs / "expert") / "base_adapter", out / "expert")
    shutil.copy(runs / "collm" / "head.safetensors", out / "head.safetensors")
    config["experts"] = ["expert"]  # the adapter beside it; the trained run named a merged folder
    config["training"].pop("data_stats", None)
    write_json(out / "collm.json", config)
    if (runs / "calibration.png").is_file():
        shutil.copy(runs / "calibration.png", out / "calibration.png")
    loaded = {label: json.loads(path.read_text()) for label, path in evaluations.items() if path.is_file()}
    if not loaded:
        raise CollmError(f"no evaluation results in {runs} (expected {', '.join(EVALUATIONS.values())})")
    first_label, first = next(iter(loaded.items()))
    chosen = pick_examples(first)
    problems = [{"prompt": first["systems"][0]["examples"][i]["prompt"],
                 "answer": first["systems"][0]["examples"][i]["answer"]} for i in chosen]
    write_json(out / "problems.json", {"problems": problems, "chosen": f"{first_label}: rows where Co-LLM is "
                                       "right, its base alone wrong and Co-LLM's <<a=b>> notes all true"})
    trimmed = {label: {**{k: v for k, v in r.items() if k != "systems"}, "summary": summarise(r),
                       "systems": [{k: v for k, v in s.items() if k != "examples"} for s in r["systems"]]}
               for label, r in loaded.items()}
    trimmed["calibration"] = config.get("calibration")
    trimmed["examples"] = [{"prompt": _system(first, "Co-LLM")["examples"][i]["prompt"],
                            **{name: _system(first, name)["examples"][i]["text"]
                               for name in ("base alone", "expert alone")},
                            "Co-LLM": provenance_text(_system(first, "Co-LLM")["examples"][i]),
                            "answer": _system(first, "Co-LLM")["examples"][i]["answer"]} for i in chosen]
    write_json(out / "results.json", trimmed)
    markdown = results_markdown(trimmed)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))
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


# ---------------------------------------------------------------- the demo


def run(console, folder: Path = ASSETS, count: int = 3, max_new_tokens: int = 256, device: str = "cpu",
        threshold: float | None = None) -> None:
    """Load the shipped run, answer `count` of its problems three ways, print the shipped results table.

    Co-LLM runs at ``threshold`` (default: the run's calibrated one). Where that threshold never defers
    (calibration found no threshold better than the base alone), it also runs at 0.5, so the colors show
    where the head would hand tokens to the expert."""
    from rich.markdown import Markdown

    from collm.data.answer import extract_answer
    from collm.decoding.provenance import colored, legend

    with console.status("verifying and loading the shipped run (SmolLM2-135M-Instruct + two adapters)"):
        pair = load_pair(folder, device)
    shipped = json.loads((folder / "problems.json").read_text())
    problems = shipped["problems"][:count]
    prompts = [p["prompt"] for p in problems]
    threshold = pair.threshold if threshold is None else threshold
    systems = [("base alone", "base", None), ("expert alone", "expert", None),
               (f"Co-LLM (η = {threshold:g})", "collm", threshold)]
    if threshold >= 1:
        systems.append(("Co-LLM at η = 0.5, uncalibrated (where the head defers)", "collm", 0.5))
    outputs = {}
    for label, mode, eta in systems:
        with console.status(f"{label}: answering {len(prompts)} problems"):
            outputs[label] = pair.generate(prompts, max_new_tokens=max_new_tokens, mode=mode, threshold=eta)
    console.print(legend(["math expert (SmolLM2-135M + LoRA on calculations)"]))
    console.print(f"[dim]Problems: {shipped.get('chosen', 'shipped with the run')}; none was in any training "
                  "data.[/dim]")
    for i, problem in enumerate(problems):
        console.rule(f"problem {i + 1} (gold answer {problem['answer']})")
        console.print(f"[dim]> {problem['prompt']}[/dim]")
        for label, out in outputs.items():
            answer = extract_answer(out.texts[i])
            mark = "[green]right[/green]" if answer == problem["answer"] else "[red]wrong[/red]"
            console.print(f"\n[bold]{label}[/bold] (answer {answer}, {mark}):")
            console.print(colored(pair.tokenizer, out.token_ids[i], out.sources[i]))
    console.rule()
    for label, mode, eta in systems[2:]:
        stats = outputs[label].stats
        console.print(f"{label}: deferral rate {stats['defer_rate']:.1%}, {stats['expert_calls']} expert calls")
    console.print(Markdown((folder / "results.md").read_text().split("### Example")[0]))


def main(argv: list[str] | None = None) -> None:
    """``python -m collm.demo package RUNS [OUT] [--sft DIR] [--expert DIR]``: build the shipped folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m collm.demo")
    parser.add_argument("command", choices=["package"])
    parser.add_argument("runs", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=ASSETS)
    parser.add_argument("--sft", type=Path, help="SFT run whose adapter is the frozen base of RUNS/collm")
    parser.add_argument("--expert", type=Path, help="the expert's run (default RUNS/expert)")
    args = parser.parse_args(argv)
    manifest = package(args.runs, args.out, sft=args.sft, expert=args.expert)
    print(json.dumps({"files": len(manifest["files"]), "total_bytes": manifest["total_bytes"]}))


if __name__ == "__main__":
    main()
