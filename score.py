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
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

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


def last_two_hidden(decoder, head, P, tails, groups, pad_id):
    """The decoder's last hidden state at the last two positions of each row, (B, 2, D), for
    judge prompts whose first P tokens are the cached `head` (one row, or None if P = 0) and
    whose rest are `tails` (lists of ids). Rows of the same group (a prompt's candidates) also
    share what their tails begin with (the question): that part runs once per group, its keys
    and values are copied to the group's rows, and only each row's own remainder runs after.
    Pads sit between the parts (left of each part); positions count real tokens only."""
    dev = decoder.device
    names = {k: j for j, k in enumerate(dict.fromkeys(groups))}  # each group's index, in order of first row
    g = torch.tensor([names[k] for k in groups], device=dev)  # each row's group
    members = [[t for t, k in zip(tails, groups) if k == n] for n in names]
    shared = [generation.common_prefix_length(m) if len(m) > 1 else 0 for m in members]
    if max(shared) and head is not None:  # the groups' shared parts, one row per group, after the head
        ids, mask, _ = generation.head_and_tails([m[0][:q] for m, q in zip(members, shared)], pad_id, share_head=False)
        ids, mask = ids.to(dev), mask.to(dev)
        cache, before = generation.repeated(head, len(names)), torch.ones(len(names), P, dtype=torch.long, device=dev)
        decoder(input_ids=ids, attention_mask=torch.cat([before, mask], 1), position_ids=generation.positions(mask, P),
                cache=cache, use_cache=True)
        cache.batch_select_indices(g)  # every row gets its group's keys and values
        before, offset = torch.cat([before, mask], 1)[g], P + torch.tensor(shared, device=dev)[g, None]
        tails = [t[shared[j]:] for t, j in zip(tails, g.tolist())]
    else:
        cache = generation.repeated(head, len(tails)) if head is not None else None
        before, offset = torch.ones(len(tails), P, dtype=torch.long, device=dev), P
    ids, mask, _ = generation.head_and_tails(tails, pad_id, share_head=False)
    ids, mask = ids.to(dev), mask.to(dev)
    hidden = decoder(input_ids=ids, attention_mask=torch.cat([before, mask], 1), cache=cache,
                     position_ids=generation.positions(mask, offset), use_cache=cache is not None).last_hidden_state
    return hidden[:, -2:]


@torch.no_grad()
def rating_distribution(model, tok, conversations, batch_size=16, groups=None):
    """P(score = k | judge prompt + 'Rating: ') for k = 1..10, shape (N, 10), in one forward
    pass per judgement. When '10' is two tokens t1 t0 with t1 = '1', the prompt is fed with
    t1 appended and we read two positions: P(10) = P(t1) P(t0 | t1), P(1) = P(t1)(1 - P(t0 | t1)).
    The judge prompts share a long head (instructions and constitution): it runs once and its
    KV cache serves every row; conversations with the same `groups` key (one per conversation,
    e.g. its question; None: all distinct) share their next part too (last_two_hidden). Only
    the two positions read go through the vocabulary head."""
    ids = rating_token_ids(tok)
    two = len(ids[9]) == 2
    if two and ids[9][0] != ids[0][0]:
        raise ValueError("logits mode expects '10' to start with the token of '1'")
    seqs = [tok(generation.chat_text(tok, c) + "Rating: ", add_special_tokens=False)["input_ids"]
            + ([ids[0][0]] if two else []) for c in conversations]
    groups = list(range(len(seqs))) if groups is None else list(groups)
    P = generation.common_prefix_length(seqs)
    with common.autocast():
        decoder = model.get_decoder()  # the vocabulary head runs only at the two positions read
        head = decoder(input_ids=torch.tensor([seqs[0][:P]], device=model.device), use_cache=True).cache if P else None
    first_row, longest = {}, {}
    for i, k in enumerate(groups):
        first_row.setdefault(k, i)
        longest[k] = max(longest.get(k, 0), len(seqs[i]))
    order = sorted(range(len(seqs)), key=lambda i: (longest[groups[i]], first_row[groups[i]], i))  # like lengths together
    out = torch.empty(len(seqs), 10)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        with common.autocast():
            hidden = last_two_hidden(decoder, head, P, [seqs[i][P:] for i in idx], [groups[i] for i in idx],
                                     tok.pad_token_id)
            logits = model.get_output_embeddings()(hidden).float()  # (B, 2, V)
        first = logits[:, 0 if two else 1].log_softmax(-1)
        p = first[:, [i[0] for i in ids[:9]]].exp()  # (B, 9): P(1..9) as a first token
        p10 = first[:, ids[9][0]].exp()  # '10' as one token (Llama 3), else replaced below
        if two:
            q0 = logits[:, 1].log_softmax(-1)[:, ids[9][1]].exp()  # P('0' | '1')
            p10 = p[:, 0] * q0
            p = torch.cat([(p[:, 0] * (1 - q0))[:, None], p[:, 1:]], dim=1)
        probs = torch.cat([p, p10[:, None]], dim=1)
        out[idx] = (probs / probs.sum(dim=1, keepdim=True)).cpu()
    return out


def score_answers(model, tok, items, objective, mode="generate", batch_size=16, max_new_tokens=48):
    """Judge (prompt, answer) pairs on one objective. Returns one dict per item:
    {"score": int 1..10 or None} plus, in logits mode, "expected" (float).
    mode: "generate", "logits" (score = most likely rating) or "logits-expected" (score =
    the expected rating rounded: for a weak judge whose most likely rating never moves)."""
    if not items:
        return []
    convs = [judge_conversation(objective, q, a) for q, a in items]
    if mode.startswith("logits"):
        probs = rating_distribution(model, tok, convs, batch_size, groups=[q for q, _ in items])
        expected = (probs * torch.arange(1, 11, dtype=probs.dtype)).sum(1)
        best = probs.argmax(1) + 1 if mode == "logits" else expected.round().int()
        return [{"score": int(b), "expected": round(float(e), 4)} for b, e in zip(best, expected)]
    texts = generation.generate(model, tok, convs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [{"score": parse_rating(t[0])} for t in texts]


# ----------------------------------------------------------------------------- an HTTP judge

def post(url, body, headers, deadline):
    """POST and read the whole reply within `deadline` seconds in all: urllib's timeout bounds
    each socket read, so a server that trickles bytes could otherwise hold us forever. The
    request runs in a daemon thread that is abandoned when the deadline passes."""
    box = {}

    def worker():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=deadline) as r:
                box["data"] = r.read()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    t.join(deadline)
    if t.is_alive():
        raise TimeoutError(f"no complete reply within {deadline} s")
    if "error" in box:
        raise box["error"]
    return box["data"]


def chat_completion(api_base, model, messages, timeout=60, retries=4, backoff=1.0):
    """One reply from an OpenAI-compatible /chat/completions endpoint, standard library only.
    Retries connection errors, time-outs (`timeout`: seconds per request, in all), 429, 5xx
    and replies not in the chat-completions format, with exponential back-off. After the
    last try: a reply still malformed is None (counted unreadable), an endpoint that never
    answered is an error."""
    url = api_base.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": 256}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', '')}"}
    last = malformed = None
    for attempt in range(retries):
        try:
            content = json.loads(post(url, body, headers, timeout))["choices"][0]["message"]["content"]
            if content is None or isinstance(content, str):
                return content or ""
            malformed = last = f"content of type {type(content).__name__}"
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                raise common.InputError(f"judge endpoint {url}: HTTP {e.code} {e.reason}") from None
            last, malformed = f"HTTP {e.code}", None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last, malformed = str(getattr(e, "reason", e)), None
        except (KeyError, IndexError, TypeError, ValueError, http.client.HTTPException) as e:
            malformed = last = f"a reply not in the chat-completions format ({type(e).__name__})"
        time.sleep(backoff * 2 ** attempt)
    if malformed:
        return None
    raise common.InputError(f"judge endpoint {url} failed after {retries} tries: {last}")


# ----------------------------------------------------------------------------- the judge

class Judge:
    """Scores 1..10 (and pairwise verdicts) from a local model, by default the model itself
    (the method), or from an OpenAI-compatible chat-completions endpoint (--judge-api-base;
    the key is read from $OPENAI_API_KEY and written nowhere). HTTP requests run
    --judge-concurrency at a time; results keep their order."""

    def __init__(self, args, name, model=None, tok=None):
        self.args, self.http = args, bool(args.judge_api_base)
        self.mode = judge_mode(args, name)
        if not self.http:
            self.model, self.tok = (model, tok) if model is not None else common.load_for_inference(name)

    def ask(self, conversations, parse):
        """Replies parsed; over HTTP an unreadable reply is asked once more, then None."""
        if not self.http:
            texts = generation.generate(self.model, self.tok, conversations, max_new_tokens=self.args.judge_max_tokens,
                                        batch_size=self.args.judge_batch_size)
            return [parse(t[0]) for t in texts]

        def one(conv):
            for _ in range(2):
                reply = chat_completion(self.args.judge_api_base, self.args.judge_model, conv,
                                        timeout=self.args.judge_timeout, backoff=self.args.backoff)
                value = None if reply is None else parse(reply)
                if value is not None:
                    return value
            return None
        with ThreadPoolExecutor(self.args.judge_concurrency) as pool:
            return list(pool.map(one, conversations))

    def scores(self, items, objective):
        """(prompt, answer) pairs -> [{"score": 1..10 or None}, + "expected" in the logits modes]."""
        if self.mode.startswith("logits"):
            return score_answers(self.model, self.tok, items, objective, self.mode, self.args.judge_batch_size)
        return [{"score": s} for s in self.ask([judge_conversation(objective, q, a) for q, a in items], parse_rating)]

    def score_objectives(self, items, objectives):
        """Score items on (primary, helpfulness): a list of dicts with score_a, score_b
        (and score_a_expected, score_b_expected in the logits modes)."""
        out = [{} for _ in items]
        for key, obj in zip("ab", objectives):
            for d, s in zip(out, self.scores(items, obj)):
                d[f"score_{key}"] = s["score"]
                if "expected" in s:
                    d[f"score_{key}_expected"] = s["expected"]
        return out


def judge_mode(args, name):
    """--mode auto: an HTTP judge writes its rating ('generate'); the embedded 135M model never
    writes a readable one (measured: 18 of 18 null), so it gives its expected rating
    ('logits-expected'); any other local model writes it ('generate')."""
    if args.mode == "auto":
        return "generate" if args.judge_api_base or name != common.DEFAULT_MODEL else "logits-expected"
    if args.judge_api_base and args.mode != "generate":
        raise common.InputError(f"--mode {args.mode} reads the judge's logits: an HTTP judge needs --mode generate")
    return args.mode


def check_candidates(path, records):
    """Each record's candidates: a list of objects with a string `text`."""
    for i, r in enumerate(records, 1):
        cands = r["candidates"]
        if not isinstance(cands, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in cands):
            raise common.InputError(f"{path}: record {i} (id {r['id']}): candidates must be a list of objects "
                                    "with a string 'text'")


def add_judge_args(p, judge_default=None):
    p.add_argument("--primary", choices=["harmlessness", "honesty"], default="harmlessness",
                   help="the primary objective G_a (G_b is helpfulness; default harmlessness)")
    p.add_argument("--mode", choices=["auto", "generate", "logits", "logits-expected"], default="auto",
                   help="generate: reason then 'Rating: N'; logits: most likely rating in one forward "
                        "pass; logits-expected: the expected rating, rounded (for weak judges); auto (default): "
                        "logits-expected for the embedded default model, generate for any other judge")
    p.add_argument("--judge", default=judge_default,
                   help="local judge model (default: " + (judge_default or "the --model itself, as the method does") + ")")
    p.add_argument("--judge-api-base", default=None, help="OpenAI-compatible API base URL, e.g. http://host/v1 "
                   "(key in $OPENAI_API_KEY); instead of a local judge")
    p.add_argument("--judge-model", default="gpt-4o", help="model name sent to the endpoint (default gpt-4o)")
    p.add_argument("--judge-concurrency", type=common.positive_int, default=8,
                   help="HTTP judge requests in flight at once (default 8)")
    p.add_argument("--judge-timeout", type=float, default=60.0,
                   help="seconds an HTTP judge request may take in all, before it is retried (default 60)")
    p.add_argument("--backoff", type=float, default=1.0, help="first HTTP retry delay in seconds (default 1)")
    p.add_argument("--judge-max-tokens", type=common.positive_int, default=48,
                   help="tokens a local judge may write in generate mode (default 48)")
    p.add_argument("--judge-batch-size", type=common.positive_int, default=16,
                   help="judgements per forward or generate call of a local judge (default 16)")


def judge_settings(args, name):
    """What shapes a judge's scores, for resume checks (never the API key)."""
    return dict(judge=args.judge_model if args.judge_api_base else name, judge_api_base=args.judge_api_base,
                primary=args.primary, mode=judge_mode(args, name), judge_max_tokens=args.judge_max_tokens)


def main():
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter))
    add_judge_args(p)
    args = p.parse_args()
    objectives = [args.primary, "helpfulness"]

    records = common.read_records(args.input, ["candidates"], args.limit, "run sample.py first")
    check_candidates(args.input, records)
    name = args.judge or args.model
    with Output(args.output, records, dict(model=args.model, **judge_settings(args, name)), args.overwrite,
                args.input) as out:
        batches = out.batches(args.batch_size)
        judge = Judge(args, name) if batches else None
        nulls = total = 0
        for batch in common.progress(batches, desc="score", unit="batch"):
            items = [(r["prompt"], c["text"]) for r in batch for c in r["candidates"]]
            scores = iter(judge.score_objectives(items, objectives))
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
