"""The matrix products of inference, F.linear (MKL) against cpu_speed.ReorderedLinear
(oneDNN, weight re-laid out once), at the shapes of the embedded 135M model: decoding (8 to
256 rows), prefill (thousands of rows), and the vocabulary head. Each figure is the best of
several runs over 12 distinct weights (so they are not all in cache), both kernels
alternated. Measures, never asserts.

    python bench/inference_kernels.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_speed  # noqa: E402
from train_throughput import matmul_peak  # noqa: E402


def best(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    print(f"threads {torch.get_num_threads()}; measured float32 matmul peak {matmul_peak() / 1e9:.1f} GFLOP/s")
    shapes = [(576, 1536), (1536, 576), (576, 576), (576, 49152)]
    for rows in (8, 21, 42, 256, 2176, 16384):
        for k, n in shapes:
            if n == 49152 and rows > 256:
                continue
            count = 1 if n == 49152 else 12
            x = torch.randn(rows, k)
            lins = [torch.nn.Linear(k, n, bias=False) for _ in range(count)]
            reordered = [cpu_speed.ReorderedLinear(lin) for lin in lins]
            flops = 2 * rows * k * n * count
            reps = 5 if rows < 1000 else 2
            with torch.no_grad():
                mkl = min(best(lambda: [lin(x) for lin in lins], reps) for _ in range(2))
                dnnl = min(best(lambda: [p(x) for p in reordered], reps) for _ in range(2))
            print(
                f"rows {rows:6d}  {k:5d} -> {n:5d}: F.linear {flops / mkl / 1e9:6.1f} GFLOP/s, "
                f"ReorderedLinear {flops / dnnl / 1e9:6.1f} GFLOP/s ({mkl / dnnl:.2f}x)",
                flush=True,
            )
    print(f"float32 matmul peak at the end: {matmul_peak() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
