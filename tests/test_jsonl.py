"""jsonl.py: input read and validated with FILE:LINE errors, atomic writes."""

import pytest
import common
import jsonl
from conftest import PROMPTS, read_jsonl, refused, run, run_here, sample, write_jsonl


def test_a_deeply_nested_input_line_is_an_error(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n' + "[" * 100_000 + "\n")
    refused(
        run_here("sample.py", "--input", tmp_path / "p.jsonl", "--output", tmp_path / "o.jsonl"),
        "p.jsonl:2: JSON nested too deeply to read",
    )


def test_duplicate_and_integer_ids(tmp_path, tiny_model_dir):
    dup = write_jsonl(
        tmp_path / "d.jsonl", [{"id": i, "prompt": "q", "candidates": [{"text": "a"}]} for i in ("t02", "t01", "t02")]
    )
    refused(
        run("score.py", "--input", dup, "--output", tmp_path / "o.jsonl", "--model", tiny_model_dir, check=False),
        "d.jsonl:3: duplicate id 't02'",
    )
    ints = write_jsonl(
        tmp_path / "i.jsonl", [{"id": i, "prompt": f"q{i}", "candidates": [{"text": "a"}]} for i in (1, 2)]
    )
    args = ["--input", ints, "--output", tmp_path / "o.jsonl", "--model", tiny_model_dir, "--mode", "logits"]
    run("score.py", *args, "--limit", 1)
    run("score.py", *args)  # resumes: the integer ids are read as strings both times
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["1", "2"]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "prompt": "q", "candidates": "not a list"}])
    refused(
        run("score.py", "--input", bad, "--output", tmp_path / "o2.jsonl", check=False),
        "candidates must be a list of objects with a string 'text'",
    )


def test_bad_files_are_errors_not_tracebacks(tmp_path, tiny_model_dir):
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    refused(
        run("sample.py", "--input", tmp_path / "bad.jsonl", "--output", tmp_path / "o.jsonl", check=False),
        "bad.jsonl:2: not UTF-8",
    )
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    (tmp_path / "adir").mkdir()
    refused(sample(tmp_path, tiny_model_dir, tmp_path / "adir", check=False), "--output is a directory")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "gap": 1}])
    refused(
        run("train.py", "--input", pairs, "--output", tmp_path / "p.jsonl", "--model", tiny_model_dir, check=False),
        "--output is a file",
    )
    (tmp_path / "locked.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "locked.jsonl").chmod(0)
    p = run("sample.py", "--input", tmp_path / "locked.jsonl", "--output", tmp_path / "o.jsonl", check=False)
    (tmp_path / "locked.jsonl").chmod(0o644)
    if p.returncode != 0:  # root reads anything: then there is nothing to refuse
        refused(p, "Permission denied")


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(common.InputError, match="no such file"):
        jsonl.read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(common.InputError, match="empty file"):
        jsonl.read_prompts(tmp_path / "e.jsonl")


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(common.InputError, match=r"p\.jsonl:2: malformed JSON"):
        jsonl.read_prompts(f)


def test_missing_prompt_field_lists_keys(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "lang": "en"}])
    with pytest.raises(common.InputError, match=r"p\.jsonl:1: no prompt field.*\['lang', 'text'\]"):
        jsonl.read_prompts(f)


def test_prompt_not_a_string(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": ["a", "list"]}])
    with pytest.raises(common.InputError, match=r"p\.jsonl:2: field 'prompt' must be a non-empty string"):
        jsonl.read_prompts(f)


def test_instruction_and_question_fields_and_ids(tmp_path):
    f = write_jsonl(
        tmp_path / "p.jsonl", [{"instruction": "do x"}, {"question": "why y?", "id": "q7"}, {"ask": "z", "id": 3}]
    )
    with pytest.raises(common.InputError):
        jsonl.read_prompts(f)
    recs = jsonl.read_prompts(f, limit=2)
    assert [(r["id"], r["prompt"]) for r in recs] == [("1", "do x"), ("q7", "why y?")]
    g = write_jsonl(tmp_path / "g.jsonl", [{"ask": "z"}])
    assert jsonl.read_prompts(g, prompt_field="ask")[0]["prompt"] == "z"


def test_write_atomic_leaves_no_temp(tmp_path):
    jsonl.write_jsonl_atomic(tmp_path / "a.jsonl", [{"a": 1}])
    assert read_jsonl(tmp_path / "a.jsonl") == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


BAD_INPUTS = {
    "huge_integer": '{"id": "a", "prompt": "q", "n": ' + "9" * 5000 + "}\n",
    "nested": '{"id": "a", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
    "not_utf8": b'{"id": "a", "prompt": "\xff\xfe"}\n',
    "empty": "",
    "not_objects": "[1, 2, 3]",
    "torn": '{"id": "a", "prompt": "q"',
    "wrong_types": '{"id": "a", "prompt": "q", "candidates": 7, "refined": "x", "chosen": 1, "rejected": 2}\n',
}
STAGES = {
    "sample.py": ["--num-candidates", 2, "--max-new-tokens", 2],
    "score.py": ["--mode", "logits"],
    "refine.py": ["--mode", "logits", "--max-new-tokens", 2],
    "denoise.py": [],
    "pairs.py": [],
    "train.py": [],
    "evaluate.py": ["--max-new-tokens", 2],
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_ends_malformed_input_in_an_error_line_and_writes_nothing(tmp_path, tiny_model_dir, stage):
    for name, content in BAD_INPUTS.items():
        if name == "wrong_types" and stage in ("sample.py", "evaluate.py"):
            continue  # a prompt record with other fields beside it is a good one for these
        inp = tmp_path / f"{name}.jsonl"
        inp.write_bytes(content if isinstance(content, bytes) else content.encode())
        out = tmp_path / "out" / f"{name}.out"
        model = [] if stage in ("denoise.py", "pairs.py") else ["--model", tiny_model_dir]
        judge = ["--judge", tiny_model_dir] if stage == "evaluate.py" else []
        p = run_here(stage, "--input", inp, "--output", out, *model, *judge, *STAGES[stage])
        assert p.returncode == 2 and p.stderr.startswith("error: "), (name, p.stderr[-600:])
        assert "Traceback" not in p.stderr and str(inp.name) in p.stderr + name, (name, p.stderr[-600:])
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), name


def test_an_output_through_a_link_loop_is_an_error_line(tmp_path, tiny_model_dir):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    p = run_here("sample.py", "--input", prompts, "--output", tmp_path / "loop", "--model", tiny_model_dir)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-500:]
