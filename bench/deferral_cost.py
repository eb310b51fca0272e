"""Where a deferral's time goes in Co-LLM decoding (tiny CPU shapes, batch 1, f = 0.1 vs f = 0).

    python bench/deferral_cost.py [--no-prepack]

Times every backbone forward inside `collm.decoding.decode` and splits a deferral's cost into the expert's catch-up,
the excess of the base's next steps over its steps without deferrals (the expert's weights have pushed the
base's out of the cache), and the rest.
Prints medians over rounds, after a warm-up round.
"""

import statistics
import sys
import time

import torch

import collm.decoding.decode as decoding
from collm.evaluation.bench import BenchConfig, build_models, pattern_router
from collm.core.head import DeferralHead

NEW, ROUNDS = 128, 7


def main() -> None:
    prepack = "--no-prepack" not in sys.argv
    base, expert = build_models(BenchConfig())
    head = DeferralHead(base.config.hidden_size)
    prompts = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).tolist()
    calls = []  # (is expert, end column, seconds)
    advance = decoding._Model.advance

    def timed(self, seq, mask, positions, end, hidden=False):
        start = time.perf_counter()
        out = advance(self, seq, mask, positions, end, hidden)
        calls.append((self.model is expert, end, time.perf_counter() - start))
        return out

    decoding._Model.advance = timed

    def run(f: float) -> float:
        calls.clear()
        start = time.perf_counter()
        decoding.decode(base, [expert], head, prompts, max_new_tokens=NEW, threshold=0.5,
                        sampling=decoding.Sampling(), vocab=base.config.vocab_size,
                        router=pattern_router(f, NEW, 0), prepack=prepack)
        return time.perf_counter() - start

    rounds = []
    for index in range(ROUNDS + 1):
        never = run(0.0)
        base_steps_never = [(end, s) for is_expert, end, s in calls[2:] if not is_expert]
        sometimes = run(0.1)
        catch_ups = [(end, s) for is_expert, end, s in calls[2:] if is_expert]  # [2:]: the prefills
        deferred = {end for end, _ in catch_ups}
        base_steps = [(end, s) for is_expert, end, s in calls[2:] if not is_expert]
        since = {end: min((end - 1 - d for d in deferred if d <= end - 1), default=None) for end, _ in base_steps}
        by_distance = {k: statistics.median(s for end, s in base_steps if since[end] == k) for k in range(4)}
        alone = [s for _, s in base_steps_never]
        if index:
            rounds.append(dict(per_deferral=(sometimes - never) / len(catch_ups),
                               catch_up=statistics.median(s for _, s in catch_ups),
                               alone=statistics.median(alone), **{f"after{k}": v for k, v in by_distance.items()}))
    ms = {key: 1000 * statistics.median(r[key] for r in rounds) for key in rounds[0]}
    excess = sum(ms[f"after{k}"] - ms["alone"] for k in range(4))
    print(f"prepack {prepack}; per deferral {ms['per_deferral']:.2f} ms = expert catch-up {ms['catch_up']:.2f} "
          f"+ the base's next 4 steps' excess over its steps at f = 0 ({ms['alone']:.2f} ms): "
          + ", ".join(f"+{ms[f'after{k}'] - ms['alone']:.2f}" for k in range(4))
          + f" = {excess:.2f} + the rest {ms['per_deferral'] - ms['catch_up'] - excess:.2f}")


if __name__ == "__main__":
    main()
