"""How much slower the tiny base's next steps are after it was idle for one expert catch-up's time (CPU).

    python bench/base_after_pause.py [--rounds 2] [--threads N]

The base decodes 400 tokens alone; every 20th step something else runs first:
  none    nothing (the base's steady state),
  sweep   a sum over 110 MB (the tiny expert's weights' size): evicts the caches,
  pause   6 ms of a Python loop that touches no memory (a catch-up's duration, nothing read),
  expert  one step of the tiny expert (what a deferral does).
Prints the base's median step time at each of the 10 distances after the perturbation and their summed
excess over the same run's steps 10 to 19 after it (the steady state, measured in the same run).
`bench/deferral_cost.py` charges this excess to a deferral; here it
shows how much of it comes from merely being away, which no decoder change can remove (most likely, on a
virtual machine whose last-level cache is shared, others use it meanwhile).
"""

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from collm.backends.prepack import prepacked
from collm.evaluation.bench import BenchConfig, build_models

PROMPT, STEPS, EVERY, SHOWN = 32, 400, 20, 10
PAUSE_S = 0.006


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, expert = build_models(BenchConfig())
    ids = torch.randint(0, base.config.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))
    sweep = torch.ones(110_000_000 // 4)

    def pause() -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < PAUSE_S:
            pass

    kinds = {"none": lambda: None, "sweep": lambda: sweep.sum(), "pause": pause,
             "expert": lambda: expert(input_ids=ids[:, :1], use_cache=False, logits_to_keep=1)}

    def trial(perturb) -> list[float]:
        cache = DynamicCache(config=base.config)
        base(input_ids=ids[:, :PROMPT], past_key_values=cache, use_cache=True, logits_to_keep=1)
        by_distance: list[list[float]] = [[] for _ in range(EVERY)]
        for step in range(STEPS):
            if step % EVERY == 0:
                perturb()
            n = PROMPT + step
            start = time.perf_counter()
            base(input_ids=ids[:, n : n + 1], attention_mask=torch.ones(1, n + 1, dtype=torch.long),
                 position_ids=torch.arange(n, n + 1)[None], cache_position=torch.arange(n, n + 1),
                 past_key_values=cache, use_cache=True, logits_to_keep=1)
            by_distance[step % EVERY].append(time.perf_counter() - start)
        ms = [1000 * statistics.median(times) for times in by_distance]
        return ms[:SHOWN], statistics.median(ms[SHOWN:])

    with prepacked([base, expert]), torch.inference_mode():
        trial(kinds["none"])  # warm-up
        for _ in range(args.rounds):
            for name, perturb in kinds.items():
                ms, steady = trial(perturb)
                print(f"{name:7s} " + " ".join(f"{t:.2f}" for t in ms)
                      + f"   excess over {steady:.2f} ms steps: {sum(t - steady for t in ms):+.2f} ms", flush=True)


if __name__ == "__main__":
    main()
