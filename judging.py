"""The judge: how SPA's model rates an answer (steps 2 and 3) and how the evaluation compares two.

A rating is an integer 1..10 on one objective, the primary G_a (harmlessness or honesty) or
helpfulness G_b, asked with the constitution (prompts/score_*.txt) and read greedily, in one
of three modes:

  generate         the judge writes a short reason and ends with "Rating: N"; the last valid
                   rating is taken, anything else is null (counted, never guessed)
  logits           one forward pass over the judge prompt followed by "Rating: "; the rating
                   is the most likely of 1..10 (the expected value is kept too)
  logits-expected  as logits, the expected rating rounded (for a weak judge whose most
                   likely rating never moves, such as the embedded 135M model)

A pairwise verdict ("Winner: A" or "B", prompts/pairwise.txt) is read as in generate mode.
The judge is a local transformers model (LocalJudge: by default the model itself, as the
method has it) or an OpenAI-compatible endpoint (HttpJudge, over chat_api.py). Both take
named arguments; `from_args` is the one place where a stage's flags become a judge.
"""

import math
import re
from concurrent.futures import ThreadPoolExecutor

import torch

import common
import generation
import chat_api

PRIMARY_OBJECTIVES = ("harmlessness", "honesty")
OBJECTIVES = (*PRIMARY_OBJECTIVES, "helpfulness")
MODES = ("auto", "generate", "logits", "logits-expected")
# possessive quantifiers (*+, ?+): no backtracking, so a reply of any length parses in linear time
RATING = re.compile(r"rating\s*+[:=]?+[\s*]*+(\d++)(?!\.\d)", re.IGNORECASE)
BARE = re.compile(r"\**+\s*+(\d++)\s*+(?:/\s*+10)?+\s*+\**+\.?+")  # a reply that is only a number
WINNER = re.compile(r"winner\s*+[:=]?+[\s*]*+([AB])\b", re.IGNORECASE)


# ----------------------------------------------------------------------------- prompts and replies (pure)


def parse_rating(text):
    """The last 'Rating: N' in text with N in 1..10 ('rating: 10/10' -> 10), or a reply that
    is nothing but such a number; anything else is None, never a guess."""
    bare = BARE.fullmatch(text.strip())
    found = [bare] if bare else reversed(list(RATING.finditer(text)))
    for m in found:
        if 1 <= int(m.group(1)) <= 10:
            return int(m.group(1))
    return None


def parse_verdict(text):
    """'A' or 'B' from 'Winner: A' (the last one) or a reply that is only the letter; else None."""
    if text.strip().strip("*.").upper() in ("A", "B"):
        return text.strip().strip("*.").upper()
    found = WINNER.findall(text)
    return found[-1].upper() if found else None


def judge_conversation(objective, prompt, answer):
    """The judge's one-turn conversation rating one (prompt, answer) on one objective."""
    if objective not in OBJECTIVES:
        raise common.InputError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    text = common.load_prompt(f"score_{objective}.txt").format(
        constitution=common.load_prompt("constitution.txt").strip(),
        prompt=generation.prompt_text(prompt),
        answer=answer,
    )
    return generation.user_turn(text)


def pairwise_conversation(objective, prompt, answer_a, answer_b):
    """The judge's one-turn conversation asking which of two answers is better on the objective."""
    text = common.load_prompt("pairwise.txt").format(
        constitution=common.load_prompt("constitution.txt").strip(),
        prompt=generation.prompt_text(prompt),
        answer_a=answer_a,
        answer_b=answer_b,
        objective=objective,
    )
    return generation.user_turn(text)


# ----------------------------------------------------------------------------- the logits modes


def rating_token_ids(tok):
    """For k in 1..10 the token ids that spell k right after 'Rating: '. Each must be one
    or two tokens; for SmolLM2 '10' is two ('1', '0')."""
    ids = [tok.encode(str(k), add_special_tokens=False) for k in range(1, 11)]
    if any(len(i) != 1 for i in ids[:9]) or len(ids[9]) > 2:
        raise ValueError("logits mode needs digits 1..9 as single tokens and '10' in at most two")
    return ids


@torch.no_grad()
def rating_distribution(model, tok, conversations, batch_size=16, max_batch_tokens=None, groups=None):
    """P(rating = k | judge prompt + 'Rating: ') for k = 1..10, shape (N, 10), from one forward
    pass per batch (groups: each one's question, as generation.next_token_logprobs takes them).
    Where '10' is two tokens ('1', '0', as in SmolLM2's vocabulary) the token '1' is appended,
    so the same pass also gives P('0' | '1'): P(10) = P('1') P('0' | '1'), P(1) = P('1') (1 - P('0' | '1'))."""
    ids = rating_token_ids(tok)
    two = len(ids[9]) == 2
    if two and ids[9][0] != ids[0][0]:
        raise ValueError("logits mode expects '10' to start with the token of '1'")
    texts = [generation.chat_text(tok, c) + "Rating: " for c in conversations]
    digits = [i[0] for i in ids[:9]] + ([ids[9][1]] if two else [ids[9][0]])
    lp = generation.next_token_logprobs(
        model,
        tok,
        texts,
        digits,
        then=ids[0][0] if two else None,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens or generation.MAX_BATCH_TOKENS,
        groups=groups,
    )
    p = lp[:, 0].exp()  # (N, 10): P(1..9) as a first token, then P('10') or, if two tokens, P('0') as a first token
    if two:
        q0 = lp[:, 1, 9].exp()  # P('0' | '1')
        p = torch.cat([(p[:, 0] * (1 - q0))[:, None], p[:, 1:9], (p[:, 0] * q0)[:, None]], dim=1)
    return p / p.sum(dim=1, keepdim=True)


def ratings_from_distribution(probs, mode):
    """(N, 10) rating probabilities -> [{"score": 1..10, "expected": float}]: the most likely
    rating (mode "logits") or the expected rating rounded ("logits-expected")."""
    expected = (probs * torch.arange(1, 11, dtype=probs.dtype)).sum(1)
    best = probs.argmax(1) + 1 if mode == "logits" else expected.round().int()
    return [{"score": int(b), "expected": round(float(e), 4)} for b, e in zip(best, expected)]


def resolve_mode(mode, http, local_name=None):
    """--mode auto: an HTTP judge writes its rating ('generate'); the embedded 135M model never
    writes a readable one (measured: 18 of 18 null), so it gives its expected rating
    ('logits-expected'); any other local model writes it ('generate')."""
    if mode == "auto":
        return "generate" if http or local_name != common.DEFAULT_MODEL else "logits-expected"
    return mode  # the logits modes through a server read its top_logprobs (HttpJudge.rating_probs)


# ----------------------------------------------------------------------------- the two judges


class Judge:
    """What every judge does with its `ask` (replies to conversations, parsed) and its mode."""

    mode = "generate"
    asked = unreadable = 0  # ratings asked for so far, and those with no usable reply
    max_unreadable = 0.5  # the share of unreadable ratings at which a run stops (--max-unreadable)

    def ask(self, conversations, parse):
        raise NotImplementedError

    def ratings(self, items, objective):
        """(prompt, answer) pairs -> [{"score": 1..10 or None}, + "expected" in the logits modes].
        A run whose replies are mostly unreadable stops (check_readable)."""
        if not items:
            return []
        convs = [judge_conversation(objective, q, a) for q, a in items]
        if self.mode.startswith("logits"):
            return ratings_from_distribution(self.rating_probs(convs, [q for q, _ in items]), self.mode)
        scores = self.ask(convs, parse_rating)
        self.check_readable(len(scores), sum(s is None for s in scores))
        return [{"score": s} for s in scores]

    def check_readable(self, asked=0, unreadable=0, least=16):
        """Count ratings; once `least` were asked, more than max_unreadable of them unreadable (a
        reply cut at the token budget, empty, filtered, or without 'Rating: N') is a judge that
        does not answer, not a judgement: the run stops with an error instead of writing nulls."""
        self.asked, self.unreadable = self.asked + asked, self.unreadable + unreadable
        if self.asked >= least and self.unreadable > self.max_unreadable * self.asked:
            raise common.InputError(
                f"{self.unreadable} of the {self.asked} ratings asked so far got no readable reply (cut off at "
                "--judge-max-tokens, empty or filtered, or without 'Rating: N'): raise --judge-max-tokens, use "
                "another judge, or with a local judge --mode logits"
            )

    def rate_objectives(self, items, objectives):
        """Rate items on (primary, helpfulness): a dict per item with score_a, score_b (and
        score_a_expected, score_b_expected in the logits modes)."""
        out = [{} for _ in items]
        for key, objective in zip("ab", objectives):
            for d, s in zip(out, self.ratings(items, objective)):
                d[f"score_{key}"] = s["score"]
                if "expected" in s:
                    d[f"score_{key}_expected"] = s["expected"]
        return out

    def verdicts(self, triples, objective):
        """(prompt, answer A, answer B) -> 'A', 'B' or None."""
        return self.ask([pairwise_conversation(objective, *t) for t in triples], parse_verdict)


class LocalJudge(Judge):
    """A transformers model as the judge, greedy: `max_tokens` per written reply,
    `batch_size` judgements per generate call or forward pass."""

    def __init__(self, model, tok, *, mode, max_tokens=48, batch_size=16, max_batch_tokens=generation.MAX_BATCH_TOKENS):
        self.model, self.tok, self.mode = model, tok, mode
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.max_batch_tokens = max_batch_tokens

    def rating_probs(self, conversations, groups=None):
        return rating_distribution(self.model, self.tok, conversations, self.batch_size, self.max_batch_tokens, groups)

    def ask(self, conversations, parse):
        texts = generation.generate(
            self.model,
            self.tok,
            conversations,
            max_new_tokens=self.max_tokens,
            batch_size=self.batch_size,
            max_batch_tokens=self.max_batch_tokens,
        )
        return [parse(t) for t in texts]


class HttpJudge(Judge):
    """An OpenAI-compatible chat-completions endpoint as the judge (the key in $OPENAI_API_KEY,
    sent to its host only), `concurrency` requests in flight, `max_tokens` a reply; a reply
    with no usable answer (cut off, filtered, unparsable) is asked once more, then counts as
    None. Replies keep their order."""

    def __init__(self, *, api_base, model, mode="generate", concurrency=8, timeout=60.0, backoff=1.0, max_tokens=256):
        self.api_base, self.model_name, self.mode = chat_api.check_api_base(api_base), model, mode
        self.concurrency, self.timeout, self.backoff, self.max_tokens = concurrency, timeout, backoff, max_tokens

    def rating_probs(self, conversations, groups=None):  # groups: only a local model's batches use them
        """The logits modes through the server, as SPA's model judges itself when vLLM serves it:
        P(rating = k) for k = 1..10, (N, 10), from the top_logprobs of the token that follows
        the judge prompt and an assistant turn begun with 'Rating: ' (continued, not answered:
        vLLM's continue_final_message; llama.cpp's server continues a final assistant message).
        Where '10' is no token of its own, a second request after 'Rating: 1' gives P('0' | '1')."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return torch.tensor(list(pool.map(self.one_distribution, conversations)), dtype=torch.float64)

    def one_distribution(self, conversation):
        first = self.next_token_probs(conversation, "Rating: ")
        p = [first.get(str(k), 0.0) for k in range(1, 11)]
        if sum(p) < 0.5:  # a server that answers anew instead of going on after "Rating: " (llama-cpp-python's)
            raise common.InputError(
                f"judge endpoint {chat_api.shown_url(self.api_base)}: ratings hold {sum(p):.2f} of the probability "
                "of the token after 'Rating: ', so the server did not continue the assistant turn begun with it; the "
                "logits modes need a server that does (vLLM: continue_final_message), or use --mode generate"
            )
        if "10" not in first and p[0] > 0:  # '10' spelt '1', '0'
            q0 = self.next_token_probs(conversation, "Rating: 1").get("0", 0.0)
            p[0], p[9] = p[0] * (1 - q0), p[0] * q0
        if sum(p) <= 0:
            raise common.InputError(
                f"judge endpoint {chat_api.shown_url(self.api_base)}: no rating 1..10 among the "
                "top_logprobs of the token after 'Rating: '; use --mode generate"
            )
        return [x / sum(p) for x in p]

    def next_token_probs(self, conversation, begun):
        """{token text, stripped: probability} of the next token after an assistant turn begun with `begun`."""
        messages = [*conversation, {"role": "assistant", "content": begun}]
        choice = chat_api.chat_choice(
            self.api_base,
            self.model_name,
            messages,
            timeout=self.timeout,
            backoff=self.backoff,
            max_tokens=1,
            logprobs=True,
            top_logprobs=20,
            continue_final_message=True,
            add_generation_prompt=False,
        )
        try:
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            probs = {}
            for t in top:
                probs[t["token"].strip()] = probs.get(t["token"].strip(), 0.0) + math.exp(t["logprob"])
        except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError):
            raise common.InputError(
                f"judge endpoint {chat_api.shown_url(self.api_base)}: returned no logprobs (top_logprobs), which "
                f"--mode {self.mode} reads; serve the judge with vLLM or llama.cpp's server, or use --mode generate"
            ) from None
        return probs

    def ask(self, conversations, parse):
        def one(conversation):
            for _ in range(2):
                reply = chat_api.chat_completion(
                    self.api_base,
                    self.model_name,
                    conversation,
                    timeout=self.timeout,
                    backoff=self.backoff,
                    max_tokens=self.max_tokens,
                )
                value = None if reply is None else parse(reply)  # None: cut off, filtered or empty
                if value is not None:
                    return value
            return None

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, conversations))


# ----------------------------------------------------------------------------- from a stage's flags


def add_judge_args(p, judge_help):
    """The judge's flags; judge_help says what --judge defaults to in this stage."""
    add, count = p.add_argument, common.positive_int
    add(
        "--mode",
        choices=MODES,
        default="auto",
        help="generate: reason then 'Rating: N'; logits: most likely "
        "rating in one forward pass; logits-expected: the expected rating, rounded (for weak judges); auto (default): "
        "logits-expected for the embedded default model, generate for any other judge",
    )
    add("--judge", default=None, help=f"local judge model ({judge_help})")
    add(
        "--judge-api-base",
        default=None,
        help="OpenAI-compatible API base URL, e.g. http://host/v1 (key in $OPENAI_API_KEY); instead of a local judge",
    )
    add("--judge-model", default="gpt-4o", help="model name sent to the endpoint (default gpt-4o)")
    add("--judge-concurrency", type=count, default=8, help="HTTP judge requests in flight at once (default 8)")
    add(
        "--judge-timeout",
        type=common.positive,
        default=60.0,
        help="seconds an HTTP judge request may take in all, before it is retried (default 60)",
    )
    add("--backoff", type=common.non_negative, default=1.0, help="first HTTP retry delay in seconds (default 1)")
    add(
        "--judge-max-tokens",
        type=count,
        default=None,
        help="tokens the judge may write in generate mode (default 48 for a local judge, 256 for an endpoint)",
    )
    add(
        "--max-unreadable",
        type=common.fraction,
        default=0.5,
        help="stop when more than this share of the ratings asked (16 at least) had no readable reply (default 0.5)",
    )
    add("--judge-batch-size", type=count, default=16, help="judgements per call of a local judge (default 16)")


def add_primary_arg(p):  # G_a; G_b is helpfulness
    p.add_argument("--primary", choices=PRIMARY_OBJECTIVES, default="harmlessness", help="G_a (default harmlessness)")


def max_tokens(args):
    """--judge-max-tokens, or its default: 48 for a local judge, 256 for an endpoint's reason and rating."""
    return args.judge_max_tokens or (256 if args.judge_api_base else 48)


def judge_settings(args, local_name):
    """What shapes a judge's ratings, for resume checks (never the API key): the endpoint and
    model asked, or a local judge's weights and how inference runs; the prompt files, the mode
    and the reply budget. local_name: the local judge's model (unused with an endpoint)."""
    if args.judge_api_base:
        chat_api.check_api_base(args.judge_api_base)  # refused here, before any output is started
        judge = {
            "judge": args.judge_model,
            "judge_api_base": chat_api.shown_url(args.judge_api_base),
            "judge_prompts": common.prompts_fingerprint(),
        }
    else:
        judge = {f"judge_{k}" if k != "model" else "judge": v for k, v in common.model_settings(local_name).items()}
    mode = resolve_mode(args.mode, bool(args.judge_api_base), local_name)
    return dict(judge, mode=mode, judge_max_tokens=max_tokens(args))


def from_args(args, local_name, loaded=None):
    """The judge a stage's flags ask for: the endpoint of --judge-api-base, else the local
    model local_name, `loaded` as (model, tokenizer) when the stage already holds it."""
    mode = resolve_mode(args.mode, bool(args.judge_api_base), local_name)
    if args.judge_api_base:
        judge = HttpJudge(
            api_base=args.judge_api_base,
            model=args.judge_model,
            mode=mode,
            concurrency=args.judge_concurrency,
            timeout=args.judge_timeout,
            backoff=args.backoff,
            max_tokens=max_tokens(args),
        )
    else:
        model, tok = loaded or common.load_for_inference(local_name)
        judge = LocalJudge(
            model,
            tok,
            mode=mode,
            max_tokens=max_tokens(args),
            batch_size=args.judge_batch_size,
            max_batch_tokens=args.max_batch_tokens,
        )
    judge.max_unreadable = args.max_unreadable
    return judge
