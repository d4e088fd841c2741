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

The stages (tiny model, bf16 on CUDA), each with its peak GPU memory: sample; score in
generate and logits modes; refine; evaluate; train spa, dpo and LoRA; stopped after a step then
--resume; sample and train under `torchrun --nproc_per_node 1` with SPA_PROCESS_GROUP=1, so that
NCCL forms a group and FSDP2 shards over the GPU, train stopped and resumed there too (DCP).
The figures (dev/gpu_figures.py, random weights of Llama-3.1-8B's shape): sample.py's path at
32 prompts x 8 candidates, 512 new tokens, tokens counted from the generated ids; train.py's
step with LoRA r=16 on the whole shape; a full fine-tune of the shape cut to 2 layers under
torchrun (FSDP2): tokens/s, MFU, peak memory, the checkpoint's save and load time.
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
    torchrun = ["env", "SPA_PROCESS_GROUP=1", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
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
        (
            "torchrun train stopped",
            torchrun + ["tests/stop_after.py", "1", "train.py", *train, "--output", w("tr_res")],
        ),
        ("torchrun train --resume", torchrun + ["train.py", *train, "--output", w("tr_res"), "--resume"]),
    ]


def sharded(work):
    """Whether every torchrun training run finished so far trained with FSDP2 (its train_config.json says)."""
    configs = [work / d / "train_config.json" for d in ("spa_tr", "tr_res")]
    return all(json.loads(f.read_text()).get("fsdp2") for f in configs if f.exists())


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
    for k, (name, cmd) in enumerate(stage_runs(work, model, prompts, pairs)):
        t, memory = time.time(), work / f"stage{k}.mem.json"
        script = next(i for i, a in enumerate(cmd) if a.endswith(".py"))
        cmd = cmd[:script] + ["dev/peak_memory.py", str(memory)] + cmd[script:]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        ok = p.returncode == 0 and (not name.startswith("torchrun train") or sharded(work))
        results.append(
            {
                "stage": name,
                "ok": ok,
                "seconds": round(time.time() - t, 1),
                "peak_gpu_gib": json.loads(memory.read_text())["peak_gib"] if memory.exists() else None,
                **({} if ok else {"stderr": p.stderr[-1500:]}),
            }
        )
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({results[-1]['seconds']} s)", flush=True)
        if not ok:
            print(p.stderr[-1500:], flush=True)
    print(f"device {common.device()}, inference {common.inference_path()}", flush=True)
    return results


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
    sys.path[:0] = [str(ROOT), str(ROOT / "dev")]
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
    import gpu_figures

    report.update(gpu_figures.fsdp_train_figure(work, tok, args.dry_run))
    model = gpu_figures.build(gpu_figures.llama_8b_shape(tok, args.dry_run))
    report["model"] = {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype)}
    report.update(gpu_figures.sample_figure(model, tok, args.dry_run))
    report.update(gpu_figures.lora_train_figure(model, tok, args.dry_run))
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
