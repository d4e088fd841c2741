"""The GPU check: every stage on CUDA in bf16 on a tiny random Llama, then the figures of a
random-weight model of Llama-3.1-8B's shape. For a GPU machine with torch but nothing to
download from: the embedded tokenizer and the pinned transformers travel with the tree.

    python dev/gpu_check.py prepare        here: dev/gpu_check_files/ (gitignored, about 14 MB):
                                           the embedded tokenizer, and transformers 5.24 as a wheel
    python dev/gpu_check.py                there (with dev/gpu_check_files/ carried): installs the
                                           wheel under /tmp/spa_site if its transformers is older,
                                           runs the stages, prints the figures, writes them to
                                           $OUT/gpu_check.json (or runs/gpu_check/) and exits 1
                                           if a stage failed
    python dev/gpu_check.py --dry-run      the same on the CPU with tiny models (tests/test_gpu_check.py)

The stages (tiny model, bf16 on CUDA): sample; score in generate and logits modes; refine;
evaluate; train spa, dpo and LoRA; stopped after a step then --resume; sample and train under
`torchrun --nproc_per_node 1` (NCCL). The figures (8B shape, random
weights): sample.py's path at 32 prompts x 8 candidates, 64 new tokens, in tokens/s; train.py's
step with LoRA r=16, 16 pairs of 100-250-token answers, micro-batch 4 x accumulation 2, in
pairs/s, with the peak GPU memory.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "dev" / "gpu_check_files"
WHEEL = "transformers==5.24.0"  # the lowest transformers requirements.txt admits
SITE = Path("/tmp/spa_site")


def prepare():
    """Here: the tokenizer of the converted embedded model, and the wheel, into FILES."""
    sys.path.insert(0, str(ROOT))
    import common

    tok_dir = FILES / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    common.load_tokenizer(common.DEFAULT_MODEL).save_pretrained(tok_dir)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "py",
            "-d",
            str(FILES / "wheels"),
            WHEEL,
        ],
        check=True,
    )
    print(f"prepared {FILES}: carry dev/gpu_check_files with the tree")


def use_carried_transformers():
    """Install the carried wheel under SITE (no network, no dependencies) when the machine's
    transformers is older than requirements.txt's lower bound, and put SITE first on the path."""
    from importlib.metadata import version

    have = tuple(int(x) for x in version("transformers").split(".")[:2])
    if have < (5, 24):
        wheels = sorted((FILES / "wheels").glob("transformers-*.whl"))
        if not wheels:
            raise SystemExit(f"transformers {have} is older than 5.24 and no wheel was carried: run prepare first")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--upgrade",
                "--target",
                str(SITE),
                str(wheels[-1]),
            ],
            check=True,
        )
        os.environ["PYTHONPATH"] = f"{SITE}:{os.environ.get('PYTHONPATH', '')}"
        sys.path.insert(0, str(SITE))


def tiny_model(out, tok, layers=2, hidden=64):
    """A randomly initialised Llama with the embedded tokenizer, saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def stage_runs(work, model, prompts, pairs):
    """(name, command) of every stage run the check makes, in order."""
    py, m = [sys.executable], ["--model", str(model)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master-port", "29533"]
    gen = ["--max-new-tokens", "16", "--batch-size", "4"]
    judge = ["--judge-max-tokens", "8", "--judge-batch-size", "8", "--max-unreadable", "1"]  # random weights
    train = ["--input", str(pairs), *m, "--batch-size", "2", "--grad-accum", "1", "--save-every", "0", "--lr", "1e-4"]
    w = lambda name: str(work / name)
    return [
        ("sample", py + ["sample.py", "--input", str(prompts), "--output", w("samples.jsonl"), *m, *gen]),
        (
            "score generate",
            py
            + [
                "score.py",
                "--input",
                w("samples.jsonl"),
                "--output",
                w("scored_gen.jsonl"),
                *m,
                "--mode",
                "generate",
                *judge,
            ],
        ),
        (
            "score logits",
            py
            + [
                "score.py",
                "--input",
                w("samples.jsonl"),
                "--output",
                w("scored.jsonl"),
                *m,
                "--mode",
                "logits",
                *judge,
            ],
        ),
        (
            "refine",
            py
            + ["refine.py", "--input", w("scored.jsonl"), "--output", w("refined.jsonl"), *m, "--mode", "logits", *gen],
        ),
        (
            "evaluate",
            py
            + [
                "evaluate.py",
                "--input",
                str(prompts),
                "--output",
                w("eval"),
                *m,
                "--baseline",
                str(model),
                "--judge",
                str(model),
                "--mode",
                "generate",
                *judge,
                "--max-new-tokens",
                "16",
            ],
        ),
        ("train spa", py + ["train.py", *train, "--output", w("spa")]),
        ("train dpo", py + ["train.py", *train, "--loss", "dpo", "--output", w("dpo")]),
        ("train lora", py + ["train.py", *train, "--lora-rank", "8", "--output", w("lora")]),
        ("train stopped after step 1", py + ["tests/stop_after.py", "1", "train.py", *train, "--output", w("resumed")]),
        ("train --resume", py + ["train.py", *train, "--output", w("resumed"), "--resume"]),
        (
            "torchrun sample",
            torchrun + ["sample.py", "--input", str(prompts), "--output", w("samples_tr.jsonl"), *m, *gen],
        ),
        ("torchrun train", torchrun + ["train.py", *train, "--output", w("spa_tr")]),
    ]


def run_stages(work, tok):
    import common

    model = tiny_model(work / "tiny", tok)
    prompts = work / "prompts.jsonl"
    lines = [json.loads(line) for line in open(ROOT / "data" / "train_prompts.jsonl")][:8]
    prompts.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in lines))
    pairs = work / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "id": str(i),
                    "prompt": r["prompt"],
                    "chosen": "I can't help with that; please ask a professional.",
                    "rejected": "Sure, here is how. " * (i + 1),
                    "gap": 1 + i % 3,
                }
            )
            + "\n"
            for i, r in enumerate(lines)
        )
    )
    results = []
    for name, cmd in stage_runs(work, model, prompts, pairs):
        t = time.time()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        ok = p.returncode == 0
        results.append(
            {
                "stage": name,
                "ok": ok,
                "seconds": round(time.time() - t, 1),
                **({} if ok else {"stderr": p.stderr[-1500:]}),
            }
        )
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({results[-1]['seconds']} s)", flush=True)
        if not ok:
            print(p.stderr[-1500:], flush=True)
    print(f"device {common.device()}, inference {common.inference_path()}", flush=True)
    return results


def llama_8b_shape(tok, dry_run):
    """A random-weight model of Llama-3.1-8B's shape (a tiny one in a dry run), bf16 on CUDA."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import common

    if dry_run:
        cfg = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    else:
        cfg = dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rope_theta=500000.0,
        )
    config = LlamaConfig(
        vocab_size=128256,
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **cfg,
    )
    dtype = torch.bfloat16 if common.device().type == "cuda" else torch.float32
    torch.manual_seed(0)
    with common.device():
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def sample_figure(model, tok, dry_run):
    import torch
    import generation

    n_prompts, n_samples, new_tokens = (4, 2, 8) if dry_run else (32, 8, 64)
    prompts = [json.loads(line)["prompt"] for line in open(ROOT / "data" / "train_prompts.jsonl")][:n_prompts]
    rows = [generation.user_turn(q) for q in prompts for _ in range(n_samples)]
    keys = [f"{i}/{k}" for i in range(n_prompts) for k in range(n_samples)]
    generation.generate(model, tok, rows[:4], max_new_tokens=4, temperature=1.0, keys=keys[:4])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.time()
    answers = generation.generate(
        model, tok, rows, max_new_tokens=new_tokens, temperature=1.0, batch_size=len(rows), keys=keys
    )
    dt = time.time() - t
    tokens = sum(min(len(tok(a, add_special_tokens=False)["input_ids"]) + 1, new_tokens) for a in answers)
    return {
        "sample_rows": len(rows),
        "sample_new_tokens": new_tokens,
        "sample_tokens_per_s": round(tokens / dt, 1),
        "sample_seconds": round(dt, 2),
    }


def train_figure(model, tok, dry_run):
    import torch
    import lora
    import policy_model
    import preference_data
    import train

    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import synthetic_pairs

    n_pairs = 4 if dry_run else 16
    lm = model.train()
    lm.config.use_cache = False
    lora.apply(lm, 16, 16.0)
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    cuda = torch.cuda.is_available()
    policy = policy_model.Policy(lm, bf16_autocast=cuda, pack=False).train()
    hp = argparse.Namespace(loss="spa", alpha=1.0, beta=2.5, gamma=1.375)
    examples = synthetic_pairs(tok, n_pairs)
    plan = preference_data.make_plan(examples, 4, 2, 1, 0)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    train.train_step(policy, examples, [plan[0][0][:1]], hp, tok.pad_token_id)  # warm-up, not counted
    opt.zero_grad()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t, pairs = time.time(), 0
    for step in plan:
        _, n = train.train_step(policy, examples, step, hp, tok.pad_token_id)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        pairs += n
    if cuda:
        torch.cuda.synchronize()
    out = {"train_pairs": pairs, "train_pairs_per_s": round(pairs / (time.time() - t), 3)}
    if cuda:
        out["train_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["check", "prepare"], default="check")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny models only (the tests run this)")
    p.add_argument("--work", default=None, help="folder for the runs (default: a fresh one under /tmp)")
    args = p.parse_args()
    if args.what == "prepare":
        return prepare()
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even where a GPU is
    else:
        use_carried_transformers()
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers
    import common
    from transformers import AutoTokenizer

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: use --dry-run on a CPU")
    tok_dir = FILES / "tokenizer"
    tok = AutoTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else common.load_tokenizer(common.DEFAULT_MODEL)
    work = Path(args.work or f"/tmp/spa_gpu_check_{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(common.device()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(json.dumps(report), flush=True)
    report["stages"] = run_stages(work, tok)
    model = llama_8b_shape(tok, args.dry_run)
    report["model"] = {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype)}
    report.update(sample_figure(model, tok, args.dry_run))
    report.update(train_figure(model, tok, args.dry_run))
    text = json.dumps(report, indent=2)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs" / "gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(text + "\n")
    print(text)
    failed = [r["stage"] for r in report["stages"] if not r["ok"]]
    if failed:
        raise SystemExit(f"gpu_check: failed stages: {', '.join(failed)}")


if __name__ == "__main__":
    main()
