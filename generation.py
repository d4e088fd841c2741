"""Batched chat generation with plain `model.generate` and its KV cache.

Prompts are rendered with the model's chat template, sorted by length, left-padded and sent
batch_size at a time. Sampling draws each row's random numbers from a generator seeded by
(seed, the row's key), so an answer's randomness depends neither on its neighbours in the
batch nor on the number of processes (the arithmetic itself can round differently with the
batch's shape; the README says how often that changes an answer).
"""

import hashlib
import re
import sys
from typing import NamedTuple

import torch

import common

WORD_JOINER = "\u2060"  # invisible; breaks a control token's spelling in user text (literal_text)
_refuses_system = {}  # chat template -> whether it raises on a system message
_markers = {}  # chat template -> the markers it writes as plain text
_turn_ends = {}  # chat template -> the added token that ends an assistant's turn, or None


def chat_text(tok, messages, add_generation_prompt=True):
    """A conversation rendered by the tokenizer's chat template. Text that spells one of the
    template's control tokens is kept literal (literal_text); a template that refuses a system
    role gets the system text folded into the first user turn (fold_system)."""
    messages = [dict(m, content=literal_text(tok, m["content"])) for m in messages]
    if messages and messages[0]["role"] == "system" and refuses_system(tok):
        messages = fold_system(messages)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def literal_text(tok, text):
    """User text as characters, never as the template's markers: where it spells one of the
    tokenizer's added tokens (<|im_end|>, <|start_header_id|>, ...) or a marker the chat
    template writes as plain text ([INST], [/INST], ...: template_markers), a word joiner goes
    after the first character, so the tokenizer reads plain characters there and nobody's
    text can close a turn or open another inside a prompt."""
    markers = [t.content for t in tok.added_tokens_decoder.values() if len(t.content) > 1]
    for marker in sorted({*markers, *template_markers(tok)}, key=len, reverse=True):
        if marker in text:
            text = text.replace(marker, marker[0] + WORD_JOINER + marker[1:])
    return text


def template_markers(tok):
    """The strings a chat template writes around the turns as plain text, found from the template
    itself: a user, assistant, user conversation rendered with placeholder contents, and every
    line of what the template wrote between them, its added tokens taken out, that holds a
    bracket, angle bracket, bar or hash ([INST], [/INST], ### Response:, ...). Cached per template."""
    key = str(tok.chat_template)
    if key not in _markers:
        turns = [
            {"role": r, "content": c} for r, c in (("user", "\ue000"), ("assistant", "\ue001"), ("user", "\ue002"))
        ]
        try:
            text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that renders no such conversation: its added tokens only
            text = ""
        for token in tok.added_tokens_decoder.values():  # "<s>[INST]": the bos token apart from the marker
            text = text.replace(token.content, "\ue000") if token.content else text
        pieces = (p.strip() for p in re.split("[\ue000-\ue002\n]+", text))
        _markers[key] = {p for p in pieces if len(p) > 1 and any(ch in "[]<>|#" for ch in p)}
    return _markers[key]


def refuses_system(tok):
    """Whether the chat template raises on a system message (Mistral-7B-Instruct v0.1/v0.2 and
    Gemma's do: 'Conversation roles must alternate'); said once in the log."""
    template = str(tok.chat_template)
    if template not in _refuses_system:
        try:
            tok.apply_chat_template(
                [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                tokenize=False,
                add_generation_prompt=True,
            )
            _refuses_system[template] = False
        except Exception:  # jinja2's TemplateError, raised by the template itself
            _refuses_system[template] = True
            common.log(
                "note: this model's chat template refuses a system message; the system text is folded "
                "into the first user turn"
            )
    return _refuses_system[template]


def fold_system(messages):
    """[system, user, ...] -> [user with the system text before its own, ...]."""
    system, rest = messages[0]["content"], messages[1:]
    if not rest or rest[0]["role"] != "user":
        return rest
    return [dict(rest[0], content=f"{system}\n\n{rest[0]['content']}"), *rest[1:]]


def user_turn(prompt, system=None):
    """A one-turn conversation; system=None keeps the chat template's own default."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def prompt_turns(prompt, system=None):
    """The conversation a prompt record asks to answer: a string is one user turn; a list of
    messages ending with a user turn (TRL's conversational prompt, MT-Bench's second turn) is
    answered as it stands, `system` put first unless it has a system message of its own."""
    if isinstance(prompt, str):
        return user_turn(prompt, system)
    has_system = prompt[0]["role"] == "system"
    return ([] if has_system or not system else [{"role": "system", "content": system}]) + list(prompt)


def prompt_text(prompt):
    """A prompt as text inside another prompt (the judge's, the refinement's): a string as it is;
    a conversation as its turns, one "Role: content" paragraph each."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def row_seed(*parts):
    """A 63-bit seed from its parts (the seed, a row's key), the same in every process and on
    every machine (no Python hash randomisation)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class RowSampler:
    """A logits processor that draws each row's next token from the row's own random numbers:
    temperature (0 = greedy) per row, an optional top-p, then the token at which the row's
    cumulative probability passes its uniform number for this step. uniforms: (rows,
    max_new_tokens), drawn by the caller from each row's own generator. It returns a one-hot
    of the drawn token (0 there, -inf elsewhere), so generate runs greedy and keeps it. It
    reads nothing back to the host."""

    def __init__(self, temperatures, top_p, uniforms):
        self.t, self.top_p, self.u, self.step = temperatures, top_p, uniforms, 0

    def __call__(self, input_ids, scores):
        u = self.u[:, self.step]
        self.step += 1
        probs = torch.softmax(scores.float() / self.t.clamp(min=1e-6)[:, None], dim=-1)
        if self.top_p < 1:  # the smallest set of most likely tokens whose mass reaches top_p
            probs, order = probs.sort(-1, descending=True)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
            pick = order.gather(1, inverse_cdf(probs, u)[:, None])[:, 0]
        else:
            pick = inverse_cdf(probs, u)
        pick = torch.where(self.t > 0, pick, scores.argmax(-1))
        return torch.full_like(scores, float("-inf")).scatter_(1, pick[:, None], 0.0)


def inverse_cdf(w, u):
    """The token i with cdf(i - 1) < u * total <= cdf(i) in each row of (unnormalised)
    probabilities w (rows, V), u (rows,) in [0, 1). Returns (rows,) token ids."""
    cdf = w.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0].clamp(max=w.shape[1] - 1)


MAX_BATCH_TOKENS = common.MAX_BATCH_TOKENS  # --max-batch-tokens' default (docs/BENCHMARKS.md has the arithmetic)


def end_token_ids(model, tok):
    """Every token that ends a row: the tokenizer's eos, each eos of the model's generation_config
    (Llama-3.1-Instruct lists three) and the special token the chat template writes right after an
    assistant's message (Gemma's <end_of_turn>, whose tokenizer's eos is <eos>)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tok.eos_token_id, *(listed if isinstance(listed, (list, tuple)) else [listed])}
    turn_end = template_turn_end(tok)
    return sorted(i for i in ids | {turn_end} if i is not None)


def template_turn_end(tok):
    """The id of the added token the chat template writes first after an assistant's message, or None."""
    key = str(tok.chat_template)
    if key not in _turn_ends:
        turns = [{"role": "user", "content": "\ue000"}, {"role": "assistant", "content": "\ue001"}]
        try:
            after = tok.apply_chat_template(turns, tokenize=False).split("\ue001", 1)[1]
        except Exception:  # a template that renders no such conversation
            after = ""
        added = {t.content: i for i, t in tok.added_tokens_decoder.items() if t.content}
        _turn_ends[key] = next((added[t] for t in sorted(added, key=len, reverse=True) if after.startswith(t)), None)
    return _turn_ends[key]


def generation_config(model, tok, max_new_tokens):
    """generate's settings: greedy (RowSampler does the sampling), a row ends at any end token
    (end_token_ids), and generate never compiles, on any device."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=end_token_ids(model, tok),
        disable_compile=True,
    )


def token_batches(order, lengths, rows, new_tokens, budget):
    """Cut `order` (indices, shortest first as a rule) into batches of at most `rows` rows whose
    rows x (longest length + new_tokens) stays within `budget` tokens (a row alone may pass it)."""
    batch, longest = [], 0
    for i in order:
        if batch and (len(batch) == rows or (len(batch) + 1) * (max(longest, lengths[i]) + new_tokens) > budget):
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        yield batch


def encode(model, tok, texts, max_new_tokens, keys, then=None):
    """Rendered prompts -> left-padded input_ids and attention_mask on the model's device
    (with the token id `then` appended to every row, if given), refused (naming their keys) if
    any does not fit the context with the answer budget."""
    enc = tok(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    if then is not None:
        enc = {
            "input_ids": torch.cat([enc["input_ids"], torch.full((len(texts), 1), then)], 1),
            "attention_mask": torch.cat([enc["attention_mask"], torch.ones(len(texts), 1, dtype=torch.long)], 1),
        }
    context = getattr(model.config, "max_position_embeddings", 1 << 30)
    check_context(enc["attention_mask"].sum(1).tolist(), max_new_tokens, context, keys)
    return {k: v.to(model.device) for k, v in enc.items()}


def check_context(lengths, max_new_tokens, context, keys, hint=""):
    """Refuse prompts that, with the answer budget, do not fit the model's context window."""
    over = [k for k, n in zip(keys, lengths) if n + max_new_tokens > context]
    if over:
        raise common.InputError(
            f"{len(over)} prompt(s) do not fit the model's context of {context} tokens with "
            f"{max_new_tokens} new tokens: ids {', '.join(map(str, over[:10]))}{hint}"
        )


def check_all_fit(tok, conversations, keys, max_new_tokens, model_name, hint=""):
    """Every conversation rendered and counted before the first batch, so a prompt that does not
    fit the model's context is refused before anything is written, not after the other work."""
    context = getattr(common.model_config(model_name), "max_position_embeddings", None) or 1 << 30
    lengths = [len(tok(chat_text(tok, c), add_special_tokens=False)["input_ids"]) for c in conversations]
    check_context(lengths, max_new_tokens, context, keys, hint)


def truncate_prompts(tok, records, systems, max_new_tokens, context):
    """--truncate-prompts: cut each prompt that, under the longest of `systems` and with the
    answer budget, would not fit the context window, keeping its beginning. Returns (records,
    number cut); a cut record says so in `prompt_truncated`."""
    overhead = max(len(tok(chat_text(tok, user_turn("", s)), add_special_tokens=False)["input_ids"]) for s in systems)
    room = context - max_new_tokens - overhead
    if room < 1:
        raise common.InputError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens"
        )
    out, cut = [], 0
    for r in records:
        if not isinstance(r["prompt"], str):  # a conversation is not cut: it is checked whole
            out.append(r)
            continue
        ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) > room:
            r, cut = dict(r, prompt=tok.decode(ids[:room]), prompt_truncated=True), cut + 1
        out.append(r)
    return out, cut


@torch.no_grad()
def generate(
    model,
    tok,
    conversations,
    *,
    max_new_tokens,
    temperature=0.0,
    top_p=1.0,
    batch_size=8,
    seed=0,
    keys=None,
    max_batch_tokens=MAX_BATCH_TOKENS,
):
    """One answer per conversation with plain `model.generate` and its KV cache, sorted by
    length, at most batch_size conversations and max_batch_tokens tokens (rows x (prompt +
    new tokens)) per call. temperature: one float, or one per conversation (0 = greedy).
    Conversation i draws its random numbers from a generator seeded with row_seed(seed,
    keys[i]); keys default to the conversations' positions: pass ids so that an answer
    depends on nothing else. Returns the answers (input order)."""
    from transformers import LogitsProcessorList

    texts = [chat_text(tok, c) for c in conversations]
    keys = list(range(len(texts))) if keys is None else keys
    temps = temperature if isinstance(temperature, (list, tuple)) else [temperature] * len(texts)
    cfg = generation_config(model, tok, max_new_tokens)
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for idx in token_batches(order, lengths, batch_size, max_new_tokens, max_batch_tokens):
        enc = encode(model, tok, [texts[i] for i in idx], max_new_tokens, [keys[i] for i in idx])
        processors = []
        if any(temps[i] > 0 for i in idx):  # all greedy: generate's own argmax
            t = torch.tensor([temps[i] for i in idx], dtype=torch.float32)
            u = torch.stack(
                [
                    torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(row_seed(seed, keys[i])))
                    for i in idx
                ]
            )
            processors.append(RowSampler(t.to(model.device), top_p, u.to(model.device)))
        inputs = model_inputs(model, enc, keep=1, room=max_new_tokens)
        ids = model.generate(**inputs, generation_config=cfg, logits_processor=LogitsProcessorList(processors))
        answers = tok.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)  # past the prompts
        for i, a in zip(idx, answers):
            out[i] = a.strip()
    return out


class LocalModel(NamedTuple):
    """A loaded model and its tokenizer, answering as a served model does (served.ServedModel):
    generate(conversations, **settings) -> answers, input order."""

    model: object
    tok: object

    def generate(self, conversations, **settings):
        return generate(self.model, self.tok, conversations, **settings)


@torch.no_grad()
def next_token_logprobs(
    model, tok, texts, token_ids, then=None, batch_size=16, max_batch_tokens=MAX_BATCH_TOKENS, groups=None
):
    """log P(token | text) for the given token_ids after each rendered text, from one forward
    pass per batch (at most batch_size texts and max_batch_tokens tokens): (N, 1, len(token_ids)).
    With `then` (a token id), it is appended to every text and the same pass also gives
    log P(token | text + then): (N, 2, len(token_ids)). Texts go shortest first; with
    `groups` (a key per text, e.g. the question a judge prompt is about) a group's texts stay
    side by side, groups in the order of their longest text, so that a prefill that shares
    prefixes (cpu_speed.py) runs their common part once."""
    keep = 1 if then is None else 2
    cols = torch.tensor(token_ids)
    lengths = [len(ids) + keep for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    if groups is not None:  # a key may be a conversation (a list): compared by its repr
        keys = [repr(g) for g in groups]
        longest = {keys[i]: (len(texts[i]), i) for i in order}  # shortest first: the last is the longest
        order.sort(key=lambda i: longest[keys[i]])
    out = torch.empty(len(texts), keep, len(token_ids))
    for idx in token_batches(order, lengths, batch_size, 0, max_batch_tokens):
        inputs = model_inputs(model, encode(model, tok, [texts[i] for i in idx], 0, idx, then), keep=keep, room=0)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        first = ids.shape[1] - keep if "cache" in inputs else 0  # a prefilled cache holds the rest
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
        logits = model(
            input_ids=ids[:, first:],
            attention_mask=mask,
            position_ids=pos[:, first:],
            cache=inputs.get("cache"),
            logits_to_keep=keep,
        ).logits.float()  # (B, keep, V)
        out[idx] = logits.log_softmax(-1)[..., cols.to(logits.device)].cpu()
    return out


# ----------------------------------------------------------------------------- the CPU path's one hook


def cpu_path(model):
    """cpu_speed.py if it prepared this model (common.load_for_inference does so on the CPU), else None."""
    speed = sys.modules.get("cpu_speed")
    return speed if speed is not None and speed.prepared(model) else None


def model_inputs(model, enc, keep, room):
    """generate's (or a forward's) inputs for a left-padded batch: enc itself on the plain path.
    The one place where the CPU path enters (cpu_speed.py, on a model it prepared): there
    every prompt token but the last `keep` is prefilled into a cache with `room` places more,
    the prefix that all rows share run once, and the inputs carry that cache."""
    speed = cpu_path(model)
    return speed.prefill(model, enc["input_ids"], enc["attention_mask"], keep, room) if speed else enc
