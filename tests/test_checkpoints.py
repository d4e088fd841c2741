"""checkpoints.py through train.py: a resumed run equals a straight one, a kill between renames
loses nothing, a checkpoint of another plan, model or setting is refused."""

import json
import pytest
import torch
import common
from safetensors.torch import load_file
from conftest import read_jsonl, refused, run, run_here, write_jsonl


@pytest.mark.parametrize("loss", ["spa", "dpo"])
def test_resume_equals_straight_run_and_saved_model_generates(tmp_path, tiny_model_dir, tokenizer, loss):
    from safetensors.torch import load_file

    pairs = [
        {
            "id": str(i),
            "prompt": f"Question {i}?",
            "chosen": "A careful answer " * (i + 1),
            "rejected": "No." * (i + 1),
            "gap": i % 3,
        }
        for i in range(8)
    ]
    f = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    common_args = [
        "--input",
        f,
        "--model",
        tiny_model_dir,
        "--lr",
        1e-3,
        "--batch-size",
        1,
        "--grad-accum",
        2,
        "--loss",
        loss,
        "--save-every",
        0,
    ]
    run("train.py", *common_args, "--output", tmp_path / "straight")
    run("tests/stop_after.py", 2, "train.py", *common_args, "--output", tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "config.json").exists()  # no half-written final model
    run("train.py", *common_args, "--output", tmp_path / "resumed", "--resume")
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (tmp_path / "resumed" / "checkpoint").exists()  # superseded by the final model
    cfg = json.loads((tmp_path / "straight" / "train_config.json").read_text())
    assert cfg["loss"] == loss and cfg["steps"] == 4
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    tok = AutoTokenizer.from_pretrained(tmp_path / "straight")
    assert tok.chat_template and "quantization_config" not in model.config.to_dict()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3 or out[0, -1] == tok.eos_token_id


def test_non_finite_loss_stops_with_step_and_batch_named(tmp_path, tiny_model_dir):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"id": "x", "prompt": "a", "chosen": "b", "rejected": "c", "gap": 1}])
    p = run(
        "train.py",
        "--input",
        f,
        "--output",
        tmp_path / "m",
        "--model",
        tiny_model_dir,
        "--beta",
        "inf",
        "--loss",
        "simpo",
        check=False,
    )
    assert p.returncode != 0 and "training stopped at step 1" in p.stderr and "['x']" in p.stderr
    assert not (tmp_path / "m" / "config.json").exists()


def test_train_resume_refuses_every_changed_setting(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"id": str(i), "prompt": f"Q{i}?", "chosen": "Careful. " * (i + 1), "rejected": "No.", "gap": 1 + i % 2}
            for i in range(4)
        ],
    )
    args = [
        "--input",
        pairs,
        "--model",
        tiny_model_dir,
        "--batch-size",
        1,
        "--grad-accum",
        1,
        "--save-every",
        1,
        "--lora-rank",
        2,
        "--output",
        tmp_path / "m",
    ]
    run("tests/stop_after.py", 1, "train.py", *args)
    other = tmp_path / "other"
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        m.model.norm.weight.add_(1.0)
    m.save_pretrained(other)
    common.load_tokenizer(str(tiny_model_dir)).save_pretrained(other)
    for change, named in (
        (["--lora-alpha", 4], "lora_alpha"),
        (["--beta", 1.0], "beta"),
        (["--gamma", 0.5], "gamma"),
        (["--alpha", 2], "alpha"),
        (["--mixed-precision", "bf16"], "mixed_precision"),
        (["--lora-targets", "q_proj"], "lora_targets"),
    ):
        refused(run_here("train.py", *args, *change, "--resume"), f"another plan: {named}")
    refused(run_here("train.py", *args[:2], "--model", other, *args[4:], "--resume"), "another plan: weights")
    assert run_here("train.py", *args, "--resume").returncode == 0


def test_resume_refuses_a_changed_plan_and_survives_a_kill_between_renames(tmp_path, tiny_model_dir):
    pairs = [
        {"id": str(i), "prompt": f"Q{i}?", "chosen": "Careful " * (i + 1), "rejected": "No.", "gap": i % 3}
        for i in range(6)
    ]
    f = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    args = [
        "--input",
        f,
        "--model",
        tiny_model_dir,
        "--lr",
        1e-3,
        "--batch-size",
        1,
        "--grad-accum",
        1,
        "--save-every",
        1,
    ]
    run("train.py", *args, "--output", tmp_path / "straight")
    run("tests/stop_after.py", 3, "train.py", *args, "--output", tmp_path / "m")
    refused(
        run(
            "train.py",
            *args[:-4],
            "--batch-size",
            2,
            "--grad-accum",
            1,
            "--save-every",
            1,
            "--output",
            tmp_path / "m",
            "--resume",
            check=False,
        ),
        "batch_size 1 (now 2)",
    )
    g = write_jsonl(tmp_path / "other.jsonl", pairs[::-1])
    refused(
        run("train.py", "--input", g, *args[2:], "--output", tmp_path / "m", "--resume", check=False),
        "the checkpoint belongs to another plan: pairs",
    )
    refused(run("train.py", *args, "--output", tmp_path / "m", check=False), "holds a checkpoint")
    assert len(read_jsonl(tmp_path / "m" / "metrics.jsonl")) == 3  # nothing discarded
    (tmp_path / "m" / "checkpoint").rename(tmp_path / "m" / "checkpoint.tmp")  # killed between the two renames
    run("train.py", *args, "--output", tmp_path / "m", "--resume")
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
