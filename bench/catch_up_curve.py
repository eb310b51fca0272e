"""Cost of one expert forward over k new tokens after a 64-token prefix (tiny expert shape, CPU), with
PyTorch's default linear kernels and with collm.backends.prepack's oneDNN layers.

    python bench/catch_up_curve.py

The performance model's τ(f) assumes a catch-up over k tokens costs about one decoding step (true where a
step is bound by reading the weights); this measures how far that holds on the machine at hand.
"""

import time
from contextlib import nullcontext

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from collm.backends.prepack import prepacked
from collm.evaluation.bench import SHAPES

LENGTHS = (1, 2, 4, 8, 10, 16, 32)


@torch.inference_mode()
def cost_ms(model, ids, k: int, prefix: int = 64, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :prefix], past_key_values=cache, use_cache=True, logits_to_keep=1)
        start = time.perf_counter()
        model(input_ids=ids[:, prefix : prefix + k], attention_mask=torch.ones(1, prefix + k, dtype=torch.long),
              past_key_values=cache, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES["tiny-expert"], max_position_embeddings=4096)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    print(f"threads {torch.get_num_threads()}")
    print("| kernels | " + " | ".join(f"k={k}" for k in LENGTHS) + " | k=10 / k=1 |")
    print("| --- |" + " --- |" * (len(LENGTHS) + 1))
    for name, context in (("default", nullcontext), ("prepacked", lambda: prepacked([model]))):
        with context():
            ms = [cost_ms(model, ids, k) for k in LENGTHS]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in ms) + f" | {ms[4] / ms[0]:.2f} |")


if __name__ == "__main__":
    main()
