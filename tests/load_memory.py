"""A test helper: build train.py's model (policy_model.build_policy) in this process, one
process or under torchrun, and record how far the host memory grew while it did.

    python tests/load_memory.py MODEL OUT          (or under torchrun)

Writes OUT/rank{R}.json: {"grown": bytes} (the peak resident set while building minus the
resident set before; Linux's VmHWM, reset first through /proc/self/clear_refs), and from
rank 0 OUT/weights.safetensors: the built model's parameters and buffers, gathered.
"""

import json
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed.checkpoint.state_dict  # noqa: E402,F401  (imported before measuring: code is not weights)
import transformers.models.llama.modeling_llama  # noqa: E402,F401
from safetensors.torch import save_file  # noqa: E402

import checkpoints  # noqa: E402
import distributed  # noqa: E402
import policy_model  # noqa: E402


def kib(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


model, out = sys.argv[1], Path(sys.argv[2])
distributed.setup()
args = Namespace(
    model=model, lora_rank=0, lora_alpha=16.0, lora_targets=[], gradient_checkpointing=True, head_chunk=0, pack=False
)
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the present resident set
before = kib("VmRSS")
policy = policy_model.build_policy(args, bf16=False)
grown = kib("VmHWM") - before
state = checkpoints.full_state_dict(policy.lm)
buffers = {n: b.detach().cpu() for n, b in policy.lm.named_buffers() if n not in state}
(out / f"rank{distributed.RANK}.json").write_text(json.dumps({"grown": grown}))
if distributed.is_main():
    tensors, seen = {}, set()
    for k, v in {**state, **buffers}.items():
        if id(v) not in seen:  # tied tensors once
            seen.add(id(v))
            tensors[k] = v.clone()
    save_file(tensors, out / "weights.safetensors")
distributed.cleanup()
