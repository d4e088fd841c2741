"""The paper's datasets as their authors ship them (small fixtures in each format)."""

import json
import sys

import pytest

import common
import jsonl
import preference_data
from conftest import ROOT, read_jsonl, run, write_jsonl


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


def test_csv_gets_a_conversion_hint(tmp_path):
    (tmp_path / "data.csv").write_bytes(b"prompt\nhi\n")
    with pytest.raises(common.InputError, match=r"is not read here; convert it to JSONL first.*pandas"):
        jsonl.read_prompts(tmp_path / "data.csv")


def test_parquet_is_read_where_pyarrow_is_installed(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (an optional package)")
    import pyarrow

    rows = [{"question_id": 81, "turns": ["Write a poem.", "Shorter."], "category": "writing"}]
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "q.parquet")
    r = jsonl.read_prompts(tmp_path / "q.parquet", id_field="question_id")[0]
    assert (r["id"], r["prompt"], r["category"]) == ("81", "Write a poem.", "writing")


def test_parquet_and_datasets_folders_without_their_package_name_it(tmp_path, monkeypatch):
    """Without pyarrow (or datasets) installed: an error naming the package, no traceback."""
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    for name in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now fails as if it were absent
    with pytest.raises(common.InputError, match=r"train\.parquet: reading it needs the package pyarrow"):
        jsonl.read_prompts(tmp_path / "train.parquet")
    with pytest.raises(common.InputError, match=r"saved: reading it needs the package datasets"):
        jsonl.read_jsonl(folder)


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


def ultrafeedback_rows():
    """The explicit form, and the same pairs in the shapes UltraFeedback-derived sets ship."""
    rows = [("What is 2+2?", "It is 4.", "It is 5."), ("Name a colour.", "Blue.", "Loud.")]
    explicit = [{"id": str(i), "prompt": q, "chosen": c, "rejected": r} for i, (q, c, r) in enumerate(rows)]
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    with_prompt = [
        {"id": str(i), "prompt": q, "chosen": conv(q, c), "rejected": conv(q, r)}  # binarized's shape
        for i, (q, c, r) in enumerate(rows)
    ]
    without = [{"id": str(i), "chosen": conv(q, c), "rejected": conv(q, r)} for i, (q, c, r) in enumerate(rows)]
    return explicit, with_prompt, without


def test_implicit_prompt_pairs_read_as_their_explicit_form(tmp_path, tokenizer):
    """chosen/rejected as whole conversations (with and without a `prompt` beside them, and
    multi-turn) give the examples, token for token, of the same pairs written explicitly."""
    explicit, with_prompt, without = ultrafeedback_rows()
    want = preference_data.load_pairs(write_jsonl(tmp_path / "e.jsonl", explicit), tokenizer, 256, need_gap=False)[0]
    for name, rows in (("w", with_prompt), ("wo", without)):
        got = preference_data.load_pairs(write_jsonl(tmp_path / f"{name}.jsonl", rows), tokenizer, 256, need_gap=False)[
            0
        ]
        assert [(e["chosen"], e["rejected"]) for e in got] == [(e["chosen"], e["rejected"]) for e in want]
    context = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    multi = [
        {
            "chosen": [*context, {"role": "assistant", "content": "4."}],
            "rejected": [*context, {"role": "assistant", "content": "5."}],
        }
    ]
    twin = [
        {
            "prompt": context,
            "chosen": [{"role": "assistant", "content": "4."}],
            "rejected": [{"role": "assistant", "content": "5."}],
        }
    ]
    a = preference_data.load_pairs(write_jsonl(tmp_path / "m.jsonl", multi), tokenizer, 256, need_gap=False)[0]
    b = preference_data.load_pairs(write_jsonl(tmp_path / "t.jsonl", twin), tokenizer, 256, need_gap=False)[0]
    assert (a[0]["chosen"], a[0]["rejected"]) == (b[0]["chosen"], b[0]["rejected"])


def test_implicit_prompt_pairs_train_to_the_explicit_forms_loss(tmp_path, tiny_model_dir):
    explicit, with_prompt, _ = ultrafeedback_rows()
    args = ["--model", tiny_model_dir, "--loss", "simpo", "--batch-size", 2, "--grad-accum", 1, "--save-every", 0]
    losses = []
    for name, rows in (("e", explicit), ("w", with_prompt)):
        run("train.py", "--input", write_jsonl(tmp_path / f"{name}.jsonl", rows), "--output", tmp_path / name, *args)
        losses.append(read_jsonl(tmp_path / name / "metrics.jsonl")[-1]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize(
    "chosen,rejected,message",
    [
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
            [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
            "do not share leading turns",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "x"},
                {"role": "user", "content": "more"},
            ],
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "y"}],
            "one assistant message each",
        ),
    ],
)
def test_conversations_without_a_shared_prompt_are_refused_with_file_and_line(
    tmp_path, tokenizer, chosen, rejected, message
):
    f = write_jsonl(tmp_path / "p.jsonl", [{"chosen": chosen, "rejected": rejected}])
    with pytest.raises(common.InputError, match=rf"p\.jsonl:1: .*{message}"):
        preference_data.load_pairs(f, tokenizer, 256, need_gap=False)


def test_a_public_ultrafeedback_file_trains_as_shipped_and_in_trl_libs_shape(tmp_path, tiny_model_dir):
    """data/ultrafeedback_50.jsonl: 50 rows no one here wrote (data/SOURCES.md), as their
    repository ships them (prompt, chosen and rejected strings, extra fields beside them). The
    same rows put back into trl-lib/ultrafeedback_binarized's shape (chosen and rejected as
    [user, assistant] conversations, no prompt field) read to the same pairs and train to the
    same loss."""
    data = ROOT / "data" / "ultrafeedback_50.jsonl"
    shipped = read_jsonl(data)
    conv = lambda r, side: [{"content": r["prompt"], "role": "user"}, {"content": r[side], "role": "assistant"}]
    implicit = [{"chosen": conv(r, "chosen"), "rejected": conv(r, "rejected"), **r["metadata"]} for r in shipped]
    args = ["--model", tiny_model_dir, "--loss", "simpo", "--max-length", 512, "--save-every", 0]
    facts, losses = [], []
    for name, f in (("shipped", data), ("trl", write_jsonl(tmp_path / "t.jsonl", implicit))):
        run("train.py", "--input", f, "--output", tmp_path / name, *args)
        facts.append(json.loads((tmp_path / name / "train_config.json").read_text()))
        losses.append([r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")])
    assert facts[0]["pairs"] + facts[0]["dropped"]["prompt_too_long"] == 50 and facts[0]["pairs"] >= 45
    assert (facts[0]["pairs"], facts[0]["dropped"]) == (facts[1]["pairs"], facts[1]["dropped"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
