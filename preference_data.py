"""Preference pairs for train.py: read and validated, tokenized with the chat template,
batched and planned into optimizer steps.

A pair is `prompt`, `chosen`, `rejected` (strings, or TRL's conversational message lists)
and, for Eq. 3, `gap` (or the scores it is computed from). The prompt side of
an answer is the chat template with add_generation_prompt=True; the answer side is what the
template renders for the assistant turn after it, end-of-turn token included.
"""

import math
import random
from pathlib import Path

import torch

import common
import jsonl
import generation


def tokenize_answer(tok, prompt, answer, max_length):
    """Token ids of prompt + answer as the chat template renders them, and the prompt length.
    The prompt side is the template with add_generation_prompt=True; the answer side is what
    it renders for the assistant turn after that, end-of-turn token included. The text is
    tokenized once without adding special tokens (the template has them: no double BOS).
    prompt: the user turn, or a conversation (a list of messages: a multi-turn context).
    Returns (ids, n_prompt), or a reason string when the pair must be dropped."""
    conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    prompt_text = generation.chat_text(tok, conv)
    full_text = generation.chat_text(tok, conv + [{"role": "assistant", "content": answer}], False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template's prompt is not a prefix of the rendered conversation")
    ids = tok(full_text, add_special_tokens=False)["input_ids"]
    p_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    if ids[: len(p_ids)] != p_ids:
        raise ValueError("the prompt's tokens are not a prefix of the conversation's tokens")
    if len(p_ids) >= max_length:
        return "prompt_too_long"
    return ids[:max_length], len(p_ids)


def read_gap(where, gap):
    """A pair's gap: a finite number >= 0 (a negative weight would train toward the rejected answer)."""
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not math.isfinite(gap) or gap < 0:
        raise common.InputError(f"{where}: gap must be a finite number >= 0, got {gap!r}")
    return float(gap)


def pair_gap(where, rec, need_gap):
    """Delta_i of Eq. 3: the record's `gap`, else |sum(chosen_scores) - sum(rejected_scores)|;
    0 where the loss needs none (simpo, dpo, sft)."""
    if "gap" in rec:
        return read_gap(where, rec["gap"])
    if "chosen_scores" in rec and "rejected_scores" in rec:
        try:
            return read_gap(where, abs(sum(rec["chosen_scores"]) - sum(rec["rejected_scores"])))
        except TypeError:
            raise common.InputError(f"{where}: chosen_scores and rejected_scores must be lists of numbers") from None
    if need_gap:
        raise common.InputError(
            f"{where}: no 'gap' and no 'chosen_scores'/'rejected_scores': --loss spa weights "
            "pairs by their score gap; --loss simpo, dpo or sft need none"
        )
    return 0.0


def is_conversation(v):
    return (
        isinstance(v, list)
        and bool(v)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v)
    )


def implicit_prompt(where, chosen, rejected):
    """TRL's implicit-prompt form, as UltraFeedback-derived sets ship (the SimPO repository's,
    alignment-handbook's): chosen and rejected whole conversations sharing their leading turns.
    The prompt is their longest common prefix of messages, which must end with a user turn; the
    answers are what follows it, one assistant message each."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prompt, rest = chosen[:n], (chosen[n:], rejected[n:])
    if not prompt or prompt[-1]["role"] != "user":
        raise common.InputError(
            f"{where}: chosen and rejected do not share leading turns ending with a user message, so no prompt "
            "can be taken from them; give `prompt` and one assistant message each"
        )
    if any(len(r) != 1 or r[0]["role"] != "assistant" for r in rest):
        raise common.InputError(
            f"{where}: after their shared turns chosen and rejected must hold one assistant message each"
        )
    return prompt, rest[0][0]["content"], rest[1][0]["content"]


def conversation_parts(where, rec):
    """(prompt, chosen, rejected) from strings; from TRL's conversational format (`prompt` a list
    of messages, the context of any number of turns, `chosen` and `rejected` each a list holding
    one assistant message); or from the implicit-prompt form (implicit_prompt), with or without
    a `prompt` field beside it."""
    chosen, rejected = rec["chosen"], rec["rejected"]
    if is_conversation(chosen) and is_conversation(rejected) and (len(chosen) > 1 or len(rejected) > 1):
        prompt, chosen, rejected = implicit_prompt(where, chosen, rejected)
        check_prompt(where, prompt)
        return prompt, chosen, rejected
    if "prompt" not in rec:
        raise common.InputError(f"{where}: missing field 'prompt' (or chosen and rejected as whole conversations)")

    def answer(key):
        v = rec[key]
        if isinstance(v, str):
            return v
        if is_conversation(v) and len(v) == 1 and v[0]["role"] == "assistant":
            return v[0]["content"]
        raise common.InputError(f"{where}: {key} must be a string or a list of one assistant message")

    check_prompt(where, rec["prompt"])
    return rec["prompt"], answer("chosen"), answer("rejected")


def check_prompt(where, prompt):
    """A prompt: a string, or a list of {role, content} messages ending with a user turn."""
    if not (isinstance(prompt, str) or is_conversation(prompt)):
        raise common.InputError(f"{where}: prompt must be a string or a list of {{role, content}} messages")
    if isinstance(prompt, list):
        jsonl.check_conversation(where, prompt)


def load_pairs(path, tok, max_length, limit=None, need_gap=True):
    """Preference pairs (JSONL or a JSON array; strings or conversational messages) -> list of
    examples {chosen: (ids, n_prompt), rejected: ..., gap, id}, and counts: the pairs dropped per
    reason (a prompt over max_length, an answer left empty, chosen and rejected the same tokens
    once cut) and "truncated", the pairs kept with an answer cut to max_length. need_gap: the
    loss weights pairs by their gap (spa)."""
    if Path(path).is_file() and not Path(path).read_text(encoding="utf-8", errors="replace").strip():
        raise common.InputError(
            f"{path}: no pairs: denoising or the margin removed everything "
            "(loosen denoise.py --tau-quantile or pairs.py --delta)"
        )
    rows = jsonl.read_jsonl(path, required=("chosen", "rejected"))  # a prompt may be implicit in them
    examples = []
    dropped = {"prompt_too_long": 0, "empty_answer": 0, "identical_after_truncation": 0, "truncated": 0}
    for n, where, rec in rows[:limit] if limit else rows:
        prompt, chosen, rejected = conversation_parts(where, rec)
        gap = pair_gap(where, rec, need_gap)
        whole = [tokenize_answer(tok, prompt, answer, 1 << 62) for answer in (chosen, rejected)]
        sides = [(ids[:max_length], n_p) for ids, n_p in whole]
        cut = any(len(ids) > max_length for ids, _ in whole)
        if any(n_p >= max_length for _, n_p in whole):
            reason = "prompt_too_long"
        elif any(len(ids) <= n_p for ids, n_p in sides):
            reason = "empty_answer"  # no answer token left after truncation: never divided by
        elif cut and sides[0][0][sides[0][1] :] == sides[1][0][sides[1][1] :]:
            reason = "identical_after_truncation"  # what is left cannot tell chosen from rejected
        else:
            reason = None
        if reason:
            dropped[reason] += 1
            continue
        dropped["truncated"] += cut  # kept, an answer cut to --max-length: counted, said in the log
        examples.append({"chosen": sides[0], "rejected": sides[1], "gap": gap, "id": str(rec.get("id", n)), "line": n})
    if not examples:
        raise common.InputError(f"{path}: every pair was dropped ({dropped}); raise --max-length")
    return examples, dropped


def collate(examples, pad_id, pack=False):
    """Chosen sequences then rejected ones, for one forward over both; a dict of policy_model.Policy's
    arguments. Padded: 2B rows right-padded to the longest, input_ids, attention_mask and
    answer_mask all (2B, T). Packed: the 2B sequences end to end in one row of N tokens (no
    padding), input_ids, position_ids (restarting at 0 for each sequence) and answer_mask all
    (1, N), and lengths (2B ints)."""
    seqs = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    if pack:
        ids = torch.tensor([t for s, _ in seqs for t in s])[None]
        pos = torch.cat([torch.arange(len(s)) for s, _ in seqs])[None]
        answer = torch.cat([torch.arange(len(s)) >= n_p for s, n_p in seqs])[None]
        return dict(input_ids=ids, position_ids=pos, answer_mask=answer, lengths=[len(s) for s, _ in seqs])
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.bool)
    answer = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (ids, n_p) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = True
        answer[i, n_p : len(ids)] = True
    return dict(input_ids=input_ids, attention_mask=attn, answer_mask=answer)


def make_plan(examples, batch_size, accum, epochs, seed):
    """Optimizer steps as lists of micro-batches (lists of example indices). An optimizer
    batch is batch_size x accum pairs of similar length (little padding); the batches are
    shuffled per epoch with the seed, then each is cut into micro-batches of batch_size.
    batch_size is the global micro-batch (per-device batch x world size): every rank builds
    the same plan and takes its share of each micro-batch (distributed.share). Which pairs
    make a step depends only on the optimizer batch, so a run resumed at another world size
    (or accumulation) with the same optimizer batch takes the same steps."""
    by_len = sorted(range(len(examples)), key=lambda i: len(examples[i]["chosen"][0]) + len(examples[i]["rejected"][0]))
    size = batch_size * accum
    batches = [by_len[i : i + size] for i in range(0, len(by_len), size)]
    steps = []
    for epoch in range(epochs):
        order = batches[:]
        random.Random(seed + epoch).shuffle(order)
        steps += [[b[i : i + batch_size] for i in range(0, len(b), batch_size)] for b in order]
    return steps
