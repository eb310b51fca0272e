"""One float32 linear layer on this CPU: PyTorch's default kernel against oneDNN on a prepacked weight
(collm.backends.prepack), for 1, 10 and 64 rows, and the machine's roofline (peak GEMM rate, streaming bandwidth).

    python bench/linear_kernels.py

Each shape is repeated over ~64 MB of distinct weights so that, as in a model, they come from memory rather
than from the last-level cache. Prints a Markdown table of microseconds per layer (median).
"""

import time

import torch
import torch.nn.functional as F

from collm.backends.prepack import ROWS_HINT

SHAPES = ((256, 256), (1408, 512), (512, 1408), (1536, 576), (4096, 512))


def median_us(fn, repeats: int = 60) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * sorted(times)[len(times) // 2]


@torch.inference_mode()
def main() -> None:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048**3 / median_us(lambda: a @ b, 10) / 1e3
    big, row = torch.randn(16384, 4096), torch.randn(1, 4096)
    bandwidth = big.numel() * 4 / median_us(lambda: F.linear(row, big), 10) / 1e3
    print(f"threads {torch.get_num_threads()}; 2048^3 GEMM {peak:.0f} GFLOP/s; one row through a 256 MB weight "
          f"{bandwidth:.1f} GB/s (default kernel)\n")
    print("| weight (out x in) | rows | default µs | prepacked µs | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for out_features, in_features in SHAPES:
        copies = max(1, int(64e6 // (out_features * in_features * 4)))
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT) for w in weights]
        for rows in (1, 10, 64):
            x = torch.randn(rows, in_features)
            default = median_us(lambda: [F.linear(x, w) for w in weights]) / copies
            onednn = median_us(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                        for p in packed]) / copies
            speed_up = default / onednn
            print(f"| {out_features} x {in_features} | {rows} | {default:.0f} | {onednn:.0f} | {speed_up:.1f}x |")


if __name__ == "__main__":
    main()
