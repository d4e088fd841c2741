"""Generation throughput of sample.py's path (generation.generate: a row per (prompt, sample),
each with its own seeded random numbers) against transformers' own sampling in one batched
call (num_return_sequences), and against one call per prompt and sample.

Same model, prompts and answer length; prints tokens per second (the answers' tokens, plus
an end of turn for each answer that ended, divided by wall time) and the machine's float32
matmul peak measured in the same run. On the CPU the stage path runs cpu_speed.py unless
SPA_CPU_SPEED=0. Measures, never asserts.

    python bench/sample_throughput.py [--prompts 8] [--samples 4] [--large 32] [--large-samples 8]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import generation  # noqa: E402
from train_throughput import matmul_peak  # noqa: E402


def timed(fn):
    t = time.time()
    tokens = fn()
    return tokens, time.time() - t


def answer_tokens(tok, answers, cap):
    """Tokens generated for these answers: their own, plus the end of turn of each that ended."""
    lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
    return sum(min(n + 1, cap) for n in lengths)


def stage_path(model, tok, convs, n_samples, new_tokens):
    """sample.py's call: every (prompt, sample) a row with its own key, one generate call."""
    rows = [c for c in convs for _ in range(n_samples)]
    keys = [f"{i}/{k}" for i in range(len(convs)) for k in range(n_samples)]
    answers = generation.generate(
        model, tok, rows, max_new_tokens=new_tokens, temperature=1.0, batch_size=len(rows), keys=keys
    )
    return answer_tokens(tok, answers, new_tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--prompts", type=int, default=8, help="prompts in the small setting (default 8)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--new-tokens", type=int, default=64, help="max new tokens (default 64)")
    p.add_argument("--large", type=int, default=32, help="prompts in the larger batch (default 32)")
    p.add_argument("--large-samples", type=int, default=8, help="samples per prompt in the larger batch (default 8)")
    p.add_argument("--single", type=int, default=8, help="(prompt, sample) calls timed one at a time (default 8)")
    args = p.parse_args()
    peak = matmul_peak()
    model, tok = common.load_for_inference(args.model)
    plain = common.load_model(args.model)[0].eval()  # transformers' model as it comes, for its own sampling
    prompts = [json.loads(line)["prompt"] for line in open(Path(common.__file__).parent / "data/train_prompts.jsonl")]
    convs = [generation.user_turn(q) for q in prompts]
    print(
        f"device {common.device()}, threads {torch.get_num_threads()}, {common.inference_path()}, "
        f"{args.new_tokens} new tokens, temperature 1.0; measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )

    def hf_sampling(texts, n_samples):
        from transformers import GenerationConfig

        cfg = GenerationConfig(
            max_new_tokens=args.new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=None,
            num_return_sequences=n_samples,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            disable_compile=True,
        )
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with torch.no_grad():
            out = plain.generate(**enc.to(plain.device), generation_config=cfg)
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return answer_tokens(tok, answers, args.new_tokens)

    texts = [generation.chat_text(tok, c) for c in convs]
    stage_path(model, tok, convs[:2], 2, args.new_tokens)  # warm-up
    n, s, L, S = args.prompts, args.samples, args.large, args.large_samples
    rows = [
        (f"transformers' sampling, {n} prompts x {s} samples, one call", *timed(lambda: hf_sampling(texts[:n], s))),
        (
            f"sample.py path, {n} prompts x {s} samples, one call",
            *timed(lambda: stage_path(model, tok, convs[:n], s, args.new_tokens)),
        ),
        (
            f"sample.py path, {L} prompts x {S} samples, one call",
            *timed(lambda: stage_path(model, tok, convs[:L], S, args.new_tokens)),
        ),
        (
            f"transformers' sampling, one call per prompt and sample ({args.single} calls)",
            *timed(lambda: sum(hf_sampling([texts[k % n]], 1) for k in range(args.single))),
        ),
    ]
    for name, tokens, dt in rows:
        print(f"{name:75s} {tokens:6d} tokens {dt:7.1f} s {tokens / dt:8.1f} tokens/s")


if __name__ == "__main__":
    main()
