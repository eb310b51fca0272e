"""Decoding speed on real held-out problems: base alone, expert alone, Co-LLM at the run's threshold,
and `transformers` assisted generation (speculative decoding, the base drafting for the expert).

Batch 1 (ms/token), and with ``--batch B`` also tokens/s at batch B for collm's systems (B prompts at once,
new tokens over the whole call's wall time, prefill included); assisted generation takes one sequence at a time.

    OMP_NUM_THREADS=1 python research/qwen/qwen_speed.py --run runs/qwen/collm --data runs/qwen/data/gsm/test.jsonl \
        --prompts 4 --new-tokens 96 --json research/qwen/results/cpu_qwen_speed.json \
        --markdown research/qwen/results/cpu_qwen_speed.md

Every system answers the same prompts (chat template, greedy) in one process. As `collm bench` counts it,
ms/token is the decoding phase: each prompt is written with N new tokens and with 1 (prefill and first token),
and ms/token = sum(t_N - t_1) / sum(n_N - 1) over the prompts (an answer may end at EOS before N).
Speculative decoding writes the expert's own greedy tokens; it is the speed a user of the expert would get:
`transformers` assisted generation (`speculative` in --systems) and collm's own loop (`--expert-lookahead k`:
``generate(mode="expert", lookahead=k)``, the base drafting k tokens that the expert checks in one read).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from collm.atomic import atomic_write, write_json
from collm.pair import CoLLM


def timed(fn) -> tuple[float, int]:
    started = time.perf_counter()
    n = fn()
    return time.perf_counter() - started, n


def collm_system(pair, ids, mode, threshold, lookahead=None, record=None):
    def run(n):
        out = pair.generate([ids], max_new_tokens=n, mode=mode, threshold=threshold, lookahead=lookahead)
        if record is not None:
            record.append(out)
        return len(out.token_ids[0]), sum(1 for s in out.sources[0] if s)
    return run


def hf_system(model, ids, assistant=None):
    def run(n):
        x = torch.tensor([ids])
        kwargs = dict(assistant_model=assistant) if assistant is not None else {}
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **kwargs)
        return out.shape[1] - x.shape[1], 0
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="trained run folder (collm.json with the calibrated threshold)")
    p.add_argument("--data", required=True, help="JSONL with prompts (held-out test problems)")
    p.add_argument("--prompts", type=int, default=4, help="prompts, every 5th row from the first")
    p.add_argument("--spread", action="store_true", help="take the prompts evenly spaced over the whole file "
                   "(every len/N-th row: the test file runs template by template, so the first rows cover few)")
    p.add_argument("--offset", type=int, default=0, help="with --spread: start at this row (another set of prompts "
                   "spread the same way)")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threshold", type=float, default=None, help="Co-LLM threshold; default the run's")
    p.add_argument("--no-hf", action="store_true", help="collm's systems only (no transformers generate)")
    p.add_argument("--systems", default="base,expert,collm,generate,speculative",
                   help="batch-1 systems, comma-separated: base, expert, collm, "
                        "generate (transformers, expert), speculative "
                        "(transformers assisted), proxy (proxy tuning; a run with a tuned base)")
    p.add_argument("--tuned-run", type=Path, help="a run whose base is tuned: adds its tuned base alone and, with "
                   "proxy in --systems, proxy tuning with it (default: --run itself, when its base is tuned)")
    p.add_argument("--lookahead", default="", help="also Co-LLM drafting past deferrals (the engine's lookahead) "
                   "at these lookaheads, comma-separated (e.g. 4,8); its answers are compared with the engine's")
    p.add_argument("--expert-lookahead", default="", help="also speculative decoding in collm's loop at these draft "
                   "lengths, comma-separated (generate(mode='expert', lookahead=k): the base drafts k tokens, the "
                   "expert checks them in one read); it writes the expert's greedy tokens")
    p.add_argument("--interleave", action="store_true", help="each prompt through every system before the next "
                   "prompt (a shared machine's load then drifts over all systems alike)")
    p.add_argument("--batch", type=int, default=0, help="also tokens/s at this batch size (0: skip)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    a = p.parse_args()
    every = [json.loads(x) for x in Path(a.data).read_text().splitlines() if x.strip()]
    if a.offset and not a.spread or not 0 <= a.offset < len(every):
        raise SystemExit(f"--offset needs --spread and a row of the file (0..{len(every) - 1}), got {a.offset}")
    every = every[a.offset :: max(1, len(every) // max(a.prompts, a.batch))] if a.spread else every[::5]
    rows = every[:a.prompts]
    pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
    eta = pair.threshold if a.threshold is None else a.threshold
    prompts = pair.encode([r["prompt"] for r in rows])
    base, expert = pair.base, pair.experts[0]
    chosen = {x.strip() for x in a.systems.split(",") if x.strip()}
    chosen -= {"generate", "speculative"} if a.no_hf else set()
    unknown = chosen - {"base", "expert", "collm", "generate", "speculative", "proxy"}
    if unknown or not {"base", "expert", "collm"} <= chosen:
        raise SystemExit(f"--systems: base, expert and collm are needed (for τ(f)); unknown: {sorted(unknown)}")
    tuned = pair.info.get("base_weights", "original") != "original"
    base_name = "tuned base alone" if tuned else "base alone"
    tuned_base = base if tuned else None
    if a.tuned_run is not None and not tuned:
        tuned_pair = CoLLM.from_pretrained(a.tuned_run, dtype=a.dtype)
        if tuned_pair.info.get("base_weights", "original") == "original":
            raise SystemExit(f"--tuned-run {a.tuned_run}: that run's base is not tuned (collm.json base_weights)")
        tuned_base = tuned_pair.base
        untuned_spec = tuned_pair.info["base"]  # the model the tuned run's adapter was trained on
        tuned_alone = CoLLM(tuned_base, [], None, pair.tokenizer)
        del tuned_pair  # its expert copy is not needed
        chosen.add("tuned")
    if "proxy" in chosen and tuned_base is None:
        raise SystemExit("--systems proxy: proxy tuning needs a tuned base (--tuned-run, or a run whose base is tuned)")
    engine_name = f"Co-LLM (eta={eta:g})"
    answers: dict[str, list] = {engine_name: [], "expert alone": []}  # whole answers, to compare tokens
    systems = {
        "base": (base_name, lambda ids: collm_system(pair, ids, "base", eta)),
        "expert": ("expert alone", lambda ids: collm_system(pair, ids, "expert", eta, record=answers["expert alone"])),
        "collm": (engine_name, lambda ids: collm_system(pair, ids, "collm", eta, record=answers[engine_name])),
        "generate": ("transformers generate, expert", lambda ids: hf_system(expert, ids)),
        "speculative": ("speculative decoding (transformers assisted, base drafts)",
                        lambda ids: hf_system(expert, ids, base)),
    }
    drafting = [("collm", int(x)) for x in a.lookahead.split(",") if x.strip()] + \
        [("expert", int(x)) for x in a.expert_lookahead.split(",") if x.strip()]
    for mode, k in drafting:  # Co-LLM drafting past deferrals; mode expert: speculative decoding
        name = f"{engine_name}, lookahead {k}" if mode == "collm" else \
            f"speculative decoding in collm (mode expert, lookahead {k}: the base drafts, the expert checks)"
        answers[name] = []
        systems[f"{mode}-lookahead{k}"] = (name, lambda ids, k=k, mode=mode, name=name: collm_system(
            pair, ids, mode, eta, lookahead=k, record=answers[name]))
        chosen.add(f"{mode}-lookahead{k}")
    if "tuned" in chosen:
        systems["tuned"] = ("tuned base alone", lambda ids: collm_system(tuned_alone, ids, "base", eta))
    if "proxy" in chosen:
        from collm.backends.models import load_model
        from collm.pair import proxy_tuning

        if a.tuned_run is not None and not tuned:  # e.g. a head on a frozen tuned base: untune the tuned run
            untuned = load_model(untuned_spec, dtype=a.dtype)[0]
        else:
            untuned = load_model(pair.info["base"], dtype=a.dtype)[0] if tuned else base
        both = proxy_tuning(expert, tuned_base, untuned, pair.tokenizer)
        systems["proxy"] = ("proxy tuning (expert + tuned - untuned base)",
                            lambda ids: collm_system(both, ids, "proxy", eta))
    systems = dict(v for k, v in systems.items() if k in chosen)
    for make in systems.values():  # warm-up: each system's first call allocates and picks kernels
        make(prompts[0])(4)
    for kept in answers.values():
        kept.clear()
    sums = {name: [0.0, 0, 0, 0] for name in systems}  # decoding seconds, decoded tokens, deferred, new tokens
    order = [(name, ids) for ids in prompts for name in systems] if a.interleave else \
        [(name, ids) for name in systems for ids in prompts]
    for name, ids in order:
        run = systems[name](ids)
        t1, _ = timed(lambda: run(1)[0])
        box = {}
        tn, n = timed(lambda: box.setdefault("r", run(a.new_tokens))[0])
        acc = sums[name]
        acc[0] += tn - t1
        acc[1] += n - 1
        acc[2] += box["r"][1]
        acc[3] += n
    results = []
    reference = [o for o in answers[engine_name] if len(o.token_ids[0]) > 1]
    for name, (t_dec, n_dec, deferred, total) in sums.items():
        row = {"system": name, "ms_per_token": 1000 * t_dec / n_dec, "decoded_tokens": int(n_dec),
               "deferral_rate": deferred / total if name.startswith("Co-LLM") else None}
        if "lookahead" in name:  # the whole answers (not the 1-token runs): what drafting cost and saved
            outs = [o for o in answers[name] if len(o.token_ids[0]) > 1]
            row |= {k: sum(o.stats[k] for o in outs) for k in ("expert_calls", "checked", "drafts_cut", "discarded",
                                                               "drafted")}
            if "mode expert" in name:  # speculative decoding writes the expert's tokens: compare with the expert's
                mine = [o for o in answers["expert alone"] if len(o.token_ids[0]) > 1]
                row["same_answers_as_expert"] = sum(o.token_ids == r.token_ids for o, r in zip(outs, mine))
            else:
                row["same_answers_as_engine"] = sum(o.token_ids == r.token_ids for o, r in zip(outs, reference))
        print(json.dumps(row), flush=True)
        results.append(row)
    batched = []
    if a.batch:
        ids = pair.encode([r["prompt"] for r in every[:a.batch]])
        if len(ids) < a.batch:
            raise SystemExit(f"--batch {a.batch}: the data has only {len(ids)} prompts at the chosen rows")
        for name, mode in ((base_name, "base"), ("expert alone", "expert"), (f"Co-LLM (eta={eta:g})", "collm")):
            started = time.perf_counter()
            out = pair.generate(ids, max_new_tokens=a.new_tokens, mode=mode, threshold=eta)
            seconds = time.perf_counter() - started
            new = sum(len(t) for t in out.token_ids)
            row = {"system": name, "batch": a.batch, "tokens_per_s": new / seconds, "new_tokens": new,
                   "deferral_rate": ((sum(sum(1 for x in s if x) for s in out.sources) / new)
                                     if mode == "collm" else None)}
            print(json.dumps(row), flush=True)
            batched.append(row)
    by = {r["system"]: r["ms_per_token"] for r in results}
    f = next(r["deferral_rate"] for r in results if r["system"].startswith("Co-LLM"))
    tau = by[base_name] + f * by["expert alone"]
    summary = {"threshold": eta, "deferral_rate": f, "tau_f_ms": tau, "prompts": len(prompts),
               "new_tokens": a.new_tokens, "dtype": a.dtype,
               "rows": (f"spread from row {a.offset}" if a.offset else "spread") if a.spread else "every 5th",
               "interleaved": a.interleave,
               "threads": torch.get_num_threads(), "systems": results,
               "batched": batched}
    if a.json:
        write_json(a.json, summary)
    lines = ["| System | ms/token (batch 1) | decoded tokens | deferral rate |", "| --- | --- | --- | --- |"]
    for r in results:
        rate = "" if r["deferral_rate"] is None else f"{r['deferral_rate']:.3f}"
        lines.append(f"| {r['system']} | {r['ms_per_token']:.1f} | {r['decoded_tokens']} | {rate} |")
    if batched:
        lines += ["", f"| System | tokens/s (batch {a.batch}) | new tokens | deferral rate |",
                  "| --- | --- | --- | --- |"]
        for r in batched:
            rate = "" if r["deferral_rate"] is None else f"{r['deferral_rate']:.3f}"
            lines.append(f"| {r['system']} | {r['tokens_per_s']:.1f} | {r['new_tokens']} | {rate} |")
    for r in (r for r in results if "same_answers_as_engine" in r):
        lines.append(f"\n{r['system']}: {r['expert_calls']} expert calls for {r['checked']} checked deferrals, "
                     f"{r['drafts_cut']} drafts cut where the expert wrote another token "
                     f"({r['discarded']} drafted tokens "
                     f"dropped), {r['drafted']} drafted stand-ins; "
                     f"{r['same_answers_as_engine']}/{len(prompts)} answers "
                     "token for token the engine's")
    for r in (r for r in results if "same_answers_as_expert" in r):
        lines.append(f"\n{r['system']}: {r['expert_calls']} expert calls for {r['checked']} tokens checked, "
                     f"{r['drafts_cut']} drafts cut where the expert wrote another token "
                     f"({r['discarded']} drafted tokens "
                     f"dropped), {r['drafted']} drafted stand-ins; "
                     f"{r['same_answers_as_expert']}/{len(prompts)} answers "
                     "token for token the expert's")
    lines.append(f"\nτ(f) = t_base + f·t_expert = {tau:.1f} ms/token at f = {f:.3f}; "
                 f"{len(prompts)} prompts ({summary['rows'].replace('spread', 'evenly spaced')}), {a.new_tokens} new "
                 f"tokens, {a.dtype}, {torch.get_num_threads()} thread(s)")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.markdown:
        atomic_write(a.markdown, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
