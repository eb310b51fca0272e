"""Learning to defer on a known case, resume, baselines, the run folder, and two processes.

The known case: completions like "kq=3 zp=8" where each digit is a hash of the word before it. An oracle
expert gives the gold digit probability 0.9 and every other gold token 0.001; no base can learn the hash,
so after training the head should defer exactly before digits, on held-out rows too.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from collm.data import encode_file
from collm.errors import CollmError
from collm.head import DeferralHead
from collm.loss import defer_prob
from collm.score import ScoreConfig, pad_batch, score, target_outputs
from collm.train import TrainConfig, train
from conftest import make_llama, make_tokenizer, save_tiny

DIGITS = set("0123456789")


def digit_rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        words = []
        for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
            word = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (2,), generator=g))
            words.append(f"{word}={int(hashlib.md5(word.encode()).hexdigest(), 16) % 10}")
        rows.append({"prompt": "go", "completion": " ".join(words)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def oracle_forward(tokenizer):
    """An expert that is right (p = 0.9, argmax) exactly on digits and nearly never elsewhere."""
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(sorted(DIGITS)))

    def forward(model, ids, attention, targets):
        gold = ids[:, 1:][targets[:, 1:]]
        is_digit = torch.isin(gold, digit_ids)
        logp = torch.where(is_digit, torch.tensor(math.log(0.9)), torch.tensor(math.log(1e-3)))
        return logp, is_digit, None

    return forward


@pytest.fixture(scope="module")
def known_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    tok = make_tokenizer()
    train_data = write_jsonl(root / "train.jsonl", digit_rows(160, seed=0))
    heldout = write_jsonl(root / "heldout.jsonl", digit_rows(40, seed=1))
    base = save_tiny(make_llama(0), tok, root / "base")
    scores = str(root / "scores")
    score(ScoreConfig(expert="oracle", data=train_data, out=scores, max_len=64), "oracle", tok, oracle_forward(tok))
    return {"root": root, "tok": tok, "data": train_data, "heldout": heldout, "base": base, "scores": scores}


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def heldout_auroc(case, run) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(case["base"])
    if (run / "base_adapter").is_dir():
        base = PeftModel.from_pretrained(base, str(run / "base_adapter")).merge_and_unload()
    head = DeferralHead.load(run / "head.safetensors")
    data = encode_file(case["heldout"], case["tok"])
    ids, attention, targets = pad_batch(data.examples, 0)
    with torch.no_grad():
        _, _, hidden = target_outputs(base.eval(), ids, attention, targets)
        pi = defer_prob(head(hidden))
    gold = ids[:, 1:][targets[:, 1:]]
    is_digit = torch.isin(gold, torch.tensor(case["tok"].convert_tokens_to_ids(sorted(DIGITS))))
    return auroc(pi, is_digit)


def config(case, out, **overrides):
    values = dict(base=case["base"], data=case["data"], scores=[case["scores"]], out=str(case["root"] / out),
                  max_len=64, batch_size=16, epochs=8, head_lr=3e-2, lr=3e-3, weak_steps=100, save_every=1000)
    return TrainConfig(**(values | overrides))


@pytest.mark.parametrize("mode, weak", [("frozen", False), ("frozen", True), ("lora", True)])
def test_learns_to_defer_before_the_digits(known_case, mode, weak):
    run = train(config(known_case, f"{mode}-{weak}", base_mode=mode, weak_start=weak))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 8 * (160 // 16)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert heldout_auroc(known_case, run) >= 0.95
    run_config = json.loads((run / "collm.json").read_text())
    assert run_config["base_weights"] == {"frozen": "original", "lora": "lora"}[mode]
    if weak:  # digits are about a fifth of the targets; the base (random) never gets them right
        assert 0.1 < run_config["training"]["weak_fit"]["positive_rate"] < 0.4
