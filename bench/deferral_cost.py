"""Where a deferral's time goes in Co-LLM decoding (tiny CPU shapes, batch 1, f = 0.1 vs f = 0).

    python bench/deferral_cost.py [--no-prepack]

Times every decoder forward inside `collm.decoding.decode` (module hooks) and splits a deferral's cost into the
expert's catch-up, the excess of the base's next steps over its steps without deferrals (the expert's weights
have pushed the base's out of the cache), and the rest.
Prints medians over rounds, after a warm-up round.
"""

import statistics
import sys
import time

import torch

import collm.decoding.decode as decoding
from collm.core.head import DeferralHead
from collm.evaluation.bench import BenchConfig, build_models, pattern_router

NEW, ROUNDS = 128, 7


def _time_decoder(model, is_expert: bool, calls: list) -> None:
    """Time every forward of the model's decoder stack (the part every read runs, with or without the output
    embedding) with PyTorch's module hooks; the end column is the attention mask's width."""
    began = {}

    def before(module, args, kwargs):
        began["t"] = time.perf_counter()

    def after(module, args, kwargs, output):
        calls.append((is_expert, kwargs["attention_mask"].shape[1], time.perf_counter() - began["t"]))

    decoder = model.get_decoder()
    decoder.register_forward_pre_hook(before, with_kwargs=True)
    decoder.register_forward_hook(after, with_kwargs=True)


def main() -> None:
    prepack = "--no-prepack" not in sys.argv
    base, expert = build_models(BenchConfig())
    head = DeferralHead(base.config.hidden_size)
    prompts = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).tolist()
    calls = []  # (is expert, end column, seconds)
    for model in (base, expert):
        _time_decoder(model, model is expert, calls)

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
