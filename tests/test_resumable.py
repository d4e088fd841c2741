"""resumable.py: the generation stages' output resumes, merges in input order, keeps one writer,
never touches a file the run reads, and refuses a resume that would mix two runs."""

import os
import shutil
import pytest
import torch
import common
import resumable
from conftest import denoise_record, PROMPTS, read_jsonl, refused, run, run_here, sample, write_jsonl


def test_side_files_never_touch_an_input(tmp_path, tiny_model_dir):
    t = tmp_path
    for name in ("t.jsonl.lock", "s.jsonl.part0", "r.jsonl.run.json", "q.jsonl.tmp"):
        write_jsonl(t / name, PROMPTS)
        before = (t / name).read_bytes()
        for extra in ([], ["--overwrite"]):
            p = run_here(
                "sample.py",
                "--input",
                t / name,
                "--output",
                t / (name.split(".")[0] + ".jsonl"),
                "--model",
                tiny_model_dir,
                *extra,
            )
            refused(p, "choose another --output")
        assert (t / name).read_bytes() == before
    judge = write_jsonl(t / "judge.jsonl", [denoise_record("a")])
    before = judge.read_bytes()
    refused(
        run_here(
            "denoise.py",
            "--input",
            write_jsonl(t / "r.jsonl", [denoise_record("a")]),
            "--output",
            judge,
            "--rv-against",
            judge,
        ),
        "this run reads it",
    )
    refused(
        run_here(
            "denoise.py", "--input", write_jsonl(t / "d.summary.json", [denoise_record("a")]), "--output", t / "d.jsonl"
        ),
        "beside --output",
    )  # the summary of d.jsonl is d.summary.json
    assert judge.read_bytes() == before and (t / "d.summary.json").read_text().startswith('{"id"')
    model = t / "A"
    shutil.copytree(tiny_model_dir, model)
    weights = (model / "model.safetensors").read_bytes()
    refused(
        run_here("oracle/soup.py", "--first", model, "--second", tiny_model_dir, "--weight", 0.5, "--output", model),
        "this run reads it",
    )
    pairs = write_jsonl(t / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "gap": 1}])
    refused(run_here("train.py", "--input", pairs, "--model", model, "--output", model), "this run reads it")
    refused(
        run_here(
            "evaluate.py",
            "--input",
            write_jsonl(t / "e.jsonl", PROMPTS),
            "--model",
            model,
            "--judge",
            model,
            "--output",
            model / "eval",
        ),
        "this run reads it",
    )
    assert (model / "model.safetensors").read_bytes() == weights and not (model / "eval").exists()


def test_hard_links_and_a_users_own_file_named_like_a_side_file(tmp_path, tiny_model_dir):
    t = tmp_path
    write_jsonl(t / "p.jsonl", PROMPTS)
    os.link(t / "p.jsonl", t / "out.jsonl")  # the output is the input under another name
    refused(
        run_here(
            "sample.py", "--input", t / "p.jsonl", "--output", t / "out.jsonl", "--model", tiny_model_dir, "--overwrite"
        ),
        "this run reads it",
    )
    assert read_jsonl(t / "p.jsonl") == PROMPTS
    (t / "u.jsonl.partial-backup").write_text("mine\n")
    args = ["--input", t / "p.jsonl", "--output", t / "u.jsonl", "--model", tiny_model_dir, "--max-new-tokens", 2]
    for extra in ([], ["--overwrite"]):
        assert run_here("sample.py", *args, *extra).returncode == 0
    assert (t / "u.jsonl.partial-backup").read_text() == "mine\n" and len(read_jsonl(t / "u.jsonl")) == 3


def test_a_stage_resumed_on_replaced_weights_or_another_path_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = [
        "--input",
        prompts,
        "--output",
        tmp_path / "ev",
        "--model",
        model,
        "--judge",
        tiny_model_dir,
        "--mode",
        "logits",
        "--max-new-tokens",
        2,
    ]
    assert run_here("evaluate.py", *args, "--limit", 1).returncode == 0
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        m.model.norm.weight.add_(1.0)
    m.save_pretrained(model)  # new weights, same path
    refused(
        run_here("evaluate.py", *args),
        "responses.jsonl: was made with the models (--model, --baseline, their names and files)",
    )
    sample = ["--input", prompts, "--output", tmp_path / "s.jsonl", "--model", tiny_model_dir, "--max-new-tokens", 2]
    assert run_here("sample.py", *sample, "--limit", 1).returncode == 0
    monkeypatch.setenv("SPA_CPU_SPEED", "0")
    refused(run_here("sample.py", *sample), "the inference path (device, SPA_CPU_SPEED) 'cpu_speed' (now 'plain cpu')")


def test_an_edited_constitution_is_a_changed_setting(tmp_path, tiny_model_dir, monkeypatch):
    prompts = tmp_path / "prompts"
    shutil.copytree(common.PROMPTS_DIR, prompts)
    monkeypatch.setattr(common, "PROMPTS_DIR", prompts)
    common.load_prompt.cache_clear()
    inp = write_jsonl(tmp_path / "s.jsonl", [dict(p, candidates=[{"text": "a"}, {"text": "b"}]) for p in PROMPTS])
    args = ["--input", inp, "--output", tmp_path / "o.jsonl", "--model", tiny_model_dir, "--mode", "logits"]
    try:
        assert run_here("score.py", *args, "--limit", 1).returncode == 0
        (prompts / "constitution.txt").write_text("Be brief.\n")
        common.load_prompt.cache_clear()
        refused(run_here("score.py", *args), "was made with the files of prompts/")
    finally:
        common.load_prompt.cache_clear()


@pytest.fixture
def made(tmp_path, tiny_model_dir):
    """prompts -> samples -> scored (logits mode) on the tiny model."""
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    sample(tmp_path, tiny_model_dir, tmp_path / "s.jsonl")
    run(
        "score.py",
        "--input",
        tmp_path / "s.jsonl",
        "--output",
        tmp_path / "sc.jsonl",
        "--model",
        tiny_model_dir,
        "--mode",
        "logits",
    )
    return tmp_path


def test_an_output_equal_to_its_input_is_refused(made, tiny_model_dir):
    before = (made / "sc.jsonl").read_bytes()
    refused(
        run("denoise.py", "--input", made / "sc.jsonl", "--output", made / "sc.jsonl", check=False),
        "this run reads it, and would write or remove",
    )
    refused(
        run("score.py", "--input", made / "sc.jsonl", "--output", made / "sc.jsonl", "--overwrite", check=False),
        "this run reads it, and would write or remove",
    )
    assert (made / "sc.jsonl").read_bytes() == before


def test_resume_refuses_other_settings_and_changed_inputs(made, tiny_model_dir):
    before = (made / "sc.jsonl").read_bytes()
    p = run(
        "score.py",
        "--input",
        made / "s.jsonl",
        "--output",
        made / "sc.jsonl",
        "--model",
        tiny_model_dir,
        "--mode",
        "logits-expected",
        check=False,
    )
    refused(p, "was made with --mode 'logits' (now 'logits-expected')")
    p = sample(made, tiny_model_dir, made / "s.jsonl", "--num-candidates", 3, check=False)
    refused(p, "--num-candidates 2 (now 3)")
    # re-sampled candidates: the scored output no longer answers its input
    resampled = [
        dict(r, candidates=[dict(c, text=c["text"] + "!") for c in r["candidates"]])
        for r in read_jsonl(made / "s.jsonl")
    ]
    write_jsonl(made / "s2.jsonl", resampled)
    p = run(
        "score.py",
        "--input",
        made / "s2.jsonl",
        "--output",
        made / "sc.jsonl",
        "--model",
        tiny_model_dir,
        "--mode",
        "logits",
        check=False,
    )
    refused(p, "changed since the output was started")
    assert (made / "sc.jsonl").read_bytes() == before


def test_a_second_run_on_a_locked_output_is_refused(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    held = resumable.lock(tmp_path / "s.jsonl.lock", "test")
    refused(
        sample(tmp_path, tiny_model_dir, tmp_path / "s.jsonl", check=False), "another run is writing this output (pid"
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "gap": 1}])
    held2 = resumable.lock(tmp_path / "m" / "train.lock", "test")
    refused(
        run("train.py", "--input", pairs, "--output", tmp_path / "m", "--model", tiny_model_dir, check=False),
        "another run is writing this output",
    )
    resumable.release(held)
    resumable.release(held2)
    assert not (tmp_path / "s.jsonl").exists()


def test_output_resumes_parts_merges_in_input_order_and_refuses_foreign_output(tmp_path):
    from resumable import Output

    inputs = [{"id": str(i), "prompt": "p" * (5 - i)} for i in range(4)]
    out = tmp_path / "o.jsonl"
    w = Output(out, inputs, {"k": 1})
    assert [[r["id"] for r in b] for b in w.batches(2)] == [["3", "2"], ["1", "0"]]  # by length
    w.write([dict(inputs[3], x=3)])
    w.f.write(b'{"id": "2", "pro')  # a crash in the middle of a line
    w.__exit__(RuntimeError, None, None)  # leaving with an exception: no merge
    assert not out.exists() and (tmp_path / "o.jsonl.part0").exists()
    with Output(out, inputs, {"k": 1}) as w:
        assert [r["id"] for r in w.pending] == ["0", "1", "2"]  # the torn record is redone
        w.write([dict(r, x=int(r["id"])) for r in w.pending])
    assert [r["id"] for r in read_jsonl(out)] == ["0", "1", "2", "3"]  # input order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.jsonl.run.json"]
    before = out.read_bytes()
    with pytest.raises(common.InputError, match=r"was made with --k 1 \(now 2\)"):
        Output(out, inputs, {"k": 2})
    with pytest.raises(common.InputError, match=r"holds id '3', which is not in this input"):
        Output(out, inputs[:3], {"k": 1})
    changed = [dict(inputs[0], prompt="another")] + inputs[1:]
    with pytest.raises(common.InputError, match=r"input record\(s\) 0 changed"):
        Output(out, changed, {"k": 1})
    with pytest.raises(
        common.InputError, match=r"this run reads it, and would write or remove .*o\.jsonl \(--output\)"
    ):
        Output(out, inputs, {"k": 1}, reads=[out])
    assert out.read_bytes() == before  # nothing lost
    with Output(out, inputs, {"k": 2}, overwrite=True) as w:
        assert len(w.pending) == 4
        w.write([dict(r, x=0) for r in w.pending])


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    from resumable import Output

    inputs = [{"id": "a", "prompt": "x"}]
    with Output(tmp_path / "o.jsonl", inputs, {}) as w:
        with pytest.raises(common.InputError, match=r"another run is writing this output \(pid \d+"):
            Output(tmp_path / "o.jsonl", inputs, {})
        w.write([dict(inputs[0], y=1)])
    assert not (tmp_path / "o.jsonl.lock").exists()


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_change_anywhere_in_the_weights_or_the_tokenizer_refuses_the_resume(tmp_path, tiny_model_dir):
    """The middle of a 6 MB embedding and of a 3.5 MB tokenizer.json, at the same size: the
    fingerprint reads every byte, so a resume that would mix two models is refused."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = [
        "--input",
        prompts,
        "--output",
        tmp_path / "s.jsonl",
        "--model",
        model,
        "--num-candidates",
        2,
        "--max-new-tokens",
        2,
    ]
    assert run_here("sample.py", *args, "--limit", 1).returncode == 0
    flip_middle_byte(model / "model.safetensors")
    refused(run_here("sample.py", *args), "the model's files")
    original = common.model_fingerprint(str(tiny_model_dir))
    shutil.copy(tiny_model_dir / "model.safetensors", model / "model.safetensors")
    assert common.model_fingerprint(str(model)) == original
    text = (model / "tokenizer.json").read_text()
    mid = next(i for i in range(len(text) // 2, len(text)) if text[i] in "abcdefgh")
    (model / "tokenizer.json").write_text(text[:mid] + chr(ord(text[mid]) + 1) + text[mid + 1 :])  # one id's token
    assert common.model_fingerprint(str(model)) != original


def test_a_local_looking_model_path_that_does_not_exist_is_an_error_at_once(tmp_path, monkeypatch):
    """'runs/tinyy' (one slash, a typo of runs/tiny) is a path here, not a hub name: refused at
    once, before any offline retry, and nothing is left beside the output."""
    import time

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    t = time.time()
    p = run_here("sample.py", "--input", prompts, "--output", tmp_path / "runs" / "s.jsonl", "--model", "runs/tinyy")
    refused(p, "runs/tinyy: no such model directory")
    assert time.time() - t < 10 and sorted(f.name for f in (tmp_path / "runs").iterdir()) == []
