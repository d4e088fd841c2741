"""Every generation stage under torchrun (gloo, 2 ranks) writes what one process writes."""

import pytest

from conftest import read_jsonl, run, torchrun, write_jsonl

PROMPTS = [{"id": f"q{i}", "prompt": f"Question {i}: is {'this ' * (i % 4)}safe?"} for i in range(6)]
SAMPLE = ["--num-candidates", 2, "--max-new-tokens", 5, "--seed", 3, "--temperatures", 1.0]
JUDGE = ["--mode", "logits"]  # refine.py rates on the objectives the scored file names


def same(a, b):
    """Records equal, floats (expected ratings) up to batched arithmetic."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], abs=1e-3)
            elif isinstance(x[k], list) and x[k] and isinstance(x[k][0], dict):
                same(x[k], y[k])
            else:
                assert x[k] == y[k], k


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Each stage once with one process and once with two ranks, on the same input."""
    d = tmp_path_factory.mktemp("dist")
    inp = write_jsonl(d / "prompts.jsonl", PROMPTS)
    m = ["--model", tiny_model_dir]
    for tag, launch in (("one", run), ("two", torchrun)):
        launch("sample.py", "--input", inp, "--output", d / f"{tag}_samples.jsonl", *m, *SAMPLE, "--batch-size", 4)
        launch(
            "score.py",
            "--input",
            d / "one_samples.jsonl",
            "--output",
            d / f"{tag}_scored.jsonl",
            *m,
            *JUDGE,
            "--primary",
            "honesty",
        )
        launch(
            "refine.py",
            "--input",
            d / "one_scored.jsonl",
            "--output",
            d / f"{tag}_refined.jsonl",
            *m,
            *JUDGE,
            "--max-new-tokens",
            5,
            "--batch-size",
            2,
        )
        launch(
            "evaluate.py",
            "--input",
            inp,
            "--output",
            d / f"{tag}_eval",
            "--model",
            tiny_model_dir,
            "--baseline",
            tiny_model_dir,
            "--judge",
            tiny_model_dir,
            "--mode",
            "logits",
            "--max-new-tokens",
            5,
            "--judge-max-tokens",
            4,
            "--batch-size",
            2,
        )
    return d


@pytest.mark.parametrize("stage", ["samples", "scored", "refined"])
def test_two_ranks_write_what_one_process_writes(runs, stage):
    one, two = read_jsonl(runs / f"one_{stage}.jsonl"), read_jsonl(runs / f"two_{stage}.jsonl")
    assert [r["id"] for r in two] == [p["id"] for p in PROMPTS]  # input order
    same(one, two)
    assert not list(runs.glob(f"two_{stage}.jsonl.part*")) and not list(runs.glob(f"two_{stage}.jsonl.lock"))


def test_evaluate_under_two_ranks(runs):
    for f in ("responses.jsonl", "judgments.jsonl"):
        same(read_jsonl(runs / "one_eval" / f), read_jsonl(runs / "two_eval" / f))
    assert (runs / "one_eval" / "report.md").read_text() == (runs / "two_eval" / "report.md").read_text()


def test_samples_do_not_depend_on_the_batch_size(runs, tiny_model_dir):
    out = runs / "bs1_samples.jsonl"
    run(
        "sample.py",
        "--input",
        runs / "prompts.jsonl",
        "--output",
        out,
        "--model",
        tiny_model_dir,
        *SAMPLE,
        "--batch-size",
        1,
    )
    same(read_jsonl(runs / "one_samples.jsonl"), read_jsonl(out))
    texts = [c["text"] for r in read_jsonl(out) for c in r["candidates"]]
    assert len(set(texts)) > len(texts) // 2  # sampled, not one greedy answer


def test_a_crashed_two_rank_run_resumes_to_the_uninterrupted_output(runs, tiny_model_dir):
    out = runs / "crash_samples.jsonl"
    args = ["--input", runs / "prompts.jsonl", "--output", out, "--model", tiny_model_dir, *SAMPLE, "--batch-size", 1]
    p = torchrun("tests/crash_after.py", 1, "sample.py", *args, check=False)  # each rank dies in its second record
    assert p.returncode != 0 and not out.exists() and list(runs.glob("crash_samples.jsonl.part*"))
    p = torchrun("sample.py", *args)
    assert "resumed" in p.stdout
    assert out.read_bytes() == (runs / "one_samples.jsonl").read_bytes()
    assert not list(runs.glob("crash_samples.jsonl.part*"))
