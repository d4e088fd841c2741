"""The house: no stage script imports another, and every flag does what its help says."""

import ast


import pytest
import common
import re
from conftest import refused, ROOT, run, run_here, write_jsonl

STAGES = ["sample", "score", "refine", "denoise", "pairs", "train", "evaluate"]


def project_imports(module):
    """The project's modules that `module` (a top-level .py file) imports, at any depth of its code."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if (ROOT / f"{n}.py").exists()}


def reached(module):
    """Every project module `module` reaches through its imports, itself left out."""
    seen, todo = set(), [module]
    while todo:
        for m in project_imports(todo.pop()) - seen:
            seen.add(m)
            todo.append(m)
    return seen - {module}


def test_no_stage_script_imports_another_at_any_depth():
    for stage in STAGES:
        others = reached(stage) & set(STAGES)
        assert not others, f"{stage}.py reaches the stage(s) {sorted(others)} through its imports"


def test_the_import_walk_sees_an_import_inside_a_function(tmp_path, monkeypatch):
    """The walk must find a lazy import too (a mutation of the walk that reads only the top fails here)."""
    (tmp_path / "a.py").write_text("def f():\n    import b\n")
    (tmp_path / "b.py").write_text("import c\n")
    (tmp_path / "c.py").write_text("")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert reached("a") == {"b", "c"}


def scored_file(tmp_path, primary):
    rec = {
        "id": "p0",
        "prompt": "Is it safe?",
        "objectives": [primary, "helpfulness"],
        "candidates": [{"text": "Yes.", "score_a": 5, "score_b": 5}, {"text": "No.", "score_a": 6, "score_b": 4}],
    }
    return write_jsonl(tmp_path / "scored.jsonl", [rec])


def test_refine_takes_the_objectives_from_the_scored_file_and_has_no_primary_flag(tmp_path, tiny_model_dir):
    p = run_here(
        "refine.py",
        "--input",
        scored_file(tmp_path, "harmlessness"),
        "--output",
        tmp_path / "r.jsonl",
        "--model",
        tiny_model_dir,
        "--primary",
        "honesty",
    )
    assert p.returncode == 2 and "unrecognized arguments: --primary honesty" in p.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_score_has_no_seed_it_would_not_read():
    p = run_here("score.py", "--help")
    assert p.returncode == 0 and "--seed" not in p.stdout
    assert "--seed" in run_here("sample.py", "--help").stdout and "--seed" in run_here("refine.py", "--help").stdout


def test_train_has_no_test_hook_flag():
    assert "--stop-after" not in run_here("train.py", "--help").stdout


def test_evaluate_names_the_judge_flags_for_a_model_other_than_the_embedded_one(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "e.jsonl", [{"id": "q", "prompt": "Hi?"}])
    p = run_here("evaluate.py", "--input", prompts, "--output", tmp_path / "ev", "--model", tiny_model_dir)
    assert p.returncode == 2 and "--judge MODEL" in p.stderr and "--judge-api-base" in p.stderr
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize(
    "script,flags,message",
    [
        ("sample.py", ["--batch-size", "-1"], "--batch-size: must be an integer >= 1"),
        ("sample.py", ["--limit", "0"], "--limit: must be an integer >= 1"),
        ("sample.py", ["--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1"),
        ("denoise.py", ["--limit", "-1"], "--limit: must be an integer >= 1"),
        ("train.py", ["--grad-accum", "0"], "--grad-accum: must be an integer >= 1"),
        ("train.py", ["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    ],
)
def test_flag_values_out_of_range_are_refused(tmp_path, script, flags, message):
    p = run(script, "--input", tmp_path / "x.jsonl", "--output", tmp_path / "y", *flags, check=False)
    refused(p, message)


def flags_of(source):
    return set(re.findall(r'(?:add_argument|\badd)\(\s*"(--[a-z-]+)"', source))


def test_every_stage_documents_its_flags():
    import inspect
    import judging

    shared = {
        "add_common_args": flags_of(inspect.getsource(common.add_common_args)),
        "add_prompt_args": flags_of(inspect.getsource(common.add_prompt_args)),
        "add_judge_args": flags_of(inspect.getsource(judging.add_judge_args)),
        "add_primary_arg": flags_of(inspect.getsource(judging.add_primary_arg)),
    }
    from torch.distributed.run import get_args_parser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings]
    for script in ["sample.py", "score.py", "refine.py", "denoise.py", "pairs.py", "train.py", "evaluate.py"]:
        p = run_here(script, "--help")
        src = (ROOT / script).read_text()
        flags = flags_of(src).union(*(f for name, f in shared.items() if name + "(" in src))
        if "seed=False" in src:  # a greedy stage: add_common_args leaves --seed out
            flags.discard("--seed")
        missing = [f for f in flags if f not in p.stdout]
        assert not missing, f"{script} --help lacks {missing}"
        # torchrun parses every option on its command line: no flag may be one of its own or a prefix of one
        clash = [f for f in flags if any(o.startswith(f) for o in theirs)]
        assert not clash, f"{script}: {clash} clash with torchrun's options"


# the environment the shipped code reads, each documented in the README; a test hook read from
# the environment (SPA_TEST_..., say) would be a new name here and fail the test below
ENVIRONMENT = {
    "SPA_CACHE",
    "SPA_CPU_SPEED",
    "SPA_DIST_TIMEOUT",
    "SPA_STEP_TIMEOUT",
    "SPA_PROCESS_GROUP",
    "OPENAI_API_KEY",
    "GLIBC_TUNABLES",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
}


def environment_reads(source):
    """The environment variables a Python source reads by name: os.environ.get("X"),
    os.environ["X"], os.getenv("X"), "X" in os.environ; '?' for a name that is not a literal."""

    def is_environ(node):
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    def name(node):
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else "?"

    found = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.args
            and (
                (node.func.attr in ("get", "pop", "setdefault") and is_environ(node.func.value))
                or node.func.attr == "getenv"
            )
        ):
            found.add(name(node.args[0]))
        elif isinstance(node, ast.Subscript) and is_environ(node.value):
            found.add(name(node.slice))
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            found.add(name(node.left))
    return found


def test_shipped_code_reads_only_the_documented_environment():
    readme = (ROOT / "README.md").read_text()
    read = set().union(*(environment_reads(f.read_text()) for f in ROOT.glob("*.py")))
    assert read <= ENVIRONMENT, f"the shipped code reads {sorted(read - ENVIRONMENT)} from the environment"
    assert all(v in readme for v in ENVIRONMENT if v.startswith("SPA_"))
    hook = 'import os\nif os.environ.get("SPA_TEST_CRASH_AFTER"):\n    pass\nx = "SPA_X" in os.environ\n'
    assert environment_reads(hook) == {"SPA_TEST_CRASH_AFTER", "SPA_X"}  # the walk sees a hook where there is one


def bare_number_flags(source):
    """The flags of a source whose argparse type is a bare int or float (no range checked)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            for kw in node.keywords:
                if kw.arg == "type" and isinstance(kw.value, ast.Name) and kw.value.id in ("int", "float"):
                    found.append(node.args[0].value)
    return found


def test_every_number_flag_has_its_range_checked_while_parsing():
    scripts = [*ROOT.glob("*.py"), *ROOT.glob("oracle/*.py"), *ROOT.glob("dev/*.py")]
    bare = {f.name: flags for f in scripts if (flags := bare_number_flags(f.read_text()))}
    assert not bare, f"number flags without a range: {bare}"
    assert bare_number_flags('p.add_argument("--lr", type=float)') == ["--lr"]  # the walk sees one


@pytest.mark.parametrize(
    "script,flags,message",
    [
        ("train.py", ["--lr", "1e-2", "--beta=-2.5"], "--beta: must be a finite number > 0, got -2.5"),
        ("train.py", ["--max-grad-norm", "0"], "--max-grad-norm: must be a finite number > 0"),
        ("train.py", ["--lora-alpha", "0"], "--lora-alpha: must be a finite number > 0"),
        ("train.py", ["--lr=-1e-2"], "--lr: must be a finite number > 0"),
        ("train.py", ["--warmup-ratio", "nan"], "--warmup-ratio: must be a finite number >= 0 and <= 1"),
        ("train.py", ["--head-chunk", "-1"], "--head-chunk: must be an integer >= 0"),
        ("train.py", ["--gamma", "inf"], "--gamma: must be a finite number >= 0"),
        ("score.py", ["--judge-timeout", "inf"], "--judge-timeout: must be a finite number > 0"),
        ("score.py", ["--judge-timeout", "-5"], "--judge-timeout: must be a finite number > 0"),
        ("score.py", ["--backoff", "nan"], "--backoff: must be a finite number >= 0"),
        ("sample.py", ["--temperatures", "nan"], "--temperatures: must be a finite number >= 0"),
        ("sample.py", ["--temperatures", "0.8", "-1"], "--temperatures: must be a finite number >= 0"),
        ("sample.py", ["--top-p=-3"], "--top-p: must be a finite number <= 1 and > 0"),
        ("sample.py", ["--num-candidates", "1"], "--num-candidates: must be an integer >= 2"),
        ("refine.py", ["--temperature", "-0.5"], "--temperature: must be a finite number >= 0"),
        ("oracle/soup.py", ["--weight", "1.5"], "--weight: must be a finite number >= 0 and <= 1"),
    ],
)
def test_decimal_and_integer_flags_out_of_range_stop_before_any_work(tmp_path, script, flags, message):
    need = {
        "train.py": ["--input", "x", "--output", tmp_path / "o"],
        "oracle/soup.py": ["--first", "a", "--second", "b", "--output", tmp_path / "o"],
    }.get(script, ["--input", "x", "--output", tmp_path / "o"])
    p = run_here(script, *need, *flags)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-800:]
    assert not (tmp_path / "o").exists()


def test_lora_targets_the_model_lacks_stop_before_any_work(tmp_path, tiny_model_dir):
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "gap": 1}])
    for targets in (["qproj"], ["q_proj", "vproj"]):  # a typo alone, and beside a real name
        p = run_here(
            "train.py",
            "--input",
            pairs,
            "--model",
            tiny_model_dir,
            "--output",
            tmp_path / "o",
            "--lora-rank",
            2,
            "--lora-targets",
            *targets,
        )
        assert p.returncode == 2 and f"--lora-targets {targets[-1]}: no linear layer" in p.stderr, p.stderr[-500:]
        assert "q_proj" in p.stderr and not (tmp_path / "o").exists()
