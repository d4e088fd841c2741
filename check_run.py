"""Check that a run directory holds every stage's file with the fields of the data contract
(docs/DESIGN.md). Exit status 1 and a list of problems if not.

    python check_run.py runs/demo/iter1
"""

import argparse
import json
import sys
from pathlib import Path

CONTRACT = {  # file -> (fields on each record, fields on each candidate)
    "samples.jsonl": (["id", "prompt", "candidates"], ["text", "system", "temperature"]),
    "scored.jsonl": (["id", "prompt", "candidates", "objectives"], ["text", "score_a", "score_b"]),
    "refined.jsonl": (["id", "prompt", "candidates", "objectives", "refined"], ["text", "score_a", "score_b"]),
    "denoised.jsonl": (["id", "prompt", "candidates", "refined", "det_cov"], ["score_a", "score_b"]),
    "pairs.jsonl": (["id", "prompt", "chosen", "rejected", "chosen_scores", "rejected_scores", "gap"], []),
    "eval/responses.jsonl": (["id", "prompt", "model", "response"], []),
    "eval/judgments.jsonl": (["id", "kind"], []),
}
FILES = [
    "denoised.summary.json",
    "model/config.json",
    "model/model.safetensors",
    "model/train_config.json",
    "model/metrics.jsonl",
    "model/chat_template.jinja",
    "eval/report.md",
    "eval/report.json",
]


def problems(run):
    run = Path(run)
    out = [f"{run / f}: missing" for f in FILES if not (run / f).is_file()]
    for name, (fields, cand_fields) in CONTRACT.items():
        path = run / name
        if not path.is_file():
            out.append(f"{path}: missing")
            continue
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            out.append(f"{path}: empty")
        for n, line in enumerate(lines, 1):
            rec = json.loads(line)
            missing = [f for f in fields if f not in rec]
            missing += [f"candidates[].{f}" for c in rec.get("candidates", []) for f in cand_fields if f not in c]
            if missing:
                out.append(f"{path}:{n}: missing {sorted(set(missing))}")
                break
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory holding every stage's output (e.g. runs/demo/iter1)")
    run = p.parse_args().run
    found = problems(run)
    print("\n".join(found) if found else f"check_run: {run} holds every stage's file with the contract's fields")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
