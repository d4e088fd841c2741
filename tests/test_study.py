"""oracle/study.py report: the chain's figures equal a direct computation on a small fake run."""

import json

import numpy as np

from conftest import run_here

VARIANTS = ("spa", "simpo", "reverse", "nodenoise")


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_study_report_computes_each_link(tmp_path):
    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(6)]
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
                [{"model": "Vanilla", "response": "Take 20 mg twice."}, {"model": v, "response": "I'm sorry, no."}],
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
    out = run_here("oracle/study.py", "report", tmp_path, "--seeds", "1", "2", "--output", tmp_path / "summary")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "summary" / "study.json").read_text())
    spa = summary["models"]["SPA"]
    d = np.array([[mine[s, "spa"][p][0] - vanilla[p][0] for p in sorted(prompts)] for s in (1, 2)])
    assert abs(spa["d_primary"] - d.mean()) < 1e-9 and spa["d_primary_ci"][0] <= d.mean() <= spa["d_primary_ci"][1]
    link = summary["links"]["reverse"]
    assert link["primary_higher"] == 0.5 and link["d_primary"] == 0.5 and link["d_help"] == 1.0
    assert link["acc_before"] == 0.5 and abs(link["acc_after"] - 0.825) < 1e-9 and link["margin_after"] == 1.5
    assert link["win"] == 0.5 and link["tie"] == 0.25 and link["steps"] == 5
    assert link["declines"] == 1.0 and link["specifics"] == 0.0 and link["words"] == 3
    assert summary["vanilla_answers"]["specifics"] == 1.0 and summary["vanilla_answers"]["declines"] == 0.0
    assert (tmp_path / "summary" / "study.svg").read_text().startswith("<svg")
