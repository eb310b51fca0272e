"""`collm eval` one system at a time, resumable: each system's result is saved as it finishes.

On 2 CPU cores each system takes minutes to tens of minutes; a kill loses only the system being decoded.
The models load once; the weak-supervision head is swapped into the same pair instead of loading it again.

    python research/qwen/qwen_eval.py --run runs/qwen/collm --weak-run runs/qwen/weak \
        --data runs/qwen/data/gsm/test.jsonl \
        --every 5 --out runs/qwen/eval-test44

Writes ``<out>/system-*.json`` (one per system, with every answer), then ``results.json``, ``results.md`` and
``report.html`` in collm eval's formats.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

from collm.atomic import write_json
from collm.core.head import DeferralHead
from collm.evaluation.evaluate import (
    EvalConfig,
    missing,
    random_router,
    read_rows,
    run_system,
    save_results,
)
from collm.pair import CoLLM, read_run_config

WEAK = "Co-LLM, weak-supervision head"

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--weak-run", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--every", type=int, default=1, help="keep every k-th row (1: all)")
    p.add_argument("--changed-only", action="store_true", help="only rows marked \"changed\" (collm data facts "
                   "--update-fraction: questions that use a changed fact)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=44)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--extra-thresholds", default="", help="comma-separated: more Co-LLM rows, for the plot")
    p.add_argument("--only", default="", help="comma-separated: decode just these (base, expert, collm, weak, "
                   "random), then stop; rows that need no calibrated router can run while it is being trained")
    p.add_argument("--random-rate", type=float, help="with --only random: the deferral probability")
    p.add_argument("--random-rate-from", default="given", help="with --only random: where the rate comes from")
    p.add_argument("--reuse", type=Path, help="an earlier --out of this script: take its rows that do not depend on "
                   "--run's head (base alone, expert alone; the weak head, tuned base and proxy tuning when its note "
                   "names the same --weak-run / --tuned-run) when it decoded the same rows the same way")
    p.add_argument("--tuned-run", type=Path, help="a run whose base is tuned (LoRA or full): adds its tuned base "
                   "alone and proxy tuning with it (default: --run itself, when its base is tuned)")
    p.add_argument("--with-facts", type=Path, help="the same questions with the facts each needs in front of the "
                   "prompt (collm data facts' *_with_facts.jsonl): adds the expert on them, the retrieval upper bound")
    p.add_argument("--catalogue", type=Path, help="collm data facts' catalogue.json: each row gets the share of the "
                   "expert's tokens inside the values of the facts its question uses")
    p.add_argument("--no-proxy", default="", metavar="WHY", help="with a tuned base: leave proxy tuning out of the "
                   "table, saying why (it runs three models every step: the longest row)")
    a = p.parse_args()
    rows = read_rows(a.data)[::a.every]
    if a.changed_only:
        rows = [row for row in rows if row.get("changed")]
    config = EvalConfig(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    a.out.mkdir(parents=True, exist_ok=True)
    tuned = read_run_config(a.run).get("base_weights", "original") != "original"
    tuned_run = a.tuned_run or (a.run if tuned else None)
    if tuned_run is not None and read_run_config(tuned_run).get("base_weights", "original") == "original":
        p.error(f"--tuned-run {tuned_run}: that run's base is not tuned (collm.json base_weights)")
    if a.reuse:
        # rows that --run's head does not touch; the others only when they came from the same runs
        runs = {"base alone": None, "expert alone": None}
        if a.weak_run:
            runs[WEAK] = a.weak_run
        if tuned_run is not None and tuned_run != a.run:
            runs |= {"tuned base alone": tuned_run, "proxy tuning": tuned_run}
        reuse(a.reuse, a.out, rows, config, a.dtype, runs)
    pair = None
    trained = None
    extra = {}  # the tuned run's pair, when it is not --run

    def loaded() -> CoLLM:
        nonlocal pair, trained
        if pair is None:
            pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
            trained = pair.head
        return pair

    def system(name: str, note: str = "", **kwargs) -> dict:
        path = system_file(a.out, name)
        if path.exists():
            return json.loads(path.read_text())
        loaded()
        pair.head = kwargs.pop("head", trained)
        other = kwargs.pop("pair", None)  # loads another pair only when the row is not decoded yet
        decoder = other() if other else pair
        result = asdict(run_system(decoder, rows, name, config, **kwargs)) | ({"note": note} if note else {})
        write_json(path, result)
        print(f"{name}: {result['correct']}/{result['total']}, deferral {result['defer_rate']:.3f}, "
              f"{result['seconds']:.0f} s", flush=True)
        return result

    def weak() -> dict:
        weak_eta = read_run_config(a.weak_run)["threshold"]
        return system(WEAK, threshold=weak_eta,
                      head=DeferralHead.load(a.weak_run / "head.safetensors"),
                      note=f"the paper's pseudo-labels on the expert's own text (run {a.weak_run}), "
                           f"threshold {weak_eta:g}")

    def randomised(rate: float, where: str) -> dict:
        return system("random deferral", router=random_router(rate, config.seed),
                      note=f"each token deferred with probability {rate:.3f} ({where})")

    def untuned_base():
        original = read_run_config(tuned_run or a.run)["base"]  # the model the tuned run's adapter was trained on
        if not tuned and original == read_run_config(a.run)["base"]:
            return loaded().base  # --run's own base (one copy fewer: proxy tuning holds three models)
        from collm.backends.models import load_model

        model, _ = load_model(original, dtype=a.dtype)
        return model

    def base_alone() -> dict:
        if not tuned:
            return system("base alone", mode="base", note=f"the base of run {a.run}")
        return system("base alone", mode="base", pair=lambda: CoLLM(untuned_base(), [], None, pair.tokenizer),
                      note="the untuned base")

    def tuned_pair() -> CoLLM:
        if tuned_run == a.run:
            return loaded()
        if "tuned" not in extra:  # its base only: a second copy of the expert took 3 GB (bf16) for nothing
            extra["tuned"] = CoLLM(CoLLM.from_pretrained(tuned_run, dtype=a.dtype).base, [], None, loaded().tokenizer)
        return extra["tuned"]

    def tuned_alone() -> dict:
        return system("tuned base alone", mode="base", pair=tuned_pair,
                      note=f"the base with the adapter of run {tuned_run}")

    def proxy() -> dict:
        from collm.pair import proxy_tuning

        return system("proxy tuning", mode="proxy",
                      pair=lambda: proxy_tuning(pair.experts[0], tuned_pair().base, untuned_base(), pair.tokenizer),
                      note=f"expert + tuned base - untuned base (the base of run {tuned_run})")

    def with_facts() -> dict:
        path = system_file(a.out, "expert, facts in prompt")
        if path.exists():
            return json.loads(path.read_text())
        fact_rows = read_rows(a.with_facts)[::a.every]
        if a.changed_only:
            fact_rows = [row for row in fact_rows if row.get("changed")]
        if [r["answer"] for r in fact_rows] != [r["answer"] for r in rows]:
            p.error(f"--with-facts {a.with_facts}: not the same questions as --data (answers differ)")
        result = asdict(run_system(loaded(), fact_rows, "expert, facts in prompt", config, mode="expert"))
        result["note"] = f"the expert with each question's facts written into its prompt ({a.with_facts})"
        write_json(path, result)
        return result

    def value_shares(systems: list[dict]) -> None:
        from collm.data.facts import fact_values, share_in_values

        catalogue = json.loads(a.catalogue.read_text())
        for result in systems:
            if not result.get("examples") or result["name"] in ("expert alone", "expert, facts in prompt"):
                continue
            inside = expert = 0
            for row, example in zip(rows, result["examples"]):
                i, e = share_in_values(example["tokens"], example["sources"], fact_values(catalogue, row["facts"]))
                inside, expert = inside + i, expert + e
            result["share_in_values"] = inside / expert if expert else None

    only = {x.strip() for x in a.only.split(",") if x.strip()}
    if only:  # rows that need no calibrated threshold, or a given random rate: run them beside other jobs
        if not only <= {"base", "expert", "collm", "weak", "random", "tuned", "proxy"} or \
                ("weak" in only and not a.weak_run) or ("random" in only and a.random_rate is None) or \
                (only & {"tuned", "proxy"} and tuned_run is None):
            p.error("--only takes base, expert, collm, weak (with --weak-run), random (with --random-rate), and "
                    "tuned and proxy (with --tuned-run, or a run whose base is tuned)")
        if "base" in only:
            base_alone()
        if "expert" in only:
            system("expert alone", mode="expert")
        if "tuned" in only:
            tuned_alone()
        if "proxy" in only:
            proxy()
        if "collm" in only:
            system("Co-LLM", threshold=read_run_config(a.run)["threshold"])
        if "weak" in only:
            weak()
        if "random" in only:
            randomised(a.random_rate, a.random_rate_from)
        return
    eta = read_run_config(a.run)["threshold"]
    systems = [base_alone(), system("expert alone", mode="expert")]
    if a.with_facts:  # the retrieval upper bound goes beside the expert, and is decoded before the slow rows
        systems.append(with_facts())
    systems.append(system("Co-LLM", threshold=eta))
    rate = systems[-1]["defer_rate"]
    systems.append(randomised(rate, "Co-LLM's measured rate on these problems"))
    if a.weak_run:
        systems.append(weak())
    if tuned_run is not None:
        # a run whose (frozen) base is the tuned run's adapter: "base alone" already is the tuned base
        base_is_tuned = (a.run / read_run_config(a.run)["base"]).resolve() == (tuned_run / "base_adapter").resolve()
        systems += [] if base_is_tuned else [tuned_alone()]
        systems += [proxy() if not a.no_proxy else asdict(missing("proxy tuning", a.no_proxy))]
    for t in (float(x) for x in a.extra_thresholds.split(",") if x.strip()):
        systems.append(system(f"Co-LLM eta={t:g}", threshold=t))
    if a.catalogue:
        value_shares(systems)
    results = {"config": asdict(config), "threshold": eta, "rows": len(rows), "dtype": a.dtype, "systems": systems,
               "run": str(a.run), "data": f"{a.data} (every {a.every})"}
    save_results(results, a.out / "results.json", a.out / "results.md")
    if a.catalogue:
        from collm.atomic import write_text
        from collm.evaluation.report import system_table

        write_text(a.out / "results.md", system_table(results, ("accuracy", "ci", "defer", "values", "calls", "speed")))
    from collm.evaluation.report import write_html

    write_html(a.out / "report.html", results)
    print((a.out / "results.md").read_text())


def system_file(folder: Path, name: str) -> Path:
    """Where one system's results live: its name, lower-case, runs of other characters as one dash."""
    return folder / f"system-{re.sub(r'[^a-z0-9.]+', '-', name.lower()).strip('-')}.json"


def reuse(earlier: Path, out: Path, rows: list[dict], config: EvalConfig, dtype: str,
          runs: dict[str, Path | None]) -> None:
    """Copy the systems named in ``runs`` (system name -> the run it must come from, named in its note; None: the
    untrained models) of an earlier evaluation into ``out`` when that evaluation decoded the same prompts with
    the same settings; otherwise say why and decode them again."""
    try:
        old = json.loads((earlier / "results.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--reuse {earlier}: no readable results.json there ({e}); drop --reuse")
    # results record the decoding dtype since --reuse exists; older ones (without it) are taken as this dtype
    same = (old.get("config") == json.loads(json.dumps(asdict(config))) and old.get("rows") == len(rows)
            and old.get("dtype", dtype) == dtype)
    for name, run in runs.items():
        source, target = system_file(earlier, name), system_file(out, name)
        if target.exists() or not source.exists():
            continue
        result = json.loads(source.read_text())
        prompts = [e["prompt"] for e in result.get("examples", [])]
        if not same or prompts != [r["prompt"] for r in rows]:
            print(f"--reuse: {source} decoded other rows or settings; decoding {name} again")
            continue
        if run is not None and not re.search(rf"run {re.escape(str(run))}(\)|,|$)", result.get("note", "")):
            print(f"--reuse: {source} does not name run {run} in its note; decoding {name} again")
            continue
        note = (result.get("note", "") + f" (decoded for {earlier.name}, same rows and settings)").strip()
        write_json(target, result | {"note": note})


if __name__ == "__main__":
    main()
