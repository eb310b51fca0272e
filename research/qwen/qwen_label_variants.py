"""Router heads fitted offline with other pseudo-labels than plain disagreement, as run folders to calibrate.

The router's labels (``disagree``) mark every token where the expert's greedy choice differs from the token
written, however weakly the expert prefers its own. These variants keep a disagreement on a token the base wrote
only where the expert gives that token less than a probability ``c`` (``conf10``: 0.1, ``conf03``: 0.03): the
expert rejects it, rather than preferring another wording. Disagreements on tokens the expert wrote (the on-policy
rows) are kept. ``disagree`` refits the plain labels the same way, as the control: these heads are fitted on the
probe's cached base outputs (``research/qwen/qwen_head_probe.py --cache``) with ``fit_weak_start`` (300 steps at 0.01,
then 400 at 3e-3, 2300 tokens a step), not by ``collm train``, so they are compared with each other.

    python research/qwen/qwen_label_variants.py --cache runs/qwen/probe/outputs.pt --scores runs/qwen/scores-mixed \
        --like runs/qwen/router-policy --variants disagree,conf10,conf03 --out runs/qwen/lab

Writes ``<out>-<variant>/`` (new folders: the head and ``--like``'s collm.json; seal them with ``collm seal``)
and prints for each the η at which it defers on the training tokens as often as ``--like``'s head does at its
own η: the η to calibrate at.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from collm.core.head import DeferralHead
from collm.core.routing import defer_prob
from collm.training.loss import disagreement_labels
from collm.training.weak import fit_weak_start

VARIANTS = {"disagree": None, "conf10": 0.1, "conf03": 0.03}


def aligned_scores(cache: dict, scores: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert's log-prob of each cached target token and whether it is the expert's argmax, in the cache's
    order (the cache holds rows in the base pass's batch order, each row's targets contiguous and in order)."""
    shards = sorted(scores.glob("shard-*.safetensors"))
    if len(shards) != 1:
        raise SystemExit(f"{scores}: expected one shard, found {len(shards)}")
    s = load_file(shards[0])
    if not torch.equal(s["row_index"], torch.arange(len(s["row_index"]))):
        raise SystemExit(f"{scores}: rows are not stored in order")
    order = torch.argsort(cache["rows"], stable=True)
    gold_logp = torch.empty(len(order))
    expert_hit = torch.empty(len(order), dtype=torch.bool)
    gold_logp[order] = s["gold_logp"].float().flatten()
    expert_hit[order] = s["argmax_gold"].bool().flatten()
    return gold_logp, expert_hit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True, help="research/qwen/qwen_head_probe.py's --cache")
    p.add_argument("--scores", type=Path, required=True, help="collm score's folder for the same rows")
    p.add_argument("--like", type=Path, required=True, help="the run whose collm.json the new runs copy")
    p.add_argument("--variants", default="disagree,conf10,conf03")
    p.add_argument("--out", required=True, help="prefix of the run folders")
    p.add_argument("--seed", type=int, default=0, help="the fit's seed (another seed: how much the fit alone moves "
                   "validation accuracy)")
    a = p.parse_args()
    cache = torch.load(a.cache)
    hidden_size = cache["hidden_size"]
    x, labels = cache["x"][:, :hidden_size], cache["labels"].bool()
    gold_logp, expert_hit = aligned_scores(cache, a.scores)
    like = json.loads((a.like / "collm.json").read_text())
    reference = DeferralHead.load(a.like / "head.safetensors")
    with torch.no_grad():
        target_rate = float((defer_prob(reference.log_probs(x)) > like["threshold"]).float().mean())
    print(f"{a.like}: defers {target_rate:.3f} of the training tokens at η = {like['threshold']}")
    for name in a.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
        c = VARIANTS[name]
        # the cache holds the plain labels (base_hit ^ expert_hit), so base_hit = labels ^ expert_hit
        keep = labels if c is None else disagreement_labels(labels ^ expert_hit, expert_hit, gold_logp, c).bool()
        head = DeferralHead(hidden_size)
        fit_weak_start(head, x, keep.long(), steps=300, lr=0.01, batch=2300, seed=a.seed)
        fit_weak_start(head, x, keep.long(), steps=400, lr=3e-3, batch=2300, seed=a.seed + 1)
        with torch.no_grad():
            defer_probs = defer_prob(head.log_probs(x)).sort().values
        eta = float(defer_probs[int((1 - target_rate) * len(defer_probs))])
        folder = Path(f"{a.out}-{name}" + (f"-seed{a.seed}" if a.seed else ""))
        if folder.exists() and any(folder.iterdir()):
            raise SystemExit(f"{folder} exists and is not empty: give another --out (nothing there is overwritten)")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a.like / "collm.json", folder / "collm.json")
        head.save(folder / "head.safetensors")
        print(f"{name}: {int(keep.sum())} positive of {len(keep)} tokens; η for the same deferral: {eta:.2f}; "
              f"seal and calibrate with: collm seal {folder}", flush=True)


if __name__ == "__main__":
    main()
