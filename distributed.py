"""torch.distributed in one place: set-up from torchrun's variables, a rank's share, reductions.

`python STAGE.py` is one process (rank 0 of 1: no process group, every helper a no-op);
`torchrun --nproc_per_node N STAGE.py` starts N, each reading RANK, WORLD_SIZE and
LOCAL_RANK. NCCL joins them on CUDA (one GPU per process, LOCAL_RANK), gloo on the CPU,
so the tests run the same code here. Rank 0 alone prints and shows progress (common.log,
common.progress) and writes the files every rank shares; `is_main()` guards each such write
where it happens (resumable.py's merge, checkpoints.py, metrics_log.py, evaluate.py's report,
train.py's final model).

A rank can wait long at a barrier: one with no prompts left waits while the others load
an 8B model and generate, and every rank waits while rank 0 gathers and writes the trained
model. The process group's timeout is therefore SPA_DIST_TIMEOUT seconds (default 7200, two
hours), not NCCL's 10 minutes.
"""

import datetime
import os

import torch
import torch.distributed as dist

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))


DEFAULT_TIMEOUT_S = 7200


def timeout():
    """How long a collective (a barrier included) may wait: $SPA_DIST_TIMEOUT seconds, default 7200."""
    text = os.environ.get("SPA_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise ValueError(f"SPA_DIST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def setup():
    """Join the process group when started by torchrun (idempotent): NCCL on CUDA, one GPU per
    process, gloo on the CPU, with timeout(). Returns (rank, world)."""
    if WORLD > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(LOCAL_RANK)
            dist.init_process_group("nccl", timeout=timeout(), device_id=device())
        else:
            dist.init_process_group("gloo", timeout=timeout())
    return RANK, WORLD


def is_main():
    return RANK == 0


def device():
    """This process's device: its own GPU (LOCAL_RANK) on CUDA, else the CPU."""
    return torch.device("cuda", LOCAL_RANK) if torch.cuda.is_available() else torch.device("cpu")


def share(items):
    """This rank's fixed share of a list: items rank, rank + world, ... (balanced, and the
    same on every rank as long as `items` is)."""
    return items[RANK::WORLD]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values):
    """Element-wise sum over ranks of a list of floats (a single all-reduce)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce(value, op="sum"):
    """One float reduced over ranks: op 'sum', 'min' or 'max'."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.item()


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...]: any picklable object, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def first_error(message):
    """Every rank passes its error message or None; every rank gets the first rank's error
    (or None). Checks made on one rank (the lock, the resume settings) stop all ranks alike."""
    return next((m for m in all_gather(message) if m), None)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
