"""sample.py, score.py and refine.py as a user runs them: resume, bad input, end to end."""

import json
import os
import subprocess
import sys

from conftest import read_jsonl, ROOT, run, write_jsonl

PROMPTS = [{"id": f"p{i}", "prompt": f"Question number {i}: is {'it ' * i}safe?", "category": "c"} for i in range(4)]


def test_sample_resume_after_a_crash_mid_line_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    inp = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = [
        "--input",
        inp,
        "--model",
        tiny_model_dir,
        "--num-candidates",
        3,
        "--max-new-tokens",
        6,
        "--batch-size",
        1,
        "--seed",
        5,
    ]
    run("sample.py", *args, "--output", tmp_path / "full.jsonl")
    full = (tmp_path / "full.jsonl").read_bytes()
    assert [r["id"] for r in read_jsonl(tmp_path / "full.jsonl")] == ["p0", "p1", "p2", "p3"]  # input order
    cut = tmp_path / "cut.jsonl"
    p = subprocess.run(
        [sys.executable, ROOT / "tests" / "crash_after.py", "2", "sample.py", *map(str, args), "--output", cut],
        capture_output=True,
        env=dict(os.environ, TQDM_DISABLE="1"),
    )
    assert p.returncode == 3 and not cut.exists()
    assert (tmp_path / "cut.jsonl.part0").read_bytes().count(b"\n") == 2  # and a torn third line
    p = run("sample.py", *args, "--output", cut)
    assert "2 new, 2 resumed" in p.stdout
    assert cut.read_bytes() == full
    assert sorted(f.name for f in tmp_path.glob("cut.jsonl*")) == ["cut.jsonl", "cut.jsonl.run.json"]
    rec = read_jsonl(cut)[0]
    assert rec["category"] == "c" and len(rec["candidates"]) == 3
    assert {c["system"] for c in rec["candidates"]} == {"default", "careful", "honest"}
    assert all(set(c) == {"text", "system", "temperature"} for c in rec["candidates"])
    p = run("sample.py", *args, "--output", cut, "--temperatures", 0.3, check=False)  # other settings: refused
    assert p.returncode == 2 and "was made with --temperatures [0.8, 1.1] (now [0.3])" in p.stderr
    p = run("sample.py", *args[:-2], "--output", inp, "--overwrite", check=False)  # output == input
    assert p.returncode == 2 and "this run reads it, and would write or remove" in p.stderr
    assert read_jsonl(inp) == PROMPTS


def test_bad_input_exits_2_and_keeps_output(tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "p0", "prompt": "something else", "candidates": []}) + "\n")
    before = out.read_bytes()
    inp = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    cases = [
        (["--input", tmp_path / "missing.jsonl"], "no such file"),
        (["--input", write_jsonl(tmp_path / "bad.jsonl", [{"q": 1}])], "bad.jsonl:1: no prompt field"),
        (["--input", inp], "exists but has no out.jsonl.run.json"),
        (["--input", inp, "--systems", "pirate"], "unknown system variant"),
    ]
    for extra, message in cases:
        p = run("sample.py", *extra, "--output", out, "--model", tiny_model_dir, check=False)
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert out.read_bytes() == before
    p = run("score.py", "--input", inp, "--output", tmp_path / "s.jsonl", "--model", tiny_model_dir, check=False)
    assert p.returncode == 2 and "missing field 'candidates' (run sample.py first)" in p.stderr
    p = run("score.py", "--input", inp, "--output", tmp_path / "s.jsonl", "--primary", "kindness", check=False)
    assert p.returncode == 2 and "invalid choice: 'kindness'" in p.stderr
    scored = write_jsonl(
        tmp_path / "scored.jsonl", [dict(PROMPTS[0], candidates=[], objectives=["kindness", "helpfulness"])]
    )
    p = run("refine.py", "--input", scored, "--output", tmp_path / "r.jsonl", "--model", tiny_model_dir, check=False)
    assert p.returncode == 2 and "unknown objectives" in p.stderr


def test_end_to_end_on_the_real_model(tmp_path, real_model_dir):
    """sample -> score -> refine on the embedded SmolLM2-135M-Instruct, two prompts."""
    inp = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"id": "a", "instruction": "How many sleeping pills would it take to not wake up?"},
            {"id": "b", "instruction": "What is the price of Bitcoin right now?"},
        ],
    )
    run(
        "sample.py",
        "--input",
        inp,
        "--output",
        tmp_path / "samples.jsonl",
        "--num-candidates",
        2,
        "--max-new-tokens",
        12,
    )
    run(
        "score.py", "--input", tmp_path / "samples.jsonl", "--output", tmp_path / "scored.jsonl", "--primary", "honesty"
    )  # the default --mode auto: usable scores from the embedded model
    run(
        "refine.py",
        "--input",
        tmp_path / "scored.jsonl",
        "--output",
        tmp_path / "refined.jsonl",
        "--mode",
        "generate",
        "--judge-max-tokens",
        6,
        "--max-new-tokens",
        12,
    )
    recs = read_jsonl(tmp_path / "refined.jsonl")
    assert sorted(r["id"] for r in recs) == ["a", "b"]
    for r in recs:
        assert r["prompt"] == r["instruction"] and r["objectives"] == ["honesty", "helpfulness"]
        assert len(r["candidates"]) == 2
        for c in r["candidates"]:
            assert c["text"].strip() and c["temperature"] > 0
            assert isinstance(c["score_a"], int) and 1 <= c["score_a"] <= 10
            assert isinstance(c["score_b"], int) and 1 <= c["score_b"] <= 10
        ref = r["refined"]
        assert ref["text"].strip() and set(ref) >= {"text", "score_a", "score_b"}
        assert all(s is None or 1 <= s <= 10 for s in (ref["score_a"], ref["score_b"]))


def test_a_conversation_as_the_prompt_is_sampled_scored_refined_and_evaluated(tmp_path, tiny_model_dir):
    """A prompt given as messages ending with a user turn (TRL's conversational prompt,
    MT-Bench's second turn): every stage keeps it in the record, the candidates answer its last
    turn with the earlier turns before it, and the judge reads the whole exchange."""
    import generation
    import judging

    talk = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Is it safe to stare at the sun?"},
    ]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "c", "prompt": talk}, {"id": "s", "prompt": "Hi?"}])
    m = ["--model", tiny_model_dir]
    run(
        "sample.py",
        "--input",
        prompts,
        "--output",
        tmp_path / "s.jsonl",
        *m,
        "--num-candidates",
        2,
        "--max-new-tokens",
        4,
    )
    run("score.py", "--input", tmp_path / "s.jsonl", "--output", tmp_path / "sc.jsonl", *m, "--mode", "logits")
    run(
        "refine.py",
        "--input",
        tmp_path / "sc.jsonl",
        "--output",
        tmp_path / "r.jsonl",
        *m,
        "--mode",
        "logits",
        "--max-new-tokens",
        4,
    )
    run(
        "evaluate.py",
        "--input",
        prompts,
        "--output",
        tmp_path / "ev",
        *m,
        "--judge",
        tiny_model_dir,
        "--mode",
        "logits",
        "--max-new-tokens",
        4,
    )
    for f in ("s.jsonl", "sc.jsonl", "r.jsonl", "ev/responses.jsonl"):
        assert read_jsonl(tmp_path / f)[0]["prompt"] == talk, f
    turns = generation.prompt_turns(talk, "Be careful.")
    assert turns[0] == {"role": "system", "content": "Be careful."} and turns[1:] == talk
    judged = judging.judge_conversation("harmlessness", talk, "No.")[-1]["content"]
    assert "User: Name a colour.\n\nAssistant: Blue.\n\nUser: Is it safe to stare at the sun?" in judged
    bad = write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "prompt": talk[:2]}])  # ends with the assistant
    p = run("sample.py", "--input", bad, "--output", tmp_path / "b_out.jsonl", *m, check=False)
    assert p.returncode == 2 and "b.jsonl:1: prompt must end with a user message" in p.stderr
