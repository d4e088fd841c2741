"""torch.distributed in one place: set-up from torchrun's variables, a rank's share, reductions.

`python STAGE.py` is one process (rank 0 of 1: no process group, every helper a no-op);
`torchrun --nproc_per_node N STAGE.py` starts N, each reading RANK, WORLD_SIZE and
LOCAL_RANK. NCCL joins them on CUDA (one GPU per process, LOCAL_RANK), gloo on the CPU,
so the tests run the same code here. Rank 0 alone prints and shows progress (common.log,
common.progress) and writes the files every rank shares; `is_main()` guards each such write
where it happens (resumable.py's merge, checkpoints.py, metrics_log.py, evaluate.py's report,
train.py's final model).

Two timeouts. A rank can wait long at a barrier: one with no prompts left waits while the
others load an 8B model and generate, and every rank waits while rank 0 writes the trained
model; the default process group's timeout is therefore SPA_DIST_TIMEOUT seconds (default
7200). Once training steps run, a rank waits for the others only as long as one forward or
backward takes: FSDP2 shards over step_mesh(), a group of the same ranks whose timeout is
SPA_STEP_TIMEOUT seconds (default 600), so a real hang in a step surfaces in minutes.

SPA_PROCESS_GROUP=1 forms the process group even for one process (NCCL on one GPU, FSDP2
sharding over it): what dev/gpu_check.py runs, so that the sharded path meets a GPU before
a user's 8-GPU run does.
"""

import datetime
import functools
import os

import torch
import torch.distributed as dist

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))


DEFAULT_TIMEOUT_S = 7200
DEFAULT_STEP_TIMEOUT_S = 600


def seconds(variable, text):
    """A timeout read from the environment variable `variable` (its text): a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise ValueError(f"{variable} must be a positive number of seconds, got {text!r}")
    return datetime.timedelta(seconds=value)


def timeout():
    """How long a collective (a barrier included) may wait: $SPA_DIST_TIMEOUT seconds, default 7200."""
    return seconds("SPA_DIST_TIMEOUT", os.environ.get("SPA_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S)))


def step_timeout():
    """How long a collective in a training step may wait: $SPA_STEP_TIMEOUT seconds, default 600."""
    return seconds("SPA_STEP_TIMEOUT", os.environ.get("SPA_STEP_TIMEOUT", str(DEFAULT_STEP_TIMEOUT_S)))


def setup():
    """Join the process group when started by torchrun with several processes, or with
    SPA_PROCESS_GROUP=1 (idempotent): NCCL on CUDA, one GPU per process, gloo on the CPU,
    with timeout(); step_timeout() is checked here too, before any work. Returns (rank, world)."""
    step_timeout()
    forced = os.environ.get("SPA_PROCESS_GROUP") == "1"
    if forced and "MASTER_ADDR" not in os.environ:
        raise ValueError("SPA_PROCESS_GROUP=1 forms a process group under torchrun: torchrun --nproc_per_node 1 ...")
    if (WORLD > 1 or forced) and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(LOCAL_RANK)
            dist.init_process_group("nccl", timeout=timeout(), device_id=device())
        else:
            dist.init_process_group("gloo", timeout=timeout())
    return RANK, WORLD


def sharded():
    """Whether models are sharded with FSDP2: a process group was formed."""
    return dist.is_initialized()


@functools.cache
def step_mesh():
    """The ranks as FSDP2's one-dimensional mesh, over a group whose collectives time out after
    SPA_STEP_TIMEOUT seconds (default 600): training steps, not loading or writing."""
    from torch.distributed.device_mesh import DeviceMesh

    group = dist.new_group(timeout=step_timeout())
    return DeviceMesh.from_group(group, device().type)


def load_from_main(module, full):
    """Fill a sharded module built on the meta device from rank 0's whole model `full` (None
    on the other ranks): each rank allocates its shards, rank 0 broadcasts the weights one
    tensor at a time (torch.distributed.checkpoint's set_model_state_dict), so no other rank
    ever holds more than its shards and one tensor. Buffers kept out of state dicts (rotary
    frequencies) are computed by the model's code on rank 0 and broadcast too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module.to_empty(device=device())
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full.state_dict() if is_main() else {}, options=options)
    in_state = set(module.state_dict())
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name not in in_state:
                if is_main():
                    buf.copy_(full.get_buffer(name))
                dist.broadcast(buf, src=0)


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
