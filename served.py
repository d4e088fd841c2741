"""A model served by an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server) in place of
a local one: the generation stages' --api-base and --api-model.

Where users outgrow plain `generate`, they serve the model with the engine they already run
and point the stages at it. Each answer is one chat-completions request carrying what the
local path would use: the candidate's own seed (generation.row_seed of the run's seed and the
row's key), its temperature, top_p and max_tokens, and its system variant (folded into the
user turn once the server's template refuses a system role, as generation.fold_system does
locally). Requests run --api-concurrency at a time; answers keep their order. The key rules
of chat_api.py hold (the key to the configured host only, no redirect, no proxy over http).
"""

from concurrent.futures import ThreadPoolExecutor

import chat_api
import common
import generation


class ServedModel:
    """generate(conversations, **settings) -> answers (input order), as generation.LocalModel."""

    def __init__(self, api_base, model, concurrency=32, timeout=600.0, backoff=1.0):
        self.api_base, self.model = chat_api.check_api_base(api_base, "--api-base"), model
        self.concurrency, self.timeout, self.backoff = concurrency, timeout, backoff
        self.fold = False  # the server's template refuses a system role: learnt from its first refusal

    def generate(self, conversations, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, keys=None, **_):
        """One request per conversation: temperature one float or one per conversation, the
        seed of conversation i row_seed(seed, keys[i]) (keys default to the positions)."""
        keys = list(range(len(conversations))) if keys is None else keys
        temps = temperature if isinstance(temperature, (list, tuple)) else [temperature] * len(conversations)

        def one(i):
            params = dict(
                max_tokens=max_new_tokens, temperature=temps[i], top_p=top_p, seed=generation.row_seed(seed, keys[i])
            )
            return self.answer(conversations[i], params)

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, range(len(conversations))))

    def answer(self, conversation, params):
        """One answer's text (stripped): complete, or cut at max_tokens as a local answer is."""
        system = conversation[0]["role"] == "system"
        messages = generation.fold_system(conversation) if system and self.fold else conversation
        try:
            choice = chat_api.chat_choice(
                self.api_base, self.model, messages, timeout=self.timeout, backoff=self.backoff, **params
            )
        except chat_api.Refused as e:
            if e.code != 400 or not system or self.fold:
                raise
            self.fold = True
            common.log(
                "note: the served model refused a system message; the system text is folded into the first user turn"
            )
            return self.answer(conversation, params)
        return (chat_api.reply_text(choice, finished=("stop", "length")) or "").strip()


def from_args(args):
    """The served model of --api-base/--api-model, or None for a local --model."""
    if bool(args.api_base) != bool(args.api_model):
        raise common.InputError("--api-base and --api-model go together: the server's URL and the model it serves")
    return ServedModel(args.api_base, args.api_model, args.api_concurrency) if args.api_base else None


def settings(args):
    """What a served model brings to a stage's resume settings: the server (as chat_api shows
    it: no credentials, the query hashed), the model's name and the prompt files."""
    return {
        "api_base": chat_api.shown_url(args.api_base),
        "api_model": args.api_model,
        "prompts": common.prompts_fingerprint(),
    }
