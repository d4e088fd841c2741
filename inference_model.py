"""The model as generation and judging run it: the same weights and the same mathematics as
the plain transformers model, laid out for speed (issue 15). policy_model.py is its twin for
training.

  attention   grouped-query attention without copying keys and values: the queries of the
              heads that share a key/value head are stacked into one query block, so SDPA
              reads each cached key once (transformers copies every key and value to every
              query head whenever there is a mask, i.e. in every padded prefill); in
              decoding, only the filled part of the static cache is read, not its empty tail
  linears     on the CPU, every projection (the decoder's and the vocabulary head) runs as a
              oneDNN product over a weight re-laid out once at load, instead of F.linear's
              MKL product (faster at every shape measured but the largest, see PackedLinear)
  shared head in decoding on the CPU, the head a batch's prompts begin with (instructions and
              constitution, prefilled once and copied to every row) is read once for all rows:
              every row's query attends to row 0's copy of the head in one pass, to its own
              keys in a second, and the two softmaxes are merged by their log-sum-exps (exact
              to float rounding). Each decoding step reads the whole KV cache from memory:
              266 of refine's ~700 cached tokens are its head (refine's attention 10.7 -> 8.7 s;
              in prefill the split measured slower, 8.4 -> 10.8 s in score.py, and so did a
              24-token head in decoding, sample.py's system prompt at 256 rows: 534 / 551 ->
              481 / 535 tokens/s; hence heads of MIN_SHARED_HEAD tokens or more, in decoding)
  memory      on the CPU with glibc, the process keeps the memory it frees for its next
              allocations (keep_freed_memory): each decoding step's 50 MB logits copy and
              the static cache then reuse pages instead of faulting fresh ones in

SPA_PLAIN_INFERENCE=1 turns all four off (the plain transformers model), for comparisons;
tests/test_speed_paths.py checks that both give the same text and judge scores.
"""
import contextlib
import ctypes
import os
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION = "spa_inference"  # the attention implementation registered below
_shared_head = 0  # keys every row has in common at its start (set by shared_head)
MIN_SHARED_HEAD = 128  # shorter heads are read with the rest: two kernel calls cost more than they save


def plain():
    return os.environ.get("SPA_PLAIN_INFERENCE") == "1"


def filled_length(mask):
    """Key positions up to the last one any query may attend to: (B, 1, T, S) bool -> int."""
    cols = mask.any(dim=2).any(dim=0)[0]  # (S,)
    return int(cols.nonzero()[-1]) + 1 if cols.any() else mask.shape[-1]


@contextlib.contextmanager
def shared_head(n):
    """Within it, every row's first n keys and values are the same and no query masks them
    (generation.head_and_tails lays batches out so)."""
    global _shared_head
    old, _shared_head = _shared_head, n
    try:
        yield
    finally:
        _shared_head = old


def head_then_tail_attention(q, key, value, mask, head, scale):
    """softmax(q [K_head | K_tail]^T) [V_head | V_tail] from two partial attentions, merged:
    out = w_h o_h + w_t o_t with w = exp(lse_part - logaddexp(lse_h, lse_t)).
    q (B, KV, M, D); key/value (B, KV, S, D) whose first `head` positions are the same in
    every row and attended by every query; mask (B, 1, M, S) bool. The head is read once
    (row 0's copy), by all B*M query rows at once. Returns (B, KV, M, D)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # SDPA's CPU kernel, with its lse
    B, KV, M, D = q.shape
    o_h, lse_h = flash(q.transpose(0, 1).reshape(1, KV, B * M, D), key[:1, :, :head], value[:1, :, :head], scale=scale)
    o_h, lse_h = o_h.reshape(KV, B, M, D).transpose(0, 1), lse_h.reshape(KV, B, M).transpose(0, 1)
    tail = mask[..., head:]
    bias = torch.zeros(tail.shape, dtype=q.dtype, device=q.device).masked_fill_(~tail, float("-inf"))  # the kernel wants a float mask
    o_t, lse_t = flash(q, key[:, :, head:], value[:, :, head:], attn_mask=bias, scale=scale)
    lse_t = lse_t.masked_fill(~tail.any(-1), float("-inf"))  # a query with no tail key (padding): the kernel says 0
    lse = torch.logaddexp(lse_h, lse_t)
    return o_h * (lse_h - lse).exp()[..., None] + o_t * (lse_t - lse).exp()[..., None]


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Scaled dot-product attention, grouped-query heads handled without repeat_kv.
    query (B, H, T, D), key/value (B, KV, S, D), attention_mask (B or 1, 1, T, S) bool or None.
    Query head h reads key/value head h // G (G = H / KV), as transformers' repeat_kv has it.
    Returns ((B, T, H, D), None), as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    G = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or attention_mask.dtype != torch.bool or G == 1:  # causal without a mask: as is
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    B, H, T, D = query.shape
    S = filled_length(attention_mask) if T == 1 else key.shape[2]  # decoding: the static cache's filled part
    key, value, mask = key[:, :, :S], value[:, :, :S], attention_mask[..., :S]
    q = query.reshape(B, H // G, G * T, D)  # row g*T + t of block k: head k*G + g at position t
    if T > 1:
        mask = mask[:, :, None].expand(mask.shape[0], 1, G, T, S).reshape(mask.shape[0], 1, G * T, S)
    head = _shared_head
    if head >= MIN_SHARED_HEAD and T == 1 and B > 1 and S > head and q.device.type == "cpu" and not dropout:
        out = head_then_tail_attention(q, key, value, mask, head, scaling)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout)
    return out.reshape(B, H, T, D).transpose(1, 2).contiguous(), None


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight oneDNN has re-laid out once for its own matrix
    product (what torch.compile's CPU freezing does): (..., in) -> (..., out), the same
    numbers as the nn.Linear it replaces to float rounding. Measured on this project's 2-core
    CPU against F.linear (MKL), float32, the 135M model's shapes, cold weights
    (bench/inference_kernels.py, one run): decoder projections 0.9-1.7x at 8-256 rows
    (decoding), 1.0-1.4x at 2k-16k rows (prefill); the 49k-row vocabulary head 1.7-2.6x."""

    def __init__(self, linear):
        super().__init__()
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def pack_linears(model):
    """Every bias-free nn.Linear of the model (the decoder's projections and the vocabulary
    head) replaced by a PackedLinear; the head keeps its tie to the input embeddings' weight
    only in value (the model is not trained or saved after this)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(module, child_name, PackedLinear(child))


def keep_freed_memory():
    """Have glibc keep freed memory in the process: no block gets a mapping of its own
    (M_MMAP_MAX = 0), and the heap's free top is handed back only above 2 GiB
    (M_TRIM_THRESHOLD, a C int), as demo.sh's GLIBC_TUNABLES does (4 GB there). On this
    project's virtual machine a page handed back costs a fault when touched again (README,
    issue 15: 32 prompts x 8 samples x 64 tokens, 328.8 -> 351.4 tokens/s, medians of 3
    alternated runs). Not for train.py: there it cost 15% more peak memory. A GLIBC_TUNABLES that sets malloc options wins."""
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD, bytes


def prepare(model):
    """Switch a loaded inference model (eval mode, no gradients) to the paths above."""
    if plain():
        return model
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(ATTENTION, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # the boolean masks transformers builds for SDPA
    model.set_attn_implementation(ATTENTION)
    if model.device.type == "cpu":
        keep_freed_memory()
        if torch.backends.mkldnn.is_available() and model.dtype == torch.float32:
            pack_linears(model)
    return model
