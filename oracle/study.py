"""The study's helpers (oracle/study.sh): split a seed's refined records into training and
validation, and measure the chain link by link over seeds.

    python oracle/study.py split REFINED VAL_PROMPTS OUT_TRAIN OUT_VAL
    python oracle/study.py report RUN --seeds 1 2 3 --output RUN/summary

The links, per variant, as means over seeds:
  1 the pairs encode the priority: the share of training pairs whose chosen answer has the
    higher primary score, and the mean score differences chosen - rejected (d_primary, d_help);
  2 training learns them: reward accuracy and margin on the variant's held-out pairs (built the
    same way from the validation prompts), before the first step and after the last;
  3 the generations move: the judge's primary and helpfulness scores of greedy answers to the
    held-out prompts, and their difference from vanilla's answers to the same prompts, each with
    a 95% interval from a bootstrap over prompts and seeds; win / tie / lose against vanilla
    (pairwise, both orders, a win only when both agree); and what the greedy answers look like
    under the judge's own rules: words, the share that declines, dangerous specifics per answer.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import common  # noqa: E402
import jsonl  # noqa: E402
import report  # noqa: E402
from judge import DECLINE, SPECIFIC  # noqa: E402  (oracle/judge.py)

VARIANTS = ("spa", "simpo", "reverse", "nodenoise")
NAMES = {"spa": "SPA", "simpo": "SPA, w = 1 (simpo)", "reverse": "reverse priority", "nodenoise": "SPA w/o denoising"}


def split(refined, val_prompts, out_train, out_val):
    val = {r["id"] for _, _, r in jsonl.read_jsonl(val_prompts)}
    rows = [r for _, _, r in jsonl.read_jsonl(refined)]
    jsonl.write_jsonl_atomic(out_train, [r for r in rows if r["id"] not in val])
    jsonl.write_jsonl_atomic(out_val, [r for r in rows if r["id"] in val])


def bootstrap(cells, n=2000, seed=0):
    """95% interval of the mean of a (seeds, prompts) array, resampling seeds and prompts."""
    rng = np.random.default_rng(seed)
    S, P = cells.shape
    means = [cells[rng.integers(0, S, S)][:, rng.integers(0, P, P)].mean() for _ in range(n)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def rows_of(path):
    return [r for _, _, r in jsonl.read_jsonl(path)]


def link_pairs(path):
    ps = rows_of(path)
    d = np.array(
        [
            [p["chosen_scores"][0] - p["rejected_scores"][0], p["chosen_scores"][1] - p["rejected_scores"][1]]
            for p in ps
        ],
        dtype=float,
    )
    return {
        "pairs": len(ps),
        "primary_higher": float((d[:, 0] > 0).mean()),
        "d_primary": float(d[:, 0].mean()),
        "d_help": float(d[:, 1].mean()),
    }


def link_training(path):
    evals = [r for r in rows_of(path) if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    return {
        "steps": last["step"],
        "acc_before": first["eval_rewards/accuracies"],
        "acc_after": last["eval_rewards/accuracies"],
        "margin_before": first["eval_rewards/margins"],
        "margin_after": last["eval_rewards/margins"],
    }


def answers(responses, model):
    """Mean words, share declining and dangerous specifics per answer of one model's greedy answers."""
    texts = [r["response"] for r in responses if r["model"] == model]
    return {
        "words": float(np.mean([len(t.split()) for t in texts])),
        "declines": float(np.mean([bool(DECLINE.search(t)) for t in texts])),
        "specifics": float(np.mean([len(SPECIFIC.findall(t)) for t in texts])),
    }


def scores(judgments, model):
    """{prompt id: (primary, helpfulness)} of one model's judged answers."""
    return {
        j["prompt_id"]: (j["score_a"], j["score_b"]) for j in judgments if j["kind"] == "score" and j["model"] == model
    }


def report_run(run, seeds, out):
    run = Path(run)
    rows, cells, vanilla, vanilla_answers = {}, {}, {}, None
    for v in VARIANTS:
        per_seed = []
        for s in seeds:
            d = run / f"seed{s}" / v
            judged = rows_of(d / "eval" / "judgments.jsonl")
            mine, base = scores(judged, v), scores(judged, "Vanilla")
            pids = sorted(mine)
            cells.setdefault(v, []).append([mine[p] for p in pids])
            vanilla.setdefault(s, [base[p] for p in pids])
            outcomes = [j["outcome"] for j in judged if j["kind"] == "pairwise"]
            responses = rows_of(d / "eval" / "responses.jsonl")
            vanilla_answers = vanilla_answers or answers(responses, "Vanilla")  # the same greedy answers each time
            per_seed.append(
                {
                    **link_pairs(d / "train_pairs.jsonl"),
                    **link_training(d / "model" / "metrics.jsonl"),
                    **{k: outcomes.count(k) / len(outcomes) for k in ("win", "tie", "lose")},
                    **answers(responses, v),
                }
            )
        rows[v] = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
    base = np.array([vanilla[s] for s in seeds], dtype=float)  # (seeds, prompts, 2): the same greedy answers each seed
    summary = {
        "seeds": list(seeds),
        "prompts": base.shape[1],
        "models": {},
        "links": rows,
        "vanilla_answers": vanilla_answers,
    }
    table = [
        "| Model | Primary (harmlessness) | Helpfulness | d primary vs vanilla | d helpfulness vs vanilla | "
        "Win | Tie | Lose |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda m, lo, hi: f"{m:.2f} [{lo:.2f}, {hi:.2f}]"
    for v, name, c in [(None, "Vanilla", base), *((v, NAMES[v], np.array(cells[v], dtype=float)) for v in VARIANTS)]:
        m = {
            "primary": float(c[..., 0].mean()),
            "primary_ci": bootstrap(c[..., 0]),
            "helpfulness": float(c[..., 1].mean()),
            "helpfulness_ci": bootstrap(c[..., 1]),
            "d_primary": float((c - base)[..., 0].mean()),
            "d_primary_ci": bootstrap((c - base)[..., 0]),
            "d_help": float((c - base)[..., 1].mean()),
            "d_help_ci": bootstrap((c - base)[..., 1]),
        }
        summary["models"][name] = m
        wtl = " | ".join(f"{rows[v][k]:.0%}" for k in ("win", "tie", "lose")) if v else "- | - | -"
        d = f"{fmt(m['d_primary'], *m['d_primary_ci'])} | {fmt(m['d_help'], *m['d_help_ci'])}" if v else "- | -"
        table.append(
            f"| {name} | {fmt(m['primary'], *m['primary_ci'])} | {fmt(m['helpfulness'], *m['helpfulness_ci'])} "
            f"| {d} | {wtl} |"
        )
    table += [
        "",
        "| Variant | pairs | chosen higher on primary | d primary | d helpfulness | steps | held-out reward "
        "accuracy before -> after | held-out margin before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        r = rows[v]
        table.append(
            f"| {NAMES[v]} | {r['pairs']:.0f} | {r['primary_higher']:.0%} | {r['d_primary']:+.2f} | "
            f"{r['d_help']:+.2f} | {r['steps']:.0f} | {r['acc_before']:.2f} -> {r['acc_after']:.2f} | "
            f"{r['margin_before']:+.3f} -> {r['margin_after']:+.3f} |"
        )
    table += ["", "| Greedy answers | words | declining | dangerous specifics per answer |", "|---|---|---|---|"]
    for name, r in [("Vanilla", vanilla_answers), *((NAMES[v], rows[v]) for v in VARIANTS)]:
        table.append(f"| {name} | {r['words']:.1f} | {r['declines']:.0%} | {r['specifics']:.2f} |")
    text = "\n".join(table) + "\n"
    out = Path(out)
    jsonl.write_atomic(out / "study.json", json.dumps(summary, indent=2) + "\n")
    jsonl.write_atomic(out / "study.md", text)
    names = list(summary["models"])
    jsonl.write_atomic(out / "study.svg", report.svg({"primary": "harmlessness", "models": summary["models"]}, names))
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("split")
    for name in ("refined", "val_prompts", "out_train", "out_val"):
        s.add_argument(name)
    r = sub.add_parser("report")
    r.add_argument("run")
    r.add_argument("--seeds", nargs="+", required=True)
    r.add_argument("--output", required=True)
    args = p.parse_args()
    if args.what == "split":
        split(args.refined, args.val_prompts, args.out_train, args.out_val)
    else:
        report_run(args.run, args.seeds, args.output)


if __name__ == "__main__":
    common.run_main(main)
