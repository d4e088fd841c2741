"""What a run writes: never through a link, never a file of yours, one writer per output whichever the stage."""

import os
import shutil
import pytest
import resumable
from conftest import denoise_record, PROMPTS, read_jsonl, refused, run, run_here, sample, write_jsonl


def plant(kind, victim, at):
    """A link at `at` to `victim`: symbolic or hard."""
    os.symlink(victim, at) if kind == "symbolic" else os.link(victim, at)


@pytest.mark.parametrize("kind", ["symbolic", "hard"])
@pytest.mark.parametrize("side", ["o.jsonl.lock", "o.jsonl.part0"])
def test_no_file_beside_the_output_is_written_through_a_link(tmp_path, tiny_model_dir, kind, side):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    plant(kind, victim, tmp_path / side)
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    p = sample(tmp_path, tiny_model_dir, tmp_path / "o.jsonl", here=True)
    assert p.returncode == 2 and ("link" in p.stderr or "named like a part file" in p.stderr), p.stderr[-500:]
    assert victim.read_text() == "mine" and not (tmp_path / "o.jsonl").exists()


def test_temporary_files_get_fresh_names_so_a_planted_one_is_never_written(tmp_path, tiny_model_dir):
    """Beyond the named cases: links planted at the old fixed temporary names change nothing."""
    victims = []
    for name in ("o.jsonl.tmp", "o.jsonl.run.json.tmp", "d.summary.json.tmp"):
        victims.append(tmp_path / f"victim-{name}")
        victims[-1].write_text("mine")
        plant("symbolic", victims[-1], tmp_path / name)
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    p = sample(tmp_path, tiny_model_dir, tmp_path / "o.jsonl", here=True)
    assert p.returncode == 0 and len(read_jsonl(tmp_path / "o.jsonl")) == 3
    d = run_here(
        "denoise.py",
        "--input",
        write_jsonl(tmp_path / "r.jsonl", [denoise_record("a"), denoise_record("b")]),
        "--output",
        tmp_path / "d.jsonl",
        "--tau-quantile",
        1,
        "--no-consistency",
    )
    assert d.returncode == 0 and (tmp_path / "d.summary.json").is_file()
    assert all(v.read_text() == "mine" for v in victims)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".") and f.name.endswith(".tmp")]


def test_a_users_file_named_like_a_part_is_never_taken_nor_deleted(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = ["--input", prompts, "--model", tiny_model_dir, "--num-candidates", 2, "--max-new-tokens", 2]
    (tmp_path / "s.jsonl.part00").write_text("what split -d made\n")  # not a part name of this project
    assert run_here("sample.py", *args, "--output", tmp_path / "s.jsonl").returncode == 0
    assert (tmp_path / "s.jsonl.part00").read_text() == "what split -d made\n"
    (tmp_path / "t.jsonl.part1").write_text("mine\n")  # a part name, but no run of t.jsonl recorded
    for extra in ([], ["--overwrite"]):
        p = run_here("sample.py", *args, "--output", tmp_path / "t.jsonl", *extra)
        refused(p, "t.jsonl.part1: named like a part file of --output")
        assert "--overwrite" not in p.stderr and (tmp_path / "t.jsonl.part1").read_text() == "mine\n"


@pytest.mark.parametrize("stage", ["denoise.py", "pairs.py", "sample.py"])
def test_one_writer_per_output_whichever_stages_they_are(tmp_path, tiny_model_dir, stage):
    """A generation stage writing X holds X.lock: a denoise.py or pairs.py run (or another
    generation stage) with --output X is refused, and X is left as it was."""
    out = tmp_path / "x.jsonl"
    held = resumable.lock(tmp_path / "x.jsonl.lock", out)  # as sample.py --output x.jsonl holds it while it runs
    try:
        if stage == "sample.py":
            args = ["--input", write_jsonl(tmp_path / "p.jsonl", PROMPTS), "--model", tiny_model_dir]
        else:
            args = ["--input", write_jsonl(tmp_path / "r.jsonl", [denoise_record("a"), denoise_record("b")])]
        p = run(stage, *args, "--output", out, check=False)
        refused(p, "another run is writing this output")
        assert not out.exists() and not (tmp_path / "x.summary.json").exists()
    finally:
        resumable.release(held)


def test_soup_refuses_an_existing_model_folder(tmp_path, tiny_model_dir):
    other = tmp_path / "unrelated"
    shutil.copytree(tiny_model_dir, other)
    before = {f.name: f.read_bytes() for f in other.iterdir()}
    p = run_here(
        "oracle/soup.py", "--first", tiny_model_dir, "--second", tiny_model_dir, "--weight", 0.5, "--output", other
    )
    refused(p, "exists and is not empty")
    assert {f.name: f.read_bytes() for f in other.iterdir()} == before
