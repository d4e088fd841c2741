"""Issue 15's three performance goals, each printed as a ratio measured in this one run, with
the machine's float32 matmul peak beside it (shared machines drift; ratios of one run don't).

  train       train.py's step (bench/train_throughput.py) against TRL's CPOTrainer
              (bench/trl_reference.py, run with --trl-python from its own environment): pairs/s
              and peak RSS, same pairs and settings, gradient checkpointing on, float32.
              Goal: >= 1.3x the speed in <= 0.8x the memory.
  generation  sample.py's path on the large setting (32 prompts x 8 samples, 64 new tokens)
              against the FLOP floor: the tokens/s the measured matmul peak would give at
              2 x parameters FLOPs per token. Goal: >= 70%. On the CPU it also prints the time
              in the linear layers' products and their rate, the share the products alone
              would reach, and the time 70% would leave for all the rest.
  demo        with --demo-base REV: the pipeline of `make demo` (demo.sh, set-up excluded, the
              time it prints) at REV and in this working tree, back to back, each in a fresh
              run directory. Goal: <= 0.5x. About 15 minutes on a 2-core machine.

    python bench/goals.py --trl-python /tmp/trl/bin/python [--demo-base 63e91eb]

Measures and prints; asserts nothing.
"""
import argparse
import contextlib
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
import inference_model  # noqa: E402
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
    print(f"train: train.py {ours[0]:.3f} pairs/s, {ours[1]:.2f} GiB; TRL CPOTrainer {trl[0]:.3f} pairs/s, "
          f"{trl[1]:.2f} GiB -> speed {ours[0] / trl[0]:.2f}x (goal >= 1.3), memory {ours[1] / trl[1]:.2f}x (goal <= 0.8)")


def linear_weights(cfg):
    """Weights of the decoder's projections and the vocabulary head: a generated token costs
    2 FLOPs per weight (the embedding lookup costs none; a tied head counts once)."""
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.hidden_size * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    return cfg.num_hidden_layers * (attn + 3 * cfg.hidden_size * cfg.intermediate_size) + cfg.hidden_size * cfg.vocab_size


@contextlib.contextmanager
def timed_products(model):
    """Within it, the wall time and FLOPs of every linear layer's forward (the decoder's
    projections and the vocabulary head): a dict {'s', 'flops'}. CPU only (a GPU product
    would need a sync per call, which would slow what it measures). The hooks cost about
    3.5 us a call on this project's CPU, 0.05 s of the generation goal's 14k calls."""
    acc, start = {"s": 0.0, "flops": 0}, {}
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, inference_model.PackedLinear))]

    def before(m, inputs):
        start[m] = time.perf_counter()

    def after(m, inputs, out):
        acc["s"] += time.perf_counter() - start[m]
        acc["flops"] += 2 * inputs[0].numel() * out.shape[-1]

    hooks = [h for m in linears for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield acc
    finally:
        for h in hooks:
            h.remove()


def generation_goal(peak, n_prompts=32, n_samples=8, new_tokens=64):
    model, tok = common.load_for_inference(common.DEFAULT_MODEL)
    prompts = [json.loads(l)["prompt"] for l in open(ROOT / "data/train_prompts.jsonl")][:n_prompts]
    convs = [generation.user_turn(q) for q in prompts]
    generation.generate(model, tok, convs[:2], max_new_tokens=4, temperature=1.0, num_return=2)  # warm-up
    st, cpu = {}, model.device.type == "cpu"
    with timed_products(model) if cpu else contextlib.nullcontext() as products:
        t = time.time()
        generation.generate(model, tok, convs, max_new_tokens=new_tokens, temperature=1.0, num_return=n_samples,
                            batch_size=n_prompts, stats=st)
        wall = time.time() - t
    speed = st["tokens"] / wall
    flops_per_token = 2 * linear_weights(model.config)
    floor = peak / flops_per_token
    print(f"generation: {n_prompts} prompts x {n_samples} samples, {new_tokens} new tokens: {speed:.1f} tokens/s; "
          f"FLOP floor {floor:.1f} tokens/s ({flops_per_token / 1e9:.3f} GFLOP/token) -> {100 * speed / floor:.1f}% "
          f"(goal >= 70%)")
    if cpu:  # where the time went: the products (the prefill's too) against everything else (attention, cache
        # writes, sampling, norms); the floor needs the products at the peak with nothing else
        rate, budget = products["flops"] / products["s"], st["tokens"] / (0.7 * floor)
        print(f"  of its {wall:.1f} s, the linear layers' products {products['s']:.1f} s at {rate / 1e9:.1f} GFLOP/s "
              f"({100 * rate / peak:.0f}% of the peak), everything else {wall - products['s']:.1f} s; with nothing "
              f"else, the products alone would give {100 * st['tokens'] / products['s'] / floor:.1f}% of the floor; "
              f"70% leaves {budget - products['s']:.1f} s for everything else")


def demo_seconds(tree):
    """The pipeline time demo.sh prints, run in `tree` with a fresh run directory."""
    with tempfile.TemporaryDirectory() as runs:
        out = subprocess.run(["bash", "demo.sh"], cwd=tree, capture_output=True, text=True, check=True,
                             env=dict(os.environ, PY=sys.executable, RUN=f"{runs}/demo", TQDM_DISABLE="1"))
    return int(re.search(r"demo: done in (\d+) s", out.stdout).group(1))


def demo_goal(base):
    with tempfile.TemporaryDirectory() as tree:
        subprocess.run(["git", "worktree", "add", "--detach", tree, base], cwd=ROOT, check=True, capture_output=True)
        try:
            before = demo_seconds(tree)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=True)
    after = demo_seconds(ROOT)
    print(f"demo pipeline: {base} {before} s, this tree {after} s -> {after / before:.2f}x (goal <= 0.5)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-python", help="a Python with TRL installed (bench/trl_reference.py's docstring); "
                                        "without it the train goal is skipped")
    p.add_argument("--demo-base", help="a git revision to time make demo's pipeline against; without it, skipped")
    args = p.parse_args()
    peak = matmul_peak()
    print(f"device {common.device()}, threads {torch.get_num_threads()}; measured float32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s", flush=True)
    if args.trl_python:
        train_goal(args.trl_python)
    generation_goal(peak)
    if args.demo_base:
        demo_goal(args.demo_base)
    print(f"float32 matmul peak at the end: {matmul_peak() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
