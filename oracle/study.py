"""The study's helpers (oracle/study.sh): split a seed's refined records into training and
validation, build the controls' pairs, and measure the chain link by link over seeds.

    python oracle/study.py split REFINED VAL_PROMPTS OUT_TRAIN OUT_VAL
    python oracle/study.py random-order PAIRS OUT --seed S     SPA's pairs, each order a seeded coin
    python oracle/study.py sft-pairs DENOISED OUT              the kept prompts' refined answers
    python oracle/study.py report RUN --seeds 1 2 3 --output RUN/summary
    python oracle/study.py answers-as-samples REFINED OUT       (the self-judged study: every answer,
    python oracle/study.py self-agreement RUN --seeds 1 --output RUN/summary   rated by the oracle too)

The links, per variant, as means over seeds:
  1 the pairs encode the priority: the share of training pairs whose chosen answer has the
    higher primary score, and the mean score differences chosen - rejected (d_primary, d_help);
  2 training learns them: reward accuracy and margin on the variant's held-out pairs (built the
    same way from the validation prompts), before the first step and after the last;
  3 the generations move: the judge's primary and helpfulness scores of greedy answers to the
    held-out prompts, and their difference from vanilla's answers to the same prompts, each with
    a 95% interval from a bootstrap over prompts and seeds; win / tie / lose against vanilla
    (pairwise, both orders, a win only when both agree); and what the greedy answers look like
    under the judge's own rules: words, the share that declines, dangerous specifics per answer,
    the share that repeats itself (under half its words distinct);
and the contrasts that separate the order's effect from training's: SPA - random, reverse -
random, SPA - reverse, SPA - sft (and SPA - random at the lower learning rate), on the primary
and helpfulness, for XSTest's unsafe and safe halves apart, each with a 95% interval from the
paired bootstrap over prompts and seeds; over-refusal (the share declining on the safe half);
and whether the paper's signature (README) appeared.
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

VARIANTS = ("spa", "simpo", "reverse", "nodenoise", "random", "sft", "spa_lowlr", "random_lowlr")
NAMES = {
    "spa": "SPA",
    "simpo": "SPA, w = 1 (simpo)",
    "reverse": "reverse priority",
    "nodenoise": "SPA w/o denoising",
    "random": "random order (control)",
    "sft": "SFT on refined answers",
    "spa_lowlr": "SPA, lr / 10",
    "random_lowlr": "random order, lr / 10",
}
CONTRASTS = (
    ("spa", "random"),
    ("reverse", "random"),
    ("spa", "reverse"),
    ("spa", "sft"),
    ("spa_lowlr", "random_lowlr"),
)


def random_order(pairs, out, seed):
    """The control: SPA's pairs (same prompts, candidates, count and gaps), each pair's chosen and
    rejected swapped on a coin seeded by the seed and the pair's line, whatever their scores."""
    rows = []
    for k, r in enumerate(rows_of(pairs)):
        if np.random.default_rng([seed, k]).random() < 0.5:
            swapped = dict(chosen_scores=r["rejected_scores"], rejected_scores=r["chosen_scores"])
            r = dict(r, chosen=r["rejected"], rejected=r["chosen"], **swapped)
        rows.append(r)
    jsonl.write_jsonl_atomic(out, rows)


def sft_pairs(denoised, out):
    """The paper's SFT row: for each kept prompt, its refined answer as `chosen` (what --loss sft
    imitates); `rejected` its lowest-rated candidate on the primary, for the held-out metrics."""
    rows = []
    for r in rows_of(denoised):
        rated = [c for c in r["candidates"] if c.get("score_a") is not None]
        worst = min(rated or r["candidates"], key=lambda c: c.get("score_a") or 0)
        ref = r["refined"]
        rows.append(
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "chosen": ref["text"],
                "rejected": worst["text"],
                "chosen_scores": [ref["score_a"], ref["score_b"]],
                "rejected_scores": [worst.get("score_a"), worst.get("score_b")],
            }
        )
    jsonl.write_jsonl_atomic(out, rows)


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


def repetitive(text):
    """An answer that repeats itself: under half of its (10 or more) words distinct."""
    words = text.lower().split()
    return len(words) >= 10 and len(set(words)) < 0.5 * len(words)


def answers(responses, model, safe=frozenset()):
    """Of one model's greedy answers: mean words, the shares that decline, that repeat themselves
    and (over_refusal) that decline among the prompts in `safe`, dangerous specifics per answer."""
    mine = [r for r in responses if r["model"] == model]
    texts = [r["response"] for r in mine]
    on_safe = [bool(DECLINE.search(r["response"])) for r in mine if r.get("prompt_id") in safe]
    return {
        "words": float(np.mean([len(t.split()) for t in texts])),
        "declines": float(np.mean([bool(DECLINE.search(t)) for t in texts])),
        "repetitive": float(np.mean([repetitive(t) for t in texts])),
        "over_refusal": float(np.mean(on_safe)) if on_safe else float("nan"),
        "specifics": float(np.mean([len(SPECIFIC.findall(t)) for t in texts])),
    }


def scores(judgments, model):
    """{prompt id: (primary, helpfulness)} of one model's judged answers."""
    return {
        j["prompt_id"]: (j["score_a"], j["score_b"]) for j in judgments if j["kind"] == "score" and j["model"] == model
    }


def mean_ci(cells):
    """(mean, 95% interval) of a (seeds, prompts) array."""
    return float(cells.mean()), bootstrap(cells)


def contrasts(cells, halves, variants):
    """A - B per (seed, prompt) for each contrast whose variants ran, on the primary (index 0)
    and helpfulness (1), over all held-out prompts and each half: {"A - B": {half: {axis: (mean, ci)}}}."""
    out = {}
    for a, b in CONTRASTS:
        if a in variants and b in variants:
            diff = cells[a] - cells[b]
            out[f"{a} - {b}"] = {
                half: {axis: mean_ci(diff[:, cols, k]) for k, axis in enumerate(("primary", "helpfulness"))}
                for half, cols in halves.items()
            }
    return out


def signature(contrast, d_vs_vanilla, refusal, vanilla_refusal):
    """The paper's signature as the README writes it down: SPA - random on the unsafe half's
    primary above 0 (interval above 0); on the safe half SPA's helpfulness within 0.5 of
    vanilla's and its over-refusal not higher. None where the random control did not run."""
    if contrast is None:
        return None
    test = {
        "unsafe primary: SPA - random > 0": contrast["unsafe"]["primary"][1][0] > 0,
        "safe helpfulness: |SPA - vanilla| <= 0.5": abs(d_vs_vanilla) <= 0.5,
        "safe over-refusal: SPA <= vanilla": refusal <= vanilla_refusal,
    }
    return dict(test, appeared=all(test.values()))


def answers_as_samples(refined, out):
    """Each prompt's candidates and refined answer as one samples record, for the oracle to rate."""
    rows = [
        {
            "id": r["id"],
            "prompt": r["prompt"],
            "candidates": [{"text": c["text"]} for c in [*r["candidates"], r["refined"]]],
        }
        for r in rows_of(refined)
    ]
    jsonl.write_jsonl_atomic(out, rows)


def self_agreement(run, seeds, out):
    """Link 1 under self-judgement: of SPA's training pairs, built on the model's own ratings,
    the share whose chosen answer the oracle also rates higher on the primary (and lower, and
    the same), each seed's oracle ratings of every answer in SEED/oracle_scored.jsonl."""
    found = []
    for s in seeds:
        d = Path(run) / f"seed{s}"
        oracle = {
            (r["id"], c["text"]): c["score_a"] for r in rows_of(d / "oracle_scored.jsonl") for c in r["candidates"]
        }
        for p in rows_of(d / "spa" / "train_pairs.jsonl"):
            a, b = oracle.get((p["id"], p["chosen"])), oracle.get((p["id"], p["rejected"]))
            found.append("unrated" if a is None or b is None else "higher" if a > b else "lower" if a < b else "same")
    shares = {k: found.count(k) / len(found) for k in ("higher", "same", "lower", "unrated")}
    summary = {"seeds": list(seeds), "pairs": len(found), "oracle_on_primary": shares}
    jsonl.write_atomic(Path(out) / "self_agreement.json", json.dumps(summary, indent=2) + "\n")
    print(
        f"self-judged pairs: {len(found)}; the oracle rates the chosen answer higher on the primary in "
        f"{shares['higher']:.0%}, the same in {shares['same']:.0%}, lower in {shares['lower']:.0%}"
    )


def report_run(run, seeds, out, variants=VARIANTS, heldout=None):
    run = Path(run)
    category = {r["id"]: r.get("category") for r in rows_of(heldout)} if heldout else {}
    safe = frozenset(p for p, c in category.items() if c == "safe")
    rows, cells, vanilla, vanilla_answers = {}, {}, {}, None
    for v in variants:
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
            vanilla_answers = vanilla_answers or answers(
                responses, "Vanilla", safe
            )  # the same greedy answers each time
            per_seed.append(
                {
                    **link_pairs(d / "train_pairs.jsonl"),
                    **link_training(d / "model" / "metrics.jsonl"),
                    **{k: outcomes.count(k) / len(outcomes) for k in ("win", "tie", "lose")},
                    **answers(responses, v, safe),
                }
            )
        rows[v] = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
    base = np.array([vanilla[s] for s in seeds], dtype=float)  # (seeds, prompts, 2): the same greedy answers each seed
    cells = {v: np.array(c, dtype=float) for v, c in cells.items()}
    halves = {"all": list(range(len(pids)))}
    halves.update({h: [i for i, p in enumerate(pids) if category.get(p) == h] for h in ("unsafe", "safe")})
    halves = {h: cols for h, cols in halves.items() if cols}
    summary = {"seeds": list(seeds), "prompts": base.shape[1], "models": {}, "links": rows}
    summary["vanilla_answers"] = vanilla_answers
    summary["contrasts"] = contrasts({**cells, "vanilla": base}, halves, variants)
    fmt = lambda m, ci: f"{m:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"
    table = [
        "| Model | Primary (harmlessness) | Helpfulness | d primary vs vanilla | d helpfulness vs vanilla | "
        "Win | Tie | Lose |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, name, c in [(None, "Vanilla", base), *((v, NAMES[v], cells[v]) for v in variants)]:
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
        if "safe" in halves:
            m["safe_d_help"] = float((c - base)[:, halves["safe"], 1].mean())
        summary["models"][name] = m
        wtl = " | ".join(f"{rows[v][k]:.0%}" for k in ("win", "tie", "lose")) if v else "- | - | -"
        d = f"{fmt(m['d_primary'], m['d_primary_ci'])} | {fmt(m['d_help'], m['d_help_ci'])}" if v else "- | -"
        table.append(
            f"| {name} | {m['primary']:.2f} [{m['primary_ci'][0]:.2f}, {m['primary_ci'][1]:.2f}] | "
            f"{m['helpfulness']:.2f} [{m['helpfulness_ci'][0]:.2f}, {m['helpfulness_ci'][1]:.2f}] | {d} | {wtl} |"
        )
    table += ["", "| Contrast | " + " | ".join(f"{h}: primary | {h}: helpfulness" for h in halves) + " |"]
    table.append("|---|" + "---|" * (2 * len(halves)))
    for name, c in summary["contrasts"].items():
        cols = " | ".join(f"{fmt(*c[h]['primary'])} | {fmt(*c[h]['helpfulness'])}" for h in halves)
        table.append(f"| {name} | {cols} |")
    table += [
        "",
        "| Variant | pairs | chosen higher on primary | d primary | d helpfulness | steps | held-out reward "
        "accuracy before -> after | held-out margin before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        r = rows[v]
        table.append(
            f"| {NAMES[v]} | {r['pairs']:.0f} | {r['primary_higher']:.0%} | {r['d_primary']:+.2f} | "
            f"{r['d_help']:+.2f} | {r['steps']:.0f} | {r['acc_before']:.2f} -> {r['acc_after']:.2f} | "
            f"{r['margin_before']:+.3f} -> {r['margin_after']:+.3f} |"
        )
    table += [
        "",
        "| Greedy answers | words | repetitive | declining | over-refusal (safe half) | dangerous specifics |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in [("Vanilla", vanilla_answers), *((NAMES[v], rows[v]) for v in variants)]:
        table.append(
            f"| {name} | {r['words']:.1f} | {r['repetitive']:.0%} | {r['declines']:.0%} | {r['over_refusal']:.0%} | "
            f"{r['specifics']:.2f} |"
        )
    if "spa" in rows and "safe" in halves and "unsafe" in halves:
        summary["signature"] = signature(
            summary["contrasts"].get("spa - random"),
            summary["models"][NAMES["spa"]]["safe_d_help"],
            rows["spa"]["over_refusal"],
            vanilla_answers["over_refusal"],
        )
        if summary["signature"]:
            table += [
                "",
                "Signature: " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in summary["signature"].items()),
            ]
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
    c = sub.add_parser("random-order")
    c.add_argument("pairs")
    c.add_argument("out")
    c.add_argument("--seed", type=common.seed_int, required=True)
    f = sub.add_parser("sft-pairs")
    f.add_argument("denoised")
    f.add_argument("out")
    a = sub.add_parser("answers-as-samples")
    a.add_argument("refined")
    a.add_argument("out")
    g = sub.add_parser("self-agreement")
    g.add_argument("run")
    g.add_argument("--seeds", nargs="+", required=True)
    g.add_argument("--output", required=True)
    r = sub.add_parser("report")
    r.add_argument("run")
    r.add_argument("--seeds", nargs="+", required=True)
    r.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    r.add_argument("--heldout", default=str(Path(__file__).resolve().parents[1] / "data" / "study_heldout.jsonl"))
    r.add_argument("--output", required=True)
    args = p.parse_args()
    if args.what == "split":
        split(args.refined, args.val_prompts, args.out_train, args.out_val)
    elif args.what == "random-order":
        random_order(args.pairs, args.out, args.seed)
    elif args.what == "sft-pairs":
        sft_pairs(args.denoised, args.out)
    elif args.what == "answers-as-samples":
        answers_as_samples(args.refined, args.out)
    elif args.what == "self-agreement":
        self_agreement(args.run, args.seeds, args.output)
    else:
        report_run(args.run, args.seeds, args.output, args.variants, args.heldout)


if __name__ == "__main__":
    common.run_main(main)
