"""dev/gpu_check.py's dry run: the GPU check, on the CPU with tiny models, so it cannot rot."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_every_stage_on_the_cpu(tmp_path):
    p = subprocess.run(
        [sys.executable, str(ROOT / "dev" / "gpu_check.py"), "--dry-run", "--work", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, OUT=str(tmp_path / "out")),
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    stages = [r["stage"] for r in report["stages"]]
    for wanted in (
        "sample",
        "score generate",
        "score logits",
        "refine",
        "evaluate",
        "train spa",
        "train dpo",
        "train lora",
        "train --resume",
        "torchrun sample",
        "torchrun train",
    ):
        assert wanted in stages
    assert all(r["ok"] for r in report["stages"]) and report["device"] == "cpu"
    assert report["sample_tokens_per_s"] > 0 and report["train_pairs_per_s"] > 0 and report["model"]["parameters"] > 0
