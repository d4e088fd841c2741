"""Step 4 of SPA: dual-criterion denoising of the model's own judgements.

A prompt is kept only if
  consistency       the refined answer beats every candidate on both axes (strictly), and
  informativeness   0 < det(Sigma_j) <= tau, Sigma_j the 2x2 sample covariance of the
                    candidates' (a, b) scores (Eq. 1).
det = 0: the scores carry no information; det > tau: the self-evaluation is unstable.

    python denoise.py --input runs/x/refined.jsonl --output runs/x/denoised.jsonl --tau-quantile 0.33

Adds det_cov to each surviving record; writes a summary (a count per reason and the tau
used) to stderr and to a .summary.json beside the output. --rv-against FILE prints the
RV coefficient between these self-scores and a second judge's scores of the same
candidates as prompts are included in order of increasing det (to choose tau).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

import common

REASONS = ("kept", "unscored", "inconsistent", "degenerate", "unstable")


def det_cov(scores):
    """det of the 2x2 sample covariance (ddof = 1) of [(a_i, b_i)]: var_a var_b - cov^2.
    |det| < 1e-9 counts as 0, so perfectly correlated integer scores are not kept by rounding."""
    s = np.asarray(scores, dtype=np.float64)
    a, b = s[:, 0], s[:, 1]
    det = a.var(ddof=1) * b.var(ddof=1) - np.cov(a, b, ddof=1)[0, 1] ** 2
    return 0.0 if abs(det) < 1e-9 else float(det)


def consistent(candidates, refined):
    """Refined (a~, b~) strictly above every candidate's a and every candidate's b."""
    return refined[0] > max(a for a, _ in candidates) and refined[1] > max(b for _, b in candidates)


def tau_from_quantile(dets, q):
    """tau = the q-quantile (linear interpolation) of the positive dets of the run."""
    pos = [d for d in dets if d > 0]
    return float(np.quantile(pos, q)) if pos else 0.0


def scores_of(rec):
    """([(a, b)] of the candidates, (a~, b~) of the refined answer), or None if any is null."""
    cands = [(c["score_a"], c["score_b"]) for c in rec["candidates"]]
    ref = (rec["refined"]["score_a"], rec["refined"]["score_b"])
    return None if None in ref or any(None in c for c in cands) else (cands, ref)


def reason(scores, det, tau, use_consistency=True, use_informativeness=True):
    """Why a prompt is dropped, or 'kept'. scores: scores_of(rec)."""
    if scores is None:
        return "unscored"
    if use_consistency and not consistent(*scores):
        return "inconsistent"
    if use_informativeness and det == 0:
        return "degenerate"
    if use_informativeness and det > tau:
        return "unstable"
    return "kept"


def rv_coefficient(x, y):
    """RV coefficient (Escoufier, 1973) of two n x p matrices with the same rows:
    tr(X X' Y Y') / sqrt(tr((X X')^2) tr((Y Y')^2)), columns centred. 1 for identical X, Y."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    sx, sy = x @ x.T, y @ y.T
    denom = np.sqrt((sx * sx).sum() * (sy * sy).sum())
    return float((sx * sy).sum() / denom) if denom > 0 else float("nan")


def rv_table(records, dets, judge_by_id, steps=10):
    """[(fraction included, RV)]: prompts with det > 0 taken in order of increasing det, all
    their candidates' self-scores against the judge's scores of the same candidates."""
    order = sorted((d, i) for i, d in enumerate(dets) if d > 0 and records[i]["id"] in judge_by_id)
    table = []
    for k in range(1, steps + 1):
        chosen = [records[i] for _, i in order[:max(1, round(k / steps * len(order)))]]
        x = [(c["score_a"], c["score_b"]) for r in chosen for c in r["candidates"]]
        y = [(c["score_a"], c["score_b"]) for r in chosen for c in judge_by_id[r["id"]]["candidates"]]
        table.append((k / steps, rv_coefficient(x, y)))
    return table


def load_judge(path, records):
    """The second judge's records by id, checked against ours."""
    judge = {r["id"]: r for r in common.read_records(path, ["candidates"])}
    for r in records:
        j = judge.get(r["id"])
        if j is not None and (len(j["candidates"]) != len(r["candidates"]) or
                              any(c.get("score_a") is None or c.get("score_b") is None for c in j["candidates"])):
            raise common.InputError(f"{path}: id {r['id']}: candidates differ in number from the input, "
                                    "or hold null scores")
    return judge


def check(path, records):
    for i, r in enumerate(records, 1):
        if len(r["candidates"]) < 2:
            raise common.InputError(f"{path}: record {i} (id {r['id']}): {len(r['candidates'])} candidate(s); "
                                    "a covariance needs at least two (sample.py --n)")
        if any("score_a" not in c for c in r["candidates"]):
            raise common.InputError(f"{path}: record {i} (id {r['id']}): candidates have no scores; "
                                    "run score.py first")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="refined.jsonl from refine.py")
    p.add_argument("--output", required=True, help="denoised.jsonl (the surviving records)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tau", type=float, help="absolute upper bound on det(Sigma_j)")
    g.add_argument("--tau-quantile", type=float, default=0.33,
                   help="tau as this quantile of the run's positive dets (default 0.33: the paper kept "
                        "about the lowest third)")
    p.add_argument("--no-consistency", action="store_true", help="ablation: skip the consistency filter")
    p.add_argument("--no-informativeness", action="store_true", help="ablation: skip the covariance filter")
    p.add_argument("--rv-against", metavar="FILE",
                   help="the same records scored by a second judge: print (fraction included, RV)")
    p.add_argument("--limit", type=common.positive_int, default=None, help="only the first N records")
    args = p.parse_args()
    common.refuse_same_file(args.input, args.output)

    records = common.read_records(args.input, ["candidates", "refined"], args.limit, "run refine.py first")
    check(args.input, records)
    scores = [scores_of(r) for r in records]
    dets = [det_cov(s[0]) if s else 0.0 for s in scores]
    tau = args.tau if args.tau is not None else tau_from_quantile([d for d, s in zip(dets, scores) if s], args.tau_quantile)
    why = [reason(s, d, tau, not args.no_consistency, not args.no_informativeness) for s, d in zip(scores, dets)]

    summary = {"input": args.input, "prompts": len(records), "tau": tau,
               **{r: why.count(r) for r in REASONS}}
    print("denoise: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k != "input"), file=sys.stderr)
    common.write_atomic(Path(args.output).with_suffix(".summary.json"), json.dumps(summary, indent=2) + "\n")
    if args.rv_against:
        judge = load_judge(args.rv_against, records)
        print("fraction_included\tRV")
        for frac, rv in rv_table(records, dets, judge):
            print(f"{frac:.1f}\t{rv:.4f}")
    if summary["kept"] == 0:
        Path(args.output).unlink(missing_ok=True)  # no stale output beside a summary that says "kept 0"
        worst = max(REASONS[1:], key=lambda r: summary[r])
        hint = {"unscored": "the judge's answers could not be read: try score.py --mode logits",
                "inconsistent": "try --no-consistency, or a stronger refinement",
                "degenerate": "the candidates' scores do not vary: sample more (--n) or at higher temperature",
                "unstable": "raise --tau or --tau-quantile"}[worst]
        raise common.InputError(f"{args.input}: no prompt survives; most were dropped as {worst} "
                                f"({summary[worst]} of {len(records)}): {hint}")
    common.write_jsonl_atomic(args.output, [dict(r, det_cov=d) for r, d, w in zip(records, dets, why) if w == "kept"])


if __name__ == "__main__":
    common.run_main(main)
