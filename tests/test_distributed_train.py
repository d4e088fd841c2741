"""train.py under torchrun (gloo, 2 ranks) against one process; mixed precision; LoRA."""

import json

import pytest
import torch
from safetensors.torch import load_file

import common
import lora
import policy_model
import preference_data
import train
from conftest import PAIRS, update_matches, dcp_tensors, read_jsonl, run, torchrun, write_jsonl


def weights(d):
    return load_file(d / "model.safetensors")


@pytest.mark.parametrize("loss", ["spa", "dpo"])
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path, tiny_model_dir, loss):
    f = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common_args = [
        "--input",
        f,
        "--model",
        tiny_model_dir,
        "--lr",
        1e-3,
        "--grad-accum",
        1,
        "--loss",
        loss,
        "--save-every",
        0,
        "--warmup-ratio",
        0,
    ]
    run("train.py", *common_args, "--batch-size", 4, "--output", tmp_path / "one")
    torchrun("train.py", *common_args, "--batch-size", 2, "--output", tmp_path / "two")
    m1, m2 = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert len(m1) == len(m2) == 2
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-5)
    assert m2[1]["loss"] == pytest.approx(m1[1]["loss"], rel=1e-4)
    for k in ("rewards/margins", "weight/mean", "weight/zero", "grad_norm"):
        assert m2[0][k] == pytest.approx(m1[0][k], rel=1e-4, abs=1e-6), k
    start = weights(tiny_model_dir)
    assert weights(tmp_path / "two").keys() == start.keys()  # tied embeddings saved once, as the base has them
    rel, norm = update_matches(weights(tmp_path / "one"), weights(tmp_path / "two"), start)
    assert norm > 0 and rel < 0.01
    cfg = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["batch_size"] == 2


def test_bf16_mixed_precision_keeps_float32_master_weights_and_moves_them(tmp_path, tiny_model_dir):
    """One step at lr 1e-6 moves nearly every decoder weight: it would not in pure bf16."""
    f = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    run(
        "tests/stop_after.py",
        1,
        "train.py",
        "--input",
        f,
        "--model",
        tiny_model_dir,
        "--output",
        tmp_path / "m",
        "--lr",
        1e-6,
        "--batch-size",
        4,
        "--grad-accum",
        1,
        "--warmup-ratio",
        0,
        "--mixed-precision",
        "bf16",
    )
    shard = dcp_tensors(tmp_path / "m" / "checkpoint")
    start = weights(tiny_model_dir)
    layers = [k for k in start if ".layers." in k]
    assert all(shard[f"model.lm.{k}"].dtype == torch.float32 for k in layers)
    moved = sum(int((shard[f"model.lm.{k}"] != start[k]).sum()) for k in layers)
    total = sum(start[k].numel() for k in layers)
    assert moved / total >= 0.9
    # the same update applied to bf16 weights is lost to rounding
    lost = sum(int((shard[f"model.lm.{k}"].bfloat16() != start[k].bfloat16()).sum()) for k in layers)
    assert lost / total < 0.5


def tiny_lm(tiny_model_dir, rank=4):
    model, _ = common.load_model(str(tiny_model_dir))
    lora.apply(model, rank, 8.0)
    return model


def test_lora_trains_only_adapters_and_starts_at_the_base(tiny_model_dir, tokenizer):
    from test_train import make_examples

    base, _ = common.load_model(str(tiny_model_dir))
    model = tiny_lm(tiny_model_dir)
    ex = make_examples(tokenizer)
    batch = preference_data.collate(ex, tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(policy_model.Policy(model)(**batch)[0], policy_model.Policy(base)(**batch)[0], atol=1e-5)
    args = type("A", (), dict(loss="spa", alpha=1.0, beta=2.5, gamma=1.375))()
    train.train_step(policy_model.Policy(model), ex, [[0, 1, 2, 3]], args, tokenizer.pad_token_id)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith(("lora_A", "lora_B")) for n in with_grad)
    assert any(n.endswith("lora_B") for n in with_grad)


def test_lora_merge_equals_base_plus_adapters(tiny_model_dir):
    model = tiny_lm(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    merged, _ = common.load_model(str(tiny_model_dir))
    sd = lora.merge(model.state_dict(), 8.0 / 4)
    assert set(sd) == set(merged.state_dict())
    merged.load_state_dict(sd)
    ids = torch.tensor([[1, 5, 9, 200, 3000, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-5)
        lora.set_enabled(model, False)
        base, _ = common.load_model(str(tiny_model_dir))
        assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-6)


@pytest.mark.parametrize("launch", ["python", "torchrun"])
def test_lora_dpo_saves_a_plain_model_without_a_reference_pass(tmp_path, tiny_model_dir, launch):
    from transformers import AutoModelForCausalLM

    f = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    (run if launch == "python" else torchrun)(
        "train.py",
        "--input",
        f,
        "--model",
        tiny_model_dir,
        "--output",
        tmp_path / "m",
        "--lr",
        1e-2,
        "--batch-size",
        2,
        "--grad-accum",
        1,
        "--save-every",
        0,
        "--lora-rank",
        4,
        "--loss",
        "dpo",
    )
    assert not (tmp_path / "m" / "reference_logps.safetensors").exists()  # no reference pass
    m = read_jsonl(tmp_path / "m" / "metrics.jsonl")
    assert m[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # adapters start at zero: policy = reference
    saved, start = weights(tmp_path / "m"), weights(tiny_model_dir)
    assert saved.keys() == start.keys()
    assert any(not torch.equal(saved[k], start[k]) for k in saved)
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def direct_eval(model_dir, tokenizer, pairs, beta=2.5, gamma=1.375):
    """Eq. 3 on the held-out pairs from plain full forwards of the saved model: the reference
    the trainer's eval_* metrics must equal."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    for p in pairs:
        sides = []
        for answer in (p["chosen"], p["rejected"]):
            ids, n_prompt = preference_data.tokenize_answer(tokenizer, p["prompt"], answer, 512)
            with torch.no_grad():
                lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            sides.append((float(sum(lp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))), len(ids) - n_prompt))
        rows.append((sides, p["gap"]))
    mean_gap = sum(g for _, g in rows) / len(rows)
    out = {"eval_loss": 0.0, "eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0, "eval_logps/chosen": 0.0}
    for ((lc, nc), (lr, nr)), g in rows:
        rc, rr = beta * lc / nc, beta * lr / nr
        out["eval_loss"] += (g / mean_gap) * -torch.nn.functional.logsigmoid(torch.tensor(rc - rr - gamma)).item()
        out["eval_rewards/accuracies"] += rc > rr
        out["eval_rewards/margins"] += rc - rr
        out["eval_logps/chosen"] += lc / nc
    return {k: v / len(rows) for k, v in out.items()}


@pytest.mark.parametrize("launch", ["python", "torchrun"])
def test_held_out_pairs_are_evaluated_as_a_direct_computation_says(tmp_path, tiny_model_dir, tokenizer, launch):
    """--eval-input: the eval_* metrics of step 0 and of the last step equal Eq. 3 computed from
    plain forwards of the starting and of the saved model; metrics.svg has a point per row."""
    import xml.etree.ElementTree as ET

    f = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    held = [
        {
            "id": f"h{i}",
            "prompt": f"Held-out question {i}?",
            "chosen": "A careful reply " * (i + 1),
            "rejected": "Whatever." * (i + 1),
            "gap": [1, 3, 2][i],
        }
        for i in range(3)
    ]
    h = write_jsonl(tmp_path / "held.jsonl", held)
    (run if launch == "python" else torchrun)(
        "train.py",
        "--input",
        f,
        "--eval-input",
        h,
        "--model",
        tiny_model_dir,
        "--output",
        tmp_path / "m",
        "--lr",
        1e-3,
        "--batch-size",
        2,
        "--grad-accum",
        1,
        "--save-every",
        0,
        "--eval-every",
        1,
    )
    rows = read_jsonl(tmp_path / "m" / "metrics.jsonl")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == list(range(len(rows))) and rows[0]["step"] == 0
    for row, model in ((evals[0], tiny_model_dir), (evals[-1], tmp_path / "m")):
        want = direct_eval(model, tokenizer, held)
        for k, v in want.items():
            assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    assert evals[0]["eval_loss"] != evals[-1]["eval_loss"]
    root = ET.parse(tmp_path / "m" / "metrics.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    points = {(g.get("data-panel"), g.get("data-name")): len(g.findall(ns + "circle")) for g in root.iter(ns + "g")}
    assert points[("loss", "train")] == len(rows) - 1 and points[("loss", "eval")] == len(evals)
    assert points[("reward accuracy", "eval")] == len(evals)
