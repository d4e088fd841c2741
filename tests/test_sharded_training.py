"""train.py's sharded path at the scale it meets on a node: loading without a whole model per
rank, checkpoints that resume at another process count, two torchrun 'nodes', hangs that
surface. gloo on the CPU, 2 ranks."""

import json
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import PAIRS, update_matches, ROOT, read_jsonl, run, torchrun, write_jsonl


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    """A 42M-parameter Llama saved in bf16, as released checkpoints are (train.py trains it in
    float32): big enough that its weights, not the interpreter, dominate a process's memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    d = tmp_path_factory.mktemp("bf16_model")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return d


def test_a_rank_loads_its_shards_not_the_whole_model(tmp_path, bf16_model_dir):
    """Before, every rank loaded the whole float32 model before sharding it: the one-process
    load, measured beside. Now rank 1 allocates its shards and one broadcast tensor at a time."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run("tests/load_memory.py", bf16_model_dir, one)
    torchrun("tests/load_memory.py", bf16_model_dir, two)
    whole = json.loads((one / "rank0.json").read_text())["grown"]
    rank1 = json.loads((two / "rank1.json").read_text())["grown"]
    n_bytes = 4 * sum(t.numel() for t in load_file(bf16_model_dir / "model.safetensors").values())
    assert whole >= 0.9 * n_bytes  # the measure sees a whole float32 model being loaded
    assert rank1 <= 0.6 * whole, (rank1, whole)
    a, b = load_file(one / "weights.safetensors"), load_file(two / "weights.safetensors")
    assert any("inv_freq" in k for k in a)  # the rotary buffers too, which no state dict carries
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k


PER_PROCESS = {1: 2, 2: 1}  # --batch-size by process count: the optimizer batch stays 2 pairs (4 steps)


def train_args(tmp_path, model):
    f = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    return ["--input", f, "--model", model, "--lr", 1e-3, "--grad-accum", 1, "--warmup-ratio", 0, "--save-every", 0]


def launch(processes, *args, check=True):
    return (run if processes == 1 else torchrun)(*args, check=check)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir):
    """4 steps at 2 ranks, never interrupted."""
    d = tmp_path_factory.mktemp("straight")
    torchrun("train.py", *train_args(d, tiny_model_dir), "--batch-size", 1, "--output", d / "model")
    return load_file(d / "model" / "model.safetensors")


@pytest.mark.parametrize("saved_by,resumed_by", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_at_another_number_of_processes(
    tmp_path, tiny_model_dir, straight_run, saved_by, resumed_by
):
    args, out = train_args(tmp_path, tiny_model_dir), tmp_path / "model"
    per = PER_PROCESS[saved_by]
    launch(saved_by, "tests/stop_after.py", 2, "train.py", *args, "--batch-size", per, "--output", out)
    ck = out / "checkpoint"
    shards = sorted(p.name for p in ck.glob("*.distcp"))
    assert len(shards) == saved_by and (ck / ".metadata").exists() and (ck / "trainer_state.json").exists()
    p = launch(resumed_by, "train.py", *args, "--batch-size", 3, "--output", out, "--resume", check=False)
    assert p.returncode != 0 and "optimizer_batch 2 (now" in p.stderr  # another optimizer batch: other steps
    if resumed_by == 2:  # neither --resume nor --overwrite
        p = torchrun("train.py", *args, "--batch-size", 1, "--output", out, check=False)
        assert p.returncode != 0 and "holds a checkpoint" in p.stderr
    launch(resumed_by, "train.py", *args, "--batch-size", PER_PROCESS[resumed_by], "--output", out, "--resume")
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    resumed, start = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert resumed.keys() == straight_run.keys()
    rel, moved = update_matches(straight_run, resumed, start)
    assert moved > 0 and rel < 1e-4, (rel, moved)


def test_a_rank_hung_in_a_step_stops_the_run_within_the_step_timeout(tmp_path, tiny_model_dir, monkeypatch):
    """Rank 1 stops answering in its second forward; rank 0, waiting in FSDP2's all-gather,
    gives up after SPA_STEP_TIMEOUT seconds, not after the two hours loading may take."""
    monkeypatch.setenv("SPA_STEP_TIMEOUT", "5")
    args = [*train_args(tmp_path, tiny_model_dir), "--batch-size", 1, "--output", tmp_path / "model"]
    t0 = time.time()
    p = torchrun("tests/hang_at.py", 2, "train.py", *args, check=False)
    assert p.returncode != 0 and time.time() - t0 < 120
    assert "timed out" in p.stderr.lower() or "timeout" in p.stderr.lower(), p.stderr[-3000:]


def test_two_nodes_train_to_the_weights_of_one_process(tmp_path, tiny_model_dir):
    """Two torchrun launches on 127.0.0.1, one rank each, as two nodes sharing the output folder."""
    args = train_args(tmp_path, tiny_model_dir)
    run("train.py", *args, "--batch-size", 2, "--output", tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node)]
            + ["--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}"]
            + [str(ROOT / "train.py"), *map(str, args), "--batch-size", "1", "--output", str(tmp_path / "two")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    rel, moved = update_matches(one, two, start)
    assert moved > 0 and rel < 1e-4, (rel, moved)
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["world_size"] == 2
