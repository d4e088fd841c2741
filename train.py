"""Step 6 of SPA: uncertainty-weighted, length-normalised SimPO (Eq. 3), in a hand-written loop.

    r(y)   = (beta / |y|) log pi(y | x)                          length-normalised reward
    gap_i  = |a(y) + b(y) - a(y-) - b(y-)|                       from pairs.py
    w_i    = (gap_i / mean(gap over the optimizer batch))^alpha  no gradient; all-zero gaps: w = 1
    loss_i = -w_i log sigmoid(r(y) - r(y-) - gamma)

--loss simpo sets w = 1; --loss dpo uses summed log-probs against reference log-probs
computed once by the starting model before training; --loss sft is the NLL of the chosen
answer. Chosen and rejected answers go through the model in one concatenated forward.

    python train.py --input runs/x/pairs.jsonl --output runs/x/model --loss spa

The output directory gets save_pretrained (safetensors) with the tokenizer and chat template,
train_config.json and metrics.jsonl (a row per optimizer step); while training it also holds
checkpoint/ for --resume, deleted once the final model is saved.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

HEAD_CHUNK = 512  # answer positions per pass of the vocabulary head (--head-chunk)


# ----------------------------------------------------------------------------- the mathematics

def uncertainty_weights(gaps, mean_gap, alpha):
    """w_i = (gap_i / mean_gap)^alpha of Eq. 3, detached. mean_gap runs over every pair of
    the optimizer step; if it is 0 (all gaps zero) every w_i is 1. gaps: (B,) -> (B,)."""
    if mean_gap <= 0:
        return torch.ones_like(gaps)
    return ((gaps / mean_gap) ** alpha).detach()


def preference_losses(logp_c, logp_r, n_c, n_r, weights, loss, beta, gamma, ref_c=None, ref_r=None):
    """Per-pair losses and rewards.
    logp_c, logp_r: (B,) summed log pi of the chosen / rejected answer tokens
    n_c, n_r:       (B,) their token counts (|y|)
    weights:        (B,) w_i (spa); ignored by the other losses
    ref_c, ref_r:   (B,) summed reference log-probs (dpo only)
    Returns (losses (B,), reward_chosen (B,), reward_rejected (B,))."""
    if loss in ("spa", "simpo"):
        r_c, r_r = beta * logp_c / n_c, beta * logp_r / n_r  # Eq. 3: length-normalised rewards
        losses = -F.logsigmoid(r_c - r_r - gamma)
        return (weights * losses if loss == "spa" else losses), r_c, r_r
    if loss == "dpo":
        r_c, r_r = beta * (logp_c - ref_c), beta * (logp_r - ref_r)
        return -F.logsigmoid(r_c - r_r), r_c, r_r
    if loss == "sft":
        return -logp_c / n_c, beta * logp_c / n_c, beta * logp_r / n_r
    raise ValueError(f"unknown loss {loss!r}")


def token_logps(lm_head, hidden, targets):
    """log pi(target | position) at N positions: hidden (N, H), targets (N,) -> (N,) float32."""
    logits = lm_head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def answer_logps(hidden, lm_head, input_ids, answer_mask, chunk=HEAD_CHUNK):
    """Summed log-probabilities of the answer tokens, and their counts.
    hidden: (B, T, H) final hidden states; lm_head: (N, H) -> (N, V), the vocabulary projection;
    input_ids: (B, T); answer_mask: (B, T), True where the token is an answer token.
    The projection runs only at the N positions that predict an answer token, `chunk` of them
    at a time (0: all at once); with gradients on, each chunk's (chunk, V) float32 logits are
    recomputed in backward instead of kept, so no (N, V) tensor is ever held.
    Returns (logp (B,), n_tokens (B,))."""
    mask = answer_mask[:, 1:]                       # token t is predicted at position t - 1
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(mask)[mask]
    h, targets = hidden[:, :-1][mask], input_ids[:, 1:][mask]
    chunk = chunk or len(h)
    recompute = torch.is_grad_enabled() and h.requires_grad
    head = partial(checkpoint, token_logps, use_reentrant=False) if recompute else token_logps
    lp = torch.cat([head(lm_head, h[s:s + chunk], targets[s:s + chunk]) for s in range(0, len(h), chunk)])
    total = torch.zeros(len(input_ids), device=hidden.device).index_add(0, rows, lp)
    return total, mask.sum(1)


# ----------------------------------------------------------------------------- data

def tokenize_answer(tok, prompt, answer, max_length):
    """Token ids of prompt + answer as the chat template renders them, and the prompt length.
    The prompt side is the template with add_generation_prompt=True; the answer side is what
    it renders for the assistant turn after that, end-of-turn token included. The text is
    tokenized once without adding special tokens (the template has them: no double BOS).
    Returns (ids, n_prompt), or a reason string when the pair must be dropped."""
    conv = [{"role": "user", "content": prompt}]
    prompt_text = common.chat_text(tok, conv)
    full_text = common.chat_text(tok, conv + [{"role": "assistant", "content": answer}], False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template's prompt is not a prefix of the rendered conversation")
    ids = tok(full_text, add_special_tokens=False)["input_ids"]
    p_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    if ids[:len(p_ids)] != p_ids:
        raise ValueError("the prompt's tokens are not a prefix of the conversation's tokens")
    if len(p_ids) >= max_length:
        return "prompt_too_long"
    return ids[:max_length], len(p_ids)


def load_pairs(path, tok, max_length, limit=None):
    """pairs.jsonl -> list of examples {chosen: (ids, n_prompt), rejected: ..., gap, id}, and
    a count of the pairs dropped per reason."""
    if Path(path).is_file() and not Path(path).read_text(encoding="utf-8").strip():
        raise common.InputError(f"{path}: no pairs: denoising or the margin removed everything "
                                "(loosen denoise.py --tau-quantile or pairs.py --delta)")
    rows = common.read_jsonl(path, required=("prompt", "chosen", "rejected", "gap"))
    examples, dropped = [], {"prompt_too_long": 0, "empty_answer": 0}
    for n, rec in rows[:limit] if limit else rows:
        if not all(isinstance(rec[k], str) for k in ("prompt", "chosen", "rejected")):
            raise common.InputError(f"{path}:{n}: prompt, chosen and rejected must be strings")
        sides = [tokenize_answer(tok, rec["prompt"], rec[k], max_length) for k in ("chosen", "rejected")]
        bad = next((s for s in sides if isinstance(s, str)), None)
        if bad is None and any(len(ids) <= n_p for ids, n_p in sides):
            bad = "empty_answer"  # no answer token left after truncation: never divided by
        if bad:
            dropped[bad] += 1
            continue
        examples.append({"chosen": sides[0], "rejected": sides[1], "gap": float(rec["gap"]),
                         "id": rec.get("id", str(n)), "line": n})
    if not examples:
        raise common.InputError(f"{path}: every pair was dropped ({dropped}); raise --max-length")
    return examples, dropped


def collate(examples, pad_id):
    """Chosen rows then rejected rows, right-padded to one length: one forward for both.
    Returns input_ids (2B, T), attention_mask (2B, T), answer_mask (2B, T)."""
    seqs = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.bool)
    answer = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (ids, n_p) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attn[i, :len(ids)] = True
        answer[i, n_p:len(ids)] = True
    return input_ids, attn, answer


def make_plan(examples, batch_size, accum, epochs, seed):
    """Optimizer steps as lists of micro-batches (lists of example indices). Micro-batches
    are buckets of similar length (little padding), shuffled per epoch with the seed."""
    by_len = sorted(range(len(examples)), key=lambda i: len(examples[i]["chosen"][0]) + len(examples[i]["rejected"][0]))
    micro = [by_len[i:i + batch_size] for i in range(0, len(by_len), batch_size)]
    steps = []
    for epoch in range(epochs):
        order = micro[:]
        random.Random(seed + epoch).shuffle(order)
        steps += [order[i:i + accum] for i in range(0, len(order), accum)]
    return steps


# ----------------------------------------------------------------------------- one step

def sequence_logps(model, examples, pad_id, head_chunk=HEAD_CHUNK):
    """Summed answer log-probs and counts for chosen and rejected: 4 tensors of shape (B,)."""
    input_ids, attn, answer = (t.to(common.device()) for t in collate(examples, pad_id))
    with common.autocast():
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attn).last_hidden_state
        logp, n = answer_logps(hidden, model.get_output_embeddings(), input_ids, answer, head_chunk)
    B = len(examples)
    return logp[:B], logp[B:], n[:B], n[B:]


def train_step(model, examples, micro_batches, args, pad_id, ref=None):
    """Forward and backward over the micro-batches of one optimizer step; gradients are
    accumulated so that they equal one batch holding every pair. The weights' mean gap runs
    over all pairs of the step. Returns summed statistics for logging."""
    n_pairs = sum(len(mb) for mb in micro_batches)
    mean_gap = sum(examples[i]["gap"] for mb in micro_batches for i in mb) / n_pairs
    stats = {k: 0.0 for k in ("loss", "r_c", "r_r", "acc", "lp_c", "lp_r", "tokens", "zero_w", "w_sum")}
    stats.update(w_min=math.inf, w_max=-math.inf)
    for mb in micro_batches:
        ex = [examples[i] for i in mb]
        lp_c, lp_r, n_c, n_r = sequence_logps(model, ex, pad_id, args.head_chunk)
        gaps = torch.tensor([e["gap"] for e in ex], device=lp_c.device)
        w = uncertainty_weights(gaps, mean_gap, args.alpha) if args.loss == "spa" else torch.ones_like(gaps)
        refs = (ref[mb, 0].to(lp_c.device), ref[mb, 1].to(lp_c.device)) if ref is not None else (None, None)
        losses, r_c, r_r = preference_losses(lp_c, lp_r, n_c, n_r, w, args.loss, args.beta, args.gamma, *refs)
        loss = losses.sum() / n_pairs
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} in pairs {[e['id'] for e in ex]} "
                                     f"(lines {[e['line'] for e in ex]})")
        loss.backward()
        stats["loss"] += loss.item()
        stats["r_c"] += r_c.sum().item()
        stats["r_r"] += r_r.sum().item()
        stats["acc"] += (r_c > r_r).sum().item()
        stats["lp_c"] += (lp_c / n_c).sum().item()
        stats["lp_r"] += (lp_r / n_r).sum().item()
        stats["tokens"] += (n_c.sum() + n_r.sum()).item()
        stats["zero_w"] += (w == 0).sum().item()
        stats["w_sum"] += w.sum().item()
        stats.update(w_min=min(stats["w_min"], w.min().item()), w_max=max(stats["w_max"], w.max().item()))
    return stats, n_pairs


@torch.no_grad()
def reference_logps(model, examples, batch_size, pad_id, head_chunk):
    """Summed log-probs of chosen and rejected under the starting model: (N, 2). For dpo."""
    model.eval()
    out = torch.zeros(len(examples), 2)
    for s in tqdm(range(0, len(examples), batch_size), desc="reference log-probs"):
        lp_c, lp_r, _, _ = sequence_logps(model, examples[s:s + batch_size], pad_id, head_chunk)
        out[s:s + len(lp_c)] = torch.stack([lp_c, lp_r], 1).float().cpu()
    model.train()
    return out


# ----------------------------------------------------------------------------- checkpoints

def lr_lambda(warmup, total):
    """Linear warm-up, then cosine decay to 0."""
    def f(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def save_checkpoint(out, model, opt, sched, step):
    """OUT/checkpoint/: model (safetensors), optimizer, scheduler, RNG, data position.
    Written beside and renamed over the old one, so a crash keeps the last good checkpoint."""
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp / "trainer_state.pt")
    old = out / "checkpoint.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out, model, opt, sched):
    """Restore a checkpoint/ written by save_checkpoint; returns the step to continue at."""
    from safetensors.torch import load_file
    ck = out / "checkpoint"
    if not (ck / "trainer_state.pt").exists():
        raise common.InputError(f"{ck}: no checkpoint to resume from")
    model.load_state_dict(load_file(ck / "model.safetensors"), strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    state = torch.load(ck / "trainer_state.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def save_final(out, model, tok, config):
    """save_pretrained into a temporary folder, then move the files in with config.json
    last: the output only looks like a model once every weight file is in place."""
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    common.write_atomic(tmp / "train_config.json", json.dumps(config, indent=2) + "\n")
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out / f.name)
    tmp.rmdir()


# ----------------------------------------------------------------------------- the loop

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="pairs.jsonl from pairs.py (prompt/chosen/rejected/gap)")
    p.add_argument("--output", required=True, help="output model directory")
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="starting model (default: the embedded one)")
    p.add_argument("--loss", choices=["spa", "simpo", "dpo", "sft"], default="spa", help="default spa (Eq. 3)")
    p.add_argument("--beta", type=float, default=None, help="reward scale (default 2.5; 0.1 for dpo)")
    p.add_argument("--gamma", type=float, default=1.375, help="target reward margin (default 1.375)")
    p.add_argument("--alpha", type=float, default=1.0, help="exponent of the uncertainty weights (default 1)")
    p.add_argument("--lr", type=float, default=1e-6, help="peak learning rate (default 1e-6)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps warming up (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1.0)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the pairs (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per prompt + answer (default 512)")
    p.add_argument("--head-chunk", type=int, default=HEAD_CHUNK,
                   help="answer positions per pass of the vocabulary head; each chunk's logits are "
                        f"recomputed in backward (default {HEAD_CHUNK}; 0 = all at once: more memory)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward to save memory (default on)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weight dtype; bf16 autocast is used on CUDA either way (default float32)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimizer steps (default 50)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps, as a crash would (for tests)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    args = p.parse_args(argv)
    if args.beta is None:
        args.beta = 0.1 if args.loss == "dpo" else 2.5
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output)
    common.return_freed_memory()
    common.seed_everything(args.seed)
    tok = common.load_tokenizer(args.model)
    examples, dropped = load_pairs(args.input, tok, args.max_length, args.limit)
    if (out / "config.json").exists() and not args.resume:
        raise common.InputError(f"{out}: already holds a trained model; choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    model = common.load_weights(args.model, getattr(torch, args.dtype))
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    pad_id = tok.pad_token_id

    ref = None
    if args.loss == "dpo":  # computed once by the starting model, kept on disk for --resume
        ref_path = out / "reference_logps.pt"
        ref = torch.load(ref_path) if args.resume and ref_path.exists() else reference_logps(model, examples, args.batch_size, pad_id, args.head_chunk)
        torch.save(ref, ref_path)
    model.train()
    plan = make_plan(examples, args.batch_size, args.grad_accum, args.epochs, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(round(args.warmup_ratio * len(plan)), len(plan)))
    start = load_checkpoint(out, model, opt, sched) if args.resume else 0
    metrics_path = out / "metrics.jsonl"
    kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= start] \
        if start and metrics_path.exists() else []
    common.write_atomic(metrics_path, "".join(l + "\n" for l in kept))
    zero_gap = sum(e["gap"] == 0 for e in examples)
    print(f"train: {len(examples)} pairs ({dropped['prompt_too_long']} dropped with a prompt over --max-length, "
          f"{dropped['empty_answer']} with an empty answer, {zero_gap} with gap 0), {len(plan)} steps, "
          f"loss {args.loss}, device {common.device()}", file=sys.stderr)

    bar = tqdm(range(start, len(plan)), desc="train", unit="step", initial=start, total=len(plan))
    with open(metrics_path, "a") as mf:
        for step in bar:
            t0 = time.time()
            try:
                s, n = train_step(model, examples, plan[step], args, pad_id, ref)
            except FloatingPointError as e:
                raise SystemExit(f"error: training stopped at step {step + 1}: {e}; the last good checkpoint "
                                 f"is in {out / 'checkpoint'}")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.time() - t0
            row = {"step": step + 1, "loss": s["loss"], "rewards/chosen": s["r_c"] / n, "rewards/rejected": s["r_r"] / n,
                   "rewards/accuracy": s["acc"] / n, "rewards/margin": (s["r_c"] - s["r_r"]) / n,
                   "logps/chosen": s["lp_c"] / n, "logps/rejected": s["lp_r"] / n, "weight/mean": s["w_sum"] / n,
                   "weight/min": s["w_min"], "weight/max": s["w_max"], "weight/zero": s["zero_w"], "lr": lr,
                   "grad_norm": grad_norm, "pairs_per_s": n / dt, "tokens_per_s": s["tokens"] / dt}
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margin']:.3f}", acc=f"{row['rewards/accuracy']:.2f}")
            if args.save_every and (step + 1) % args.save_every == 0 or step + 1 == args.stop_after:
                save_checkpoint(out, model, opt, sched, step + 1)
            if step + 1 == args.stop_after:
                print(f"train: stopped after step {step + 1} (--stop-after)", file=sys.stderr)
                return
    config = dict(vars(args), pairs=len(examples), dropped=dropped, zero_gap_pairs=zero_gap, steps=len(plan))
    if args.gradient_checkpointing:
        model.activation_checkpointing_disable()
    model.config.use_cache = True
    save_final(out, model, tok, config)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # the final model supersedes it
    print(f"train: {len(plan)} steps on {len(examples)} pairs -> {out}")


if __name__ == "__main__":
    common.run_main(main)
