"""dev/gpu_check.py's figures, on random-weight models of Llama-3.1-8B's shape (tiny ones in a
dry run): sampling at 512 new tokens, LoRA training on the whole shape in one process, and a
full fine-tune of the shape cut to a few layers under torchrun with FSDP2 and NCCL, with its
checkpoint's save and load time."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def llama_8b_shape(tok, dry_run, layers=32):
    """A random-weight Llama-3.1-8B-shaped config (vocabulary 128,256, untied head); tiny in a dry run."""
    from transformers import LlamaConfig

    if dry_run:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        shape.update(num_key_value_heads=2, vocab_size=len(tok))
    else:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32)
        shape.update(num_key_value_heads=8, rope_theta=500000.0, vocab_size=128256)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=False, **ids, **shape)


def build(config):
    """The model of `config` with random weights on this device: bf16 on CUDA, float32 on the CPU."""
    import torch
    from transformers import LlamaForCausalLM

    import common

    torch.manual_seed(0)
    with common.device():
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16 if common.device().type == "cuda" else None)
    return model.eval()


def sample_figure(model, tok, dry_run):
    """sample.py's path (generation.generate) at 32 prompts x 8 candidates, 512 new tokens; the
    tokens counted from the generated ids (up to each row's end token), not re-tokenised text."""
    import torch

    import generation

    n_prompts, n_samples, new_tokens = (4, 2, 8) if dry_run else (32, 8, 512)
    prompts = [json.loads(line)["prompt"] for line in open(ROOT / "data" / "train_prompts.jsonl")][:n_prompts]
    rows = [generation.user_turn(q) for q in prompts for _ in range(n_samples)]
    keys = [f"{i}/{k}" for i in range(n_prompts) for k in range(n_samples)]
    ends, plain, counted = set(generation.end_token_ids(model, tok)), model.generate, []

    def counting(input_ids, **kwargs):
        ids = plain(input_ids=input_ids, **kwargs)
        for row in ids[:, input_ids.shape[1] :].tolist():
            stop = next((k for k, t in enumerate(row) if t in ends), None)
            counted.append(len(row) if stop is None else stop + 1)
        return ids

    model.generate = counting
    generation.generate(model, tok, rows[:4], max_new_tokens=4, temperature=1.0, keys=keys[:4])  # warm-up
    counted.clear()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    generation.generate(model, tok, rows, max_new_tokens=new_tokens, temperature=1.0, batch_size=len(rows), keys=keys)
    dt = time.time() - t
    model.generate = plain
    out = {"sample_rows": len(rows), "sample_new_tokens": new_tokens, "sample_tokens": sum(counted)}
    out.update(sample_tokens_per_s=round(sum(counted) / dt, 1), sample_seconds=round(dt, 2))
    if torch.cuda.is_available():
        out["sample_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def lora_train_figure(model, tok, dry_run):
    """train.py's step with LoRA r=16 on the whole shape, one process: 16 pairs of 100-250-token
    answers, micro-batch 4 x accumulation 2; pairs/s, tokens/s, MFU and peak memory."""
    import argparse

    import torch

    import lora
    import metrics_log
    import policy_model
    import preference_data
    import train
    from train_throughput import synthetic_pairs

    lm = model.train()
    lm.config.use_cache = False
    lora.apply(lm, 16, 16.0)
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    cuda = torch.cuda.is_available()
    policy = policy_model.Policy(lm, bf16_autocast=cuda, pack=False).train()
    hp = argparse.Namespace(loss="spa", alpha=1.0, beta=2.5, gamma=1.375)
    examples = synthetic_pairs(tok, 4 if dry_run else 16)
    plan = preference_data.make_plan(examples, 4, 2, 1, 0)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    train.train_step(policy, examples, [plan[0][0][:1]], hp, tok.pad_token_id)  # warm-up, not counted
    opt.zero_grad()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t, pairs, total = time.time(), 0, {"tokens": 0.0, "sequence_tokens": 0.0}
    for step in plan:
        s, n = train.train_step(policy, examples, step, hp, tok.pad_token_id)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        pairs += n
        total = {k: total[k] + s[k] for k in total}
    if cuda:
        torch.cuda.synchronize()
    dt = time.time() - t
    rates = metrics_log.throughput(total, dt, lm, True, cuda)
    return {"lora_train_pairs_per_s": round(pairs / dt, 3), **{f"lora_train_{k}": v for k, v in rates.items()}}


def fsdp_train_figure(work, tok, dry_run, layers=2):
    """train.py under `torchrun --nproc_per_node 1` with SPA_PROCESS_GROUP=1 (NCCL, FSDP2 over
    one GPU): a full fine-tune of the 8B shape cut to `layers` layers, saved in bf16 and loaded
    as train.py loads it; stopped after step 2 (a checkpoint written) and resumed for 2 more.
    Its tokens/s, MFU and peak memory are train.py's own (metrics.jsonl), the checkpoint's
    save and load time its log's."""
    from train_throughput import synthetic_texts

    model_dir, out = work / "cut_8b", work / "fsdp_train"
    build(llama_8b_shape(tok, dry_run, layers)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    pairs = work / "fsdp_pairs.jsonl"
    texts = synthetic_texts(tok, 16)
    rows = [dict(id=str(i), prompt=p, chosen=c, rejected=r, gap=g) for i, (p, c, r, g) in enumerate(texts)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torchrun = ["env", "SPA_PROCESS_GROUP=1", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    args = ["train.py", "--input", str(pairs), "--model", str(model_dir), "--output", str(out), "--batch-size", "2"]
    args += ["--grad-accum", "2", "--max-length", "1024", "--lr", "1e-5"]
    env = dict(os.environ, TQDM_DISABLE="1")
    first = subprocess.run(
        torchrun
        + ["--master-port", "29541", "dev/peak_memory.py", str(work / "fsdp.mem.json")]
        + ["tests/stop_after.py", "2", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    second = subprocess.run(
        torchrun + ["--master-port", "29542", *args, "--resume"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    if first.returncode or second.returncode:
        raise RuntimeError(f"the FSDP2 figure's run failed:\n{first.stderr[-2000:]}\n{second.stderr[-2000:]}")
    written = re.search(r"checkpoint: step 2 written in ([\d.]+) s", first.stderr)
    loaded = re.search(r"checkpoint: step 2 loaded in ([\d.]+) s", second.stderr)
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    config = json.loads((out / "train_config.json").read_text())
    figure = {k: last[k] for k in ("tokens_per_s", "mfu", "peak_memory_gib") if k in last}
    figure.update(layers=layers if not dry_run else 2, fsdp2=config["fsdp2"])
    figure.update(checkpoint_save_s=float(written.group(1)), checkpoint_load_s=float(loaded.group(1)))
    return {f"fsdp_train_{k}": v for k, v in figure.items()}
