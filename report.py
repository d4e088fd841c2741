"""Evaluation results: the paper's metrics, the table, and a picture; and one command that
gathers several evaluation directories (vanilla, SPA, the ablations) into one of each.

    HH_lambda = (lambda * primary + helpfulness) / (lambda + 1),   lambda in 5, 10, 20

    python report.py runs/demo/iter1/eval runs/demo/iter1/ablation-*/eval --output runs/demo/summary

evaluate.py writes report.md, report.json and result.svg into its directory with these
functions; the gathering command writes the same three from several report.json files.
"""

import argparse
import json
from pathlib import Path

import numpy as np

import common
import jsonl
import markup
import resumable

LAMBDAS = (5, 10, 20)


# ----------------------------------------------------------------------------- metrics (pure)


def hh(primary, helpfulness, lam):
    """HH_lambda: the primary objective weighted lambda times helpfulness."""
    return (lam * primary + helpfulness) / (lam + 1)


def bootstrap_ci(values, n=2000, seed=0):
    """95% percentile bootstrap interval of the mean; (nan, nan) for no values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(v, size=(n, len(v))).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(judged):
    """Metrics of one model from its judgement records [{score_a, score_b}]: means, HH_lambda
    (over answers with both scores) and their 95% bootstrap intervals."""
    a = [j["score_a"] for j in judged if j["score_a"] is not None]
    b = [j["score_b"] for j in judged if j["score_b"] is not None]
    both = [(j["score_a"], j["score_b"]) for j in judged if None not in (j["score_a"], j["score_b"])]
    out = {
        "n": len(judged),
        "unreadable": 2 * len(judged) - len(a) - len(b),
        "primary": float(np.mean(a)) if a else float("nan"),
        "primary_ci": bootstrap_ci(a),
        "helpfulness": float(np.mean(b)) if b else float("nan"),
        "helpfulness_ci": bootstrap_ci(b),
    }
    for lam in LAMBDAS:
        vals = [hh(x, y, lam) for x, y in both]
        out[f"hh{lam}"] = float(np.mean(vals)) if vals else float("nan")
        out[f"hh{lam}_ci"] = bootstrap_ci(vals)
    return out


def win_rates(outcomes):
    n = len(outcomes)
    rates = {k: sum(o == k for o in outcomes) / n if n else float("nan") for k in ("win", "tie", "lose")}
    rates["win_ci"] = bootstrap_ci([o == "win" for o in outcomes])
    rates["n"] = n
    return rates


def build_report(judgments, names, primary):
    """report.json content: per model (and per category) metrics, and win rates of the
    model under test against the baseline."""
    scores = [j for j in judgments if j["kind"] == "score"]
    pair = [j for j in judgments if j["kind"] == "pairwise"]
    cats = sorted({j["category"] for j in scores if j.get("category")})
    report = {"primary": primary, "models": {}, "categories": {}}
    for n in names:
        report["models"][n] = summarize([j for j in scores if j["model"] == n])
        for c in cats:
            report["categories"].setdefault(c, {"models": {}})["models"][n] = summarize(
                [j for j in scores if j["model"] == n and j.get("category") == c]
            )
    if pair:
        report["pairwise"] = {
            "model": names[-1],
            "baseline": names[0],
            **win_rates([p["outcome"] for p in pair]),
            "unreadable": sum(p.get("model_first") is None or p.get("model_second") is None for p in pair),
        }
        for c in cats:
            report["categories"][c]["pairwise"] = win_rates([p["outcome"] for p in pair if p.get("category") == c])
    return report


def report_markdown(report, names):
    """A table in the paper's style: one row per model, the baseline (Vanilla) first."""
    ci = lambda m, k: f"{m[k]:.2f} [{m[k + '_ci'][0]:.2f}, {m[k + '_ci'][1]:.2f}]"
    head = (
        f"| Model | {report['primary'].capitalize()} | Helpfulness | "
        + " | ".join(f"HH_{lam}" for lam in LAMBDAS)
        + " | Win | Tie | Lose |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    vs = pairwise_by_model(report)
    for n in names:
        m, pw = report["models"][n], vs.get(n)
        wtl = f"{pw['win']:.0%} | {pw['tie']:.0%} | {pw['lose']:.0%}" if pw else "- | - | -"
        lines.append(
            f"| {markup.md(n)} | {ci(m, 'primary')} | {ci(m, 'helpfulness')} | "
            + " | ".join(f"{m[f'hh{lam}']:.2f}" for lam in LAMBDAS)
            + f" | {wtl} |"
        )
    if report.get("categories"):
        lines += [
            "",
            f"| Category | Model | {report['primary'].capitalize()} | Helpfulness | HH_10 | Win | Tie | Lose |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c, per in report["categories"].items():
            for n in names:
                m, p = per["models"][n], per.get("pairwise")
                wtl = f"{p['win']:.0%} | {p['tie']:.0%} | {p['lose']:.0%}" if p and n in vs else "- | - | -"
                lines.append(
                    f"| {markup.md(c)} | {markup.md(n)} | {m['primary']:.2f} | {m['helpfulness']:.2f} | "
                    f"{m['hh10']:.2f} | {wtl} |"
                )
    n_unread = sum(report["models"][n]["unreadable"] for n in names)
    lines += ["", f"Means with 95% bootstrap intervals; {n_unread} judge scores could not be read (left out)."]
    for n, pw in vs.items():
        lines.append(
            f"Pairwise ({markup.md(n)}): {pw['unreadable']} of {pw['n']} comparisons had an unreadable verdict in at "
            "least one order (counted as ties)."
        )
    return "\n".join(lines) + "\n"


def pairwise_by_model(report):
    """{model: its pairwise result against the baseline}, from one report or a gathered one."""
    return {p["model"]: p for p in report.get("pairwise_all", [report["pairwise"]] if "pairwise" in report else [])}


# ----------------------------------------------------------------------------- the picture


def svg(report, names, width=720, height=540):
    """Each model's mean primary score (y) against its mean helpfulness (x), with 95% intervals
    as bars, as an SVG written directly. The region the priority favours is shaded: primary
    held at the first model's (the baseline's) level or above, and within it, darker, both.
    A model without readable scores on both axes is left out, and the picture says so."""
    drawn = [n for n in names if all(np.isfinite(report["models"][n][k]) for k in ("primary", "helpfulness"))]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">'
    ]
    left_out = [n for n in names if n not in drawn]
    if left_out:
        out.append(
            f'<text x="60" y="{height - 30}" fill="#b00">left out, no readable scores: '
            f"{markup.xml(', '.join(left_out))}</text>"
        )
    if not drawn:
        return "\n".join(out + ["</svg>"]) + "\n"
    ms = [report["models"][n] for n in drawn]
    span = lambda k: (
        np.floor(min(m[k + "_ci"][0] for m in ms) * 2) / 2 - 0.5,
        np.ceil(max(m[k + "_ci"][1] for m in ms) * 2) / 2 + 0.5,
    )
    (x0, x1), (y0, y1) = span("helpfulness"), span("primary")
    L, R, T, B = 60, width - 20, 50, height - 50
    x = lambda v: L + (v - x0) / (x1 - x0) * (R - L)
    y = lambda v: B - (v - y0) / (y1 - y0) * (B - T)
    out.append(f'<rect x="{L}" y="{T}" width="{R - L}" height="{B - T}" fill="white" stroke="#999"/>')
    if names[0] in drawn:
        base = ms[0]
        out += [
            f'<rect class="favoured" x="{L}" y="{T}" width="{R - L}" height="{y(base["primary"]) - T:.1f}" '
            'fill="#2a9d8f" fill-opacity="0.10"/>',
            f'<rect class="favoured-both" x="{x(base["helpfulness"]):.1f}" y="{T}" '
            f'width="{R - x(base["helpfulness"]):.1f}" height="{y(base["primary"]) - T:.1f}" fill="#2a9d8f" '
            'fill-opacity="0.15"/>',
            f'<text x="{L}" y="16" fill="#2a9d8f">shaded: {markup.xml(report["primary"])} at or above '
            f"{markup.xml(names[0])}'s, as the priority asks;</text>",
            f'<text x="{L}" y="32" fill="#2a9d8f">darker: helpfulness at or above too</text>',
        ]
    for t in np.arange(x0, x1 + 1e-9, 0.5):
        out.append(f'<text x="{x(t):.1f}" y="{B + 15}" text-anchor="middle">{t:g}</text>')
    for t in np.arange(y0, y1 + 1e-9, 0.5):
        out.append(f'<text x="{L - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    out += [
        f'<text x="{(L + R) / 2}" y="{height - 12}" text-anchor="middle">helpfulness (mean, 95% CI)</text>',
        f'<text transform="translate(14,{(T + B) / 2}) rotate(-90)" text-anchor="middle">'
        f"{markup.xml(report['primary'])} (mean, 95% CI)</text>",
    ]
    colours = ["#555", "#e76f51", "#264653", "#e9c46a", "#8ab17d", "#9b5de5", "#00bbf9", "#f15bb5"]
    for n, m in zip(drawn, ms):
        c, px, py = colours[names.index(n) % len(colours)], x(m["helpfulness"]), y(m["primary"])
        out += [
            f'<g class="model" data-name="{markup.xml(n)}" stroke="{c}" fill="{c}">',
            f'<line x1="{x(m["helpfulness_ci"][0]):.1f}" y1="{py:.1f}" x2="{x(m["helpfulness_ci"][1]):.1f}" '
            f'y2="{py:.1f}"/>',
            f'<line x1="{px:.1f}" y1="{y(m["primary_ci"][0]):.1f}" x2="{px:.1f}" y2="{y(m["primary_ci"][1]):.1f}"/>',
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4"/>',
            f'<text x="{px + 6:.1f}" y="{py - 6:.1f}" stroke="none">{markup.xml(n)}</text></g>',
        ]
    return "\n".join(out + ["</svg>"]) + "\n"


def write(out_dir, report, names):
    """report.json, report.md (linking the picture) and result.svg into out_dir; returns the table."""
    out_dir = Path(out_dir)
    table = report_markdown(report, names)
    jsonl.write_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    jsonl.write_atomic(out_dir / "result.svg", svg(report, names))
    jsonl.write_atomic(out_dir / "report.md", table + "\n![primary against helpfulness](result.svg)\n")
    return table


# ----------------------------------------------------------------------------- gathering


def gather(reports, dirs):
    """Several evaluate.py reports (from dirs) -> one: every model once (the first directory's
    baseline first), each model's pairwise result against its baseline kept. A name that
    stands for other results in a later directory gets that directory after it."""
    merged = {"primary": reports[0]["primary"], "models": {}, "pairwise_all": []}
    for r, d in zip(reports, dirs):
        if r["primary"] != merged["primary"]:
            raise common.InputError(
                f"reports judge different primary objectives: {merged['primary']} and {r['primary']}"
            )
        named = {}
        for n, m in r["models"].items():
            same = n in merged["models"] and json.dumps(merged["models"][n]) == json.dumps(m)
            named[n] = n if n not in merged["models"] or same else f"{n} ({d})"
            merged["models"].setdefault(named[n], m)
        merged["pairwise_all"] += [
            dict(p, model=named.get(p["model"], p["model"])) for p in pairwise_by_model(r).values()
        ]
    return merged


METRICS = (
    "n",
    "unreadable",
    "primary",
    "primary_ci",
    "helpfulness",
    "helpfulness_ci",
    *(f"hh{lam}{ci}" for lam in LAMBDAS for ci in ("", "_ci")),
)


def read_report(path):
    """A report.json written by evaluate.py, checked, or an InputError naming what is wrong."""
    if not path.is_file():
        raise common.InputError(f"{path}: no such file (run evaluate.py --output {path.parent} first)")
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as e:  # ValueError: malformed JSON, a huge integer
        raise common.InputError(f"{path}: not a JSON report ({type(e).__name__})") from None
    ok = (
        isinstance(r, dict)
        and isinstance(r.get("primary"), str)
        and isinstance(r.get("models"), dict)
        and r["models"]
        and all(isinstance(m, dict) and all(k in m for k in METRICS) for m in r["models"].values())
    )
    if not ok:
        raise common.InputError(
            f"{path}: not a report written by evaluate.py (it needs 'primary' and 'models' with each model's metrics)"
        )
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="evaluation directories written by evaluate.py")
    p.add_argument("--output", required=True, help="directory for the gathered report.md, report.json, result.svg")
    args = p.parse_args()
    common.refuse_overlap(reads=args.dirs, writes=[args.output])
    merged = gather([read_report(Path(d) / "report.json") for d in args.dirs], args.dirs)
    with resumable.one_writer(Path(args.output)):
        print(write(args.output, merged, list(merged["models"])))


if __name__ == "__main__":
    common.run_main(main)
