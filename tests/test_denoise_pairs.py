"""Eq. 1 and Eq. 2 on hand-computed cases, and denoise.py -> pairs.py on a crafted file."""

import json

import numpy as np
import pytest

import denoise
import pairs

import math
import time
from conftest import denoise_record, read_jsonl, refused, run, run_here, write_jsonl


def test_det_exact_value():
    # a = 1 2 3 (var 1), b = 2 4 3 (var 1), cov = (1 + 0 + 0) / 2 = 0.5 -> det = 1 - 0.25
    assert denoise.det_cov([(1, 2), (2, 4), (3, 3)]) == pytest.approx(0.75)
    # a = 3 5 4 (var 1), b = 4 2 4 (var 4/3), cov = -1 -> det = 1/3
    assert denoise.det_cov([(3, 4), (5, 2), (4, 4)]) == pytest.approx(1 / 3)


def test_det_zero_for_constant_axis_and_perfect_correlation():
    assert denoise.det_cov([(5, 1), (5, 3), (5, 7)]) == 0.0
    assert denoise.det_cov([(1, 2), (2, 4), (3, 6)]) == 0.0
    assert denoise.det_cov([(1, 9), (2, 7), (3, 5), (4, 3)]) == 0.0  # perfectly anti-correlated


def test_consistency_is_strict():
    cands = [(3, 4), (5, 2)]
    assert denoise.consistent(cands, (6, 5))
    assert not denoise.consistent(cands, (5, 5))  # ties the best a
    assert not denoise.consistent(cands, (6, 4))  # ties the best b


def test_tau_quantile():
    assert denoise.tau_from_quantile([0, 4, 1, 3, 2], 0.5) == pytest.approx(2.5)
    assert denoise.tau_from_quantile([0, 4, 1, 3, 2], 0.25) == pytest.approx(1.75)
    assert denoise.tau_from_quantile([0, 0], 0.5) == 0.0


def test_reason_order_and_ablations():
    s = ([(3, 4), (5, 2), (4, 4)], (6, 6))
    assert denoise.reason(None, 0, 1) == "unscored"
    assert denoise.reason(s, 1 / 3, 1) == "kept"
    assert denoise.reason(s, 1 / 3, 0.2) == "unstable"
    assert denoise.reason(s, 0.0, 1) == "degenerate"
    assert denoise.reason(s, 0.0, 1, use_informativeness=False) == "kept"
    bad = ([(3, 4), (5, 2)], (5, 6))
    assert denoise.reason(bad, 1 / 3, 1) == "inconsistent"
    assert denoise.reason(bad, 1 / 3, 1, use_consistency=False) == "kept"


def test_pair_enumeration_with_ties_and_delta():
    # A=(7,2) B=(5,5) C=(5,3) D=(5,4), delta 2
    pairs_found = pairs.lexicographic_pairs([(7, 2), (5, 5), (5, 3), (5, 4)], 2)
    # A beats all (margins 5, 3, 4); B>C on equal a (margin 2 = delta); B>D and D>C have margin 1 < delta
    assert sorted(pairs_found) == [(0, 1), (0, 2), (0, 3), (1, 2)]
    assert pairs.lexicographic_pairs([(5, 5), (5, 5)], 0) == []  # identical scores: neither is better
    assert pairs.weight_gap((7, 2), (5, 4)) == 0  # a valid pair with weight gap 0


def test_identical_texts_merged_and_zero_gap_counted():
    rec = {
        "id": "x",
        "prompt": "q",
        "candidates": [
            {"text": "same", "score_a": 3, "score_b": 4},
            {"text": " same ", "score_a": 3, "score_b": 4},
            {"text": "other", "score_a": 5, "score_b": 2},
        ],
        "refined": {"text": "best", "score_a": 6, "score_b": 6},
    }
    assert [t for t, _, _ in pairs.answers_of(rec)] == ["same", "other", "best"]
    got = pairs.prompt_pairs(rec, 2)
    assert sorted((p["chosen"], p["rejected"], p["gap"]) for p in got) == [
        ("best", "other", 5),
        ("best", "same", 5),
        ("other", "same", 0),
    ]
    assert pairs.prompt_pairs(rec, 2, max_pairs=1)[0]["chosen"] == "best"


def test_rv_coefficient():
    x = np.array([[1, 2], [3, 1], [2, 5], [4, 4]])
    assert denoise.rv_coefficient(x, x) == pytest.approx(1.0)
    assert denoise.rv_coefficient(x, 3 * x + 7) == pytest.approx(1.0)
    # centred X = [[1,0],[0,1],[-1,-1]], Y = [[1,0],[0,0],[-1,0]]: tr(XX'YY') = 5, |XX'|^2 = 10, |YY'|^2 = 4
    assert denoise.rv_coefficient([[1, 0], [0, 1], [-1, -1]], [[1, 0], [0, 0], [-1, 0]]) == pytest.approx(
        5 / np.sqrt(40)
    )


def record(i, cands, refined):
    return {
        "id": i,
        "prompt": f"prompt {i}",
        "candidates": [{"text": f"{i}-c{k}", "score_a": a, "score_b": b} for k, (a, b) in enumerate(cands)],
        "refined": {"text": f"{i}-R", "score_a": refined[0], "score_b": refined[1]},
    }


CRAFTED = [
    record("kept", [(3, 4), (5, 2), (4, 4)], (6, 6)),  # det 1/3
    record("unstable", [(2, 2), (6, 6), (4, 3)], (7, 7)),  # det 4/3
    record("inconsistent", [(3, 4), (5, 2), (4, 4)], (5, 6)),
    record("degenerate", [(5, 1), (5, 3), (5, 7)], (6, 8)),
    record("unscored", [(3, None), (5, 2), (4, 4)], (6, 6)),
]


def test_denoise_then_pairs_cli(tmp_path):
    inp = write_jsonl(tmp_path / "refined.jsonl", CRAFTED)
    run("denoise.py", "--input", inp, "--output", tmp_path / "denoised.jsonl", "--tau", 1)
    kept = read_jsonl(tmp_path / "denoised.jsonl")
    assert [r["id"] for r in kept] == ["kept"] and kept[0]["det_cov"] == pytest.approx(1 / 3)
    summary = json.loads((tmp_path / "denoised.summary.json").read_text())
    assert {k: summary[k] for k in denoise.REASONS} == {
        "kept": 1,
        "unscored": 1,
        "inconsistent": 1,
        "degenerate": 1,
        "unstable": 1,
    }
    run("pairs.py", "--input", tmp_path / "denoised.jsonl", "--output", tmp_path / "pairs.jsonl")
    got = read_jsonl(tmp_path / "pairs.jsonl")
    assert sorted((p["chosen"], p["rejected"], p["gap"]) for p in got) == [
        ("kept-R", "kept-c0", 5),
        ("kept-R", "kept-c1", 5),
        ("kept-R", "kept-c2", 4),
        ("kept-c1", "kept-c0", 0),
        ("kept-c1", "kept-c2", 1),
    ]
    assert all(p["id"] == "kept" and p["prompt"] == "prompt kept" for p in got)
    assert got[0].keys() >= {"chosen_scores", "rejected_scores"}
    assert json.loads((tmp_path / "pairs.summary.json").read_text())["zero_gap_pairs"] == 1
    # the quantile form and the ablations
    run("denoise.py", "--input", inp, "--output", tmp_path / "q.jsonl", "--tau-quantile", 1.0, "--no-consistency")
    assert [r["id"] for r in read_jsonl(tmp_path / "q.jsonl")] == ["kept", "unstable", "inconsistent"]


def test_denoise_and_pairs_bad_input(tmp_path):
    inp = write_jsonl(tmp_path / "refined.jsonl", CRAFTED)
    p = run("denoise.py", "--input", inp, "--output", tmp_path / "d.jsonl", "--tau", 0.1, check=False)
    assert p.returncode == 2 and "no prompt survives" in p.stderr and "raise --tau" in p.stderr
    assert not (tmp_path / "d.jsonl").exists()
    scored = write_jsonl(tmp_path / "scored.jsonl", [{"id": "1", "prompt": "q", "candidates": []}])
    p = run("denoise.py", "--input", scored, "--output", tmp_path / "d.jsonl", check=False)
    assert p.returncode == 2 and "missing field 'refined' (run refine.py first)" in p.stderr
    one = write_jsonl(tmp_path / "one.jsonl", [record("x", [(3, 4)], (6, 6))])
    p = run("denoise.py", "--input", one, "--output", tmp_path / "d.jsonl", check=False)
    assert p.returncode == 2 and "at least two" in p.stderr
    p = run("pairs.py", "--input", inp, "--output", tmp_path / "p.jsonl", check=False)
    assert p.returncode == 2 and "score_b must be an integer 1..10, got None" in p.stderr and "run it first" in p.stderr
    p = run(
        "pairs.py",
        "--input",
        write_jsonl(tmp_path / "k.jsonl", CRAFTED[:1]),
        "--output",
        tmp_path / "p.jsonl",
        "--delta",
        20,
        check=False,
    )
    assert p.returncode == 2 and "lower --delta" in p.stderr


def test_rv_against_prints_table(tmp_path):
    recs = [record(f"r{k}", [(3, 4 + k % 2), (5, 2), (4, 4 + k % 3)], (9, 9)) for k in range(6)]
    inp = write_jsonl(tmp_path / "refined.jsonl", recs)
    judge = write_jsonl(tmp_path / "judge.jsonl", recs)
    p = run("denoise.py", "--input", inp, "--output", tmp_path / "d.jsonl", "--tau-quantile", 1, "--rv-against", judge)
    rows = [line.split("\t") for line in p.stdout.strip().splitlines()[1:]]
    assert len(rows) == 10 and all(float(rv) == pytest.approx(1.0) for _, rv in rows)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r["candidates"][0].pop("score_a"), "candidate 1 has no score_a"),
        (lambda r: r.update(refined="better"), "refined must be an object"),
        (lambda r: r.update(candidates=3), "candidates must be a list of objects"),
        (lambda r: r["candidates"][1].update(score_b=float("nan")), "candidate 2's score_b must be an integer 1..10"),
        (lambda r: r["candidates"][1].update(score_b=11), "candidate 2's score_b must be an integer 1..10"),
        (lambda r: r["refined"].update(score_a="7"), "refined's score_a must be an integer 1..10"),
        (lambda r: r["refined"].update(score_a=True), "refined's score_a must be an integer 1..10"),
    ],
)
def test_denoise_names_a_malformed_record(tmp_path, change, message):
    rec = denoise_record("a")
    change(rec)
    inp = tmp_path / "r.jsonl"
    inp.write_text(json.dumps(denoise_record("b")) + "\n" + json.dumps(rec) + "\n")  # NaN as Python writes it
    refused(run_here("denoise.py", "--input", inp, "--output", tmp_path / "d.jsonl"), f"record 2 (id a): {message}")


def test_denoise_flags_and_a_failed_rerun_keep_what_was_written(tmp_path):
    inp = write_jsonl(
        tmp_path / "r.jsonl", [denoise_record(str(i), ((3, 4), (5, 2), (4, 4 + i % 3))) for i in range(6)]
    )
    for flags, message in (
        (["--tau-quantile", 1.5], "must be a finite number >= 0 and <= 1"),
        (["--tau-quantile", "nan"], "must be a finite number >= 0 and <= 1"),
        (["--tau", "-1"], "must be a finite number >= 0"),
    ):
        refused(run_here("denoise.py", "--input", inp, "--output", tmp_path / "d.jsonl", *flags), message)
    assert (
        run_here(
            "denoise.py", "--input", inp, "--output", tmp_path / "d.jsonl", "--limit", 2, "--tau-quantile", 1
        ).returncode
        == 0
    )
    before = [(tmp_path / f).read_bytes() for f in ("d.jsonl", "d.summary.json")]
    other = write_jsonl(tmp_path / "j.jsonl", [denoise_record("zz")])
    refused(
        run_here("denoise.py", "--input", inp, "--output", tmp_path / "d.jsonl", "--rv-against", other),
        "no id in common with the input",
    )
    strings = write_jsonl(tmp_path / "s.jsonl", [dict(denoise_record("0"), candidates=["a", "b", "c"])])
    refused(
        run_here("denoise.py", "--input", inp, "--output", tmp_path / "d.jsonl", "--rv-against", strings),
        "candidates must be a list of 3 objects",
    )
    assert [(tmp_path / f).read_bytes() for f in ("d.jsonl", "d.summary.json")] == before


def test_the_rv_table_is_the_rv_of_the_prompts_taken_in_linear_time():
    rng = np.random.default_rng(0)
    n = 100_000
    ours = rng.integers(1, 11, (n, 4, 2))
    theirs = np.clip(ours + rng.integers(-2, 3, (n, 4, 2)), 1, 10)
    dets = list(rng.random(n))
    t = time.time()
    table = denoise.rv_table(dets, list(ours), list(theirs))
    assert time.time() - t < 30 and len(table) == 10
    order = np.argsort(dets)[: n // 2]
    want = denoise.rv_coefficient(ours[order].reshape(-1, 2), theirs[order].reshape(-1, 2))
    assert table[4][0] == 0.5 and table[4][1] == pytest.approx(want, rel=1e-9) and 0 < want < 1
    x = rng.normal(size=(7, 2))
    xc = x - x.mean(0)
    y = rng.normal(size=(7, 2))
    yc = y - y.mean(0)
    by_definition = np.trace(xc @ xc.T @ yc @ yc.T) / math.sqrt(
        np.trace((xc @ xc.T) @ (xc @ xc.T)) * np.trace((yc @ yc.T) @ (yc @ yc.T))
    )
    assert denoise.rv_coefficient(x, y) == pytest.approx(by_definition)


def test_nothing_survives_removes_the_stale_output(tmp_path):
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
