"""What one expert read costs by its width: the 1.5B reading L new tokens after a 400-token prefix, in bf16 on
prepacked oneDNN weights (as collm decodes on a CPU), outside collm's loop.

    OMP_NUM_THREADS=2 python research/qwen/qwen_catch_up.py

Prints the min and median ms per read over 4 repeats of 5 reads, for L = 1, 2, 4, 8. A Co-LLM deferral is one
such read over the tokens the base wrote since the expert's last turn (3.7 on average in the Qwen evaluation).
"""

import time

import torch
from transformers import DynamicCache

from collm.backends.models import load_model
from collm.backends.prepack import prepacked

model, _ = load_model("qwen2.5-coder-1.5b-instruct", dtype="bfloat16")
ids = torch.randint(100, 20000, (1, 460), generator=torch.Generator().manual_seed(0))
with torch.inference_mode(), prepacked([model]):
    for width in (1, 2, 4, 8):
        times = []
        for _ in range(4):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :400], cache=cache, use_cache=True, logits_to_keep=1)
            started = time.perf_counter()
            for k in range(5):
                s = 400 + k * width
                model(input_ids=ids[:, s:s + width], attention_mask=torch.ones(1, s + width, dtype=torch.long),
                      cache=cache, use_cache=True, logits_to_keep=1)
            times.append((time.perf_counter() - started) / 5 * 1000)
        times.sort()
        print(f"{width} tokens per read: {times[0]:.1f} ms min, {times[len(times) // 2]:.1f} ms median", flush=True)
