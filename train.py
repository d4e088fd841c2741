"""Step 6 of SPA: uncertainty-weighted, length-normalised SimPO (Eq. 3), in a hand-written loop.

    r(y)   = (beta / |y|) log pi(y | x)                          length-normalised reward
    gap_i  = |a(y) + b(y) - a(y-) - b(y-)|                       from pairs.py
    w_i    = (gap_i / mean(gap over the optimizer batch))^alpha  no gradient; all-zero gaps: w = 1
    loss_i = -w_i log sigmoid(r(y) - r(y-) - gamma)

--loss simpo sets w = 1; --loss dpo uses summed log-probs against reference log-probs computed
once by the starting model before training (with LoRA: the model with its adapters off, no
reference pass); --loss sft is the NLL of the chosen answer. Chosen and rejected: one forward.

    python train.py --input runs/x/pairs.jsonl --output runs/x/model --loss spa
    torchrun --nproc_per_node 8 train.py ...             FSDP2 over 8 GPUs (full fine-tune)
    python train.py ... --lora-rank 16                   one GPU, an 8B model: LoRA

Training keeps float32 master weights; `--mixed-precision` computes in bf16 (FSDP2's policy
under torchrun, autocast in one process). --batch-size is per device: the optimizer batch is
batch-size x grad-accum x world size. The output gets the model (in the starting model's dtype
unless --save-dtype says), tokenizer, chat template, train_config.json, metrics.jsonl (a row
per step) and metrics.svg; while training, checkpoint/ for --resume at any process count.
"""

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints
import common
import distributed
import lora
import metrics_log
import policy_model
import preference_data
import resumable

# ----------------------------------------------------------------------------- the mathematics


def uncertainty_weights(gaps, mean_gap, alpha):
    """w_i = (gap_i / mean_gap)^alpha of Eq. 3, detached. mean_gap runs over every pair of
    the optimizer step; if it is 0 (all gaps zero) every w_i is 1. gaps: (B,) -> (B,)."""
    if mean_gap <= 0:
        return torch.ones_like(gaps)
    return ((gaps / mean_gap) ** alpha).detach()


def preference_losses(
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    weights,
    loss,
    beta,
    gamma,
    reference_chosen_logps=None,
    reference_rejected_logps=None,
):
    """Per-pair losses and rewards (TRL's names).
    policy_chosen_logps, policy_rejected_logps: (B,) summed log pi of the chosen / rejected answer tokens
    chosen_lengths, rejected_lengths:           (B,) their token counts (|y|)
    weights:                                    (B,) w_i (spa); ignored by the other losses
    reference_chosen_logps, ..._rejected_logps: (B,) summed reference log-probs (dpo only)
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,))."""
    if loss in ("spa", "simpo"):  # Eq. 3: length-normalised rewards
        chosen_rewards = beta * policy_chosen_logps / chosen_lengths
        rejected_rewards = beta * policy_rejected_logps / rejected_lengths
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
        return (weights * losses if loss == "spa" else losses), chosen_rewards, rejected_rewards
    if loss == "dpo":
        chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
        return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards
    if loss == "sft":
        return (
            -policy_chosen_logps / chosen_lengths,
            beta * policy_chosen_logps / chosen_lengths,
            beta * policy_rejected_logps / rejected_lengths,
        )
    raise ValueError(f"unknown loss {loss!r}")


# ----------------------------------------------------------------------------- one step, one evaluation


def pair_losses(policy, examples, idx, args, pad_id, mean_gap, ref=None):
    """Eq. 3 (or the --loss variant) on the pairs examples[idx]: a dict of (B,) tensors, loss,
    chosen_rewards, rejected_rewards, chosen_logps, rejected_logps (summed), chosen_lengths,
    rejected_lengths (answer tokens) and w."""
    ex = [examples[i] for i in idx]
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = policy_model.sequence_logps(policy, ex, pad_id)
    gaps = torch.tensor([e["gap"] for e in ex], device=chosen_logps.device)
    w = uncertainty_weights(gaps, mean_gap, args.alpha) if args.loss == "spa" else torch.ones_like(gaps)
    refs = (None, None)
    if args.loss == "dpo" and ref is None:  # LoRA: the reference is the model with its adapters off
        lora.set_enabled(policy, False)
        refs = policy_model.reference_forward(policy, ex, pad_id)
        lora.set_enabled(policy, True)
    elif ref is not None:
        refs = (ref[idx, 0].to(chosen_logps.device), ref[idx, 1].to(chosen_logps.device))
    loss, chosen_rewards, rejected_rewards = preference_losses(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, w, args.loss, args.beta, args.gamma, *refs
    )
    if not torch.isfinite(loss.sum()):
        raise FloatingPointError(
            f"loss is {loss.sum().item()} in pairs {[e['id'] for e in ex]} (lines {[e['line'] for e in ex]})"
        )
    return dict(
        loss=loss,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        w=w,
        sequence_tokens=sum(len(e["chosen"][0]) + len(e["rejected"][0]) for e in ex),
    )


def train_step(policy, examples, micro_batches, args, pad_id, ref=None):
    """Forward and backward over this rank's slices of the micro-batches of one optimizer
    step; gradients are accumulated so that, summed over ranks, they equal one batch holding
    every pair. Eq. 3's mean gap and the loss normalisation run over all pairs of the step on
    every rank (every rank knows the whole plan). A rank whose slice is empty runs one pair
    with weight 0, so every rank makes the same collective calls. Returns this rank's summed
    statistics and the step's global pair count."""
    n_pairs = sum(len(mb) for mb in micro_batches)
    mean_gap = sum(examples[i]["gap"] for mb in micro_batches for i in mb) / n_pairs
    scale = distributed.WORLD / n_pairs  # FSDP averages gradients over ranks; we want the sum / n_pairs
    stats = metrics_log.new_stats()
    for mb in micro_batches:
        mine = distributed.share(mb)
        out = pair_losses(policy, examples, mine or mb[:1], args, pad_id, mean_gap, ref)
        (out["loss"].sum() * scale * (1.0 if mine else 0.0)).backward()
        if mine:
            metrics_log.add_stats(stats, out, n_pairs)
    return stats, n_pairs


@torch.no_grad()
def evaluate_pairs(policy, examples, args, pad_id, ref=None):
    """The held-out pairs through the model without gradients, as TRL's trainers report them:
    eval_loss (Eq. 3's mean over the pairs, the weights' mean gap taken over all of them),
    eval_rewards/chosen, /rejected, /margins, /accuracies (the share with chosen_rewards > rejected_rewards) and
    eval_logps/chosen, /rejected (mean log-prob per answer token). Each rank takes its slice
    of every global micro-batch, as in training."""
    policy.eval()
    n = len(examples)
    mean_gap = sum(e["gap"] for e in examples) / n
    stats, stride = metrics_log.new_stats(), args.batch_size * distributed.WORLD
    for start in range(0, n, stride):
        mb = list(range(start, min(start + stride, n)))
        mine = distributed.share(mb)
        out = pair_losses(policy, examples, mine or mb[:1], args, pad_id, mean_gap, ref)
        if mine:
            metrics_log.add_stats(stats, out, n)
    if hasattr(policy, "reshard"):  # FSDP2 keeps the root's parameters gathered after a no-grad forward
        policy.reshard()
    policy.train()
    s = metrics_log.reduce_stats(stats)
    return {"eval_loss": s["loss"], **metrics_log.trl_metrics(s, n, "eval_")}


def lr_lambda(warmup, total):
    """Linear warm-up, then cosine decay to 0."""

    def f(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


# ----------------------------------------------------------------------------- the loop


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add, count, switch = p.add_argument, common.positive_int, argparse.BooleanOptionalAction
    add(
        "--input",
        required=True,
        help="pairs from pairs.py, or any prompt/chosen/rejected data (JSONL or a JSON "
        "array; strings or conversational messages; gap needed by --loss spa only)",
    )
    add(
        "--eval-input",
        default=None,
        help="held-out pairs, evaluated before the first step, every --eval-every "
        "steps and at the end (eval_loss, eval_rewards/accuracies, ... in metrics.jsonl)",
    )
    add(
        "--eval-every",
        type=common.non_negative_int,
        default=0,
        help="steps between evaluations (default 0: before and after only)",
    )
    add("--output", required=True, help="output model directory")
    add("--model", default=common.DEFAULT_MODEL, help="starting model (default: the embedded one)")
    add("--loss", choices=["spa", "simpo", "dpo", "sft"], default="spa", help="default spa (Eq. 3)")
    add("--beta", type=common.positive, default=None, help="reward scale (default 2.5; 0.1 for dpo)")
    add("--gamma", type=common.non_negative, default=1.375, help="target reward margin (default 1.375)")
    add("--alpha", type=common.non_negative, default=1.0, help="exponent of the uncertainty weights (default 1)")
    add("--lr", type=common.positive, default=1e-6, help="peak learning rate (default 1e-6)")
    add("--warmup-ratio", type=common.fraction, default=0.1, help="share of steps warming up (default 0.1)")
    add("--weight-decay", type=common.non_negative, default=0.0, help="AdamW weight decay (default 0)")
    add("--max-grad-norm", type=common.positive, default=1.0, help="gradient clipping (default 1.0)")
    add("--epochs", type=count, default=1, help="passes over the pairs (default 1)")
    add("--batch-size", type=count, default=4, help="pairs per micro-batch per device (default 4)")
    add("--grad-accum", type=count, default=2, help="micro-batches per optimizer step (default 2)")
    add("--max-length", type=count, default=512, help="tokens per prompt + answer (default 512)")
    add(
        "--head-chunk",
        type=common.non_negative_int,
        default=policy_model.HEAD_CHUNK,
        help="answer positions per pass of the "
        f"vocabulary head, recomputed in backward (default {policy_model.HEAD_CHUNK}; 0 = all at once: more memory)",
    )
    add(
        "--pack",
        action=switch,
        default=None,
        help="lay a micro-batch's sequences end to end in one row, attention "
        "within each: no padding computed (default: cpu_speed.py's choice on the CPU, on; off on a GPU and with "
        "SPA_CPU_SPEED=0: every sequence padded to the longest)",
    )
    add("--gradient-checkpointing", action=switch, default=True, help="recompute activations in backward (default on)")
    add(
        "--mixed-precision",
        choices=["auto", "bf16", "no"],
        default="auto",
        help="bf16 compute over float32 master "
        "weights: auto = bf16 on CUDA, float32 on the CPU; bf16 also runs on the CPU (slowly: for tests)",
    )
    add(
        "--save-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="the saved model's dtype (default auto: the starting model's, as its config says; float32 if none)",
    )
    add("--lora-rank", type=common.non_negative_int, default=0, help="LoRA rank r; 0 = full fine-tune (default 0)")
    add("--lora-alpha", type=common.positive, default=16.0, help="LoRA scale alpha (update x alpha / r; default 16)")
    add(
        "--lora-targets",
        nargs="+",
        default=list(lora.DEFAULT_TARGETS),
        help=f"linear layers given adapters (default: {' '.join(lora.DEFAULT_TARGETS)})",
    )
    add(
        "--save-every", type=common.non_negative_int, default=50, help="checkpoint every N optimizer steps (default 50)"
    )
    add("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    add("--overwrite", action="store_true", help="start again in an output that holds a checkpoint")
    add("--seed", type=common.seed_int, default=0, help="random seed (default 0)")
    add(
        "--report-to",
        choices=["none", "tensorboard", "wandb"],
        default="none",
        help="also log TRL's metric names to TensorBoard (OUT/runs) or Weights & Biases (default none)",
    )
    add("--limit", type=count, default=None, help="only the first N pairs")
    args = p.parse_args(argv)
    if args.beta is None:
        args.beta = 0.1 if args.loss == "dpo" else 2.5
    if args.pack is None:  # packing pays on the CPU, where cpu_speed.py decides it; a GPU pads
        speed = common.cpu_speed_module()
        args.pack = bool(speed and speed.PACK_BY_DEFAULT)
    return args


def load_data(args, tok):
    """The training pairs and the held-out ones (--eval-input, else []), with the drop counts."""
    examples, dropped = preference_data.load_pairs(
        args.input, tok, args.max_length, args.limit, need_gap=args.loss == "spa"
    )
    held_out = (
        preference_data.load_pairs(args.eval_input, tok, args.max_length, need_gap=args.loss == "spa")[0]
        if args.eval_input
        else []
    )
    return examples, held_out, dropped


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output)
    common.seed_everything(args.seed)
    common.refuse_overlap(reads=[args.input, args.eval_input, common.model_folder(args.model)], writes=[out])
    if args.lora_rank:
        policy_model.check_lora_targets(args.model, args.lora_targets)
    tok = common.load_tokenizer(args.model)
    examples, held_out, dropped = load_data(args, tok)
    checkpoints.check_output(out, args)
    lock = resumable.lock(out / "train.lock", out)  # one run per output directory
    try:
        fit(args, out, tok, examples, held_out, dropped)
    finally:
        resumable.release(lock)


def fit(args, out, tok, examples, held_out, dropped):
    """The training loop of an output directory this process holds the lock of."""
    bf16 = args.mixed_precision == "bf16" or (args.mixed_precision == "auto" and common.device().type == "cuda")
    if args.overwrite and distributed.is_main():
        for old in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
            shutil.rmtree(out / old, ignore_errors=True)
        (out / "reference_logps.safetensors").unlink(missing_ok=True)
    distributed.barrier()
    policy = policy_model.build_policy(args, bf16)
    pad_id = tok.pad_token_id
    ref, eval_ref = policy_model.dpo_reference(out, policy, examples, held_out, args, pad_id)
    plan = preference_data.make_plan(
        examples, args.batch_size * distributed.WORLD, args.grad_accum, args.epochs, args.seed
    )
    info = checkpoints.plan_info(args, examples, len(plan))
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=args.lr, weight_decay=args.weight_decay, fused=True)  # one kernel
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(round(args.warmup_ratio * len(plan)), len(plan)))
    start = checkpoints.load_checkpoint(out, policy, opt, sched, info) if args.resume else 0
    metrics = metrics_log.Metrics(out / "metrics.jsonl", start, args.report_to, vars(args))
    zero_gap = sum(e["gap"] == 0 for e in examples)
    n_train = sum(p.numel() for _, p in named)
    common.log(
        f"train: {len(examples)} pairs ({dropped['prompt_too_long']} dropped with a prompt over --max-length, "
        f"{dropped['empty_answer']} with an empty answer, {dropped['identical_after_truncation']} with chosen and "
        f"rejected the same once cut; {dropped['truncated']} kept with an answer cut to --max-length; "
        f"{zero_gap} with gap 0), {len(held_out)} held-out pairs, {len(plan)} steps of {args.batch_size} per device "
        f"x {args.grad_accum} accumulation x {distributed.WORLD} process(es) = "
        f"{args.batch_size * args.grad_accum * distributed.WORLD} pairs; loss {args.loss}, device {common.device()}, "
        f"{'bf16 compute' if bf16 else 'float32'} over float32 master weights{', FSDP2' * distributed.sharded()}, "
        f"{'LoRA r=%d, ' % args.lora_rank if args.lora_rank else ''}{n_train:,} trained parameters",
        file=sys.stderr,
    )
    every = args.eval_every  # evaluate before the first step, every `every` steps and after the last
    evaluate_now = lambda step: held_out and (step in (0, len(plan)) or every and step % every == 0)
    if start == 0 and evaluate_now(0):
        metrics.write({"step": 0, **evaluate_pairs(policy, held_out, args, pad_id, eval_ref)})

    bar = common.progress(range(start, len(plan)), desc="train", unit="step", initial=start, total=len(plan))
    for step in bar:
        t0 = time.time()
        try:
            s, n = train_step(policy, examples, plan[step], args, pad_id, ref)
        except FloatingPointError as e:
            ck = checkpoints.find_checkpoint(out)
            where = f"the last good checkpoint is in {ck}" if ck else "no checkpoint was written yet"
            raise common.InputError(f"training stopped at step {step + 1}: {e}; {where}") from None
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], args.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)  # gradient buffers kept: reallocating them each step fragments the heap
        s = metrics_log.reduce_stats(s)
        dt = time.time() - t0
        row = {
            "step": step + 1,
            "loss": s["loss"],
            **metrics_log.trl_metrics(s, n),
            "weight/mean": s["w_sum"] / n,
            "weight/min": s["w_min"],
            "weight/max": s["w_max"],
            "weight/zero": s["zero_w"],
            "lr": lr,
            "grad_norm": grad_norm,
            "pairs_per_s": n / dt,
            **metrics_log.throughput(s, dt, policy.lm, bool(args.lora_rank), bf16),
        }
        if evaluate_now(step + 1):
            row.update(evaluate_pairs(policy, held_out, args, pad_id, eval_ref))
        metrics.write(row)
        bar.set_postfix(
            loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3f}", acc=f"{row['rewards/accuracies']:.2f}"
        )
        if args.save_every and (step + 1) % args.save_every == 0:
            checkpoints.save_checkpoint(out, policy, opt, sched, step + 1, info)
    facts = dict(
        pairs=len(examples),
        held_out_pairs=len(held_out),
        dropped=dropped,
        zero_gap_pairs=zero_gap,
        steps=len(plan),
        world_size=distributed.WORLD,
        fsdp2=distributed.sharded(),
        mixed_precision_bf16=bf16,
    )
    checkpoints.save_trained(out, policy.lm, tok, args, facts)
    common.log(f"train: {len(plan)} steps on {len(examples)} pairs -> {out}")


if __name__ == "__main__":
    common.run_main(main)
