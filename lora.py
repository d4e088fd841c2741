"""LoRA (Hu et al., 2021), written by hand: y = x W^T + (alpha / r) x A^T B^T with W frozen.

A (r, in) starts small and random, B (out, r) at zero, so training starts exactly at the
base model. Only A and B are trained (in float32; the frozen base may be bf16). Saving
merges them, W + (alpha / r) B A, so the saved model is a plain one with the base's keys.
With the adapters switched off the model is the base again: DPO's reference, for free.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight (and bias) with a trainable low-rank update. Keeps the
    linear's parameter names (`weight`, `bias`), so the base's keys are unchanged."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale, self.enabled = alpha / rank, True
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=linear.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + self.scale * F.linear(F.linear(x, a), b)


def apply(model, rank, alpha, targets=DEFAULT_TARGETS):
    """Replace every nn.Linear whose name ends with one of `targets` by a LoRALinear and
    freeze everything else. Returns the number of layers adapted."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no linear layer named {', '.join(targets)} in the model")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha))
    return len(names)


def set_enabled(model, enabled):
    """Switch every adapter on or off (off: the base model, e.g. DPO's reference)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.enabled = enabled


def merge(state_dict, scale):
    """A full state dict of a LoRA model -> the base's keys with W + scale B A (float32)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        prefix = key[: -len("weight")]
        if key.endswith(".weight") and prefix + "lora_A" in state_dict:
            a, b = state_dict[prefix + "lora_A"].float(), state_dict[prefix + "lora_B"].float()
            value = value.float() + scale * (b @ a)
        out[key] = value
    return out


def peft_adapter(state_dict, rank, alpha, targets, base_model):
    """The adapters as PEFT writes them, without PEFT: (adapter_config.json's dict, the tensors of
    adapter_model.safetensors), so `PeftModel.from_pretrained(base, OUT/adapter)` and vLLM's LoRA
    serving load them onto the base (A and B as PEFT names them, float32)."""
    tensors = {
        f"base_model.model.{key[: -len('lora_A')]}lora_{side}.weight": state_dict[key[: -len("A")] + side].float()
        for key in state_dict
        if key.endswith(".lora_A")
        for side in ("A", "B")
    }
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "modules_to_save": None,
    }
    return config, tensors
