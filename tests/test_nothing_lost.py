"""Nothing lost, nothing silently wrong: each probe of a demanding user, refused with a clear
message (exit 2) and with what was already written intact."""
import json
import shutil
import time
from http.server import BaseHTTPRequestHandler

import pytest
import torch
from safetensors.torch import load_file

import common
import report
import http_judge
import preference_data
import resumable
from conftest import http_server, read_jsonl, run, write_jsonl

PROMPTS = [{"id": f"t{i}", "prompt": f"Is thing {i} safe?"} for i in range(3)]


def refused(p, message):
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def sample(tmp_path, tiny, out, *extra, check=True):
    return run("sample.py", "--input", tmp_path / "p.jsonl", "--output", out, "--model", tiny, "--num-candidates", 2,
               "--max-new-tokens", 3, *extra, check=check)


@pytest.fixture
def made(tmp_path, tiny_model_dir):
    """prompts -> samples -> scored (logits mode) on the tiny model."""
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    sample(tmp_path, tiny_model_dir, tmp_path / "s.jsonl")
    run("score.py", "--input", tmp_path / "s.jsonl", "--output", tmp_path / "sc.jsonl", "--model", tiny_model_dir,
        "--mode", "logits")
    return tmp_path


def test_1_output_equal_to_input_is_refused(made, tiny_model_dir):
    before = (made / "sc.jsonl").read_bytes()
    refused(run("denoise.py", "--input", made / "sc.jsonl", "--output", made / "sc.jsonl", check=False),
            "this run reads it, and would write or remove")
    refused(run("score.py", "--input", made / "sc.jsonl", "--output", made / "sc.jsonl", "--overwrite", check=False),
            "this run reads it, and would write or remove")
    assert (made / "sc.jsonl").read_bytes() == before


def test_3_resume_refuses_other_settings_and_changed_inputs(made, tiny_model_dir):
    before = (made / "sc.jsonl").read_bytes()
    p = run("score.py", "--input", made / "s.jsonl", "--output", made / "sc.jsonl", "--model", tiny_model_dir,
            "--mode", "logits-expected", check=False)
    refused(p, "was made with --mode 'logits' (now 'logits-expected')")
    p = sample(made, tiny_model_dir, made / "s.jsonl", "--num-candidates", 3, check=False)
    refused(p, "--num-candidates 2 (now 3)")
    # re-sampled candidates: the scored output no longer answers its input
    resampled = [dict(r, candidates=[dict(c, text=c["text"] + "!") for c in r["candidates"]])
                 for r in read_jsonl(made / "s.jsonl")]
    write_jsonl(made / "s2.jsonl", resampled)
    p = run("score.py", "--input", made / "s2.jsonl", "--output", made / "sc.jsonl", "--model", tiny_model_dir,
            "--mode", "logits", check=False)
    refused(p, "changed since the output was started")
    assert (made / "sc.jsonl").read_bytes() == before


def test_3_evaluate_keys_answers_by_the_model(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    other = tmp_path / "b" / "model"
    shutil.copytree(tiny_model_dir, other)
    args = ["--input", tmp_path / "p.jsonl", "--output", tmp_path / "ev", "--judge", tiny_model_dir, "--mode", "logits",
            "--max-new-tokens", 3]
    run("evaluate.py", *args, "--model", tiny_model_dir)
    p = run("evaluate.py", *args, "--model", other, check=False)
    refused(p, "responses.jsonl: was made with --models")


def test_5_duplicate_and_integer_ids(tmp_path, tiny_model_dir):
    dup = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "prompt": "q", "candidates": [{"text": "a"}]}
                                             for i in ("t02", "t01", "t02")])
    refused(run("score.py", "--input", dup, "--output", tmp_path / "o.jsonl", "--model", tiny_model_dir, check=False),
            "d.jsonl:3: duplicate id 't02'")
    ints = write_jsonl(
        tmp_path / "i.jsonl", [{"id": i, "prompt": f"q{i}", "candidates": [{"text": "a"}]} for i in (1, 2)]
    )
    args = ["--input", ints, "--output", tmp_path / "o.jsonl", "--model", tiny_model_dir, "--mode", "logits"]
    run("score.py", *args, "--limit", 1)
    run("score.py", *args)  # resumes: the integer ids are read as strings both times
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["1", "2"]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "prompt": "q", "candidates": "not a list"}])
    refused(run("score.py", "--input", bad, "--output", tmp_path / "o2.jsonl", check=False),
            "candidates must be a list of objects with a string 'text'")


def test_6_a_second_run_on_a_locked_output_is_refused(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    held = resumable.lock(tmp_path / "s.jsonl.lock", "test")
    refused(
        sample(tmp_path, tiny_model_dir, tmp_path / "s.jsonl", check=False), "another run is writing this output (pid"
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "gap": 1}])
    held2 = resumable.lock(tmp_path / "m" / "train.lock", "test")
    refused(run("train.py", "--input", pairs, "--output", tmp_path / "m", "--model", tiny_model_dir, check=False),
            "another run is writing this output")
    resumable.release(held)
    resumable.release(held2)
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("gap", [-4, float("nan"), float("inf"), "3", True, "abc", None])
def test_7_gaps_are_validated(tmp_path, tokenizer, gap):
    text = json.dumps(
        {"prompt": "q", "chosen": "a", "rejected": "b", "gap": gap}
    )  # NaN, Infinity as Python writes them
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "gap": 1}) + "\n" + text + "\n"
    )
    with pytest.raises(common.InputError, match=r"p\.jsonl:2: gap must be a finite number >= 0"):
        preference_data.load_pairs(tmp_path / "p.jsonl", tokenizer, 64)


def test_4_and_8_resume_refuses_a_changed_plan_and_survives_a_kill_between_renames(tmp_path, tiny_model_dir):
    pairs = [{"id": str(i), "prompt": f"Q{i}?", "chosen": "Careful " * (i + 1), "rejected": "No.", "gap": i % 3}
             for i in range(6)]
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
    run("train.py", *args, "--output", tmp_path / "m", "--stop-after", 3)
    refused(run("train.py", *args[:-4], "--batch-size", 2, "--grad-accum", 1, "--save-every", 1, "--output",
                tmp_path / "m", "--resume", check=False), "batch_size 1 (now 2)")
    g = write_jsonl(tmp_path / "other.jsonl", pairs[::-1])
    refused(run("train.py", "--input", g, *args[2:], "--output", tmp_path / "m", "--resume", check=False),
            "the checkpoint belongs to another plan: pairs")
    refused(run("train.py", *args, "--output", tmp_path / "m", check=False), "holds a checkpoint")
    assert len(read_jsonl(tmp_path / "m" / "metrics.jsonl")) == 3  # nothing discarded
    (tmp_path / "m" / "checkpoint").rename(tmp_path / "m" / "checkpoint.tmp")  # killed between the two renames
    run("train.py", *args, "--output", tmp_path / "m", "--resume")
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("script,flags,message", [
    ("sample.py", ["--batch-size", "-1"], "--batch-size: must be at least 1"),
    ("sample.py", ["--limit", "0"], "--limit: must be at least 1"),
    ("sample.py", ["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    ("denoise.py", ["--limit", "-1"], "--limit: must be at least 1"),
    ("train.py", ["--grad-accum", "0"], "--grad-accum: must be at least 1"),
    ("train.py", ["--batch-size", "0"], "--batch-size: must be at least 1"),
])
def test_9_flag_values_out_of_range(tmp_path, script, flags, message):
    p = run(script, "--input", tmp_path / "x.jsonl", "--output", tmp_path / "y", *flags, check=False)
    refused(p, message)


def test_10_nothing_survives_removes_the_stale_output(tmp_path):
    cands = [{"text": f"c{i}", "score_a": 5, "score_b": 5} for i in range(3)]
    recs = [{"id": "x", "prompt": "q", "candidates": cands, "refined": {"text": "r", "score_a": 6, "score_b": 6}}]
    f = write_jsonl(tmp_path / "r.jsonl", recs)
    (tmp_path / "d.jsonl").write_text('{"id": "old"}\n')
    p = run("denoise.py", "--input", f, "--output", tmp_path / "d.jsonl", check=False)
    refused(p, "no prompt survives")
    assert not (tmp_path / "d.jsonl").exists()
    assert json.loads((tmp_path / "d.summary.json").read_text())["kept"] == 0
    (tmp_path / "pairs.jsonl").write_text('{"id": "old"}\n')
    p = run("pairs.py", "--input", f, "--output", tmp_path / "pairs.jsonl", "--delta", 9, check=False)
    refused(p, "no pair has a margin")
    assert not (tmp_path / "pairs.jsonl").exists()
    assert json.loads((tmp_path / "pairs.summary.json").read_text())["pairs"] == 0


def test_11_prompts_over_the_context_are_refused_or_truncated(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1] + [{"id": "huge", "prompt": "word " * 3000}])
    refused(
        sample(tmp_path, tiny_model_dir, tmp_path / "s.jsonl", check=False), "do not fit the model's context of 1024"
    )
    p = sample(tmp_path, tiny_model_dir, tmp_path / "t.jsonl", "--truncate-prompts", "--overwrite")
    assert "1 prompts truncated" in p.stdout
    recs = read_jsonl(tmp_path / "t.jsonl")
    assert (
        recs[1]["prompt_truncated"] is True and len(recs[1]["prompt"]) < 3000 * 5 and "prompt_truncated" not in recs[0]
    )


class Awkward(BaseHTTPRequestHandler):
    """A judge that misbehaves by path: /trickle sends a byte a second, /empty a JSON [] body,
    /number content 7, /raw a reply that is not HTTP."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        kind = self.path.split("/")[1]
        if kind == "raw":
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            return
        body = {"empty": b"[]", "number": json.dumps({"choices": [{"message": {"content": 7}}]}).encode(),
                "trickle": b'{"choices": [{"message": {"content": "Rating: 5"}}]}'}[kind]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(len(body)):
            self.wfile.write(body[i:i + 1])
            self.wfile.flush()
            if kind == "trickle":
                time.sleep(1)

    def log_message(self, *a):
        pass


def test_12_http_judge_deadline_and_malformed_replies(tmp_path):
    msg = [{"role": "user", "content": "hi"}]
    with http_server(Awkward) as base:
        t = time.time()
        with pytest.raises(common.InputError, match="no complete reply within 0.5 s"):
            http_judge.chat_completion(base + "/trickle", "m", msg, timeout=0.5, retries=2, backoff=0.01)
        assert time.time() - t < 5
        for kind in ("empty", "number", "raw"):  # a broken endpoint, not an opinion: retried, then an error
            with pytest.raises(common.InputError, match="failed after 2 tries"):
                http_judge.chat_completion(f"{base}/{kind}", "m", msg, timeout=2, retries=2, backoff=0.01)
    judged = [{"kind": "score", "model": m, "score_a": 5, "score_b": 5} for m in ("V", "S")]
    judged += [{"kind": "pairwise", "outcome": "tie", "model_first": None, "model_second": "B"},
               {"kind": "pairwise", "outcome": "win", "model_first": "A", "model_second": "B"}]
    rep = report.build_report(judged, ["V", "S"], "harmlessness")
    assert rep["pairwise"]["unreadable"] == 1
    assert "Pairwise (S): 1 of 2 comparisons had an unreadable verdict" in report.report_markdown(rep, ["V", "S"])


def test_13_bad_files_are_errors_not_tracebacks(tmp_path, tiny_model_dir):
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    refused(run("sample.py", "--input", tmp_path / "bad.jsonl", "--output", tmp_path / "o.jsonl", check=False),
            "bad.jsonl:2: not UTF-8")
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    (tmp_path / "adir").mkdir()
    refused(sample(tmp_path, tiny_model_dir, tmp_path / "adir", check=False), "--output is a directory")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "gap": 1}])
    refused(run("train.py", "--input", pairs, "--output", tmp_path / "p.jsonl", "--model", tiny_model_dir, check=False),
            "--output is a file")
    (tmp_path / "locked.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "locked.jsonl").chmod(0)
    p = run("sample.py", "--input", tmp_path / "locked.jsonl", "--output", tmp_path / "o.jsonl", check=False)
    (tmp_path / "locked.jsonl").chmod(0o644)
    if p.returncode != 0:  # root reads anything: then there is nothing to refuse
        refused(p, "Permission denied")
