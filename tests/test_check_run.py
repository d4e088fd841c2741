"""check_run.py, the demo's contract check, passes on a complete run and names what is missing."""

import check_run
from conftest import run_here, write_jsonl

CAND = {"text": "t", "system": "default", "temperature": 0.8, "score_a": 5, "score_b": 6}


def make_run(d):
    rec = {
        "id": "1",
        "prompt": "q",
        "candidates": [CAND, CAND],
        "objectives": ["harmlessness", "helpfulness"],
        "refined": {"text": "r", "score_a": 7, "score_b": 7},
        "det_cov": 0.5,
    }
    for f in ("samples", "scored", "refined", "denoised"):
        write_jsonl(d / f"{f}.jsonl", [rec])
    write_jsonl(
        d / "pairs.jsonl",
        [
            {
                "id": "1",
                "prompt": "q",
                "chosen": "r",
                "rejected": "t",
                "chosen_scores": [7, 7],
                "rejected_scores": [5, 6],
                "gap": 3,
            }
        ],
    )
    (d / "eval").mkdir()
    (d / "model").mkdir()
    write_jsonl(d / "eval/responses.jsonl", [{"id": "m/1", "prompt": "q", "model": "m", "response": "a"}])
    write_jsonl(d / "eval/judgments.jsonl", [{"id": "m/1", "kind": "score"}])
    for f in check_run.FILES:
        (d / f).write_text("{}")


def test_complete_run_passes_and_gaps_are_named(tmp_path):
    make_run(tmp_path)
    assert check_run.problems(tmp_path) == []
    write_jsonl(
        tmp_path / "scored.jsonl", [{"id": "1", "prompt": "q", "objectives": [], "candidates": [{"text": "t"}]}]
    )
    (tmp_path / "model/model.safetensors").unlink()
    found = check_run.problems(tmp_path)
    assert any("model.safetensors: missing" in p for p in found)
    assert any("scored.jsonl:1: missing ['candidates[].score_a', 'candidates[].score_b']" in p for p in found)


def test_help_prints_help():
    p = run_here("check_run.py", "--help")
    assert p.returncode == 0 and "usage: check_run.py" in p.stdout and "data contract" in p.stdout
