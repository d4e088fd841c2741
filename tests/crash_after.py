"""A stage that dies after writing N records, half-way through the next line, as a kill would:

python tests/crash_after.py N STAGE.py ARGS...     (also as the script torchrun starts)
"""

import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import resumable  # noqa: E402

n, script = int(sys.argv[1]), str(ROOT / sys.argv[2])
write = resumable.Output.write


def write_then_die(self, records):
    for rec in records:
        if self.new >= n:
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            self.f.write(line[: len(line) // 2])
            self.f.flush()
            os._exit(3)
        write(self, [rec])


resumable.Output.write = write_then_die
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
