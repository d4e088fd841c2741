"""Generation throughput of sample.py's path against plain `generate`: one batched call
(num_return_sequences, do_sample), and one call per prompt and sample.

Same model, prompts and answer length; prints tokens per second (generated tokens up to and
including end of turn, divided by wall time), and the machine's float32 matmul peak measured
in the same run (shared machines drift). Measures, never asserts.

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
    prompts = [json.loads(l)["prompt"] for l in open(Path(common.__file__).parent / "data/train_prompts.jsonl")]
    convs = [generation.user_turn(q) for q in prompts]
    print(f"device {common.device()}, threads {torch.get_num_threads()}, {args.new_tokens} new tokens, "
          f"temperature 1.0; measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s")

    def ours(n_prompts, n_samples):
        st = {}
        generation.generate(model, tok, convs[:n_prompts], max_new_tokens=args.new_tokens, temperature=1.0,
                            num_return=n_samples, batch_size=n_prompts, stats=st)
        return st["tokens"]

    def plain(texts, n_samples):
        from transformers import GenerationConfig
        tok.padding_side = "left"
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, top_k=None,
                               num_return_sequences=n_samples, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=cfg)
        return generation.count_new_tokens(out[:, enc["input_ids"].shape[1]:], tok.eos_token_id)

    texts = [generation.chat_text(tok, c) for c in convs]
    ours(2, 2)  # warm-up
    n, s, L, S = args.prompts, args.samples, args.large, args.large_samples
    rows = [(f"plain generate, {n} prompts x {s} samples, one call", *timed(lambda: plain(texts[:n], s))),
            (f"sample.py path, {n} prompts x {s} samples, one call", *timed(lambda: ours(n, s))),
            (f"sample.py path, {L} prompts x {S} samples, one call", *timed(lambda: ours(L, S))),
            (f"plain generate, one call per prompt and sample ({args.single} calls)",
             *timed(lambda: sum(plain([texts[k % n]], 1) for k in range(args.single))))]
    for name, tokens, dt in rows:
        print(f"{name:70s} {tokens:6d} tokens {dt:7.1f} s {tokens / dt:8.1f} tokens/s")


if __name__ == "__main__":
    main()
