"""checkpoints.py through train.py: a resumed run equals a straight one, a kill between renames
loses nothing, a checkpoint of another plan, model or setting is refused."""

import json
import os
import shutil
from pathlib import Path
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
        "1e308",
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
        "optimizer_batch 1 (now 2)",
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


@pytest.mark.parametrize("name", ["final.tmp", "checkpoint.tmp", "metrics.jsonl", "train.lock"])
def test_train_writes_through_no_link_in_its_output(tmp_path, tiny_model_dir, name):
    """A link to another model folder (or a file) at a name train.py writes: refused, the target intact."""
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    before = sorted(f.name for f in other.iterdir())
    out = tmp_path / "t"
    out.mkdir()
    os.symlink(other if name.endswith(".tmp") else other / "config.json", out / name)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a b", "rejected": "c", "gap": 1}])
    p = run("train.py", "--input", pairs, "--model", tiny_model_dir, "--output", out, "--save-every", 1, check=False)
    refused(p, f"{out / name}: is a symbolic link")
    assert sorted(f.name for f in other.iterdir()) == before
    assert (other / "config.json").read_bytes() == (Path(tiny_model_dir) / "config.json").read_bytes()


def test_a_torn_last_metrics_line_does_not_block_a_resume(tmp_path, tiny_model_dir):
    pairs = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a b", "rejected": "c", "gap": 1} for i in range(4)]
    )
    args = [
        "--input",
        pairs,
        "--model",
        tiny_model_dir,
        "--output",
        tmp_path / "t",
        "--batch-size",
        1,
        "--grad-accum",
        1,
    ]
    run("tests/stop_after.py", 2, "train.py", *args)
    with open(tmp_path / "t" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')  # killed while appending
    run("train.py", *args, "--resume")
    assert [r["step"] for r in read_jsonl(tmp_path / "t" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_dpo_reference_logps_are_recomputed_when_what_they_came_from_changed(tmp_path, tiny_model_dir):
    """--eval-input may change on --resume: the cached reference log-probs of the old held-out
    pairs must not score the new ones (same count: silently wrong metrics; another count: an
    IndexError before)."""
    pairs = [
        {"id": str(i), "prompt": f"Q{i}?", "chosen": "Careful. " * (i + 1), "rejected": "No.", "gap": 1}
        for i in range(4)
    ]
    train_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    first = write_jsonl(tmp_path / "a.jsonl", [dict(p, chosen="Yes " * (3 + i)) for i, p in enumerate(pairs)])
    for name, n in (("b", 4), ("c", 3)):
        other = write_jsonl(
            tmp_path / f"{name}.jsonl", [dict(p, rejected="Never! " * (2 + i)) for i, p in enumerate(pairs[:n])]
        )
        args = [
            "--input",
            train_file,
            "--model",
            tiny_model_dir,
            "--loss",
            "dpo",
            "--lr",
            1e-3,
            "--batch-size",
            1,
            "--grad-accum",
            1,
            "--save-every",
            0,
        ]
        run("train.py", *args, "--eval-input", other, "--output", tmp_path / f"straight_{name}")
        run("tests/stop_after.py", 2, "train.py", *args, "--eval-input", first, "--output", tmp_path / f"r_{name}")
        run("train.py", *args, "--eval-input", other, "--output", tmp_path / f"r_{name}", "--resume")
        want, got = (read_jsonl(tmp_path / d / "metrics.jsonl")[-1] for d in (f"straight_{name}", f"r_{name}"))
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-4)
        assert got["eval_rewards/margins"] == pytest.approx(want["eval_rewards/margins"], rel=1e-3, abs=1e-5)


def test_the_final_model_is_saved_in_the_starting_models_dtype(tmp_path, tiny_model_dir):
    """A bf16 starting model (as Llama-3.1-8B-Instruct ships) is trained on float32 master
    weights and saved in bf16 unless --save-dtype float32 asks; either loads with its tokenizer,
    chat template and generation_config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)
    pairs = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a b", "rejected": "c", "gap": 1} for i in range(2)]
    )
    args = ["--input", pairs, "--model", base, "--batch-size", 2, "--grad-accum", 1, "--save-every", 0]
    run("train.py", *args, "--output", tmp_path / "auto")
    run("train.py", *args, "--output", tmp_path / "f32", "--save-dtype", "float32")
    for name, dtype in (("auto", torch.bfloat16), ("f32", torch.float32)):
        d = tmp_path / name
        assert {v.dtype for v in load_file(d / "model.safetensors").values()} == {dtype}
        assert json.loads((d / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
        m = AutoModelForCausalLM.from_pretrained(d)
        assert m.dtype == dtype and (d / "generation_config.json").is_file()
        assert AutoTokenizer.from_pretrained(d).chat_template


def test_a_lora_run_writes_adapters_peft_loads_onto_the_base(tmp_path, tiny_model_dir):
    """adapter/ holds PEFT's files, written without PEFT: PeftModel puts them on the base and
    gives the logits of the merged model train.py saved beside them."""
    peft = pytest.importorskip("peft", reason="peft is a test-only package (make test installs it)")
    from transformers import AutoModelForCausalLM

    pairs = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a b c", "rejected": "d", "gap": 1} for i in range(4)]
    )
    run(
        "train.py",
        "--input",
        pairs,
        "--model",
        tiny_model_dir,
        "--output",
        tmp_path / "m",
        "--lora-rank",
        4,
        "--lora-alpha",
        8,
        "--lr",
        1e-2,
        "--batch-size",
        2,
        "--grad-accum",
        1,
        "--save-every",
        0,
    )
    cfg = json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "m" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([[1, 5, 9, 200, 3000, 7]])
    with torch.no_grad():
        a, b = adapted(ids).logits, merged(ids).logits
    assert (a - AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits).abs().max() > 1e-3  # it moved
    assert torch.allclose(a, b, atol=1e-4)
