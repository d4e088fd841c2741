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
refine.py and evaluate.py judge with its Judge.
"""
import argparse
import re
from concurrent.futures import ThreadPoolExecutor

import torch

import common
import jsonl
import distributed
import generation
import http_judge
from resumable import Output

OBJECTIVES = ("harmlessness", "honesty", "helpfulness")
# possessive quantifiers (*+, ?+): no backtracking, so a reply of any length parses in linear time
RATING = re.compile(r"rating\s*+[:=]?+[\s*]*+(\d++)(?!\.\d)", re.IGNORECASE)
BARE = re.compile(r"\**+\s*+(\d++)\s*+(?:/\s*+10)?+\s*+\**+\.?+")  # a reply that is only a number


def parse_rating(text):
    """The last 'Rating: N' in text with N in 1..10 ('rating: 10/10' -> 10), or a reply that
    is nothing but such a number; anything else is None, never a guess."""
    bare = BARE.fullmatch(text.strip())
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


@torch.no_grad()
def rating_distribution(model, tok, conversations, batch_size=16, compile=False):
    """P(score = k | judge prompt + 'Rating: ') for k = 1..10, shape (N, 10): the judge is asked
    to go on after 'Rating: ' and its first token's probabilities are read from generate's logits.
    Where '10' is two tokens ('1', '0', as in SmolLM2's vocabulary) the first token is forced to
    '1' and the second step gives P('0' | '1'): P(10) = P('1') P('0' | '1') and P(1) = P('1')
    (1 - P('0' | '1'))."""
    ids = rating_token_ids(tok)
    two = len(ids[9]) == 2
    if two and ids[9][0] != ids[0][0]:
        raise ValueError("logits mode expects '10' to start with the token of '1'")
    texts = [generation.chat_text(tok, c) + "Rating: " for c in conversations]
    digits = [i[0] for i in ids[:9]] + ([ids[9][1]] if two else [ids[9][0]])
    lp = generation.next_token_logprobs(model, tok, texts, digits, steps=2 if two else 1,
                                        first_token=ids[0][0] if two else None, batch_size=batch_size, compile=compile)
    p = lp[:, 0].exp()  # (N, 10): P(1..9) as a first token, then P('10') or, if two tokens, P('0') as a first token
    if two:
        q0 = lp[:, 1, 9].exp()  # P('0' | '1')
        p = torch.cat([(p[:, 0] * (1 - q0))[:, None], p[:, 1:9], (p[:, 0] * q0)[:, None]], dim=1)
    return p / p.sum(dim=1, keepdim=True)


def logits_scores(model, tok, items, objective, mode, batch_size=16, compile=False):
    """Judge (prompt, answer) pairs on one objective from the rating distribution: one dict per
    item, {"score": int 1..10, "expected": float}. mode "logits": the score is the most likely
    rating; "logits-expected": the expected rating, rounded (for a weak judge whose most likely
    rating never moves)."""
    if not items:
        return []
    probs = rating_distribution(model, tok, [judge_conversation(objective, q, a) for q, a in items], batch_size,
                                compile)
    expected = (probs * torch.arange(1, 11, dtype=probs.dtype)).sum(1)
    best = probs.argmax(1) + 1 if mode == "logits" else expected.round().int()
    return [{"score": int(b), "expected": round(float(e), 4)} for b, e in zip(best, expected)]


# ----------------------------------------------------------------------------- the judge

class Judge:
    """Scores 1..10 (and pairwise verdicts) from a local model, by default the model itself
    (the method), or from an OpenAI-compatible chat-completions endpoint (--judge-api-base;
    the key is read from $OPENAI_API_KEY and written nowhere). HTTP requests run
    --judge-concurrency at a time; results keep their order."""

    def __init__(self, args, name, model=None, tok=None):
        self.args, self.http = args, bool(args.judge_api_base)
        self.mode = judge_mode(args, name)
        if self.http:
            http_judge.check_api_base(args.judge_api_base)
        if not self.http:
            self.model, self.tok = (model, tok) if model is not None else common.load_for_inference(name, args.compile)

    def ask(self, conversations, parse):
        """Replies parsed; over HTTP an unreadable reply is asked once more, then None."""
        if not self.http:
            texts = generation.generate(self.model, self.tok, conversations, max_new_tokens=self.args.judge_max_tokens,
                                        batch_size=self.args.judge_batch_size, compile=self.args.compile)
            return [parse(t) for t in texts]

        def one(conv):
            for _ in range(2):
                value = parse(http_judge.chat_completion(self.args.judge_api_base, self.args.judge_model, conv,
                                                         timeout=self.args.judge_timeout, backoff=self.args.backoff))
                if value is not None:
                    return value
            return None
        with ThreadPoolExecutor(self.args.judge_concurrency) as pool:
            return list(pool.map(one, conversations))

    def scores(self, items, objective):
        """(prompt, answer) pairs -> [{"score": 1..10 or None}, + "expected" in the logits modes]."""
        if self.mode.startswith("logits"):
            return logits_scores(self.model, self.tok, items, objective, self.mode, self.args.judge_batch_size,
                                 self.args.compile)
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
        if not isinstance(cands, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) for c in cands
        ):
            raise common.InputError(f"{path}: record {i} (id {r['id']}): candidates must be a list of objects "
                                    "with a string 'text'")


def add_judge_args(p, judge_default=None):
    p.add_argument("--primary", choices=["harmlessness", "honesty"], default="harmlessness",
                   help="the primary objective G_a (G_b is helpfulness; default harmlessness)")
    p.add_argument("--mode", choices=["auto", "generate", "logits", "logits-expected"], default="auto",
                   help="generate: reason then 'Rating: N'; logits: most likely rating in one forward "
                        "pass; logits-expected: the expected rating, rounded (for weak judges); auto (default): "
                        "logits-expected for the embedded default model, generate for any other judge")
    p.add_argument(
        "--judge",
        default=judge_default,
        help="local judge model (default: " + (judge_default or "the --model itself, as the method does") + ")",
    )
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
    """What shapes a judge's scores, for resume checks (never the API key): the endpoint and
    model asked, or a local judge's weights and how inference runs; the prompt files."""
    if args.judge_api_base:
        http_judge.check_api_base(args.judge_api_base)  # refused here, before any output is started
        judge = {"judge": args.judge_model, "judge_api_base": http_judge.shown_url(args.judge_api_base),
                 "judge_prompts": common.prompts_fingerprint()}
    else:
        judge = {
            f"judge_{k}" if k != "model" else "judge": v for k, v in common.model_settings(name, args.compile).items()
        }
    return dict(judge, primary=args.primary, mode=judge_mode(args, name), judge_max_tokens=args.judge_max_tokens)


def main():
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter))
    add_judge_args(p)
    args = p.parse_args()
    objectives = [args.primary, "helpfulness"]

    records = jsonl.read_records(args.input, ["candidates"], args.limit, "run sample.py first")
    check_candidates(args.input, records)
    name = args.judge or args.model
    reads = [args.input, None if args.judge_api_base else common.model_folder(name)]
    with Output(args.output, records, judge_settings(args, name), args.overwrite, reads) as out:
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
