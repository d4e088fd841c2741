"""The README and the messages name flags as they are; the data names its sources."""

import functools
import re
from pathlib import Path

from conftest import ROOT, run_here

SCRIPTS = [
    "sample.py",
    "score.py",
    "refine.py",
    "denoise.py",
    "pairs.py",
    "train.py",
    "evaluate.py",
    "report.py",
    "oracle/soup.py",
    "oracle/study.py",
    "oracle/judge.py",
    "dev/gpu_check.py",
    "check_run.py",
]
FLAG = r"(?<![\w-])(--[a-z][a-z0-9-]*)(?![\w-])"
OTHER_TOOLS = {
    "--nproc_per_node",
    "--no-deps",
    "--quiet",
    "--model_args",
    "--tasks",
    "--num_fewshot",
    "--batch_size",
    "--output_path",
    "--no-index",
    "--upgrade",
    "--target",
    "--implementation",
    "--master-port",
    "--no-compile",
    "--only-binary",
    "--python-version",
}  # torchrun, pip, lm_eval


@functools.lru_cache(maxsize=None)
def flags_of(script):
    """The options a script's --help lists, its subcommands' included."""
    out = run_here(script, "--help").stdout
    subcommands = re.search(r"\{([\w,-]+)\}", out)
    for sub in subcommands.group(1).split(",") if subcommands else []:
        out += run_here(script, sub, "--help").stdout
    return set(re.findall(FLAG, out))


def readme_commands():
    """(script, flags) of every command line in the README's code blocks."""
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        for line in block.splitlines():
            m = re.search(r"(?:^|\s)((?:oracle/|dev/|bench/)?\w+\.py)(?:\s(.*)|$)", line)
            if m and (ROOT / m.group(1)).exists():
                yield m.group(1), re.findall(FLAG, m.group(2) or "")


def test_every_readme_command_parses():
    seen = 0
    for script, flags in readme_commands():
        missing = [f for f in flags if f not in flags_of(script) and f not in OTHER_TOOLS]
        assert not missing, f"README: {script} has no {missing}"
        seen += 1
    assert seen >= 20
    lines = (ROOT / "README.md").read_text().splitlines()
    assert any("torchrun --nproc_per_node 8" in line for line in lines[:60])  # the 8-GPU commands come first
    assert 200 <= len(lines) <= 260


def test_every_flag_a_message_names_exists():
    """A flag named in a script's strings is one of its own; 'X.py --flag' is one of X's."""
    every = set().union(*(flags_of(s) for s in SCRIPTS))
    for path in [*ROOT.glob("*.py"), *ROOT.glob("oracle/*.py"), *ROOT.glob("dev/*.py")]:
        src = path.read_text()
        for script, flag in re.findall(r"((?:\w+/)?\w+\.py) " + FLAG, src):
            if script in SCRIPTS:
                assert flag in flags_of(script), f"{path.name} names {script} {flag}"
        unknown = {f for f in re.findall(FLAG, src)} - every - OTHER_TOOLS
        assert not unknown, f"{path.name} names flags no script has: {sorted(unknown)}"


def test_the_data_names_the_source_and_licence_of_each_file():
    sources = (ROOT / "data" / "SOURCES.md").read_text()
    for f in sorted((ROOT / "data").iterdir()):
        if f.name != "SOURCES.md":
            row = next((line for line in sources.splitlines() if line.startswith(f"| `{f.name}`")), None)
            assert row, f"data/SOURCES.md does not name {f.name}"
            assert re.search(r"MIT|CC BY|as this repository", row), f"data/SOURCES.md gives {f.name} no licence"
    assert Path(ROOT / "docs" / "DESIGN.md").is_file() and "docs/DESIGN.md" in (ROOT / "check_run.py").read_text()
