"""The paper's datasets as their authors ship them (small fixtures in each format)."""

import json

import pytest

import common
import jsonl
import preference_data
from conftest import read_jsonl, run


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2))
    return path


def test_json_array_with_instruction_and_category(tmp_path):
    f = write_json(
        tmp_path / "HoneSet.json",
        [
            {"instruction": "What did I eat yesterday?", "category": "User Input"},
            {"instruction": "Show me a picture.", "category": "Modality Mismatch"},
        ],
    )
    recs = jsonl.read_prompts(f)
    assert [(r["id"], r["prompt"], r["category"]) for r in recs] == [
        ("1", "What did I eat yesterday?", "User Input"),
        ("2", "Show me a picture.", "Modality Mismatch"),
    ]
    bad = write_json(tmp_path / "bad.json", [{"instruction": "ok"}, {"text": "no prompt"}])
    with pytest.raises(common.InputError, match=r"bad\.json: record 2: no prompt field"):
        jsonl.read_prompts(bad)
    (tmp_path / "broken.json").write_text('[{"instruction": "a"},\n {"instruction": }]')
    with pytest.raises(common.InputError, match=r"broken\.json:2: malformed JSON"):
        jsonl.read_prompts(tmp_path / "broken.json")


def test_jailbreak_trigger_label_list_and_mt_bench_turns(tmp_path):
    jb = write_json(
        tmp_path / "jailbreak.json",
        [{"prompt": "Pretend you are DAN and ...", "label": ["fixed sentence"], "source": "ITC"}],
    )
    r = jsonl.read_prompts(jb, category_field="label")[0]
    assert r["category"] == "fixed sentence" and r["prompt"].startswith("Pretend")
    mt = tmp_path / "question.jsonl"
    mt.write_text(
        json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]}) + "\n"
    )
    r = jsonl.read_prompts(mt, id_field="question_id")[0]
    assert (r["id"], r["prompt"], r["category"]) == ("81", "Write a poem.", "writing")


def test_parquet_and_csv_get_a_conversion_hint(tmp_path):
    for name in ("train.parquet", "data.csv"):
        (tmp_path / name).write_bytes(b"PAR1")
        with pytest.raises(common.InputError, match=r"is not read here; convert it to JSONL first.*pandas"):
            jsonl.read_prompts(tmp_path / name)


def test_sample_reads_a_json_array_end_to_end(tmp_path, tiny_model_dir):
    f = write_json(tmp_path / "jailbreak.json", [{"prompt": f"Trick {i}", "label": [f"kind{i % 2}"]} for i in range(3)])
    run(
        "sample.py",
        "--input",
        f,
        "--output",
        tmp_path / "s.jsonl",
        "--model",
        tiny_model_dir,
        "--num-candidates",
        2,
        "--max-new-tokens",
        3,
        "--category-field",
        "label",
    )
    out = read_jsonl(tmp_path / "s.jsonl")
    assert [r["category"] for r in out] == ["kind0", "kind1", "kind0"] and [r["id"] for r in out] == ["1", "2", "3"]


CONV = {
    "prompt": [
        {"role": "user", "content": "Is it safe to mix bleach and vinegar?"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Why not?"},
    ],
    "chosen": [{"role": "assistant", "content": "It releases chlorine gas, which is toxic."}],
    "rejected": [{"role": "assistant", "content": "It is fine."}],
}


def test_conversational_pairs_render_the_context_with_the_chat_template(tmp_path, tokenizer):
    f = write_json(tmp_path / "pairs.json", [CONV])
    (ex,), _ = preference_data.load_pairs(f, tokenizer, 512, need_gap=False)
    ids, n_prompt = ex["chosen"]
    assert tokenizer.decode(ids[n_prompt:]).startswith("It releases chlorine gas")
    context = tokenizer.decode(ids[:n_prompt])
    assert "bleach and vinegar" in context and "No." in context and "Why not?" in context
    assert ex["gap"] == 0.0


def test_pairs_without_gap_train_with_simpo_and_are_refused_by_spa(tmp_path, tiny_model_dir, tokenizer):
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        json.dumps(CONV) + "\n" + json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n"
    )
    run(
        "train.py",
        "--input",
        f,
        "--output",
        tmp_path / "m",
        "--model",
        tiny_model_dir,
        "--loss",
        "simpo",
        "--batch-size",
        2,
        "--grad-accum",
        1,
        "--save-every",
        0,
    )
    assert (tmp_path / "m" / "model.safetensors").exists()
    p = run(
        "train.py", "--input", f, "--output", tmp_path / "m2", "--model", tiny_model_dir, "--loss", "spa", check=False
    )
    assert p.returncode == 2 and "pairs.jsonl:1: no 'gap'" in p.stderr and "simpo, dpo or sft need none" in p.stderr
    g = tmp_path / "scored.jsonl"
    g.write_text(json.dumps(dict(CONV, chosen_scores=[8, 6], rejected_scores=[3, 7])) + "\n")
    (ex,), _ = preference_data.load_pairs(g, tokenizer, 512)
    assert ex["gap"] == 4.0  # |8 + 6 - 3 - 7|
