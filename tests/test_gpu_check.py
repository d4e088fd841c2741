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
        "torchrun train stopped",
        "torchrun train --resume",
    ):
        assert wanted in stages
    assert all(r["ok"] and "peak_gpu_gib" in r for r in report["stages"]) and report["device"] == "cpu"
    assert report["sample_tokens"] == report["sample_rows"] * report["sample_new_tokens"]  # random weights: no end
    assert (
        report["sample_tokens_per_s"] > 0 and report["lora_train_pairs_per_s"] > 0 and report["model"]["parameters"] > 0
    )
    assert report["lora_train_tokens_per_s"] > 0 and report["fsdp_train_tokens_per_s"] > 0
    assert report["fsdp_train_fsdp2"] is True  # the forced process group: FSDP2 over one process
    assert report["fsdp_train_checkpoint_save_s"] >= 0 and report["fsdp_train_checkpoint_load_s"] >= 0
