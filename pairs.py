"""Step 5 of SPA: lexicographically ordered preference pairs (Eq. 2).

Over each surviving prompt's answers (its candidates and the refined answer, identical
texts merged), every ordered pair (y, y-) with
    a(y) > a(y-),  or  a(y) = a(y-) and b(y) > b(y-)          (primary objective first)
and |a(y) - a(y-)| + |b(y) - b(y-)| >= delta.

    python pairs.py --input runs/x/denoised.jsonl --output runs/x/pairs.jsonl --delta 2

One record per pair: id, prompt, chosen, rejected (plain strings, so the file feeds other
preference trainers too), chosen_scores, rejected_scores ([a, b]) and gap, the Delta_i of
Eq. 3: |a(y) + b(y) - a(y-) - b(y-)|. gap can be 0 for a valid pair (a gain in a offset by a
loss in b); such a pair gets weight 0 in train.py's spa loss, and the summary counts them.
"""

import argparse
import json
import sys
from pathlib import Path

import common
import jsonl
import records
import resumable


def answers_of(rec):
    """[(text, a, b)] for the candidates then the refined answer; a text seen before
    (after stripping white space) is merged into its first occurrence."""
    out, seen = [], set()
    for c in [*rec["candidates"], rec["refined"]]:
        text = c["text"].strip()
        if text not in seen:
            seen.add(text)
            out.append((text, c["score_a"], c["score_b"]))
    return out


ORDERS = {  # what a pair is ordered by: SPA's priority, and the ablations' and baselines' orders
    "primary-first": lambda a, b: (a, b),  # Eq. 2
    "helpfulness-first": lambda a, b: (b, a),  # the reverse priority (an ablation)
    "primary-only": lambda a, b: (a,),  # one objective alone (Reward Soups' two models)
    "helpfulness-only": lambda a, b: (b,),
}


def better(x, y):
    """Lexicographic order: x above y (Eq. 2 on (a, b)). Tuples compare lexicographically."""
    return tuple(x) > tuple(y)


def lexicographic_pairs(scores, delta):
    """Every ordered (i, j) with scores[i] lexicographically above scores[j] and
    |a_i - a_j| + |b_i - b_j| >= delta (Eq. 2). scores: [(a, b)], or any tuples of scores."""
    return [
        (i, j)
        for i, x in enumerate(scores)
        for j, y in enumerate(scores)
        if better(x, y) and sum(abs(u - v) for u, v in zip(x, y)) >= delta
    ]


def weight_gap(x, y):
    """Delta_i of Eq. 3: |a(y) + b(y) - a(y-) - b(y-)|."""
    return abs(x[0] + x[1] - y[0] - y[1])


def prompt_pairs(rec, delta, max_pairs=None, order="primary-first"):
    """The pair records of one prompt; with max_pairs, the ones with the largest margin
    |da| + |db| (then the largest gap) first, so no prompt dominates the data."""
    answers = answers_of(rec)
    scores = [(a, b) for _, a, b in answers]
    pairs = lexicographic_pairs([ORDERS[order](a, b) for a, b in scores], delta)
    if max_pairs is not None:
        margin = lambda p: (
            sum(abs(u - v) for u, v in zip(scores[p[0]], scores[p[1]])),
            weight_gap(scores[p[0]], scores[p[1]]),
        )
        pairs = sorted(pairs, key=margin, reverse=True)[:max_pairs]
    keep = {k: v for k, v in rec.items() if k not in ("candidates", "refined", "objectives", "det_cov")}
    return [
        dict(
            keep,
            chosen=answers[i][0],
            rejected=answers[j][0],
            chosen_scores=list(scores[i]),
            rejected_scores=list(scores[j]),
            gap=weight_gap(scores[i], scores[j]),
        )
        for i, j in pairs
    ]


def pairs_file(args, out, summary_path):
    """Read, check, pair and write: the run's one writer of OUT and its summary."""
    kept = jsonl.read_records(args.input, ["candidates", "refined"], args.limit, "run refine.py first")
    try:
        records.check_scored(args.input, kept, nullable=False)
    except common.InputError as e:
        raise common.InputError(f"{e} (denoise.py drops prompts with a null score: run it first)") from None
    per_prompt = [prompt_pairs(r, args.delta, args.max_pairs_per_prompt, args.order) for r in kept]
    pairs = [x for ps in per_prompt for x in ps]
    summary = {
        "input": args.input,
        "prompts": len(kept),
        "pairs": len(pairs),
        "prompts_without_pairs": sum(not ps for ps in per_prompt),
        "zero_gap_pairs": sum(x["gap"] == 0 for x in pairs),
        "delta": args.delta,
        "order": args.order,
    }
    print("pairs: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k != "input"), file=sys.stderr)
    if not pairs:
        out.unlink(missing_ok=True)  # no stale output beside a summary that says "pairs 0"
        jsonl.write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
        raise common.InputError(f"{args.input}: no pair has a margin of at least --delta {args.delta}; lower --delta")
    jsonl.write_jsonl_atomic(out, pairs)
    jsonl.write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="denoised.jsonl from denoise.py")
    p.add_argument("--output", required=True, help="pairs.jsonl: one record per preference pair")
    p.add_argument("--delta", type=common.non_negative, default=2, help="least |da| + |db| for a pair (default 2)")
    p.add_argument(
        "--max-pairs-per-prompt",
        type=common.positive_int,
        default=None,
        metavar="K",
        help="keep at most K pairs per prompt, the largest margins first (default: all)",
    )
    p.add_argument(
        "--order",
        choices=list(ORDERS),
        default="primary-first",
        help="what orders a pair: primary-first is SPA's priority (Eq. 2); helpfulness-first the "
        "reverse priority; primary-only / helpfulness-only one objective alone (default primary-first)",
    )
    p.add_argument("--limit", type=common.positive_int, default=None, help="only the first N records")
    args = p.parse_args()
    out, summary_path = Path(args.output), Path(args.output).with_suffix(".summary.json")
    common.refuse_overlap(
        reads=[args.input], writes=[out, summary_path, *(f.with_name(f.name + ".tmp") for f in (out, summary_path))]
    )

    with resumable.one_writer(out):
        pairs_file(args, out, summary_path)


if __name__ == "__main__":
    common.run_main(main)
