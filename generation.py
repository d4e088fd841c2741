"""Batched chat generation with plain `model.generate` and its KV cache.

Prompts are sorted by length, left-padded and sent many rows per call; every row draws its
own random numbers from a generator seeded by (seed, the prompt's key, the row's index), so
a sample depends on neither the batch it lands in nor the number of processes.
"""
import copy
import hashlib

import torch

import common
import inference_model


def chat_text(tok, messages, add_generation_prompt=True):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def user_turn(prompt, system=None):
    """A one-turn conversation; system=None keeps the chat template's own default."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def row_seed(*parts):
    """A 63-bit seed from its parts (the seed, a prompt's id, a candidate's index), the same
    in every process and on every machine (no Python hash randomisation)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class InverseCdfSampler:
    """A logits processor that draws the next token itself, by inverse CDF: one uniform
    number per row and step, read from `uniforms` (rows, max_new_tokens), which the caller
    draws from each row's own generator. torch.multinomial, which generate's sampling mode
    uses, draws noise over the whole vocabulary and took a fifth of a CPU decode step at 128
    rows (measured). Each row has its own temperature (0 = greedy) and an optional top-p.
    It returns the probabilities with +inf at the drawn token, so generate runs in greedy mode
    and keeps that token."""

    BLOCK = 1024  # the CDF is found in two levels: block sums, then within one block

    def __init__(self, temperatures, top_p, uniforms):
        self.t, self.top_p, self.u, self.step = temperatures, top_p, uniforms, 0

    def __call__(self, input_ids, scores):
        t = self.t.to(scores.device)
        u = self.u[:, self.step].to(scores.device)
        self.step += 1
        greedy = scores.argmax(-1) if (t == 0).any() else None
        # unnormalised probabilities exp((s - max) / t), in place over generate's float32 copy of
        # the logits (a fresh (rows, V) tensor a step cost page faults); greedy rows are set below
        w = scores.float()
        w = w.sub_(w.max(-1, keepdim=True).values).div_(t.clamp(min=1e-6)[:, None]).exp_()
        if self.top_p < 1:  # keep the smallest set of tokens whose mass reaches top_p
            w, order = w.sort(-1, descending=True)
            w = w.masked_fill(w.cumsum(-1) - w >= self.top_p * w.sum(-1, keepdim=True), 0.0)
            pick = order.gather(1, inverse_cdf(w, u, self.BLOCK)[:, None])[:, 0]
        else:
            pick = inverse_cdf(w, u, self.BLOCK)
        if greedy is not None:
            pick = torch.where(t > 0, pick, greedy)
        return w.scatter_(1, pick[:, None], float("inf"))


def inverse_cdf(w, u, block):
    """The token i with cdf(i - 1) < u * total <= cdf(i) in each row of unnormalised
    probabilities w (rows, V), u (rows,) in [0, 1). The cumulative sum runs over block sums,
    then inside the one block that holds the answer: two short scans instead of one over
    the whole vocabulary (a single-threaded pass: 19 ms a step at 256 rows, measured).
    Returns (rows,) token ids."""
    R, V = w.shape
    blocks = (torch.nn.functional.pad(w, (0, -V % block)) if V % block else w).view(R, -1, block)
    sums = blocks.sum(-1)                                        # (R, n_blocks)
    cdf = sums.cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    b = torch.searchsorted(cdf, target).clamp(max=cdf.shape[1] - 1)  # (R, 1)
    rest = target - (cdf.gather(1, b) - sums.gather(1, b))         # mass to cover inside block b
    inner = blocks[torch.arange(R, device=w.device), b[:, 0]].cumsum(-1)  # (R, block)
    j = torch.searchsorted(inner, rest).clamp(max=block - 1)
    return (b * block + j)[:, 0].clamp(max=V - 1)


def positions(mask, offset=0):
    """Position ids for padded rows: (B, T) 0/1 mask -> (B, T), counting real tokens from
    `offset` (a pad, at the left or between head and tail, gets a neighbour's position; it
    is masked anyway)."""
    return offset + (mask.cumsum(-1) - 1).clamp(min=0)


def common_prefix_length(seqs):
    """Length of the token prefix all sequences share, leaving each at least two tokens."""
    n = min(len(s) for s in seqs) - 2
    first = seqs[0]
    for k in range(max(n, 0)):
        if any(s[k] != first[k] for s in seqs):
            return k
    return max(n, 0)


def head_and_tails(seqs, pad_id, share_head=True):
    """Lay out a batch's prompts for one prefill: the head they all share (instructions, a
    constitution, a system prompt) once, then each tail padded on its left, between head
    and tail. Returns ids (B, T), mask (B, T) and the head's length (0 if share_head=False:
    plain left padding)."""
    head = common_prefix_length(seqs) if share_head and len(seqs) > 1 else 0
    T = max(len(s) for s in seqs) - head
    ids = [s[:head] + [pad_id] * (T + head - len(s)) + s[head:] for s in seqs]
    mask = [[1] * head + [0] * (T + head - len(s)) + [1] * (len(s) - head) for s in seqs]
    return torch.tensor(ids), torch.tensor(mask), head


PREFILL_TOKENS = 2048  # prompt tokens per prefill pass (rows x padded tail); 0 = all rows at once


def repeated(cache, n):
    """A copy of a one-row cache (the batch's shared head) for n rows."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out


def static_layer_init(layer, rows, keys, values, make):
    """Give a static cache layer its keys and values, (rows, H, max_cache_len, D) shaped after
    `keys`/`values`, made by `make`: torch.zeros, or torch.empty for what is written before
    it is read (on the CPU untouched pages are never faulted in)."""
    layer.lazy_initialization(keys[:1, :, :1], values[:1, :, :1])  # the layer's attributes, for one row
    layer.batch_size = rows
    layer.keys, layer.values = (make((rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in (layer.keys, layer.values))


def prefilled_cache(model, ids, mask, head, num_return, max_new_tokens, chunk_tokens=None, read_once=(0, 1)):
    """Run each prompt (all but its last token) through the model once and write its keys and
    values num_return times into a static cache, so the samples of one prompt share one
    prefill (on the CPU a chat prompt costs about as much as a 64-token answer, measured).
    The first `head` tokens, the same in every row, run once for the whole batch; the
    vocabulary head does not run (HF's forward would project every prompt position). The
    tails run a few rows at a time (about chunk_tokens tokens a pass), each group padded
    only to its own longest tail: activations stay small (measured on the CPU: 42 refine
    prompts at once spent a third of their time faulting in and masking 100 MB tensors).
    Each group's keys and values go straight into the static cache's rows: no full-size copy
    in between (fresh memory costs page faults on the CPU).
    chunk_tokens: None = PREFILL_TOKENS, 0 = all rows in one pass.
    read_once (keys, rows): decoding reads the first `keys` positions of each run of `rows`
    cache rows from the run's first row only (inference_model.reads_prefix_once); the other
    rows' copies of them are neither written nor zeroed (memory never touched costs nothing)."""
    from transformers import DynamicCache, StaticCache
    pos, decoder = positions(mask), model.get_decoder()  # the decoder alone: no logits are needed here
    B, T = ids.shape
    shared = DynamicCache(config=model.config)
    if head:
        decoder(input_ids=ids[:1, :head], position_ids=pos[:1, :head], cache=shared, use_cache=True)
    chunk_tokens = PREFILL_TOKENS if chunk_tokens is None else chunk_tokens
    rows = max(1, chunk_tokens // (T - head)) if chunk_tokens else B
    cache = StaticCache(config=model.config, max_cache_len=T + max_new_tokens)
    once, per_run = read_once[0], max(read_once[1] // num_return, 1)  # prompts per run of rows
    for s in range(0, B, rows):
        part = slice(s, s + rows)
        lead = head + int((mask[part, head:-1].sum(0) == 0).sum())  # columns that are padding in every row
        done = repeated(shared, len(ids[part])) if head else DynamicCache(config=model.config)
        decoder(input_ids=ids[part, lead:-1], position_ids=pos[part, lead:-1], cache=done, use_cache=True,
                attention_mask=torch.cat([mask[part, :head], mask[part, lead:-1]], 1))
        for layer, kv in zip(cache.layers, done.layers):
            if not layer.is_initialized:  # (B * num_return, H, T + max_new_tokens, D), zeros unless read_once
                static_layer_init(layer, B * num_return, kv.keys, kv.values, torch.empty if once else torch.zeros)
            for full, new in ((layer.keys, kv.keys), (layer.values, kv.values)):
                # this group's prompts, each copied to its num_return rows: head, zero pads up to `lead`, tail;
                # a region in the prefix read once goes to the runs' first rows only
                dest, new = full.view(B, num_return, *full.shape[1:])[part], new[:, None]  # (rows, num_return, H, ., D)
                first = slice(-s % per_run, None, per_run)
                for lo, hi, cols in ((0, head, slice(0, head)), (head, lead, None), (lead, T - 1, slice(head, None))):
                    d, n = (dest[first, :1], new[first]) if lo < once else (dest, new)
                    d[:, :, :, lo:hi] = 0 if cols is None else n[:, :, :, cols]
    for layer in cache.layers:
        layer.cumulative_length.add_(T - 1)
    return cache


def check_context(lengths, max_new_tokens, context, keys):
    """Refuse prompts that, with the answer budget, do not fit the model's context window.
    lengths: each prompt's token count (from the batch's own attention mask)."""
    over = [k for k, n in zip(keys, lengths) if n + max_new_tokens > context]
    if over:
        raise common.InputError(f"{len(over)} prompt(s) do not fit the model's context of {context} tokens with "
                                f"{max_new_tokens} new tokens: ids {', '.join(map(str, over[:10]))}")


def truncate_prompts(tok, records, systems, max_new_tokens, context):
    """--truncate-prompts: cut each prompt that, under the longest of `systems` and with the
    answer budget, would not fit the context window, keeping its head. Returns (records,
    number cut); a cut record says so in `prompt_truncated`."""
    overhead = max(len(tok(chat_text(tok, user_turn("", s)), add_special_tokens=False)["input_ids"]) for s in systems)
    room = context - max_new_tokens - overhead
    if room < 1:
        raise common.InputError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                                f"context of {context} tokens")
    out, cut = [], 0
    for r in records:
        ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) > room:
            r, cut = dict(r, prompt=tok.decode(ids[:room]), prompt_truncated=True), cut + 1
        out.append(r)
    return out, cut


@torch.no_grad()
def generate(model, tok, conversations, *, max_new_tokens, temperature=0.0, top_p=1.0, num_return=1,
             batch_size=8, seed=0, keys=None, stats=None, share_head=True):
    """Answer each conversation num_return times with plain `model.generate` and its KV
    cache (static, prefilled once per prompt; the head the batch's prompts share prefilled
    once, unless share_head=False). Prompts are sorted by length and sent batch_size at a
    time (times num_return rows), padded on the left of what differs. Row j of conversation i
    draws its random numbers from a generator seeded with row_seed(seed, keys[i], j): keys default to
    the conversations' positions; pass the prompts' ids so samples depend on nothing else.
    temperature: one float, or one per conversation (0 = greedy).
    Returns a list (input order) of lists of num_return strings. If `stats` is a dict, its
    'tokens' entry counts the generated tokens (up to and including end of turn)."""
    from transformers import GenerationConfig, LogitsProcessorList
    texts = [chat_text(tok, c) for c in conversations]
    keys = list(range(len(texts))) if keys is None else keys
    context = getattr(model.config, "max_position_embeddings", 1 << 30)
    temps = temperature if isinstance(temperature, (list, tuple)) else [temperature] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    out = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [tok(texts[i], add_special_tokens=False)["input_ids"] for i in idx]
        check_context([len(q) for q in seqs], max_new_tokens, context, [keys[i] for i in idx])
        ids, mask, head = head_and_tails(seqs, tok.pad_token_id, share_head)
        ids, mask = ids.to(model.device), mask.to(model.device)
        rows = {"input_ids": ids.repeat_interleave(num_return, 0), "attention_mask": mask.repeat_interleave(num_return, 0)}
        t = torch.tensor([temps[i] for i in idx], dtype=torch.float32).repeat_interleave(num_return)
        u = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(row_seed(seed, keys[i], j)))
                         for i in idx for j in range(num_return)])
        sampler = [InverseCdfSampler(t, top_p, u)] if (t > 0).any() else []  # all greedy: generate's own argmax
        # decoding reads each prompt once for its samples, or else the batch's common head once
        prefix = (ids.shape[1] - 1, num_return) if num_return > 1 else (head, len(idx))
        once = prefix if model.config._attn_implementation == inference_model.ATTENTION and \
            inference_model.reads_prefix_once(*prefix, len(idx) * num_return, model.device) else (0, 1)
        with common.autocast():
            cache = prefilled_cache(model, ids, mask, head, num_return, max_new_tokens, read_once=once)
            with inference_model.shared_prefix(*prefix):
                out_ids = model.generate(**rows, cache=cache, generation_config=cfg,
                                         logits_processor=LogitsProcessorList(sampler))
        new = out_ids[:, ids.shape[1]:]
        if stats is not None:
            stats["tokens"] = stats.get("tokens", 0) + count_new_tokens(new, tok.eos_token_id)
        decoded = tok.batch_decode(new, skip_special_tokens=True)
        for j, i in enumerate(idx):
            out[i] = [d.strip() for d in decoded[j * num_return:(j + 1) * num_return]]
    return out


def count_new_tokens(new, eos_id):
    """Tokens generated per row up to and including the first end-of-turn; (rows, T) -> int."""
    is_eos = new == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, torch.full_like(has_eos, new.shape[1], dtype=torch.long))
    return int(first.sum())
