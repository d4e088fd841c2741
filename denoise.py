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
candidates as prompts are included in order of increasing det (to choose tau). Every input
is read and checked before anything is written.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import common
import jsonl
import records
import resumable

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
    """RV coefficient (Escoufier, 1973) of two n x p matrices with the same rows, columns
    centred: tr(X X' Y Y') / sqrt(tr((X X')^2) tr((Y Y')^2)), computed as
    |X'Y|^2 / (|X'X| |Y'Y|) (Frobenius norms of p x p products: no n x n matrix). 1 for
    identical X, Y; nan when either is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return rv_from_sums(len(x), x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y)


def rv_from_sums(n, sx, sy, sxx, syy, sxy):
    """rv_coefficient from n rows' sums (sx, sy) and uncentred products (X'X, Y'Y, X'Y)."""
    cxx, cyy, cxy = sxx - np.outer(sx, sx) / n, syy - np.outer(sy, sy) / n, sxy - np.outer(sx, sy) / n
    denom = np.sqrt((cxx * cxx).sum() * (cyy * cyy).sum())
    return float((cxy * cxy).sum() / denom) if denom > 1e-12 else float("nan")


def rv_table(dets, ours, theirs, steps=10):
    """[(fraction included, RV)]: prompts with det > 0 that the second judge scored, taken in
    order of increasing det; at each fraction the RV of all their candidates' self-scores
    (ours[i], n_i x 2) against the second judge's (theirs[i], or None). Running sums: time
    and memory grow with the number of prompts, not its square."""
    order = [i for _, i in sorted((d, i) for i, d in enumerate(dets) if d > 0 and theirs[i] is not None)]
    n, sx, sy = 0, np.zeros(2), np.zeros(2)
    sxx, syy, sxy = np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))
    marks = {}  # prompts taken -> the fractions that take that many
    for k in range(1, steps + 1):
        marks.setdefault(max(1, round(k / steps * len(order))), []).append(k / steps)
    table = []
    for taken, i in enumerate(order, 1):
        x, y = np.asarray(ours[i], np.float64), np.asarray(theirs[i], np.float64)
        n, sx, sy = n + len(x), sx + x.sum(0), sy + y.sum(0)
        sxx, syy, sxy = sxx + x.T @ x, syy + y.T @ y, sxy + x.T @ y
        rv = rv_from_sums(n, sx, sy, sxx, syy, sxy) if taken in marks else None
        table += [(frac, rv) for frac in marks.get(taken, [])]
    return table


# ----------------------------------------------------------------------------- the second judge


def second_judge(path, inputs):
    """The second judge's scores of our candidates, streamed (only the scores are kept): a
    list aligned with inputs, each [(a, b)] per candidate or None where the file lacks the id."""
    index = {r["id"]: i for i, r in enumerate(inputs)}
    theirs = [None] * len(inputs)
    for _, where, rec in jsonl.stream_jsonl(path):
        i = index.get(str(rec.get("id")))
        if i is None:
            continue
        cands = rec.get("candidates")
        if (
            not isinstance(cands, list)
            or len(cands) != len(inputs[i]["candidates"])
            or not all(isinstance(c, dict) for c in cands)
        ):
            raise common.InputError(
                f"{where}: id {rec['id']}: candidates must be a list of "
                f"{len(inputs[i]['candidates'])} objects, as in the input"
            )
        for k, c in enumerate(cands, 1):
            for key in ("score_a", "score_b"):
                records.check_score(where, f"candidate {k}'s {key}", c.get(key), nullable=False)
        theirs[i] = [(c["score_a"], c["score_b"]) for c in cands]
    if not any(t is not None for t in theirs):
        raise common.InputError(
            f"{path}: no id in common with the input; --rv-against takes the same prompts "
            "scored by a second judge (score.py --judge-api-base ...)"
        )
    return theirs


def denoise_file(args, out, summary_path):
    """Read, check, filter and write: the run's one writer of OUT and its summary."""
    refined = jsonl.read_records(args.input, ["candidates", "refined"], args.limit, "run refine.py first")
    records.check_scored(args.input, refined)
    theirs = second_judge(args.rv_against, refined) if args.rv_against else None
    scores = [scores_of(r) for r in refined]
    dets = [det_cov(s[0]) if s else 0.0 for s in scores]
    tau = (
        args.tau
        if args.tau is not None
        else tau_from_quantile([d for d, s in zip(dets, scores) if s], args.tau_quantile)
    )
    why = [reason(s, d, tau, not args.no_consistency, not args.no_informativeness) for s, d in zip(scores, dets)]
    summary = {"input": args.input, "prompts": len(refined), "tau": tau, **{r: why.count(r) for r in REASONS}}
    print("denoise: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k != "input"), file=sys.stderr)
    if theirs is not None:
        ours = [[(c["score_a"], c["score_b"]) for c in r["candidates"]] for r in refined]
        print("fraction_included\tRV")
        for frac, rv in rv_table(dets, ours, theirs):
            print(f"{frac:.1f}\t{rv:.4f}")
    if summary["kept"] == 0:
        out.unlink(missing_ok=True)  # no stale output beside a summary that says "kept 0"
        jsonl.write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
        worst = max(REASONS[1:], key=lambda r: summary[r])
        hint = {
            "unscored": "the judge's answers could not be read: try score.py --mode logits",
            "inconsistent": "try --no-consistency, or a stronger refinement",
            "degenerate": "the candidates' scores do not vary: sample more (sample.py --num-candidates) or at "
            "higher temperature",
            "unstable": "raise --tau or --tau-quantile",
        }[worst]
        raise common.InputError(
            f"{args.input}: no prompt survives; most were dropped as {worst} "
            f"({summary[worst]} of {len(refined)}): {hint}"
        )
    jsonl.write_jsonl_atomic(out, [dict(r, det_cov=d) for r, d, w in zip(refined, dets, why) if w == "kept"])
    jsonl.write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="refined.jsonl from refine.py")
    p.add_argument("--output", required=True, help="denoised.jsonl (the surviving records)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tau", type=common.non_negative, help="absolute upper bound on det(Sigma_j)")
    g.add_argument(
        "--tau-quantile",
        type=common.fraction,
        default=0.33,
        help="tau as this quantile (0..1) of the run's positive dets (default 0.33: the paper kept "
        "about the lowest third)",
    )
    p.add_argument("--no-consistency", action="store_true", help="ablation: skip the consistency filter")
    p.add_argument("--no-informativeness", action="store_true", help="ablation: skip the covariance filter")
    p.add_argument(
        "--rv-against", metavar="FILE", help="the same records scored by a second judge: print (fraction included, RV)"
    )
    p.add_argument("--limit", type=common.positive_int, default=None, help="only the first N records")
    args = p.parse_args()
    out, summary_path = Path(args.output), Path(args.output).with_suffix(".summary.json")
    common.refuse_overlap(
        reads=[args.input, args.rv_against],
        writes=[out, summary_path, *(f.with_name(f.name + ".tmp") for f in (out, summary_path))],
    )

    with resumable.one_writer(out):
        denoise_file(args, out, summary_path)


if __name__ == "__main__":
    common.run_main(main)
