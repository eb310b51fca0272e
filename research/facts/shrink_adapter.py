"""Shrink a LoRA adapter to a lower rank for shipping: each layer's update (scale * B @ A) is replaced by its best
rank-k approximation (truncated SVD, computed through QR of the two factors, never the full matrix), stored in
bfloat16. A rank-64 adapter on every linear layer of the 0.5B is 135 MB in float32; rank 16 in bfloat16 is 17 MB.

    python research/facts/shrink_adapter.py --adapter runs/facts/tuned-qa/base_adapter --rank 16 \
        --out runs/facts/tuned-qa-r16/base_adapter

Prints the share of each update's energy (squared Frobenius norm) the kept rank holds, over all layers. Measure
what the shrunk adapter still knows with probe.py before shipping it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from collm.atomic import atomic_folder


def shrink(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors (A', B') of the best rank-``rank`` approximation of ``scale * b @ a`` (scale 1 after), and the
    share of its squared norm they keep."""
    a, b = a.double(), b.double()
    qb, rb = torch.linalg.qr(b)  # b = qb rb, (out, r) (r, r)
    qa, ra = torch.linalg.qr(a.T)  # a.T = qa ra, (in, r) (r, r)
    u, s, vh = torch.linalg.svd(scale * rb @ ra.T)  # the r x r core
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    new_b = (qb @ u[:, :k]) * root  # (out, k)
    new_a = root[:, None] * (vh[:k] @ qa.T)  # (k, in)
    kept = float((s[:k] ** 2).sum() / (s**2).sum().clamp_min(1e-30))
    return new_a, new_b, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="a PEFT LoRA adapter folder")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", required=True, help="the new adapter folder (must not exist)")
    args = ap.parse_args()
    src, out = Path(args.adapter), Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists: choose a new --out")
    config = json.loads((src / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
        raise SystemExit("an adapter with per-layer ranks or rsLoRA: not handled")
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(src / "adapter_model.safetensors")
    shrunk, kept, energy = {}, 0.0, 0.0
    for key, a in weights.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                shrunk[key] = weights[key].to(torch.bfloat16)
            continue
        bkey = key.replace(".lora_A.", ".lora_B.")
        new_a, new_b, share = shrink(a, weights[bkey], scale, args.rank)
        norm = float((scale * weights[bkey].double() @ a.double()).square().sum())
        kept, energy = kept + share * norm, energy + norm
        shrunk[key], shrunk[bkey] = new_a.to(torch.bfloat16), new_b.to(torch.bfloat16)
    config.update(r=args.rank, lora_alpha=args.rank)  # scale 1: the factors carry it

    def write(tmp: Path) -> None:
        save_file(shrunk, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (src / "README.md").exists():
            shutil.copy(src / "README.md", tmp / "README.md")

    atomic_folder(out, write)
    size = (out / "adapter_model.safetensors").stat().st_size
    print(f"rank {args.rank}: {size / 1e6:.1f} MB, keeps {kept / energy:.1%} of the "
          f"updates' squared norm")


if __name__ == "__main__":
    main()
