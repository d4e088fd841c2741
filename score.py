"""Step 2 of SPA: self-evaluation against the constitution.

The model judges every candidate answer on the primary objective G_a (harmlessness or
honesty) and on helpfulness G_b, each an integer 1..10, with greedy decoding so the same
answer always gets the same score. Two modes:

  generate  the judge writes a short reason and ends with "Rating: N"; the last valid
            rating (1..10) is taken, anything else is null (counted, never guessed)
  logits    one forward pass per judgement on the prompt followed by "Rating: "; the score
            is the most likely of 1..10 (also stored: the expected value, *_expected)
  logits-expected   as logits, but the score is the expected value rounded (the 135M
            default model's most likely rating is the same for every answer)

    python score.py --input runs/x/samples.jsonl --output runs/x/scored.jsonl --primary harmlessness
    torchrun --nproc_per_node 8 score.py ...      (one process per GPU, each a share of the prompts)

Adds score_a, score_b to every candidate and objectives = [primary, "helpfulness"].
refine.py and evaluate.py import score_answers() from here.
"""
import argparse
import copy
import re

import torch

import common
import distributed
import generation
from resumable import Output

OBJECTIVES = ("harmlessness", "honesty", "helpfulness")
RATING = re.compile(r"rating\s*[:=]?\s*\**\s*(\d+)(?!\d|\.\d)", re.IGNORECASE)
BARE = re.compile(r"\s*\**\s*(\d+)\s*(?:/\s*10)?\s*\**\.?\s*")  # a reply that is only a number


def parse_rating(text):
    """The last 'Rating: N' in text with N in 1..10 ('rating: 10/10' -> 10), or a reply that
    is nothing but such a number; anything else is None, never a guess."""
    bare = BARE.fullmatch(text)
    found = [bare] if bare else reversed(list(RATING.finditer(text)))
    for m in found:
        if 1 <= int(m.group(1)) <= 10:
            return int(m.group(1))
    return None


def judge_conversation(objective, prompt, answer):
    """The judge's one-turn conversation for one (prompt, answer) on one objective."""
    if objective not in OBJECTIVES:
        raise common.InputError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    text = common.load_prompt(f"score_{objective}.txt").format(
        constitution=common.load_prompt("constitution.txt").strip(), prompt=prompt, answer=answer)
    return generation.user_turn(text)


def rating_token_ids(tok):
    """For k in 1..10 the token ids that spell k right after 'Rating: '. Each must be one
    or two tokens; for SmolLM2 '10' is two ('1', '0')."""
    ids = [tok.encode(str(k), add_special_tokens=False) for k in range(1, 11)]
    if any(len(i) != 1 for i in ids[:9]) or len(ids[9]) > 2:
        raise ValueError("logits mode needs digits 1..9 as single tokens and '10' in at most two")
    return ids


def common_prefix_length(seqs):
    """Length of the token prefix all sequences share, leaving each at least two tokens."""
    n = min(len(s) for s in seqs) - 2
    first = seqs[0]
    for k in range(max(n, 0)):
        if any(s[k] != first[k] for s in seqs):
            return k
    return max(n, 0)


@torch.no_grad()
def rating_distribution(model, tok, conversations, batch_size=16):
    """P(score = k | judge prompt + 'Rating: ') for k = 1..10, shape (N, 10), in one forward
    pass per judgement. When '10' is two tokens t1 t0 with t1 = '1', the prompt is fed with
    t1 appended and we read two positions: P(10) = P(t1) P(t0 | t1), P(1) = P(t1)(1 - P(t0 | t1)).
    The judge prompts share a long head (instructions and constitution): it runs once and its
    KV cache serves every row; only the two positions read go through the vocabulary head."""
    ids = rating_token_ids(tok)
    two = len(ids[9]) == 2
    if two and ids[9][0] != ids[0][0]:
        raise ValueError("logits mode expects '10' to start with the token of '1'")
    seqs = [tok(generation.chat_text(tok, c) + "Rating: ", add_special_tokens=False)["input_ids"]
            + ([ids[0][0]] if two else []) for c in conversations]
    P = common_prefix_length(seqs)
    dev = model.device
    with common.autocast():
        head = model(input_ids=torch.tensor([seqs[0][:P]], device=dev), use_cache=True).past_key_values if P else None
    out = []
    for start in range(0, len(seqs), batch_size):
        tails = [s[P:] for s in seqs[start:start + batch_size]]
        T = max(len(t) for t in tails)  # pad on the left of each tail, between head and tail
        tail_ids = torch.tensor([[tok.pad_token_id] * (T - len(t)) + t for t in tails], device=dev)
        tail_mask = torch.tensor([[0] * (T - len(t)) + [1] * len(t) for t in tails], device=dev)
        mask = torch.cat([torch.ones(len(tails), P, dtype=torch.long, device=dev), tail_mask], 1)
        pos = generation.positions(tail_mask, P)
        cache = None
        if head is not None:
            cache = copy.deepcopy(head)
            cache.batch_repeat_interleave(len(tails))
        with common.autocast():
            hidden = model.get_decoder()(input_ids=tail_ids, attention_mask=mask, position_ids=pos,
                                         past_key_values=cache, use_cache=head is not None).last_hidden_state
            logits = model.get_output_embeddings()(hidden[:, -2:]).float()  # (B, 2, V)
        first = logits[:, 0 if two else 1].log_softmax(-1)
        p = first[:, [i[0] for i in ids[:9]]].exp()  # (B, 9): P(1..9) as a first token
        p10 = first[:, ids[9][0]].exp()  # '10' as one token (Llama 3), else replaced below
        if two:
            q0 = logits[:, 1].log_softmax(-1)[:, ids[9][1]].exp()  # P('0' | '1')
            p10 = p[:, 0] * q0
            p = torch.cat([(p[:, 0] * (1 - q0))[:, None], p[:, 1:]], dim=1)
        probs = torch.cat([p, p10[:, None]], dim=1)
        out.append(probs / probs.sum(dim=1, keepdim=True))
    return torch.cat(out).cpu()


def score_answers(model, tok, items, objective, mode="generate", batch_size=16, max_new_tokens=48):
    """Judge (prompt, answer) pairs on one objective. Returns one dict per item:
    {"score": int 1..10 or None} plus, in logits mode, "expected" (float).
    mode: "generate", "logits" (score = most likely rating) or "logits-expected" (score =
    the expected rating rounded: for a weak judge whose most likely rating never moves)."""
    if not items:
        return []
    convs = [judge_conversation(objective, q, a) for q, a in items]
    if mode.startswith("logits"):
        probs = rating_distribution(model, tok, convs, batch_size)
        expected = (probs * torch.arange(1, 11, dtype=probs.dtype)).sum(1)
        best = probs.argmax(1) + 1 if mode == "logits" else expected.round().int()
        return [{"score": int(b), "expected": round(float(e), 4)} for b, e in zip(best, expected)]
    texts = generation.generate(model, tok, convs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [{"score": parse_rating(t[0])} for t in texts]


def score_objectives(model, tok, items, objectives, mode, batch_size, max_new_tokens):
    """Score items on (primary, helpfulness): a list of dicts with score_a, score_b
    (and score_a_expected, score_b_expected in logits mode)."""
    out = [{} for _ in items]
    for key, obj in zip("ab", objectives):
        for d, s in zip(out, score_answers(model, tok, items, obj, mode, batch_size, max_new_tokens)):
            d[f"score_{key}"] = s["score"]
            if "expected" in s:
                d[f"score_{key}_expected"] = s["expected"]
    return out


def check_candidates(path, records):
    """Each record's candidates: a list of objects with a string `text`."""
    for i, r in enumerate(records, 1):
        cands = r["candidates"]
        if not isinstance(cands, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in cands):
            raise common.InputError(f"{path}: record {i} (id {r['id']}): candidates must be a list of objects "
                                    "with a string 'text'")


def add_judge_args(p):
    p.add_argument("--primary", choices=["harmlessness", "honesty"], default="harmlessness",
                   help="the primary objective G_a (G_b is helpfulness; default harmlessness)")
    p.add_argument("--mode", choices=["generate", "logits", "logits-expected"], default="generate",
                   help="generate: reason then 'Rating: N'; logits: most likely rating in one forward "
                        "pass; logits-expected: the expected rating, rounded (for weak judges)")
    p.add_argument("--judge-max-tokens", type=common.positive_int, default=48,
                   help="tokens the judge may write in generate mode (default 48)")
    p.add_argument("--judge-batch-size", type=common.positive_int, default=16,
                   help="judgements per forward or generate call (default 16)")


def main():
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter))
    add_judge_args(p)
    args = p.parse_args()
    objectives = [args.primary, "helpfulness"]

    records = common.read_records(args.input, ["candidates"], args.limit, "run sample.py first")
    check_candidates(args.input, records)
    settings = dict(model=args.model, primary=args.primary, mode=args.mode, judge_max_tokens=args.judge_max_tokens)
    with Output(args.output, records, settings, args.overwrite, args.input) as out:
        batches = out.batches(args.batch_size)
        if batches:
            model, tok = common.load_for_inference(args.model)
        nulls = total = 0
        for batch in common.progress(batches, desc="score", unit="batch"):
            items = [(r["prompt"], c["text"]) for r in batch for c in r["candidates"]]
            scores = iter(score_objectives(model, tok, items, objectives, args.mode,
                                           args.judge_batch_size, args.judge_max_tokens))
            done = []
            for r in batch:
                cands = [dict(c, **next(scores)) for c in r["candidates"]]
                nulls += sum(c["score_a"] is None for c in cands) + sum(c["score_b"] is None for c in cands)
                total += 2 * len(cands)
                done.append(dict(r, candidates=cands, objectives=objectives))
            out.write(done)
    total, nulls = map(int, distributed.all_sum([total, nulls]))
    common.log(f"score: {len(records)} prompts -> {args.output}; {total} new judgements, {nulls} unreadable (null)")


if __name__ == "__main__":
    common.run_main(main)
