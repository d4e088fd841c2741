"""A stage run that records its peak GPU memory (for dev/gpu_check.py):

    python dev/peak_memory.py OUT.json SCRIPT ARGS...      (also as the script torchrun starts)

Runs SCRIPT with ARGS as `python SCRIPT ARGS` would and, however it ends, writes
{"peak_gib": torch.cuda.max_memory_allocated() in GiB, or null without CUDA} to OUT.json
(rank R > 0 of a torchrun launch: OUT.rankR.json).
"""

import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
out, script = Path(sys.argv[1]), str(ROOT / sys.argv[2])
rank = int(os.environ.get("RANK", "0"))
sys.argv = [script, *sys.argv[3:]]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    import torch

    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    (out if rank == 0 else out.with_suffix(f".rank{rank}.json")).write_text(json.dumps({"peak_gib": peak}) + "\n")
