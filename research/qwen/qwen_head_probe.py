"""How well can a head on these inputs tell where the expert would write another token? An offline check.

Before a head is trained and calibrated (tens of minutes on this CPU), fit logistic heads on the base's outputs
at a training set's target tokens and score them on held-out rows against the router's labels (``disagree``: the
expert's greedy token differs from the base's), for several inputs: the hidden state (what the router reads),
features of the base's next-token distribution (entropy, top probability, top-two margin; ``--head-features``)
and both. Rows, not tokens, are held out (a quarter, fixed seed), so a row's neighbouring tokens never sit on
both sides. Reports the held-out AUC and average precision, and the share of held-out tokens each head defers at
P > 0.5, as one JSON file.

    python research/qwen/qwen_head_probe.py --base qwen2.5-coder-0.5b-instruct --data runs/qwen/mixed_style.jsonl \
        --scores runs/qwen/scores-mixed --max-len 512 --cache runs/qwen/probe/outputs.pt \
        --json runs/qwen/probe/probe.json

The base pass is the slow part (14 min for 87 308 targets here, 2 threads); ``--cache`` keeps its outputs for
re-runs. This measures label prediction only: a better AUC need not mean more problems right (README, what was
tried).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from collm.atomic import atomic_write, write_json
from collm.backends.models import load_model
from collm.core.head import FEATURES, DeferralHead
from collm.data.rows import encode_file, pad_id
from collm.training.loss import disagreement_labels
from collm.training.score import load_scores, pad_batch, target_outputs, token_batches
from collm.training.train import TrainConfig, row_scores
from collm.training.weak import fit_weak_start


@torch.inference_mode()
def base_outputs(args) -> dict:
    """Per target token: the base's hidden state + distribution features, the label, the row index."""
    config = TrainConfig(base=args.base, data=args.data, scores=[args.scores], max_len=args.max_len,
                         weak_label="disagree", out="unused")
    base, tokenizer = load_model(args.base)
    base.eval()
    data = encode_file(args.data, tokenizer, config.data_config())
    scores = [load_scores(args.scores, data)]
    examples = data.examples
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    x, labels, rows, started = [], [], [], time.time()
    for batch in token_batches(order, examples, args.batch_tokens):
        ids, attention, targets = pad_batch([examples[i] for i in batch], pad_id(tokenizer))
        _, hit, inputs = target_outputs(base, ids, attention, targets, features=FEATURES)
        counts = [examples[i].num_targets for i in batch]
        for i, xi, hi in zip(batch, inputs.split(counts), hit.split(counts)):
            x.append(xi.clone())
            labels.append(disagreement_labels(hi, row_scores(scores, i)[1]))
            rows.append(torch.full((len(hi),), i))
        print(f"{sum(len(r) for r in rows)} targets, {time.time() - started:.0f} s", flush=True)
    return {"x": torch.cat(x), "labels": torch.cat(labels), "rows": torch.cat(rows),
            "hidden_size": base.config.get_text_config().hidden_size}


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """P(a random positive scores above a random negative), by ranks."""
    ranks = torch.empty(len(score), dtype=torch.float64)
    ranks[score.argsort()] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    pos = float(label.sum())
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * (len(label) - pos)))


def average_precision(score: torch.Tensor, label: torch.Tensor) -> float:
    hits = label[score.argsort(descending=True)].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def fit(x: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, args) -> torch.Tensor:
    """A logistic head on x fitted as collm fits a head to pseudo-labels (:func:`fit_weak_start`: zero init,
    AdamW, class-weighted BCE on random token batches), on the training rows; its logits on every token."""
    head = DeferralHead(x.shape[1])
    fit_weak_start(head, x[train], labels[train], steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed)
    with torch.no_grad():
        return head(x).squeeze(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--data", required=True, help="the rows a router trains on (prompt/completion JSONL)")
    p.add_argument("--scores", required=True, help="collm score's folder for those rows (the expert)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--cache", type=Path, help="the base pass's outputs: read if present, else written")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per head (the router: 400)")
    p.add_argument("--batch", type=int, default=2300, help="tokens per step (the router's steps: ~2300)")
    p.add_argument("--lr", type=float, default=3e-3, help="the router's --head-lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    if args.cache and args.cache.is_file():
        out = torch.load(args.cache)
    else:
        out = base_outputs(args)
        if args.cache:
            atomic_write(args.cache, lambda tmp: torch.save(out, tmp))
    x, labels, rows, hidden = out["x"], out["labels"], out["rows"], out["hidden_size"]
    held = torch.randperm(int(rows.max()) + 1, generator=torch.Generator().manual_seed(1))[: (int(rows.max()) + 1) // 4]
    test = torch.isin(rows, held)
    inputs = {"hidden state (the router)": x[:, :hidden], "entropy": x[:, hidden : hidden + 1],
              "entropy, top probability, margin": x[:, hidden:], "hidden state + the three": x}
    result = {"data": args.data, "scores": args.scores, "base": args.base, "targets": len(labels),
              "held_out_targets": int(test.sum()), "positive_rate": float(labels.float().mean()), "heads": {}}
    for name, xi in inputs.items():
        logits = fit(xi, labels, ~test, args)
        positive = labels.bool()
        result["heads"][name] = {"auc": auc(logits[test], positive[test]),
                                 "average_precision": average_precision(logits[test], positive[test]),
                                 "defer_rate_at_0.5": float((logits[test] > 0).float().mean())}
        print(name, result["heads"][name], flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
