"""What memory the process has never touched costs on this machine: 1.47 GB of zeros (the
static KV cache of refine's 42 prompts: 60 tensors of 42 x 3 x 758 x 64 float32) made
first in a fresh process, then again after other memory has been taken (a 0.54 GB tensor,
the size of the 135M model's weights), then once more after freeing them (memory glibc
kept). On a virtual machine that hands freed memory back to its host (free page
reporting), a page touched for the first time may cost far more than writing it. Measures,
never asserts.

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4000000000 python bench/fresh_memory.py
"""
import time

import torch


def zeros(tag, keep):
    t = time.perf_counter()
    keep.append([torch.zeros(42, 3, 758, 64) for _ in range(60)])
    dt = time.perf_counter() - t
    print(f"{tag}: 1.47 GB of zeros in {dt * 1e3:.0f} ms ({1.47 / dt:.2f} GB/s)", flush=True)


def main():
    keep = []
    zeros("fresh process", keep)
    keep.append(torch.randn(135_000_000))
    zeros("after 0.54 GB more", keep)
    keep.clear()
    zeros("after freeing both (reused)", keep)


if __name__ == "__main__":
    main()
