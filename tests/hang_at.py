"""train.py with rank 1 hung in its Nth forward pass (it sleeps), as a stuck GPU would be:

    torchrun ... tests/hang_at.py N train.py ARGS...

The other ranks wait for it inside FSDP2's collectives, which must time out.
"""

import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import distributed  # noqa: E402
import policy_model  # noqa: E402

n, script = int(sys.argv[1]), str(ROOT / sys.argv[2])
forward, calls = policy_model.sequence_logps, []


def hang_at_n(*args, **kwargs):
    calls.append(1)
    if distributed.RANK == 1 and len(calls) == n:
        time.sleep(3600)
    return forward(*args, **kwargs)


policy_model.sequence_logps = hang_at_n
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
