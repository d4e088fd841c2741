"""Preference pairs for train.py: read and validated, tokenized with the chat template,
batched and planned into optimizer steps.

A pair is `prompt`, `chosen`, `rejected` (strings) and, for Eq. 3, `gap`. The prompt side of
an answer is the chat template with add_generation_prompt=True; the answer side is what the
template renders for the assistant turn after it, end-of-turn token included.
"""
import math
import random
from pathlib import Path

import torch

import common
import generation


def tokenize_answer(tok, prompt, answer, max_length):
    """Token ids of prompt + answer as the chat template renders them, and the prompt length.
    The prompt side is the template with add_generation_prompt=True; the answer side is what
    it renders for the assistant turn after that, end-of-turn token included. The text is
    tokenized once without adding special tokens (the template has them: no double BOS).
    Returns (ids, n_prompt), or a reason string when the pair must be dropped."""
    conv = [{"role": "user", "content": prompt}]
    prompt_text = generation.chat_text(tok, conv)
    full_text = generation.chat_text(tok, conv + [{"role": "assistant", "content": answer}], False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template's prompt is not a prefix of the rendered conversation")
    ids = tok(full_text, add_special_tokens=False)["input_ids"]
    p_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    if ids[:len(p_ids)] != p_ids:
        raise ValueError("the prompt's tokens are not a prefix of the conversation's tokens")
    if len(p_ids) >= max_length:
        return "prompt_too_long"
    return ids[:max_length], len(p_ids)


def read_gap(path, n, gap):
    """A pair's gap: a finite number >= 0 (a negative weight would train toward the rejected answer)."""
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not math.isfinite(gap) or gap < 0:
        raise common.InputError(f"{path}:{n}: gap must be a finite number >= 0, got {gap!r}")
    return float(gap)


def load_pairs(path, tok, max_length, limit=None):
    """pairs.jsonl -> list of examples {chosen: (ids, n_prompt), rejected: ..., gap, id}, and
    a count of the pairs dropped per reason."""
    if Path(path).is_file() and not Path(path).read_text(encoding="utf-8").strip():
        raise common.InputError(f"{path}: no pairs: denoising or the margin removed everything "
                                "(loosen denoise.py --tau-quantile or pairs.py --delta)")
    rows = common.read_jsonl(path, required=("prompt", "chosen", "rejected", "gap"))
    examples, dropped = [], {"prompt_too_long": 0, "empty_answer": 0}
    for n, rec in rows[:limit] if limit else rows:
        if not all(isinstance(rec[k], str) for k in ("prompt", "chosen", "rejected")):
            raise common.InputError(f"{path}:{n}: prompt, chosen and rejected must be strings")
        sides = [tokenize_answer(tok, rec["prompt"], rec[k], max_length) for k in ("chosen", "rejected")]
        bad = next((s for s in sides if isinstance(s, str)), None)
        if bad is None and any(len(ids) <= n_p for ids, n_p in sides):
            bad = "empty_answer"  # no answer token left after truncation: never divided by
        if bad:
            dropped[bad] += 1
            continue
        examples.append({"chosen": sides[0], "rejected": sides[1], "gap": read_gap(path, n, rec["gap"]),
                         "id": rec.get("id", str(n)), "line": n})
    if not examples:
        raise common.InputError(f"{path}: every pair was dropped ({dropped}); raise --max-length")
    return examples, dropped


def collate(examples, pad_id):
    """Chosen rows then rejected rows, right-padded to one length: one forward for both.
    Returns input_ids (2B, T), attention_mask (2B, T), answer_mask (2B, T)."""
    seqs = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.bool)
    answer = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (ids, n_p) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attn[i, :len(ids)] = True
        answer[i, n_p:len(ids)] = True
    return input_ids, attn, answer


def make_plan(examples, batch_size, accum, epochs, seed):
    """Optimizer steps as lists of micro-batches (lists of example indices). Micro-batches
    are buckets of similar length (little padding), shuffled per epoch with the seed.
    batch_size is the global micro-batch (per-device batch x world size): every rank builds
    the same plan and takes its slice of each micro-batch (rank_slice)."""
    by_len = sorted(range(len(examples)), key=lambda i: len(examples[i]["chosen"][0]) + len(examples[i]["rejected"][0]))
    micro = [by_len[i:i + batch_size] for i in range(0, len(by_len), batch_size)]
    steps = []
    for epoch in range(epochs):
        order = micro[:]
        random.Random(seed + epoch).shuffle(order)
        steps += [order[i:i + accum] for i in range(0, len(order), accum)]
    return steps
