"""Training throughput of train.py's step: pairs/s, tokens/s, peak memory, and achieved FLOP/s
as a fraction of a float32 matrix-multiply peak measured in the same run.

16 pairs whose answers are 100-250 tokens, on the default model, micro-batch 4 x accumulation
2, gradient checkpointing on (flags change these); SPA_CPU_SPEED=0 measures the plain path.
Model FLOPs count 6 x parameters per trained token (forward + backward), not the recomputation
of checkpointing. Measures, never asserts.

    python bench/train_throughput.py [--pairs 16] [--batch-size 4] [--grad-accum 2]
    torchrun --nproc_per_node 2 bench/train_throughput.py --batch-size 2    (FSDP2, gloo on the CPU)

Under torchrun --batch-size is per device, as in train.py; pairs/s and tokens/s are of the
whole job, peak memory is rank 0's.
"""

import argparse
import random
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import distributed  # noqa: E402
import cpu_speed  # noqa: E402
import policy_model  # noqa: E402
import preference_data  # noqa: E402
import train  # noqa: E402


def matmul_peak(n=2048, reps=10, tries=3):
    """float32 FLOP/s of an n x n matrix product on this device: the best of `tries` timings
    of `reps` products (one timing alone swung 133-171 GFLOP/s within a minute here), by the
    fastest library torch has for it. On the CPU that is the better of MKL (torch.matmul) and
    oneDNN (cpu_speed.onednn_product, what the CPU path multiplies with): on this project's AMD
    CPU MKL ran 179 GFLOP/s and oneDNN 430, so MKL alone understated the peak."""
    a, b = torch.randn(n, n, device=common.device()), torch.randn(n, n, device=common.device())
    sync = torch.cuda.synchronize if common.device().type == "cuda" else (lambda: None)
    products = [lambda: a @ b]
    if common.device().type == "cpu" and torch.backends.mkldnn.is_available():
        products.append(lambda: cpu_speed.onednn_product(a, b))
    best = 0.0
    for product in products:
        for _ in range(3):
            product()
        for _ in range(tries):
            sync()
            t = time.time()
            for _ in range(reps):
                product()
            sync()
            best = max(best, reps * 2 * n**3 / (time.time() - t))
    return best


def synthetic_texts(tok, n, seed=0):
    """n (prompt, chosen, rejected, gap) of random constitution words, answers of 100-250 tokens."""
    rng = random.Random(seed)
    words = open(Path(common.__file__).parent / "prompts/constitution.txt").read().split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))
    out = []
    for _ in range(n):
        prompt, answers = text(20) + "?", []
        for _ in range(2):
            target, k = rng.randint(100, 250), 60
            while len(tok(answer := text(k), add_special_tokens=False)["input_ids"]) < target:
                k += 10
            answers.append(answer)
        out.append((prompt, *answers, float(rng.randint(0, 6))))
    return out


def synthetic_pairs(tok, n, seed=0):
    return [
        {
            "chosen": preference_data.tokenize_answer(tok, p, c, 1024),
            "rejected": preference_data.tokenize_answer(tok, p, r, 1024),
            "gap": gap,
            "id": str(i),
            "line": i,
        }
        for i, (p, c, r, gap) in enumerate(synthetic_texts(tok, n, seed))
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True, help="train.py's --pack (default on)")
    p.add_argument(
        "--fused-adamw",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fused AdamW, as train.py uses (default on; off: torch's foreach implementation)",
    )
    p.add_argument(
        "--head-chunk",
        type=int,
        default=policy_model.HEAD_CHUNK,
        help=f"train.py's --head-chunk (default {policy_model.HEAD_CHUNK})",
    )
    args = p.parse_args()
    distributed.setup()
    peak = distributed.all_sum([matmul_peak()])[0]  # of all ranks together (torchrun gives each one thread)
    tok = common.load_tokenizer(args.model)
    hp = argparse.Namespace(
        loss="spa",
        alpha=1.0,
        beta=2.5,
        gamma=1.375,
        head_chunk=args.head_chunk,
        model=args.model,
        lora_rank=0,
        gradient_checkpointing=args.gradient_checkpointing,
        pack=args.pack,
    )
    policy = policy_model.build_policy(hp, bf16=False)
    examples = synthetic_pairs(tok, args.pairs)
    plan = preference_data.make_plan(examples, args.batch_size * distributed.WORLD, args.grad_accum, 1, 0)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=args.fused_adamw, foreach=not args.fused_adamw)
    n_params = sum(p.numel() for p in policy.parameters())  # a sharded parameter reports its full size
    train.train_step(policy, examples, [plan[0][0][: distributed.WORLD]], hp, tok.pad_token_id)  # warm-up, not counted
    opt.zero_grad(set_to_none=False)  # as train.py: gradient buffers kept
    distributed.barrier()
    t, pairs, tokens = time.time(), 0, 0
    for step in plan:
        s, n = train.train_step(policy, examples, step, hp, tok.pad_token_id)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        pairs += n
        tokens += sum(len(examples[i][k][0]) for mb in step for i in mb for k in ("chosen", "rejected"))
    distributed.barrier()
    dt = time.time() - t
    flops = 6 * n_params * tokens / dt
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if not distributed.is_main():
        return
    print(
        f"device {common.device()} x {distributed.WORLD} process(es), {args.pairs} pairs, micro-batch "
        f"{args.batch_size} per device x accumulation "
        f"{args.grad_accum}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, float32, "
        f"head chunk {args.head_chunk}, {'packed' if args.pack else 'padded'}, "
        f"{'fused' if args.fused_adamw else 'foreach'} AdamW, {common.inference_path()} products"
    )
    print(f"pairs/s {pairs / dt:.3f}   tokens/s {tokens / dt:.1f}   wall {dt:.1f} s")
    print(
        f"peak memory (max RSS) {rss:.2f} GiB"
        + (f"; CUDA peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else "")
    )
    print(
        f"achieved {flops / 1e9:.1f} GFLOP/s of a measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"= {100 * flops / peak:.1f}%"
    )


if __name__ == "__main__":
    main()
    distributed.cleanup()
