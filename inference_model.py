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
  shared head in decoding on the CPU, a prefix that rows share is read once: the head a batch's
              prompts begin with (instructions and constitution, prefilled once and copied to
              every row), or a prompt copied to its samples' rows. Each run of rows' queries
              attend to the run's first row's copy in one pass, every row's to its own keys in
              a second, and the two softmaxes are merged by their log-sum-exps (exact to float
              rounding); the other rows' copies are not even written (generation.prefilled_cache).
              Refine's 266-token head: attention 10.7 -> 8.7 s; a prompt read once for its 8
              samples: 32 x 8 x 64 tokens 339.8 -> 363.8 tokens/s, and 400.2 -> 423.3 without
              writing the copies (README, issue 15, seventh round). In prefill the split measured
              slower (score.py 8.4 -> 10.8 s), so did a 24-token head for all rows in decoding;
              hence MIN_SHARED_HEAD and MIN_SHARED_PREFIX
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
_shared_prefix = (0, 0)  # (keys, rows): see shared_prefix
MIN_SHARED_HEAD = 128  # a prefix all rows share: shorter ones are read with the rest (two kernel calls cost more)
MIN_SHARED_PREFIX = 32  # a prefix shared by runs of a prompt's samples: shorter ones are read with the rest


def plain():
    return os.environ.get("SPA_PLAIN_INFERENCE") == "1"


def filled_length(mask):
    """Key positions up to the last one any query may attend to: (B, 1, T, S) bool -> int."""
    cols = mask.any(dim=2).any(dim=0)[0]  # (S,)
    return int(cols.nonzero()[-1]) + 1 if cols.any() else mask.shape[-1]


@contextlib.contextmanager
def shared_prefix(keys, rows):
    """Within it, in each run of `rows` consecutive batch rows, the first `keys` keys, values
    and mask columns are the same: the head all prompts of a batch share (rows = the batch;
    generation.head_and_tails lays batches out so), or a prompt copied to its samples' rows."""
    global _shared_prefix
    old, _shared_prefix = _shared_prefix, (keys, rows)
    try:
        yield
    finally:
        _shared_prefix = old


def reads_prefix_once(keys, rows, batch, device):
    """Whether decoding reads a prefix of `keys` positions, the same in each run of `rows` of
    `batch` rows, from each run's first row only (head_then_tail_attention): then the other
    rows' copies of it are never read, and generation.prefilled_cache does not write them."""
    return (device.type == "cpu" and not plain() and 1 < rows <= batch and batch % rows == 0
            and keys >= (MIN_SHARED_PREFIX if rows < batch else MIN_SHARED_HEAD))


def head_then_tail_attention(q, key, value, mask, head, scale, rows=None):
    """softmax(q [K_head | K_tail]^T) [V_head | V_tail] from two partial attentions, merged:
    out = w_h o_h + w_t o_t with w = exp(lse_part - logaddexp(lse_h, lse_t)).
    q (B, KV, M, D); key/value (B, KV, S, D) whose first `head` positions, and the mask's,
    are the same in each run of `rows` rows (None: all B); mask (B, 1, 1 or M, S) bool. The head
    is read once per run (its first row's copy), by the run's rows' queries stacked, n*M of
    them. Returns (B, KV, M, D)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # SDPA's CPU kernel, with its lse
    B, KV, M, D = q.shape
    n = rows or B
    runs = q.reshape(B // n, n, KV, M, D).transpose(1, 2).reshape(B // n, KV, n * M, D)
    hm = mask[::n, :, :1, :head]  # the head's mask is the same for every query of a run
    o_h, lse_h = flash(runs, key[::n, :, :head], value[::n, :, :head], attn_mask=float_mask(hm, q.dtype), scale=scale)
    o_h = o_h.reshape(B // n, KV, n, M, D).transpose(1, 2).reshape(B, KV, M, D)
    lse_h = lse_h.reshape(B // n, KV, n, M).transpose(1, 2).reshape(B, KV, M)
    lse_h = lse_h.masked_fill(~hm.any(-1).repeat_interleave(n, 0), float("-inf"))  # no head key: the kernel says 0
    tail = mask[..., head:]
    o_t, lse_t = flash(q, key[:, :, head:], value[:, :, head:], attn_mask=float_mask(tail, q.dtype), scale=scale)
    lse_t = lse_t.masked_fill(~tail.any(-1), float("-inf"))  # a query with no tail key (padding)
    lse = torch.logaddexp(lse_h, lse_t)
    return o_h * (lse_h - lse).exp()[..., None] + o_t * (lse_t - lse).exp()[..., None]


def float_mask(mask, dtype):
    """0 where a bool mask attends, -inf elsewhere: the form SDPA's CPU kernel takes."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Scaled dot-product attention, grouped-query heads handled without repeat_kv.
    query (B, H, T, D), key/value (B, KV, S, D), attention_mask (B or 1, 1, T, S) bool or None.
    Query head h reads key/value head h // G (G = H / KV), as transformers' repeat_kv has it.
    Returns ((B, T, H, D), None), as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    G = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or attention_mask.dtype != torch.bool:  # causal without a mask: as is
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    B, H, T, D = query.shape
    S = filled_length(attention_mask) if T == 1 else key.shape[2]  # decoding: the static cache's filled part
    key, value, mask = key[:, :, :S], value[:, :, :S], attention_mask[..., :S]
    q = query.reshape(B, H // G, G * T, D)  # row g*T + t of block k: head k*G + g at position t
    if T > 1:
        mask = mask[:, :, None].expand(mask.shape[0], 1, G, T, S).reshape(mask.shape[0], 1, G * T, S)
    head, rows = _shared_prefix
    if T == 1 and S > head and not dropout and reads_prefix_once(head, rows, B, q.device):
        out = head_then_tail_attention(q, key, value, mask, head, scaling, rows)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout)
    return out.reshape(B, H, T, D).transpose(1, 2).contiguous(), None


def onednn_product(a, b):
    """a @ b^T on oneDNN: a (..., k), b (n, k), either may be a transposed view, or b a weight
    re-laid out for it (PackedLinear) -> (..., n). train.py multiplies with it too (policy_model)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


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
        return onednn_product(x, self.packed)


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
