"""train.py's files: resumable checkpoints and the final model, with one process or many.

A checkpoint is data, never pickled code: OUT/checkpoint/ holds one safetensors file per
rank (that rank's shards of the trained parameters, of AdamW's state, and its RNG state)
and trainer_state.json (step, scheduler, the plan it belongs to), written last. Sharded
files cost each rank only its share of memory and disk (an 8B full fine-tune on 8 GPUs:
16 GB each, against 128 GB gathered on one rank), at the price that --resume needs the same
world size: the plan check says so. A new checkpoint is written to checkpoint.tmp and
renamed over the old one; a crash between the renames leaves a complete checkpoint.old or
checkpoint.tmp, which loading falls back to.
"""

import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
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
)  # the pairs themselves are checked by their digest


def plan_info(args, examples, n_steps):
    """What a checkpoint must match to be resumed: the pairs, the starting model's files, how
    the CPU path runs, and every flag that shapes the steps (all but MAY_CHANGE_ON_RESUME)."""
    digest = hashlib.sha1(json.dumps([(e["chosen"], e["rejected"], e["gap"]) for e in examples]).encode()).hexdigest()
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in MAY_CHANGE_ON_RESUME}
    return {
        "pairs": digest,
        "steps": n_steps,
        "world_size": distributed.WORLD,
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


def local(t):
    """This rank's shard of a (possibly FSDP-sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def rank_file(directory, rank):
    return directory / f"rank{rank}.safetensors"


def save_checkpoint(out, named_params, opt, sched, step, plan_info):
    """Every rank writes its shards; rank 0 writes trainer_state.json and swaps the folders."""
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
    tensors = {"rng.torch": torch.get_rng_state()}
    for name, p in named_params:
        tensors[f"model.{name}"] = local(p.detach()).contiguous().cpu()
        for k, v in opt.state.get(p, {}).items():
            tensors[f"optim.{name}.{k}"] = local(v).contiguous().cpu()
    save_file(tensors, rank_file(tmp, distributed.RANK))
    distributed.barrier()
    if distributed.is_main():
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
        state = {
            "step": step,
            "world_size": distributed.WORLD,
            "plan": plan_info,
            "scheduler": sched.state_dict(),
            "param_groups": groups,
        }
        jsonl.write_atomic(tmp / STATE, json.dumps(state) + "\n")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def find_checkpoint(out):
    """The newest complete checkpoint folder (trainer_state.json and every rank's file), or None."""
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        d = out / name
        if (d / STATE).exists():
            world = json.loads((d / STATE).read_text())["world_size"]
            if all(rank_file(d, r).exists() for r in range(world)):
                return d
    return None


def load_checkpoint(out, named_params, opt, sched, plan_info):
    """Restore the newest complete checkpoint; refuses one made for another plan or world
    size (naming what differs). Returns the step to continue at."""
    ck = find_checkpoint(out)
    if ck is None:
        raise common.InputError(f"{out / 'checkpoint'}: no checkpoint to resume from")
    state = json.loads((ck / STATE).read_text())
    if state["world_size"] != distributed.WORLD:
        raise common.InputError(
            f"{ck}: written by {state['world_size']} process(es), now {distributed.WORLD}; "
            "resume with the same number of processes"
        )
    differ = [k for k in plan_info if plan_info[k] != state["plan"].get(k)]
    if differ:
        was = ", ".join(f"{k} {state['plan'].get(k)!r} (now {plan_info[k]!r})" for k in differ)
        raise common.InputError(
            f"{ck}: the checkpoint belongs to another plan: {was}; resume with the same "
            "pairs and settings, or start again with --overwrite"
        )
    saved = load_file(rank_file(ck, distributed.RANK))
    with torch.no_grad():
        for name, p in named_params:
            local(p).copy_(saved[f"model.{name}"])
    opt.load_state_dict(optimizer_state(saved, named_params, opt, state["param_groups"]))
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(saved["rng.torch"])
    return state["step"]


def optimizer_state(saved, named_params, opt, param_groups):
    """AdamW's state as torch's Optimizer.load_state_dict takes it, from a rank's file: each
    parameter's moments (this rank's shards placed in tensors shaped like the parameter, DTensors
    under FSDP2) and its step, which load_state_dict puts where the optimizer wants it (on the
    parameter's device for the fused kernel). named_params: opt's parameters in its order;
    param_groups: the saved hyperparameters of opt's groups (learning rate included)."""
    state = {}
    for i, (name, p) in enumerate(named_params):
        prefix = f"optim.{name}."
        entry = {}
        for key in (k for k in saved if k.startswith(prefix)):
            value = saved[key]
            if value.dim():  # a moment: this rank's shard of a tensor shaped like the parameter
                full = torch.zeros_like(p)
                local(full).copy_(value)
                value = full
            entry[key[len(prefix) :]] = value
        if entry:
            state[i] = entry
    ids = iter(range(len(named_params)))
    groups = [dict(kept, params=[next(ids) for _ in g["params"]]) for kept, g in zip(param_groups, opt.param_groups)]
    return {"state": state, "param_groups": groups}


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
    lm.save_pretrained(tmp, state_dict=state_dict)
    saved = json.loads((tmp / "config.json").read_text())  # save_pretrained writes the float32 master weights'
    saved["dtype"] = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")  # dtype: the state's
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
