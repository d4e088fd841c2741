"""Speed on the CPU, and only there. Every trick in this file paid on the CPU this project
is developed on (docs/BENCHMARKS.md has the figures); none runs on a GPU. It has two entry
points, each called from one place, and only when the device is the CPU:

  prepare_inference(model)   from common.load_for_inference (generation and judging)
  prepare_training(model)    from policy_model.build_policy (training, float32)

Without this file (or with SPA_CPU_SPEED=0) every stage runs the plain transformers model,
slower; tests/test_cpu_speed.py checks that each trick gives what the plain path gives.

For inference:
  products   every bias-free linear layer (the decoder's projections, the vocabulary head)
             runs as a oneDNN product over a weight laid out once for it (ReorderedLinear),
             instead of F.linear's MKL product
  prefill    generation.model_inputs hands a batch here (prefill): the prompt prefix its rows
             share (the chat template's system prompt, a judge's instructions and
             constitution) runs once, then once per run of rows the part they share beyond it
             (a question its candidates' judge prompts repeat, a system prompt its samples
             repeat), then each row's tail, a few rows at a time, into a static cache that
             generate (or the judge's one forward) goes on from
  attention  grouped-query attention without copying keys and values to every query head,
             reading only the filled part of the static cache when decoding
  memory     glibc keeps the memory the process frees, so each step's buffers reuse pages
             instead of faulting fresh ones in
For training:
  products   each linear layer's forward and both gradients as oneDNN products
  memory     as for inference (faster steps for a higher peak, docs/BENCHMARKS.md)
  packing    train.py --pack's default (PACK_BY_DEFAULT): a micro-batch's sequences end to end
             in one row, no padding computed (policy_model.py holds the packed layout)
"""

import ctypes
import os
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION = "spa_cpu"  # the attention implementation registered by prepare_inference
PREFILL_TOKENS = 2048  # prompt tokens per prefill pass (rows x padded tail); 0 = every row at once
MIN_SHARED = 8  # tokens rows share beyond a batch's prefix for prefill to run them once
PACK_BY_DEFAULT = True  # train.py --pack on the CPU (docs/BENCHMARKS.md); the plain path pads


def prepare_inference(model):
    """Switch a loaded model (eval mode, float32) to the paths above. Returns the model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    keep_freed_memory()
    if torch.backends.mkldnn.is_available() and model.dtype == torch.float32:
        reorder_linears(model)
    AttentionInterface.register(ATTENTION, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # the boolean masks transformers builds for SDPA
    model.set_attn_implementation(ATTENTION)
    return model


def prepared(model):
    """Whether prepare_inference laid this model out (generation.cpu_path asks)."""
    return getattr(model.config, "_attn_implementation", None) == ATTENTION


def prepare_training(model):
    """Every bias-free linear layer's products on oneDNN (float32 only), freed memory kept.
    Returns the model."""
    keep_freed_memory()
    if torch.backends.mkldnn.is_available():
        for m in model.modules():
            if type(m) is nn.Linear and m.bias is None:
                m.__class__ = OneDnnLinear
    return model


# ----------------------------------------------------------------------------- oneDNN products


def onednn_product(a, b):
    """a @ b^T on oneDNN: a (..., k), b (n, k) (either may be a transposed view, or b a weight
    laid out by ReorderedLinear) -> (..., n)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class ReorderedLinear(nn.Module):
    """A bias-free linear layer whose weight oneDNN has laid out once for its own product (what
    torch.compile's CPU freezing does): (..., in) -> (..., out), nn.Linear's numbers to float
    rounding. For inference only (the laid-out weight is not a parameter)."""

    def __init__(self, linear):
        super().__init__()
        self.out_features = linear.out_features
        self.reordered = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)

    def forward(self, x):
        return onednn_product(x, self.reordered)


def reorder_linears(model):
    """Every bias-free nn.Linear of the model replaced by a ReorderedLinear (a tied vocabulary
    head keeps its tie to the embeddings in value only: the model is not trained after this)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(module, name, ReorderedLinear(child))


class OneDnnLinearFunction(torch.autograd.Function):
    """y = x W^T with dx = dy W and dW = dy^T x, each one oneDNN product (F.linear's products,
    summed in another order)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return onednn_product(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = onednn_product(dy, weight.t()) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = onednn_product(dy.reshape(-1, dy.shape[-1]).t(), x.reshape(-1, x.shape[-1]).t())
        return dx, dw


class OneDnnLinear(nn.Linear):
    """nn.Linear (no bias) whose products run on oneDNN in float32 on the CPU, and F.linear
    otherwise (bf16, autocast). The same parameters and names: checkpoints see an nn.Linear."""

    def forward(self, x):
        if (
            x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        ):
            return OneDnnLinearFunction.apply(x, self.weight)
        return super().forward(x)


# ----------------------------------------------------------------------------- memory


def keep_freed_memory():
    """glibc keeps freed memory in the process: no block gets a mapping of its own
    (M_MMAP_MAX 0) and the heap's free top is handed back only above 2 GiB (M_TRIM_THRESHOLD).
    A GLIBC_TUNABLES that sets malloc options wins."""
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD, bytes


# ----------------------------------------------------------------------------- attention


def filled_length(mask):
    """Key positions up to the last one any query may attend to: (B, 1, T, S) bool -> int."""
    cols = mask.any(dim=2).any(dim=0)[0]  # (S,)
    return int(cols.nonzero()[-1]) + 1 if cols.any() else mask.shape[-1]


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Scaled dot-product attention with grouped-query heads handled without repeat_kv: the G
    query heads that share a key/value head are stacked into one query block. query
    (B, H, T, D), key/value (B, KV, S, D), attention_mask (B or 1, 1, T, S) bool or None.
    Decoding (T = 1) reads only the static cache's filled part. Returns ((B, T, H, D), None),
    as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or attention_mask.dtype != torch.bool:  # causal without a mask: as is
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    G = getattr(module, "num_key_value_groups", 1)
    B, H, T, D = query.shape
    S = filled_length(attention_mask) if T == 1 else key.shape[2]
    key, value, mask = key[:, :, :S], value[:, :, :S], attention_mask[..., :S]
    q = query.reshape(B, H // G, G * T, D)  # row g*T + t of block k: head k*G + g at position t
    if T > 1:
        mask = mask[:, :, None].expand(mask.shape[0], 1, G, T, S).reshape(mask.shape[0], 1, G * T, S)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout)
    return out.reshape(B, H, T, D).transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- prefill


def common_prefix_length(seqs, keep=1):
    """Length of the token prefix all sequences share, leaving each at least keep + 1 tokens."""
    n = max(min(len(s) for s in seqs) - keep - 1, 0)
    first = seqs[0]
    for k in range(n):
        if any(s[k] != first[k] for s in seqs):
            return k
    return n


def shared_parts(seqs, keep=1):
    """Two levels of sharing among one batch's prompts: the prefix every row shares, and, for
    runs of rows that share at least MIN_SHARED tokens more (a judge prompt's candidates of one
    question, the samples under one system prompt), that part. Runs are found in the rows'
    sorted order (rows that begin alike side by side, wherever they are in the batch) and
    numbered by their first row. Returns the prefix's length, each row's run and each run's
    shared length after the prefix (0 for a row alone)."""
    prefix = common_prefix_length(seqs, keep) if len(seqs) > 1 else 0
    runs = []
    for i in sorted(range(len(seqs)), key=seqs.__getitem__):
        if runs and common_prefix_length([seqs[runs[-1][0]], seqs[i]], keep) - prefix >= MIN_SHARED:
            runs[-1].append(i)
        else:
            runs.append([i])
    runs.sort(key=min)
    group = [0] * len(seqs)
    for g, r in enumerate(runs):
        for i in r:
            group[i] = g
    shared = [common_prefix_length([seqs[i] for i in r], keep) - prefix if len(r) > 1 else 0 for r in runs]
    return prefix, group, shared


def prefix_and_tails(seqs, pad_id, keep=1):
    """One batch's prompts laid out for one prefill (shared_parts): the prefix they all share
    once, then each run's shared part, then each row's own tail, each part padded on its left.
    Returns ids (B, T), mask (B, T), the prefix's length, each row's run, and the width of
    the runs' parts (columns prefix .. prefix + width)."""
    prefix, group, shared = shared_parts(seqs, keep)
    width = max(shared)
    own = [len(s) - prefix - shared[g] for s, g in zip(seqs, group)]
    T = prefix + width + max(own)
    ids, mask = [], []
    for s, g, n in zip(seqs, group, own):
        q, gap = shared[g], T - prefix - width - n  # this row's run part, and the pads before its tail
        ids.append(s[:prefix] + [pad_id] * (width - q) + s[prefix : prefix + q] + [pad_id] * gap + s[prefix + q :])
        mask.append([1] * prefix + [0] * (width - q) + [1] * q + [0] * gap + [1] * n)
    return torch.tensor(ids), torch.tensor(mask), prefix, group, width


def positions(mask):
    """Position ids of padded rows: (B, T) 0/1 mask -> (B, T), counting real tokens (a pad gets
    a neighbour's position; it is masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def prefix_cache(model, prefix):
    """The keys and values of `prefix` (token ids, one row) in a DynamicCache of its own. The
    last prefix stays on the model, and the next batch runs only what its own prefix does not
    share with it (a judge's instructions and constitution recur in every batch; causal
    attention: a shared beginning's keys and values are the same)."""
    from transformers import DynamicCache

    kept = getattr(model, "_spa_prefix", None) or ([], None)
    n = min(len(kept[0]), len(prefix))
    done = next((i for i in range(n) if kept[0][i] != prefix[i]), n)
    cache = DynamicCache([(k[:, :, :done], v[:, :, :done]) for k, v in kept[1]] if done else None, config=model.config)
    if done < len(prefix):
        ids = torch.tensor([prefix[done:]], device=model.device)
        pos = torch.arange(done, len(prefix), device=model.device)[None]
        model.get_decoder()(input_ids=ids, position_ids=pos, cache=cache, use_cache=True)
    if prefix:  # DynamicCache's updates concatenate: these tensors are never written again
        model._spa_prefix = (prefix, [(kv.keys, kv.values) for kv in cache.layers])
    return cache


def shared_cache(model, ids, mask, pos, prefix, width, group):
    """The keys and values that rows laid out by prefix_and_tails take before their own tails:
    the first `prefix` tokens, the same in every row, run once (prefix_cache); then each run's part (`width`
    columns after the prefix; `group`: each row's run) once for the run, from its first row.
    Returns a DynamicCache with one row per run (one row in all without runs) and each row's
    run as a tensor."""

    decoder, head = model.get_decoder(), prefix + width
    base = prefix_cache(model, ids[0, :prefix].tolist())
    run = torch.zeros(len(ids), dtype=torch.long) if group is None or not width else torch.as_tensor(group)
    if width:
        first = [run.tolist().index(g) for g in range(int(run.max()) + 1)]
        if prefix:
            base.batch_repeat_interleave(len(first))
        decoder(
            input_ids=ids[first, prefix:head],
            position_ids=pos[first, prefix:head],
            attention_mask=mask[first, :head],
            cache=base,
            use_cache=True,
        )
    return base, run


def tails_pass(model, ids, mask, pos, base, run, part, head, keep):
    """One decoder pass over the tails of rows `part` (all but each row's last `keep` tokens),
    after the first `head` columns' keys and values in `base` (shared_cache). Columns from
    `head` that are padding in every row of the pass are skipped. Returns the pass's
    DynamicCache (its rows' head columns, then the columns it ran) and the first column run."""
    from transformers import DynamicCache

    lead = head + int((mask[part, head:-keep].sum(0) == 0).sum())
    mine = run[part]  # the shared keys and values, one copy per row of the pass
    done = DynamicCache([(kv.keys[mine], kv.values[mine]) for kv in base.layers] if head else None, config=model.config)
    model.get_decoder()(
        input_ids=ids[part, lead:-keep],
        position_ids=pos[part, lead:-keep],
        cache=done,
        use_cache=True,
        attention_mask=torch.cat([mask[part, :head], mask[part, lead:-keep]], 1),
    )
    return done, lead


def prefilled_cache(model, ids, mask, prefix, room, chunk_tokens=None, keep=1, group=None, width=0):
    """Run every prompt but its last `keep` tokens through the decoder into a static cache of
    `room` places more, for generate to go on from, laid out as prefix_and_tails lays it: the
    shared keys and values once (shared_cache), then the tails a few rows at a time (about
    chunk_tokens tokens a pass, each pass padded only to its own longest tail: small
    activations, few page faults), their keys and values written straight into the static
    cache's rows. The vocabulary head does not run (no logits are needed).
    chunk_tokens: None = PREFILL_TOKENS, 0 = every row in one pass."""
    from transformers import StaticCache

    pos, (B, T), head = positions(mask), ids.shape, prefix + width
    base, run = shared_cache(model, ids, mask, pos, prefix, width, group)
    chunk_tokens = PREFILL_TOKENS if chunk_tokens is None else chunk_tokens
    rows = max(1, chunk_tokens // (T - head)) if chunk_tokens else B
    cache = StaticCache(config=model.config, max_cache_len=T + room)
    for s in range(0, B, rows):
        part = slice(s, s + rows)
        done, lead = tails_pass(model, ids, mask, pos, base, run, part, head, keep)
        for layer, kv in zip(cache.layers, done.layers):
            if not layer.is_initialized:  # zeros (B, KV, T + max_new_tokens, D)
                layer.lazy_initialization(
                    kv.keys[:1].expand(B, *kv.keys.shape[1:]), kv.values[:1].expand(B, *kv.values.shape[1:])
                )
            for full, new in ((layer.keys, kv.keys), (layer.values, kv.values)):
                full[part, :, :head] = new[:, :, :head]
                full[part, :, lead : T - keep] = new[:, :, head:]  # between head and lead: zeros, masked
    for layer in cache.layers:
        layer.cumulative_length.add_(T - keep)
    return cache


@torch.no_grad()
def prefill(model, input_ids, attention_mask, keep, room):
    """generation.model_inputs on a prepared model: a batch's left-padded prompts laid out by
    prefix_and_tails, all but the last `keep` tokens prefilled into a cache. For generate
    (room > 0) a static cache with `room` places more (prefilled_cache); for one forward
    (room = 0, a judge's rating) the cache of one pass over every row, and the columns that
    are padding in every row dropped. Returns generate's (or the forward's) inputs:
    input_ids and attention_mask of the cache's width plus `keep`, and the cache."""
    input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
    seqs = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
    pads = input_ids[attention_mask == 0]
    ids, mask, prefix, group, width = prefix_and_tails(seqs, int(pads[0]) if len(pads) else 0, keep)
    ids, mask = ids.to(model.device), mask.to(model.device)
    if room:
        cache = prefilled_cache(model, ids, mask, prefix, room, keep=keep, group=group, width=width)
        return {"input_ids": ids, "attention_mask": mask, "cache": cache}
    pos, head = positions(mask), prefix + width
    base, run = shared_cache(model, ids, mask, pos, prefix, width, group)
    cache, lead = tails_pass(model, ids, mask, pos, base, run, slice(None), head, keep)
    cols = torch.cat([torch.arange(head), torch.arange(lead, ids.shape[1])]).to(ids.device)
    return {"input_ids": ids[:, cols], "attention_mask": mask[:, cols], "cache": cache}
