"""train.py's log: the statistics a step sums (named as TRL's trainers name them), metrics.jsonl,
a row per optimizer step, and its picture metrics.svg (loss, reward margins and accuracies per
step, train and held-out, and the throughput; an SVG written directly)."""

import json
import math

import torch

import common
import distributed
import jsonl
import markup


def new_stats():
    keys = (
        "loss",
        "chosen_rewards",
        "rejected_rewards",
        "correct",
        "chosen_logps",
        "rejected_logps",
        "tokens",
        "sequence_tokens",
        "zero_w",
        "w_sum",
    )
    return dict(dict.fromkeys(keys, 0.0), w_min=math.inf, w_max=-math.inf)


def add_stats(stats, out, n_pairs):
    """Add one micro-batch's sums to stats (the loss already divided by the step's n_pairs)."""
    stats["loss"] += out["loss"].sum().item() / n_pairs
    stats["chosen_rewards"] += out["chosen_rewards"].sum().item()
    stats["rejected_rewards"] += out["rejected_rewards"].sum().item()
    stats["correct"] += (out["chosen_rewards"] > out["rejected_rewards"]).sum().item()
    stats["chosen_logps"] += (out["chosen_logps"] / out["chosen_lengths"]).sum().item()
    stats["rejected_logps"] += (out["rejected_logps"] / out["rejected_lengths"]).sum().item()
    stats["tokens"] += (out["chosen_lengths"].sum() + out["rejected_lengths"].sum()).item()
    stats["sequence_tokens"] += out["sequence_tokens"]
    stats["zero_w"] += (out["w"] == 0).sum().item()
    stats["w_sum"] += out["w"].sum().item()
    stats.update(w_min=min(stats["w_min"], out["w"].min().item()), w_max=max(stats["w_max"], out["w"].max().item()))


def reduce_stats(stats):
    """Sum the statistics over ranks (min and max for the weights' extremes)."""
    keys = [k for k in stats if k not in ("w_min", "w_max")]
    out = dict(zip(keys, distributed.all_sum([stats[k] for k in keys])))
    out.update(w_min=distributed.all_reduce(stats["w_min"], "min"), w_max=distributed.all_reduce(stats["w_max"], "max"))
    return out


def trl_metrics(s, n, prefix=""):
    """The summed statistics of n pairs as TRL's trainers name them (prefix "eval_" for held-out pairs)."""
    return {
        f"{prefix}rewards/chosen": s["chosen_rewards"] / n,
        f"{prefix}rewards/rejected": s["rejected_rewards"] / n,
        f"{prefix}rewards/accuracies": s["correct"] / n,
        f"{prefix}rewards/margins": (s["chosen_rewards"] - s["rejected_rewards"]) / n,
        f"{prefix}logps/chosen": s["chosen_logps"] / n,
        f"{prefix}logps/rejected": s["rejected_logps"] / n,
    }


# one device's dense bf16 peak in FLOP/s (the makers' data sheets, without sparsity), by the
# first name that occurs in torch.cuda.get_device_name(); a device not listed gets no MFU
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def flops_per_step(model, sequence_tokens, answer_tokens, frozen_base):
    """The matrix products' FLOPs of one training step, the usual estimate (forward 2 per
    parameter and token, backward 4; 2 with a frozen base, whose weights get no gradient):
    the decoder at every token, the vocabulary head only at answer tokens (policy_model applies
    it there). The input embedding is a lookup, attention's own products and the recomputation
    of gradient checkpointing are left out: MFU, not hardware utilisation."""
    head = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - head.numel() - (0 if embedding is head else embedding.numel())
    per = 4 if frozen_base else 6
    return per * body * sequence_tokens + per * head.numel() * answer_tokens


def throughput(s, seconds, model, frozen_base, bf16):
    """A step's summed statistics s -> tokens_per_s (every token the model read: prompts and
    answers, chosen and rejected); on CUDA also mfu (flops_per_step / seconds over the devices'
    bf16 peak, in bf16 on a listed device) and peak_memory_gib (the ranks' largest peak so far)."""
    row = {"tokens_per_s": s["sequence_tokens"] / seconds}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
        if peak and bf16:
            step_flops = flops_per_step(model, s["sequence_tokens"], s["tokens"], frozen_base)
            row["mfu"] = step_flops / seconds / (peak * distributed.WORLD)
        row["peak_memory_gib"] = distributed.all_reduce(torch.cuda.max_memory_allocated() / 2**30, "max")
    return row


PANELS = (
    ("loss", "loss", "eval_loss"),
    ("reward margin", "rewards/margins", "eval_rewards/margins"),
    ("reward accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
    ("chosen reward", "rewards/chosen", "eval_rewards/chosen"),
    ("rejected reward", "rewards/rejected", "eval_rewards/rejected"),
)
THROUGHPUT_PANELS = (  # drawn where the rows hold them (mfu and peak memory: CUDA only)
    ("tokens/s", "tokens_per_s", None),
    ("MFU", "mfu", None),
    ("peak memory (GiB)", "peak_memory_gib", None),
)
COLOURS = {"train": "#264653", "eval": "#e76f51"}


def series(rows, key):
    """[(step, value)] of the rows that hold a finite `key`."""
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def panel(title, lines, x0, y_top, width, height, max_step):
    """One chart: lines {name: [(step, value)]}, each a polyline with a circle per point."""
    values = [v for pts in lines.values() for _, v in pts] or [0.0]
    lo, hi = min(values), max(values)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
    L, R, T, B = x0 + 50, x0 + width - 10, y_top + 20, y_top + height - 25
    x = lambda s: L + (s / max(max_step, 1)) * (R - L)
    y = lambda v: B - (v - lo) / (hi - lo) * (B - T)
    out = [
        f'<text x="{L}" y="{y_top + 12}" font-weight="bold">{markup.xml(title)}</text>',
        f'<rect x="{L}" y="{T}" width="{R - L}" height="{B - T}" fill="white" stroke="#999"/>',
        f'<text x="{L - 4}" y="{T + 4}" text-anchor="end">{hi:.3g}</text>',
        f'<text x="{L - 4}" y="{B + 4}" text-anchor="end">{lo:.3g}</text>',
        f'<text x="{R}" y="{B + 16}" text-anchor="end">step {max_step}</text>',
    ]
    for name, pts in lines.items():
        if not pts:
            continue
        c = COLOURS[name]
        attributes = f'data-panel="{markup.xml(title)}" data-name="{markup.xml(name)}" stroke="{c}" fill="{c}"'
        out.append(f'<g class="series" {attributes}>')
        out.append('<polyline fill="none" points="' + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts) + '"/>')
        out += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5"/>' for s, v in pts]
        out.append("</g>")
    return out


def training_svg(rows, height=260):
    """The panels side by side for metrics rows (train.py's metrics.jsonl)."""
    max_step = max((r["step"] for r in rows), default=0)
    panels = PANELS + tuple(p for p in THROUGHPUT_PANELS if series(rows, p[1]))
    w = 300
    width = w * len(panels)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20}" font-family="sans-serif" '
        'font-size="11">',
        f'<text x="10" y="{height + 12}" fill="{COLOURS["train"]}">train (each step)</text>',
        f'<text x="140" y="{height + 12}" fill="{COLOURS["eval"]}">held-out (--eval-input)</text>',
    ]
    for k, (title, train_key, eval_key) in enumerate(panels):
        out += panel(
            title, {"train": series(rows, train_key), "eval": series(rows, eval_key)}, k * w, 0, w, height, max_step
        )
    return "\n".join(out + ["</svg>"]) + "\n"


class Metrics:
    """metrics.jsonl (a row per optimizer step, eval_* where held-out pairs were evaluated; a row
    of step 0 for the evaluation before training) and its picture metrics.svg, rank 0 only. On
    --resume the rows after the checkpoint's step are dropped."""

    def __init__(self, path, start, report_to="none", config=None):
        self.path = path
        self.rows = []  # what metrics.jsonl holds, drawn again after each row
        self.tracker = tracker(report_to, path.parent, config or {}) if distributed.is_main() else None
        if distributed.is_main():
            if start and path.exists():  # a torn last line (a kill while appending) is left out
                text = path.read_text()
                self.rows = [
                    r for r in map(json.loads, text[: text.rfind("\n") + 1].splitlines()) if r["step"] <= start
                ]
            jsonl.write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row):
        if distributed.is_main():
            with jsonl.open_own(self.path, "ab") as f:
                f.write((json.dumps(row) + "\n").encode())
            self.rows.append(row)
            jsonl.write_atomic(self.path.with_suffix(".svg"), training_svg(self.rows))
            if self.tracker:
                self.tracker(trl_names(row), row["step"])


def trl_names(row):
    """A metrics row under the names TRL's trainers log (train/rewards/chosen, eval/loss, ...)."""
    return {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in row.items() if k != "step"}


def tracker(report_to, out, config):
    """--report-to: a function (metrics, step) that logs to TensorBoard (event files in
    OUT/runs) or Weights & Biases, beside metrics.jsonl; None for "none". Each package is
    imported only when asked for, and an error names it when it is absent."""
    if report_to == "none":
        return None
    try:
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(out / "runs"))

            def log(metrics, step):
                for k, v in metrics.items():
                    writer.add_scalar(k, v, step)
                writer.flush()

            return log
        import wandb

        run = wandb.init(project="spa", dir=str(out), config=config)
        return lambda metrics, step: run.log(metrics, step=step)
    except ImportError as e:  # torch.utils.tensorboard raises a plain ImportError without tensorboard
        package = "tensorboard" if report_to == "tensorboard" else "wandb"
        raise common.InputError(
            f"--report-to {report_to} needs the package {package} (pip install {package}); "
            f"it is not a requirement ({e})"
        ) from None
