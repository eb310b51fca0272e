"""Which disagreements decide the answer? Swap the expert's token in at a disagreement and let the base go on.

The router's labels (``disagree``) mark every token of the base's own solutions where the expert's greedy token
differs. Most of those are wording ("Then" for "Next"); a few decide the answer. This measures which: for each of
the base-written rows whose answer is wrong, at some of its disagreements (the first ``--first`` and
``--random`` more drawn with a fixed seed), the prefix up to that token plus the *expert's* greedy token is handed
back to the base, which writes the rest greedily (the same 320-token budget as the original answer). A rollout
whose answer becomes right marks a decisive disagreement. ``--controls`` rollouts put the base's own token back
instead (they should reproduce the wrong answer: a check that the rollouts decode as the rows were written).
``--swap other`` is the null: at the same places, the base's best token that is neither its own nor the expert's
(is it the expert's word that rescues, or any change of word?). ``--head RUN`` adds the router's P(defer) at each
tested place to the report.

    python research/qwen/qwen_decisive.py --data runs/qwen/mixed_style.jsonl --scores runs/qwen/scores-mixed \
        --base-rows 160 --out runs/qwen/decisive --head src/collm/assets/qwen
    python research/qwen/qwen_decisive.py ... --random 0 --controls 0 --swap other --out runs/qwen/decisive-other

Writes ``chunk-NNN.jsonl`` (one rollout per line) one batch at a time, so a killed run resumes at the next
batch, then ``summary.json``. Refuses an ``--out`` holding another run's ``plan.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from qwen_head_probe import auc  # this folder is on the path when a script runs

from collm.atomic import atomic_write, write_json
from collm.backends.models import load_model
from collm.core.head import DeferralHead
from collm.core.routing import defer_prob
from collm.data.answer import is_correct
from collm.data.rows import DataConfig, encode_file
from collm.pair import CoLLM
from collm.training.score import load_scores


def plan(args, data, scores, rows) -> list[dict]:
    """The rollouts: (row, target position, which token goes in), before any expert token is known."""
    rng = random.Random(args.seed)
    out = []
    for i in range(min(args.base_rows, len(rows))):
        if is_correct(rows[i]["completion"], rows[i]["answer"]):
            continue
        ex = data.examples[i]
        positions = [p for p in range(1, len(ex.input_ids)) if ex.completion_mask[p]]
        hit = scores.argmax_gold[scores.offsets[i]: scores.offsets[i + 1]]
        if len(hit) != len(positions):
            raise SystemExit(f"row {i}: {len(positions)} completion tokens but {len(hit)} scores: score the same "
                             "--data with the same --max-len")
        disagree = [p for p, h in zip(positions, hit.tolist()) if not h]
        chosen = disagree[: args.first]
        rest = disagree[args.first:]
        chosen += sorted(rng.sample(rest, min(args.random, len(rest))))
        start = positions[0]
        for k, p in enumerate(chosen):
            out.append({"row": i, "pos": p, "target": positions.index(p), "completion_start": start,
                        "kind": "first" if k < args.first else "random", "rank": disagree.index(p),
                        "disagreements": len(disagree)})
        if sum(1 for r in out if r["kind"] == "control") < args.controls and disagree:
            out.append({"row": i, "pos": disagree[0], "target": positions.index(disagree[0]),
                        "completion_start": start, "kind": "control", "rank": 0, "disagreements": len(disagree)})
    return out


def row_prefixes(data, rollouts: list[dict]):
    """(ids (1, L), the row's rollouts) per row: its tokens up to its last rollout's position, for one model pass
    per row whose outputs at ``pos - 1`` are the prediction of each rollout's token."""
    by_row: dict[int, list[dict]] = {}
    for r in rollouts:
        by_row.setdefault(r["row"], []).append(r)
    for i, items in by_row.items():
        yield torch.tensor([data.examples[i].input_ids[: max(r["pos"] for r in items)]]), items


@torch.inference_mode()
def expert_tokens(expert, data, todo: list[dict]) -> None:
    """Fill each rollout's ``expert_token`` (the expert's greedy token at its position) and ``written_token``."""
    for ids, items in row_prefixes(data, todo):
        logits = expert(input_ids=ids).logits[0].float()
        for r in items:
            r["expert_token"] = int(logits[r["pos"] - 1].argmax())
            r["written_token"] = data.examples[r["row"]].input_ids[r["pos"]]


@torch.inference_mode()
def router_probs(base, head: DeferralHead, data, done: list[dict]) -> None:
    """Fill each rollout's ``defer_prob``: the router's P(defer) at its position, on the base's hidden state (one
    base pass per row over the prefix up to its last tested position, as the router reads it when decoding)."""
    for ids, items in row_prefixes(data, done):
        hidden = base.base_model(input_ids=ids).last_hidden_state[0].float()
        p = defer_prob(head.log_probs(hidden[[r["pos"] - 1 for r in items]]))
        for r, pi in zip(items, p.tolist()):
            r["defer_prob"] = pi


def report(done: list[dict], tokenizer, threshold: float | None, swap: str = "expert") -> dict:
    """Where the decisive disagreements lie: by kind, by place in the answer, by token, and how the router ranks
    them among the tested disagreements."""
    tested = [r for r in done if r["kind"] != "control" and r["expert_token"] != r["written_token"]]
    swapped = f"{swap}_token"
    out = {"swap": swap, "rollouts": len(done), "rows": len({r["row"] for r in done}), "tested": len(tested),
           "decisive": sum(r["correct"] for r in tested),
           "rows_rescued": len({r["row"] for r in tested if r["correct"]})}
    for kind in ("first", "random", "control"):
        sel = [r for r in done if r["kind"] == kind]
        out[kind] = {"rollouts": len(sel), "right": sum(r["correct"] for r in sel),
                     "rows_rescued": len({r["row"] for r in sel if r["correct"]})}
    by_rank = {}
    for r in tested:
        key = str(r["rank"]) if r["rank"] < 4 else "4+"
        by_rank.setdefault(key, [0, 0])
        by_rank[key][0] += 1
        by_rank[key][1] += r["correct"]
    out["by_disagreement_rank"] = {k: {"tested": v[0], "decisive": v[1]} for k, v in sorted(by_rank.items())}
    def digit(t):
        return any(ch.isdigit() for ch in tokenizer.decode([t]))

    for name, test in (("swapped_token_has_digit", lambda r: digit(r[swapped])),
                       ("written_token_has_digit", lambda r: digit(r["written_token"]))):
        sel = [r for r in tested if test(r)]
        out[name] = {"tested": len(sel), "decisive": sum(r["correct"] for r in sel)}
    out["decisive_examples"] = [
        {"row": r["row"], "at": r["pos"] - r["completion_start"], "written": tokenizer.decode([r["written_token"]]),
         "expert": tokenizer.decode([r["expert_token"]]), "swapped": tokenizer.decode([r[swapped]]),
         "defer_prob": r.get("defer_prob")}
        for r in tested if r["correct"]]
    if tested and "defer_prob" in tested[0]:
        p = [r["defer_prob"] for r in tested]
        y = [bool(r["correct"]) for r in tested]
        out["router_auc_decisive_vs_not"] = auc(torch.tensor(p), torch.tensor(y)) if 0 < sum(y) < len(y) else None
        if threshold is not None:
            out["router_defers_at_threshold"] = {
                "threshold": threshold,
                "decisive": sum(1 for pi, yi in zip(p, y) if yi and pi > threshold),
                "not_decisive": sum(1 for pi, yi in zip(p, y) if not yi and pi > threshold),
                "not_decisive_total": sum(not yi for yi in y)}
    return out


@torch.inference_mode()
def other_tokens(base, data, todo: list[dict]) -> None:
    """Fill each rollout's ``other_token``: the base's most likely token that is neither the written one nor the
    expert's (the null: another plausible word, not the expert's)."""
    for ids, items in row_prefixes(data, todo):
        logits = base(input_ids=ids).logits[0].float()
        for r in items:
            top = logits[r["pos"] - 1].topk(3).indices.tolist()
            r["other_token"] = next(t for t in top if t not in (r["written_token"], r["expert_token"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the router's rows (prompt/completion JSONL)")
    p.add_argument("--scores", type=Path, required=True, help="collm score's folder for those rows (the expert)")
    p.add_argument("--base-rows", type=int, default=160, help="the first N rows are the base's own answers")
    p.add_argument("--base", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--expert", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--max-len", type=int, default=512, help="as the rows were scored")
    p.add_argument("--max-new-tokens", type=int, default=320, help="the answer's whole budget, as written")
    p.add_argument("--first", type=int, default=4)
    p.add_argument("--random", type=int, default=2)
    p.add_argument("--controls", type=int, default=12)
    p.add_argument("--swap", choices=("expert", "other"), default="expert",
                   help="the token swapped in: the expert's greedy token, or (the null) the base's best token that "
                        "is neither the written one nor the expert's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=55)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--limit", type=int, help="only the first N rollouts (a smoke run)")
    p.add_argument("--head", type=Path, help="a run folder: report its router's P(defer) at the tested positions")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model(a.base, dtype=a.dtype)
    rows = [json.loads(line) for line in a.data.read_text().splitlines() if line.strip()]
    data = encode_file(a.data, tokenizer, DataConfig(max_len=a.max_len, chat=True, add_eos=True))
    if len(data.examples) != len(rows):
        raise SystemExit(f"{a.data}: encoding dropped {len(rows) - len(data.examples)} rows, so rows and "
                         "examples no longer line up: raise --max-len")
    scores = load_scores(a.scores, data)
    key = {"data": str(a.data), "scores": str(a.scores), "base_rows": a.base_rows, "first": a.first,
           "random": a.random, "controls": a.controls, "seed": a.seed, "max_new_tokens": a.max_new_tokens,
           "swap": a.swap}
    plan_file = a.out / "plan.json"
    if plan_file.exists():
        saved = json.loads(plan_file.read_text())
        saved["key"].setdefault("swap", "expert")  # plans written before --swap existed
        if saved["key"] != key:
            raise SystemExit(f"{a.out} holds a run with other settings ({saved['key']}): give another --out")
        todo = saved["rollouts"]
    else:
        todo = plan(a, data, scores, rows)
        expert, _ = load_model(a.expert, dtype=a.dtype)
        started = time.time()
        expert_tokens(expert, data, todo)
        del expert
        if a.swap == "other":
            other_tokens(base, data, todo)
        print(f"expert tokens for {len(todo)} rollouts in {time.time() - started:.0f} s", flush=True)
        write_json(plan_file, {"key": key, "rollouts": todo})
    if a.limit:
        todo = todo[: a.limit]
    pair = CoLLM(base=base, experts=[base], head=None, tokenizer=tokenizer)  # base mode: no expert runs
    # longest budgets first, so a batch's rows need about the same number of steps
    order = sorted(range(len(todo)), key=lambda k: (todo[k]["pos"] - todo[k]["completion_start"], k))
    for b, start in enumerate(range(0, len(order), a.batch_size)):
        chunk = a.out / f"chunk-{b:03d}.jsonl"
        if chunk.exists():
            continue
        batch = [todo[k] for k in order[start: start + a.batch_size]]
        prompts, budgets = [], []
        for r in batch:
            token = r["written_token"] if r["kind"] == "control" else r[f"{a.swap}_token"]
            prompts.append(data.examples[r["row"]].input_ids[: r["pos"]] + [token])
            budgets.append(a.max_new_tokens - (r["pos"] - r["completion_start"]) - 1)
        t = time.time()
        out = pair.generate(input_ids=prompts, max_new_tokens=max(1, max(budgets)), mode="base")
        lines = []
        for r, ids, budget, prompt in zip(batch, out.token_ids, budgets, prompts):
            completion = prompt[r["completion_start"]:] + list(ids[: max(budget, 0)])
            text = tokenizer.decode(completion, skip_special_tokens=True)
            right = is_correct(text, rows[r["row"]]["answer"])
            lines.append(json.dumps({**r, "correct": right, "new_tokens": min(len(ids), max(budget, 0)),
                                     "text": text}))
        atomic_write(chunk, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        flips = sum(json.loads(x)["correct"] for x in lines)
        print(f"batch {b}: {flips}/{len(batch)} right, {out.stats.get('new_tokens')} tokens in "
              f"{time.time() - t:.0f} s", flush=True)
    done = [json.loads(x) for c in sorted(a.out.glob("chunk-*.jsonl")) for x in c.read_text().splitlines()]
    threshold = None
    if a.head:
        router_probs(base, DeferralHead.load(a.head / "head.safetensors"), data, done)
        threshold = json.loads((a.head / "collm.json").read_text())["threshold"]
    summary = report(done, tokenizer, threshold, a.swap)
    summary["head"] = str(a.head) if a.head else None
    write_json(a.out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "decisive_examples"}, indent=1))


if __name__ == "__main__":
    main()
