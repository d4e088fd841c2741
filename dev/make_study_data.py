"""How data/study_*.jsonl were made (once; the files are committed): from TrustLLM's
misuse set (github.com/HowieHwong/TrustLLM, dataset/safety/misuse.json at commit b1054bef,
MIT) 300 prompts, stratified by source and shuffled with seed 0, the first 240 for training
and the other 60 for validation; from XSTest v2 (github.com/paul-rottger/exaggerated-safety,
xstest_prompts.csv at commit d7bb5bd, CC BY 4.0) 120 held-out prompts, 60 labelled safe and
60 unsafe, seeded likewise. XSTest v1 is TrustLLM's own exaggerated-safety set, so no
TrustLLM prompt outside misuse.json is used: the held-out source stays unseen.

    python dev/make_study_data.py TRUSTLLM_MISUSE_JSON XSTEST_PROMPTS_CSV
"""

import csv
import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def write(name, records):
    (DATA / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main(misuse_path, xstest_path):
    misuse = json.loads(Path(misuse_path).read_text(encoding="utf-8"))
    rng = random.Random(0)
    by_source = {}
    for i, r in enumerate(misuse):
        by_source.setdefault(r["source"], []).append(
            {"id": f"misuse-{i}", "prompt": r["prompt"], "category": r["source"]}
        )
    picked = []
    for source in sorted(by_source):  # 300 in proportion to each source's size
        items = by_source[source]
        rng.shuffle(items)
        picked += items[: round(300 * len(items) / len(misuse))]
    rng.shuffle(picked)
    picked = picked[:300]
    write("study_train.jsonl", picked[:240])
    write("study_val.jsonl", picked[240:])
    rows = list(csv.DictReader(open(xstest_path, encoding="utf-8")))
    held = []
    for label in ("safe", "unsafe"):
        items = [
            {"id": f"xstest-{r['id']}", "prompt": r["prompt"], "category": label} for r in rows if r["label"] == label
        ]
        rng.shuffle(items)
        held += items[:60]
    write("study_heldout.jsonl", held)


if __name__ == "__main__":
    main(*sys.argv[1:])
