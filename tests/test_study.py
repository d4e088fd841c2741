"""oracle/study.py report: the chain's figures equal a direct computation on a small fake run."""

import json

import numpy as np

from conftest import run_here

VARIANTS = ("spa", "simpo", "reverse", "nodenoise", "random", "sft")


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_study_report_computes_each_link(tmp_path):
    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(6)]
    write(
        tmp_path / "heldout.jsonl",
        [{"id": p, "prompt": "q", "category": "safe" if i % 2 else "unsafe"} for i, p in enumerate(prompts)],
    )
    vanilla = {p: (int(rng.integers(1, 11)), int(rng.integers(1, 11))) for p in prompts}
    mine = {}
    for s in (1, 2):
        for v in VARIANTS:
            d = tmp_path / f"seed{s}" / v
            mine[s, v] = {p: (int(rng.integers(1, 11)), int(rng.integers(1, 11))) for p in prompts}
            judged = [
                {"kind": "score", "model": m, "prompt_id": p, "score_a": sc[p][0], "score_b": sc[p][1]}
                for m, sc in (("Vanilla", vanilla), (v, mine[s, v]))
                for p in prompts
            ]
            judged += [{"kind": "pairwise", "outcome": o} for o in ("win", "win", "tie", "lose")]
            write(d / "eval" / "judgments.jsonl", judged)
            write(
                d / "eval" / "responses.jsonl",
                [{"model": "Vanilla", "prompt_id": p, "response": "Take 20 mg twice."} for p in prompts]
                + [
                    {"model": v, "prompt_id": p, "response": "I'm sorry, no." if p < "p3" else "Sure."} for p in prompts
                ],
            )
            write(
                d / "train_pairs.jsonl",
                [
                    {"chosen_scores": [7, 2], "rejected_scores": [4, 5]},
                    {"chosen_scores": [3, 6], "rejected_scores": [5, 1]},
                ],
            )
            write(
                d / "model" / "metrics.jsonl",
                [
                    {"step": 0, "eval_loss": 1.0, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.1},
                    {"step": 3, "loss": 0.9},
                    {
                        "step": 5,
                        "eval_loss": 0.5,
                        "eval_rewards/accuracies": 0.75 + 0.05 * s,
                        "eval_rewards/margins": s,
                    },
                ],
            )
    out = run_here(
        "oracle/study.py",
        "report",
        tmp_path,
        "--seeds",
        "1",
        "2",
        "--variants",
        *VARIANTS,
        "--heldout",
        tmp_path / "heldout.jsonl",
        "--output",
        tmp_path / "summary",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "summary" / "study.json").read_text())
    spa = summary["models"]["SPA"]
    d = np.array([[mine[s, "spa"][p][0] - vanilla[p][0] for p in sorted(prompts)] for s in (1, 2)])
    assert abs(spa["d_primary"] - d.mean()) < 1e-9 and spa["d_primary_ci"][0] <= d.mean() <= spa["d_primary_ci"][1]
    link = summary["links"]["reverse"]
    assert link["primary_higher"] == 0.5 and link["d_primary"] == 0.5 and link["d_help"] == 1.0
    assert link["acc_before"] == 0.5 and abs(link["acc_after"] - 0.825) < 1e-9 and link["margin_after"] == 1.5
    assert link["win"] == 0.5 and link["tie"] == 0.25 and link["steps"] == 5
    assert link["declines"] == 0.5 and link["specifics"] == 0.0 and link["words"] == 2
    assert abs(link["over_refusal"] - 1 / 3) < 1e-9  # of the safe p1, p3, p5, only p1's answer declines
    for name, (a, b) in {"spa - random": ("spa", "random"), "spa - sft": ("spa", "sft")}.items():
        for half, cols in {"all": prompts, "unsafe": prompts[0::2], "safe": prompts[1::2]}.items():
            for k, axis in enumerate(("primary", "helpfulness")):
                d = np.array([[mine[s, a][p][k] - mine[s, b][p][k] for p in sorted(cols)] for s in (1, 2)])
                mean, (lo, hi) = summary["contrasts"][name][half][axis]
                assert abs(mean - d.mean()) < 1e-9 and lo <= d.mean() <= hi, (name, half, axis)
    assert "spa_lowlr - random_lowlr" not in summary["contrasts"]  # only what ran
    sig = summary["signature"]
    assert sig["appeared"] == all(v for k, v in sig.items() if k != "appeared")
    assert sig["unsafe primary: SPA - random > 0"] == (
        summary["contrasts"]["spa - random"]["unsafe"]["primary"][1][0] > 0
    )
    assert summary["vanilla_answers"]["specifics"] == 1.0 and summary["vanilla_answers"]["declines"] == 0.0
    assert (tmp_path / "summary" / "study.svg").read_text().startswith("<svg")


def test_the_random_control_keeps_spas_pairs_and_draws_its_order_from_a_coin(tmp_path):
    rng = np.random.default_rng(1)
    spa = []
    for i in range(200):
        a, b = sorted(rng.choice(np.arange(1, 11), 2, replace=False))[::-1]  # SPA's chosen: higher on the primary
        spa.append(
            {
                "id": f"p{i // 2}",
                "prompt": f"q{i // 2}",
                "chosen": f"good {i}",
                "rejected": f"bad {i}",
                "chosen_scores": [int(a), 5],
                "rejected_scores": [int(b), 5],
                "gap": float(rng.integers(0, 8)),
            }
        )
    write(tmp_path / "spa.jsonl", spa)
    for seed in (1, 2):
        assert (
            run_here(
                "oracle/study.py", "random-order", tmp_path / "spa.jsonl", tmp_path / f"r{seed}.jsonl", "--seed", seed
            ).returncode
            == 0
        )
    r1, r2 = (read(tmp_path / f"r{s}.jsonl") for s in (1, 2))
    key = lambda p: (p["id"], p["prompt"], *sorted((p["chosen"], p["rejected"])), p["gap"])
    assert sorted(map(key, r1)) == sorted(map(key, spa))  # same prompts, candidates, count, gaps
    scores = {p["chosen"]: p["chosen_scores"] for p in spa} | {p["rejected"]: p["rejected_scores"] for p in spa}
    assert all(p["chosen_scores"] == scores[p["chosen"]] and p["rejected_scores"] == scores[p["rejected"]] for p in r1)
    higher = lambda rows: np.mean([p["chosen_scores"][0] > p["rejected_scores"][0] for p in rows])
    assert higher(spa) == 1.0 and 0.35 <= higher(r1) <= 0.65  # a copy of SPA's order fails here
    for wide in (True, False):  # the coin ignores the gap too
        assert 0.3 <= higher([p for p in r1 if (p["gap"] >= 4) == wide]) <= 0.7
    assert [p["chosen"] for p in r1] != [p["chosen"] for p in r2]  # the seed draws the coin


def test_the_sft_variant_imitates_the_refined_answers_of_the_kept_prompts(tmp_path):
    kept = [
        {
            "id": "a",
            "prompt": "q",
            "candidates": [{"text": "c0", "score_a": 4, "score_b": 6}, {"text": "c1", "score_a": 2, "score_b": 9}],
            "refined": {"text": "r", "score_a": 8, "score_b": 7},
        }
    ]
    write(tmp_path / "denoised.jsonl", kept)
    assert run_here("oracle/study.py", "sft-pairs", tmp_path / "denoised.jsonl", tmp_path / "sft.jsonl").returncode == 0
    assert read(tmp_path / "sft.jsonl") == [
        {"id": "a", "prompt": "q", "chosen": "r", "rejected": "c1", "chosen_scores": [8, 7], "rejected_scores": [2, 9]}
    ]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_self_agreement_counts_the_pairs_the_oracle_orders_the_same_way(tmp_path):
    d = tmp_path / "seed1"
    refined = [{"id": "a", "prompt": "q", "candidates": [{"text": "c0"}, {"text": "c1"}], "refined": {"text": "r"}}]
    write(d / "refined.jsonl", refined)
    assert run_here("oracle/study.py", "answers-as-samples", d / "refined.jsonl", d / "answers.jsonl").returncode == 0
    assert [c["text"] for c in read(d / "answers.jsonl")[0]["candidates"]] == ["c0", "c1", "r"]
    rated = {"c0": 3, "c1": 7, "r": 7}
    write(d / "oracle_scored.jsonl", [{"id": "a", "candidates": [{"text": t, "score_a": a} for t, a in rated.items()]}])
    pairs = [("r", "c0"), ("c1", "r"), ("c0", "c1"), ("r", "gone")]  # higher, same, lower, unrated
    write(d / "spa" / "train_pairs.jsonl", [{"id": "a", "chosen": c, "rejected": r} for c, r in pairs])
    out = run_here("oracle/study.py", "self-agreement", tmp_path, "--seeds", "1", "--output", tmp_path / "s")
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "s" / "self_agreement.json").read_text())
    assert got["pairs"] == 4 and got["oracle_on_primary"] == {
        "higher": 0.25,
        "same": 0.25,
        "lower": 0.25,
        "unrated": 0.25,
    }
