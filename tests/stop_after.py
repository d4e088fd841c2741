"""train.py stopped right after its checkpoint of step N is written, as a kill then would:

    python tests/stop_after.py N train.py ARGS...     (also as the script torchrun starts)

The run checkpoints every N steps (--save-every N goes last, so it wins) and every rank
leaves once the save of step N has returned.
"""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402

n, script = int(sys.argv[1]), str(ROOT / sys.argv[2])
save = checkpoints.save_checkpoint


def save_then_stop(out, policy, opt, sched, step, info):
    save(out, policy, opt, sched, step, info)
    if step == n:
        raise SystemExit(0)


checkpoints.save_checkpoint = save_then_stop
sys.argv = [script, *sys.argv[3:], "--save-every", str(n)]
runpy.run_path(script, run_name="__main__")
