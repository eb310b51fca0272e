"""Per-deferral latency of the expert's catch-up: a real vLLM server on loopback against the same weights in process.

    python bench/remote_catch_up.py                       # SmolLM2-135M float32, prompts 64/512/1536, cache on and off
    python bench/remote_catch_up.py --lengths 64 --deferrals 5 --gap 8

A deferral, as the engine makes it: the base has written ``gap`` tokens since the expert last read, then defers;
the expert reads those tokens and picks one. In process that is one cached forward over ``gap`` tokens
(transformers, DynamicCache). Remotely it is one completions request with the whole row as the prompt and
``max_tokens`` 1 (collm.backends.remote): with vLLM's prefix cache only the tail beyond the last full cached
block is computed, so the cost should stay flat in the prompt length; without it the whole prefix is
re-encoded every time (the paper's deployment). Two server starts (cache on, off). Medians over ``deferrals``.
Writes bench/results/remote_catch_up.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback server helper the tests use

from vllm_server import VllmServer  # noqa: E402

from collm.backends.models import EMBEDDED_DEFAULT, hf_folder, load_model  # noqa: E402
from collm.backends.remote import RemoteExpert  # noqa: E402
from collm.core.request import Sampling  # noqa: E402


def token_stream(tokenizer, length: int, seed: int) -> list[int]:
    """Ordinary-text token ids (no special tokens), ``length`` of them."""
    rng = random.Random(seed)
    specials = set(tokenizer.all_special_ids)
    return [t for t in (rng.randrange(len(tokenizer)) for _ in range(4 * length)) if t not in specials][:length]


@torch.inference_mode()
def in_process_ms(model, prompt: list[int], extra: list[int], gap: int, deferrals: int) -> list[float]:
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    times = []
    for d in range(deferrals):
        new = torch.tensor([extra[d * gap : (d + 1) * gap]])
        start = time.perf_counter()
        out = model(input_ids=new, past_key_values=cache, use_cache=True, logits_to_keep=1)
        int(out.logits[0, -1].argmax())  # the token: the host needs it, as the loop does
        times.append(1000 * (time.perf_counter() - start))
    return times


def remote_ms(expert: RemoteExpert, prompt: list[int], extra: list[int], gap: int, deferrals: int) -> list[float]:
    expert.complete([prompt], Sampling())  # the prompt's prefill, as the engine has the expert read it up front
    times = []
    for d in range(deferrals):
        row = prompt + extra[: (d + 1) * gap]
        start = time.perf_counter()
        expert.complete([row], Sampling())
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,512,1536")
    parser.add_argument("--gap", type=int, default=8, help="tokens the base writes between deferrals")
    parser.add_argument("--deferrals", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "remote_catch_up"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    model, tokenizer = load_model(EMBEDDED_DEFAULT, dtype="float32")
    rows = []
    for n in lengths:
        prompt = token_stream(tokenizer, n, seed=n)
        extra = token_stream(tokenizer, args.gap * args.deferrals, seed=n + 1)
        rows.append({"prompt": n, "system": "in-process",
                     "ms": in_process_ms(model, prompt, extra, args.gap, args.deferrals)})
    for caching in (True, False):
        with VllmServer(hf_folder(EMBEDDED_DEFAULT), "smol", prefix_caching=caching) as server:
            expert = RemoteExpert(server.spec, tokenizer)
            for n in lengths:
                prompt = token_stream(tokenizer, n, seed=n)
                extra = token_stream(tokenizer, args.gap * args.deferrals, seed=n + 1)
                ms = remote_ms(expert, prompt, extra, args.gap, args.deferrals)
                rows.append({"prompt": n, "system": f"vLLM, prefix cache {'on' if caching else 'off'}", "ms": ms})
                print(rows[-1]["system"], n, f"{statistics.median(ms):.1f} ms", flush=True)
            expert.close()
    write(rows, lengths, args)


def write(rows: list[dict], lengths: list[int], args) -> None:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    median = {(r["system"], r["prompt"]): statistics.median(r["ms"]) for r in rows}
    lines = [f"Per-deferral catch-up latency, ms (median of {args.deferrals}; {args.gap} new tokens per deferral; "
             f"SmolLM2-135M float32, loopback, {args.threads} torch threads in process)", "",
             "| system | " + " | ".join(f"prompt {n}" for n in lengths) + " |",
             "| --- |" + " ---: |" * len(lengths)]
    lines += [f"| {s} | " + " | ".join(f"{median[s, n]:.1f}" for n in lengths) + " |" for s in systems]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
