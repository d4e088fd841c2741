"""train.py's files: resumable checkpoints and the final model, with one process or many.

A checkpoint is torch.distributed.checkpoint's (DCP) folder, data and never pickled code:
every rank writes its own shards of the trained parameters and of AdamW's state, with the
RNG state, and a .metadata file that maps the shards onto the whole tensors; then rank 0
writes trainer_state.json (step, scheduler, the plan it belongs to), last. No rank gathers
the model (an 8B full fine-tune on 8 GPUs: 12 GB a rank, not 96 GB on one), and loading
reshards: a run saved by 8 processes resumes with 4, or with 1, as long as the optimizer
batch (batch size x accumulation x processes) is the same, which makes the steps the same
(preference_data.make_plan). A new checkpoint is written to checkpoint.tmp and renamed over
the old one; a crash between the renames leaves a complete checkpoint.old or checkpoint.tmp,
which loading falls back to.
"""

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

import common
import distributed
import jsonl
import lora

STATE = "trainer_state.json"
MAY_CHANGE_ON_RESUME = (
    "input",
    "limit",
    "output",
    "resume",
    "overwrite",
    "save_every",
    "eval_input",
    "eval_every",
    "batch_size",
    "grad_accum",
)  # the pairs themselves are checked by their digest, the batches by the optimizer batch


def plan_info(args, examples, n_steps):
    """What a checkpoint must match to be resumed: the pairs, the starting model's files, how
    the CPU path runs, and every flag that shapes the steps (all but MAY_CHANGE_ON_RESUME)."""
    digest = hashlib.sha1(json.dumps([(e["chosen"], e["rejected"], e["gap"]) for e in examples]).encode()).hexdigest()
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in MAY_CHANGE_ON_RESUME}
    return {
        "pairs": digest,
        "steps": n_steps,
        "optimizer_batch": args.batch_size * args.grad_accum * distributed.WORLD,
        "weights": common.model_fingerprint(args.model),
        "cpu_speed": common.cpu_speed_module() is not None,
        **flags,
    }


# what train.py writes in its output folder under fixed names (the model's own files are renamed
# into place, which replaces a link instead of writing through it)
WRITTEN = ("train.lock", "metrics.jsonl", "checkpoint.tmp", "final.tmp", "reference_logps.safetensors")


def check_output(out, args):
    """Refuse to train over a finished model, over a checkpoint without --resume/--overwrite, or
    where a link stands at a name train.py writes (jsonl.refuse_link)."""
    if out.exists() and not out.is_dir():
        raise common.InputError(f"{out}: --output is a file; it must be a directory")
    for name in WRITTEN:
        jsonl.refuse_link(out / name)
    if (out / "config.json").exists() and not args.resume:
        raise common.InputError(f"{out}: already holds a trained model; choose another --output")
    if not args.resume and not args.overwrite and find_checkpoint(out):
        raise common.InputError(f"{out}: holds a checkpoint; continue it with --resume or start again with --overwrite")


def training_state(policy, opt):
    """What a checkpoint holds, as DCP saves and loads it: the trained parameters (frozen ones
    left out: a LoRA run saves its adapters) and AdamW's state, each rank its shards, by name."""
    model, optim = get_state_dict(policy, opt, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model, "optim": optim, "rng": torch.get_rng_state()}


@contextlib.contextmanager
def one_process_quiet():
    """DCP warns, on every save and load without a process group, that it assumes one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(out, policy, opt, sched, step, plan_info):
    """Every rank writes its shards (DCP); rank 0 writes trainer_state.json and swaps the folders."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    error = None
    if distributed.is_main():
        try:
            jsonl.fresh_dir(tmp)
        except common.InputError as e:
            error = str(e)
    error = distributed.first_error(error)
    if error:
        raise common.InputError(error)
    t0 = time.time()
    with one_process_quiet():
        dcp.save(training_state(policy, opt), checkpoint_id=tmp, no_dist=not distributed.sharded())
    distributed.barrier()
    if distributed.is_main():
        state = {"step": step, "world_size": distributed.WORLD, "plan": plan_info, "scheduler": sched.state_dict()}
        jsonl.write_atomic(tmp / STATE, json.dumps(state) + "\n")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    common.log(f"checkpoint: step {step} written in {time.time() - t0:.1f} s -> {final}", file=sys.stderr)


def find_checkpoint(out):
    """The newest complete checkpoint folder (DCP's .metadata and trainer_state.json), or None."""
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        d = out / name
        if (d / STATE).exists() and (d / ".metadata").exists():
            return d
    return None


def load_checkpoint(out, policy, opt, sched, plan_info):
    """Restore the newest complete checkpoint, resharded to this run's processes; refuses one
    made for another plan (naming what differs). Returns the step to continue at."""
    ck = find_checkpoint(out)
    if ck is None:
        raise common.InputError(f"{out / 'checkpoint'}: no checkpoint to resume from")
    state = json.loads((ck / STATE).read_text())
    differ = [k for k in plan_info if plan_info[k] != state["plan"].get(k)]
    if differ:
        was = ", ".join(f"{k} {state['plan'].get(k)!r} (now {plan_info[k]!r})" for k in differ)
        raise common.InputError(
            f"{ck}: the checkpoint belongs to another plan: {was}; resume with the same "
            "pairs and settings (the same optimizer batch: batch size x accumulation x processes), "
            "or start again with --overwrite"
        )
    t0, saved = time.time(), training_state(policy, opt)
    with one_process_quiet():  # DCP checks that every tensor asked for is in the checkpoint
        dcp.load(saved, checkpoint_id=ck, no_dist=not distributed.sharded())
    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen weights: from the model's files
    set_state_dict(policy, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"], options=options)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(saved["rng"])
    common.log(f"checkpoint: step {state['step']} loaded in {time.time() - t0:.1f} s <- {ck}", file=sys.stderr)
    return state["step"]


def full_state_dict(module):
    """The module's state dict with every shard gathered (one tensor at a time), on the CPU
    of rank 0 (the other ranks get {}). Tied tensors stay one tensor under both keys."""
    out, seen = {}, {}
    for key, value in module.state_dict(keep_vars=True).items():  # parameters themselves: tied ones are one object
        if id(value) not in seen:
            full = value.full_tensor() if isinstance(value, DTensor) else value
            seen[id(value)] = full.detach().cpu() if distributed.is_main() else None
        if distributed.is_main():
            out[key] = seen[id(value)]
    return out


def save_dtype(flag, model_name):
    """--save-dtype: auto is the starting model's dtype as its config says (what users load and
    serve: bf16 for Llama-3.1-8B-Instruct, not the float32 master weights), float32 if none."""
    if flag != "auto":
        return getattr(torch, flag)
    named = getattr(common.model_config(model_name), "dtype", None)
    named = getattr(torch, named) if isinstance(named, str) else named
    return named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32


def save_trained(out, lm, tok, args, facts):
    """The trained model, once training ends: gathered to rank 0, LoRA's adapters merged (and
    written as PEFT's files too), cast to --save-dtype, saved with train_config.json (the flags
    and `facts`); the checkpoint it supersedes removed."""
    state = full_state_dict(lm)
    if distributed.is_main():
        adapter = None
        if args.lora_rank:
            adapter = lora.peft_adapter(state, args.lora_rank, args.lora_alpha, args.lora_targets, args.model)
            state = lora.merge(state, args.lora_alpha / args.lora_rank)
        dtype, cast = save_dtype(args.save_dtype, args.model), {}  # tied tensors stay one tensor
        state = {k: cast.setdefault(id(v), v.to(dtype)) for k, v in state.items()}
        save_final(out, lm, state, tok, dict(vars(args), **facts), adapter)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    distributed.barrier()


def save_final(out, lm, state_dict, tok, config, adapter=None):
    """Rank 0: save_pretrained into a temporary folder, then move the files in with
    config.json last: the output only looks like a model once every weight file is there.
    adapter: (adapter_config, tensors) of a LoRA run, written as PEFT does into adapter/."""
    tmp = jsonl.fresh_dir(out / "final.tmp")
    lm.config.use_cache = True
    dtype = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
    lm.save_pretrained(tmp, state_dict=dict(state_dict))  # (it empties the dict it is given)
    saved = json.loads((tmp / "config.json").read_text())  # save_pretrained writes the float32 master weights'
    saved["dtype"] = dtype  # dtype: the state's
    jsonl.write_atomic(tmp / "config.json", json.dumps(saved, indent=2) + "\n")
    tok.save_pretrained(tmp)
    if adapter:
        (tmp / "adapter").mkdir()
        jsonl.write_atomic(tmp / "adapter" / "adapter_config.json", json.dumps(adapter[0], indent=2) + "\n")
        save_file(adapter[1], tmp / "adapter" / "adapter_model.safetensors")
    jsonl.write_atomic(tmp / "train_config.json", json.dumps(config, indent=2) + "\n")
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out / f.name)
    tmp.rmdir()
