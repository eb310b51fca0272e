"""Measured once for the Qwen results page: run with PYTHONPATH=src OMP_NUM_THREADS=1
after research/qwen/qwen.sh stage 4."""
# Quantiles of each head's P(defer) on the training rows' completion tokens, and how often the base's argmax
# differs from the expert-written token, to choose a threshold grid.
import torch

from collm.backends.models import load_model
from collm.core.head import DeferralHead
from collm.data.rows import DataConfig, encode_file

torch.set_grad_enabled(False)
base, tok = load_model("qwen2.5-coder-0.5b-instruct", dtype="bfloat16")
data = encode_file("runs/qwen/own_style/train.jsonl", tok, DataConfig(max_len=512))
heads = {n: DeferralHead.load(f"runs/qwen/{n}/head.safetensors") for n in ("collm", "weak")}
pis = {n: [] for n in heads}
disagree = []
for ex in data.examples:
    ids = torch.tensor([ex.input_ids])
    mask = torch.tensor(ex.completion_mask)
    out = base(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1][0, :-1][mask[1:]]
    pred = out.logits[0, :-1].argmax(-1)[mask[1:]]
    disagree += (pred != ids[0, 1:][mask[1:]]).tolist()
    for n, head in heads.items():
        pis[n] += head.probs(h)[:, 1:].sum(-1).tolist()
print("tokens", len(disagree), "base argmax != expert token", sum(disagree)/len(disagree))
qs = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
for n, v in pis.items():
    t = torch.tensor(v)
    print(n, {q: round(t.quantile(q).item(), 5) for q in qs})
    d = torch.tensor(disagree, dtype=torch.bool)
    print(n, "mean pi where base disagrees", t[d].mean().item(), "agrees", t[~d].mean().item())
