import contextlib
import functools
import io
import json
import os
import runpy
import subprocess
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["TQDM_DISABLE"] = "1"


@pytest.fixture(scope="session")
def real_model_dir():
    """The embedded default model, converted once (cached under $SPA_CACHE)."""
    import common

    return common.ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(real_model_dir):
    import common

    return common.load_tokenizer(str(real_model_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_dir, tokenizer):
    """A randomly initialised 2-layer Llama with the real tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def run(script, *args, check=True):
    """Run a stage as a user would; returns the CompletedProcess."""
    p = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, TQDM_DISABLE="1"),
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def run_here(script, *args):
    """Run a stage as `run` does, but in this process (no interpreter start, no imports: a few
    seconds less a run). Returns an object with returncode, stdout and stderr; an exception
    other than the stage's own exit propagates, traceback and all."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with (
        mock.patch.object(sys, "argv", [str(ROOT / script), *map(str, args)]),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, str):  # SystemExit("error: ...") prints its message and exits 1
                print(e.code, file=sys.stderr)
                code = 1
            else:
                code = e.code or 0
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def torchrun(script, *args, nproc=2, check=True):
    """Run a stage under torchrun with `nproc` ranks (gloo on the CPU)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            str(ROOT / script),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, TQDM_DISABLE="1"),
    )
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {p.returncode}:\n{p.stderr[-4000:]}")
    return p


def send_chat_reply(handler, content, finish_reason="stop", **message):
    """Answer a request as an OpenAI-compatible chat-completions endpoint does."""
    choice = {"message": {"role": "assistant", "content": content, **message}, "finish_reason": finish_reason}
    data = json.dumps({"choices": [choice]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@contextlib.contextmanager
def http_server(handler):
    """A threaded HTTP server with `handler` on 127.0.0.1; yields its base URL."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


PROMPTS = [{"id": f"p{i}", "prompt": f"Is thing {i} safe?"} for i in range(3)]

# preference pairs of several lengths and gaps (one gap 0), for train.py
PAIRS = [
    {
        "id": str(i),
        "prompt": f"Question {i}?",
        "chosen": "A careful answer " * (i % 3 + 1),
        "rejected": "No." * (i + 1),
        "gap": [0, 1, 2, 3, 5, 1, 4, 2][i],
    }
    for i in range(8)
]


def refused(p, message):
    """A run refused as the README promises: exit status 2, the message, no traceback."""
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]


def denoise_record(i, cands=((3, 4), (5, 2), (4, 4)), refined=(6, 6)):
    return {
        "id": i,
        "prompt": "q",
        "candidates": [{"text": f"c{k}", "score_a": a, "score_b": b} for k, (a, b) in enumerate(cands)],
        "refined": {"text": "r", "score_a": refined[0], "score_b": refined[1]},
    }


def sample(tmp_path, tiny, out, *extra, check=True, here=False):
    """sample.py on tmp_path/p.jsonl, 2 candidates of 3 tokens each; here=True: in this process (run_here)."""
    return (run_here if here else functools.partial(run, check=check))(
        "sample.py",
        "--input",
        tmp_path / "p.jsonl",
        "--output",
        out,
        "--model",
        tiny,
        "--num-candidates",
        2,
        "--max-new-tokens",
        3,
        *extra,
    )


def score_with_judge(tmp_path, api_base, *flags, records=None, runner=run_here):
    """score.py against the HTTP judge at api_base: input tmp_path/s.jsonl (by default one prompt
    with one candidate), output tmp_path/o.jsonl."""
    records = records or [{"id": "a", "prompt": "q", "candidates": [{"text": "x"}]}]
    inp = write_jsonl(tmp_path / "s.jsonl", records)
    return runner("score.py", "--input", inp, "--output", tmp_path / "o.jsonl", "--judge-api-base", api_base, *flags)


def update_matches(a, b, start):
    """How far two runs' updates (final - start, over start's tensors) differ: (|update a - update b| /
    |update a|, |update a|)."""
    import torch

    da = torch.cat([(a[k] - start[k]).flatten() for k in start])
    db = torch.cat([(b[k] - start[k]).flatten() for k in start])
    return float((da - db).norm() / da.norm()), float(da.norm())


class FakeJudge(BaseHTTPRequestHandler):
    """Chat-completions speaker: fails the first request with 500, never rates answers that
    contain 'UNRATABLE', prefers answer A in pairwise questions."""

    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append(body)
        if len(FakeJudge.requests) == 1:
            self.send_response(500)
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        reply = (
            "Winner: A"
            if "Answer A:" in text
            else "I cannot say."
            if "UNRATABLE" in text
            else f"Short reason. Rating: {4 + len(text) % 5}"
        )
        send_chat_reply(self, reply)

    def log_message(self, *a):
        pass


@pytest.fixture
def judge_server():
    FakeJudge.requests = []
    with http_server(FakeJudge) as base:
        yield base + "/v1"


def dcp_tensors(folder, prefix="model."):
    """The whole tensors of a torch.distributed.checkpoint folder whose keys start with `prefix`,
    read in this process (DCP reassembles every rank's shards)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    return state
