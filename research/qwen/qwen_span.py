"""Try routing rules on a trained head, without retraining, on validation, resumable per rule.

The shipped router defers one token at a time: at η = 0.5 accuracy hardly moves with the deferral rate (57,
56, 58 of 110 from 36% to 25%), so its marginal deferrals are not where answers are decided. Two rules that
let the expert finish what it started, both read from the same head (no retraining):

- ``span:K@η``: where the head defers (P > η), the expert writes that token and the next K - 1 (the head is
  not consulted inside the run);
- ``hyst:LOW@η``: the expert starts where P > η and goes on while P > LOW (hysteresis).

One that moves the threshold along the answer: ``sched:N/EARLY@η``, η_early for the first N tokens and η after
(``sched:32/0@0.6``: the expert writes the first 32 tokens, where the plan is set).

And one that reads the tokens too: ``arith:@η``, the head's rule at η plus the expert writing each result after
an ``=``, to the end of the number (the paper's recipe on gold text learned that deferral: README item 13).

    python research/qwen/qwen_span.py --run runs/qwen/router-policy --data runs/qwen/data/gsm/validation.jsonl \
        --rules span:4@0.6,hyst:0.3@0.6 --out runs/qwen/span-val110

Each rule's result goes to ``<out>/<rule>.json`` as it finishes; a rerun skips the ones there.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from collm.atomic import write_json
from collm.core.routing import defer_prob, most_probable_expert, route
from collm.evaluation.evaluate import EvalConfig, read_rows, run_system
from collm.pair import CoLLM


class RunRouter:
    """A router (collm.core.request.Router) that keeps the expert writing once the head defers: for ``span``
    tokens (head not consulted inside), or while P(defer) stays above ``release``. Rows must keep their index
    between steps (a fixed batch, as collm.decoding.decode runs); step 0 starts a new batch."""

    def __init__(self, threshold: float, span: int = 1, release: float | None = None):
        self.threshold, self.span, self.release = threshold, span, release
        self.left = self.expert = None

    def __call__(self, step: int, log_pz: torch.Tensor) -> torch.Tensor:
        p = defer_prob(log_pz)
        rows = p.shape[0]
        if step == 0 or self.left is None or self.left.shape[0] != rows:
            self.left = torch.zeros(rows, dtype=torch.long, device=p.device)
            self.expert = torch.zeros(rows, dtype=torch.long, device=p.device)
        start = p > self.threshold
        if self.release is not None:
            defer = start | ((self.expert > 0) & (p > self.release))
            self.expert = torch.where(defer, most_probable_expert(log_pz), 0)
            return self.expert
        inside = self.left > 0
        choice = torch.where(inside, self.expert, torch.where(start, most_probable_expert(log_pz), 0))
        self.left = torch.where(inside, self.left - 1, torch.where(start, self.span - 1, 0))
        self.expert = choice
        return choice


class ArithRouter:
    """The head's rule, plus: the expert writes the result after every ``=`` the answer writes, until the
    number ends (Qwen writes one digit per token). It reads each row's newest token (``reads_tokens``: the
    engine passes it)."""

    reads_tokens = True

    NUMBER = re.compile(r"^ ?[$\d.,]+$|^ $")  # a digit, '.', ',', '$' (after an optional space), or one space

    def __init__(self, threshold: float, tokenizer):
        self.threshold, self.span = threshold, None
        pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        self.ends_eq = torch.tensor([piece.rstrip().endswith("=") for piece in pieces])
        self.number = torch.tensor([bool(self.NUMBER.match(piece)) for piece in pieces])

    def __call__(self, step: int, log_pz: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        rows = log_pz.shape[0]
        if step == 0 or self.span is None or self.span.shape[0] != rows:
            self.span = torch.zeros(rows, dtype=torch.bool)
        else:
            last = last.cpu().clamp(0, len(self.ends_eq) - 1)
            self.span = self.ends_eq[last] | (self.span & self.number[last])
        return torch.where(self.span.to(log_pz.device), most_probable_expert(log_pz), route(log_pz, self.threshold))


class ScheduleRouter:
    """The head's rule with a threshold that depends on where in the answer the token is: ``early`` for the first
    ``steps`` tokens, ``late`` after (``early`` 0: the expert writes the first ``steps`` tokens outright). Rows
    start together (a fixed batch), so the engine's step index is each row's token index."""

    def __init__(self, steps: int, early: float, late: float):
        self.steps, self.early, self.late = steps, early, late

    def __call__(self, step: int, log_pz: torch.Tensor) -> torch.Tensor:
        return route(log_pz, self.early if step < self.steps else self.late)


def parse_rule(rule: str, tokenizer=None):
    try:
        return _parse_rule(rule, tokenizer)
    except ValueError:
        raise SystemExit(f"rule {rule!r}: its numbers do not parse (e.g. span:4@0.6, sched:32/0@0.6)") from None


def _parse_rule(rule: str, tokenizer=None):
    kind, _, rest = rule.partition(":")
    value, _, eta = rest.partition("@")
    if kind == "span":
        return RunRouter(float(eta), span=int(value))
    if kind == "hyst":
        return RunRouter(float(eta), release=float(value))
    if kind == "arith":
        return ArithRouter(float(eta), tokenizer)
    if kind == "sched":
        steps, _, early = value.partition("/")
        return ScheduleRouter(int(steps), float(early), float(eta))
    raise SystemExit(f"unknown rule {rule!r}: use span:K@ETA, hyst:LOW@ETA, arith:@ETA or sched:N/EARLY@ETA")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--rules", required=True,
                   help="comma-separated span:K@ETA / hyst:LOW@ETA / arith:@ETA / sched:N/EARLY@ETA")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=55)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    rows = read_rows(a.data)[: a.limit]
    config = EvalConfig(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    a.out.mkdir(parents=True, exist_ok=True)
    pair = CoLLM.from_pretrained(a.run, dtype=a.dtype)
    for rule in a.rules.split(","):
        path = a.out / f"{rule.replace(':', '-').replace('/', '-').replace('@', '-eta')}.json"
        if path.exists():
            print(rule, "done already:", path)
            continue
        router = parse_rule(rule, pair.tokenizer)
        started = time.time()
        result = run_system(pair, rows, f"Co-LLM {rule}", config, router=router)
        write_json(path, {"rule": rule, "rows": len(rows), **asdict(result)})
        print(f"{rule}: {result.correct}/{result.total} at {result.defer_rate:.3f} deferral "
              f"({(time.time() - started) / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
