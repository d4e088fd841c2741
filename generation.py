"""Batched chat generation with plain `model.generate` and its KV cache.

Prompts are sorted by length, left-padded and sent many rows per call; every row draws its
own random numbers from a generator seeded by (seed, the prompt's key, the row's index), so
a sample depends on neither the batch it lands in nor the number of processes.
"""
import hashlib

import torch

import common


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
    It returns logits that are -inf except at the drawn token, so generate runs in greedy
    mode and keeps that token."""

    def __init__(self, temperatures, top_p, uniforms):
        self.t, self.top_p, self.u, self.step = temperatures, top_p, uniforms, 0

    def __call__(self, input_ids, scores):
        t = self.t.to(scores.device)[:, None]
        probs = (scores.float() / t.clamp(min=1e-6)).softmax(-1)
        order = None
        if self.top_p < 1:  # keep the smallest set of tokens whose mass reaches top_p
            probs, order = probs.sort(-1, descending=True)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        u = self.u[:, self.step:self.step + 1].to(probs.device) * cdf[:, -1:]
        self.step += 1
        pick = torch.searchsorted(cdf, u).clamp(max=probs.shape[-1] - 1)
        if order is not None:
            pick = order.gather(1, pick)
        pick = torch.where(t > 0, pick, scores.argmax(-1, keepdim=True))
        return torch.full_like(scores, float("-inf")).scatter_(1, pick, 0.0)


def positions(mask, offset=0):
    """Position ids for left-padded rows: (B, T) 0/1 mask -> (B, T), counting real tokens
    from `offset` (pads get the first position; they are masked anyway)."""
    return offset + (mask.cumsum(-1) - 1).clamp(min=0)


def prefilled_cache(model, enc, num_return, max_new_tokens):
    """Run each prompt (all but its last token) through the model once and copy its keys and
    values num_return times into a static cache, so the samples of one prompt share one
    prefill. On the CPU a chat prompt costs about as much as a 64-token answer (measured)."""
    from transformers import StaticCache
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = positions(mask)
    prefix = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + max_new_tokens)
    for layer, done in zip(cache.layers, prefix.past_key_values.layers):
        layer.update(done.keys.repeat_interleave(num_return, 0), done.values.repeat_interleave(num_return, 0))
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
             batch_size=8, seed=0, keys=None, stats=None):
    """Answer each conversation num_return times with plain `model.generate` and its KV
    cache (static, prefilled once per prompt). Prompts are sorted by length, left-padded and
    sent batch_size at a time (times num_return rows). Row j of conversation i draws its
    random numbers from a generator seeded with row_seed(seed, keys[i], j): keys default to
    the conversations' positions; pass the prompts' ids so samples depend on nothing else.
    temperature: one float, or one per conversation (0 = greedy).
    Returns a list (input order) of lists of num_return strings. If `stats` is a dict, its
    'tokens' entry counts the generated tokens (up to and including end of turn)."""
    from transformers import GenerationConfig, LogitsProcessorList
    tok.padding_side = "left"
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
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        check_context(enc["attention_mask"].sum(1).tolist(), max_new_tokens, context, [keys[i] for i in idx])
        enc = {key: v.to(model.device) for key, v in enc.items()}
        rows = {key: v.repeat_interleave(num_return, 0) for key, v in enc.items()}
        t = torch.tensor([temps[i] for i in idx], dtype=torch.float32).repeat_interleave(num_return)
        u = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(row_seed(seed, keys[i], j)))
                         for i in idx for j in range(num_return)])
        sampler = InverseCdfSampler(t, top_p, u)
        with common.autocast():
            cache = prefilled_cache(model, enc, num_return, max_new_tokens)
            seqs = model.generate(**rows, past_key_values=cache, generation_config=cfg,
                                  logits_processor=LogitsProcessorList([sampler]))
        new = seqs[:, enc["input_ids"].shape[1]:]
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
