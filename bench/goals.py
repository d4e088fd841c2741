"""The CPU figures the project keeps, each a ratio measured in this one run (shared machines
drift; ratios of one run don't), with the machine's float32 matmul peak beside them.

  train   train.py's step (bench/train_throughput.py) against TRL's CPOTrainer
          (bench/trl_reference.py, run with --trl-python from its own environment): pairs/s
          and peak RSS, same pairs and settings, gradient checkpointing on, float32.
          Kept: >= 1.3x the speed in <= 0.8x the memory.
  demo    with --demo-base REV: the pipeline of `make demo` (demo.sh, set-up excluded, the
          time it prints) at REV and in this working tree, back to back, each in a fresh run
          directory. Kept: <= 1.1x the base's time. About 10 minutes on a 2-core machine.
  sample  sample.py's path on 32 prompts x 8 samples, 64 new tokens: tokens/s (a figure, no goal).

    python bench/goals.py --trl-python /tmp/trl/bin/python [--demo-base a52c2da]

Measures and prints; asserts nothing.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import generation  # noqa: E402
from sample_throughput import stage_path  # noqa: E402
from train_throughput import matmul_peak  # noqa: E402


def figures(cmd):
    """Run a benchmark script; its pairs/s and peak RSS (GiB) from what it prints."""
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    speed = float(re.search(r"pairs/s (\S+)", out).group(1))
    rss = float(re.search(r"peak memory \(max RSS\) (\S+) GiB", out).group(1))
    return speed, rss


def train_goal(trl_python):
    ours = figures([sys.executable, "bench/train_throughput.py"])
    trl = figures([trl_python, "bench/trl_reference.py"])
    print(
        f"train: train.py {ours[0]:.3f} pairs/s, {ours[1]:.2f} GiB; TRL CPOTrainer {trl[0]:.3f} pairs/s, "
        f"{trl[1]:.2f} GiB -> speed {ours[0] / trl[0]:.2f}x (kept >= 1.3), memory {ours[1] / trl[1]:.2f}x "
        "(kept <= 0.8)",
        flush=True,
    )


def sample_figure(n_prompts=32, n_samples=8, new_tokens=64):
    model, tok = common.load_for_inference(common.DEFAULT_MODEL)
    prompts = [json.loads(line)["prompt"] for line in open(ROOT / "data/train_prompts.jsonl")][:n_prompts]
    convs = [generation.user_turn(q) for q in prompts]
    stage_path(model, tok, convs[:2], 2, 4)  # warm-up
    t = time.time()
    tokens = stage_path(model, tok, convs, n_samples, new_tokens)
    print(
        f"sample: {n_prompts} prompts x {n_samples} samples, {new_tokens} new tokens, {common.inference_path()}: "
        f"{tokens / (time.time() - t):.1f} tokens/s",
        flush=True,
    )


def demo_seconds(tree):
    """The pipeline time demo.sh prints, run in `tree` with a fresh run directory, and its report."""
    with tempfile.TemporaryDirectory() as runs:
        out = subprocess.run(
            ["bash", "demo.sh"],
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PY=sys.executable, RUN=f"{runs}/demo", TQDM_DISABLE="1"),
        )
        report = Path(runs, "demo/iter1/eval/report.md").read_text()
    return int(re.search(r"demo: done in (\d+) s", out.stdout).group(1)), report


def demo_goal(base):
    with tempfile.TemporaryDirectory() as tree:
        subprocess.run(["git", "worktree", "add", "--detach", tree, base], cwd=ROOT, check=True, capture_output=True)
        try:
            before, _ = demo_seconds(tree)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=True)
    after, report = demo_seconds(ROOT)
    print(f"demo pipeline: {base} {before} s, this tree {after} s -> {after / before:.2f}x (kept <= 1.1)", flush=True)
    print(f"this tree's demo report:\n{report}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--trl-python",
        help="a Python with TRL installed (bench/trl_reference.py's docstring); without it the train ratio is skipped",
    )
    p.add_argument("--demo-base", help="a git revision to time make demo's pipeline against; without it, skipped")
    args = p.parse_args()
    print(
        f"device {common.device()}, threads {torch.get_num_threads()}; measured float32 matmul peak "
        f"{matmul_peak() / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    if args.trl_python:
        train_goal(args.trl_python)
    sample_figure()
    if args.demo_base:
        demo_goal(args.demo_base)
    print(f"float32 matmul peak at the end: {matmul_peak() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
