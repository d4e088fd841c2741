"""evaluate.py: metrics, the agreement rule, the HTTP judge on a local server, report, resume."""

import argparse
import json
import re
import shutil
import sys

import pytest

import common
import evaluate
import report
import chat_api
import judging

import preference_data
from conftest import denoise_record, FakeJudge, PROMPTS, read_jsonl, refused, run, run_here, write_jsonl


def test_hh_and_summary_by_hand():
    assert report.hh(8, 5, 5) == pytest.approx(7.5)
    assert report.hh(10, 0, 20) == pytest.approx(200 / 21)
    s = report.summarize([{"score_a": 8, "score_b": 5}, {"score_a": 6, "score_b": None}, {"score_a": 10, "score_b": 7}])
    assert s["primary"] == pytest.approx(8) and s["helpfulness"] == pytest.approx(6) and s["unreadable"] == 1
    assert s["hh5"] == pytest.approx((7.5 + 57 / 6) / 2)  # over the answers with both scores
    lo, hi = s["primary_ci"]
    assert 6 <= lo <= 8 <= hi <= 10


def test_agreement_rule_and_verdicts():
    assert evaluate.pairwise_outcome("A", "B") == "win"
    assert evaluate.pairwise_outcome("B", "A") == "lose"
    assert evaluate.pairwise_outcome("A", "A") == "tie"  # position bias: no agreement
    assert evaluate.pairwise_outcome(None, "B") == "tie"
    assert judging.parse_verdict("B is kinder. Winner: B") == "B"
    assert judging.parse_verdict("A") == "A" and judging.parse_verdict("both are fine") is None
    w = report.win_rates(["win", "win", "tie", "lose"])
    assert (w["win"], w["tie"], w["lose"]) == (0.5, 0.25, 0.25)


def test_unreachable_endpoint_is_a_clear_error():
    with pytest.raises(common.InputError, match="failed after 2 tries"):
        chat_api.chat_completion("http://127.0.0.1:9/v1", "m", [], timeout=1, retries=2, backoff=0.01)


def test_report_table_from_crafted_run():
    judged = [
        {"kind": "score", "model": m, "category": c, "score_a": a, "score_b": b}
        for m, c, a, b in [("Vanilla", "x", 4, 6), ("Vanilla", "y", 6, 6), ("SPA", "x", 8, 5), ("SPA", "y", 10, 7)]
    ]
    judged += [{"kind": "pairwise", "category": c, "outcome": o} for c, o in [("x", "win"), ("y", "tie")]]
    rep = report.build_report(judged, ["Vanilla", "SPA"], "harmlessness")
    md = report.report_markdown(rep, ["Vanilla", "SPA"]).splitlines()
    assert md[0].startswith("| Model | Harmlessness | Helpfulness | HH_5 | HH_10 | HH_20 | Win | Tie | Lose |")
    assert md[2].startswith("| Vanilla | 5.00 [") and md[2].endswith("| - | - | - |")
    assert md[3].startswith("| SPA | 9.00 [") and "| 50% | 50% | 0% |" in md[3]
    assert f"| {report.hh(9, 6, 5):.2f} |" in md[3]
    assert rep["categories"]["x"]["pairwise"]["win"] == 1.0


def test_evaluate_cli_with_chat_api_resumes(tmp_path, tiny_model_dir, judge_server):
    prompts = write_jsonl(
        tmp_path / "eval.jsonl",
        [{"id": f"e{i}", "prompt": f"Is thing {i} safe?", "category": "c" if i % 2 else "d"} for i in range(3)],
    )
    args = [
        "--input",
        prompts,
        "--output",
        tmp_path / "ev",
        "--model",
        tiny_model_dir,
        "--name",
        "SPA",
        "--baseline",
        tiny_model_dir,
        "--judge-api-base",
        judge_server,
        "--max-new-tokens",
        5,
        "--backoff",
        0.01,
        "--batch-size",
        2,
    ]
    first = run("evaluate.py", *args).stdout
    assert "| Vanilla |" in first and "| SPA |" in first
    j = read_jsonl(tmp_path / "ev" / "judgments.jsonl")
    assert len(j) == 9 and sum(r["kind"] == "pairwise" for r in j) == 3
    assert all(r["outcome"] == "tie" for r in j if r["kind"] == "pairwise")  # always "A": position bias -> tie
    assert len(read_jsonl(tmp_path / "ev" / "responses.jsonl")) == 6
    # crash in the middle of the last judgement: only it is asked again
    path = tmp_path / "ev" / "judgments.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1] + b'{"id": "pairw')
    n0 = len(FakeJudge.requests)
    assert run("evaluate.py", *args).stdout == first
    assert len(FakeJudge.requests) - n0 == 2  # one pairwise judgement, both orders
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["pairwise"]["tie"] == 1.0


def test_missing_model_directory(tmp_path):
    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "x"}])
    p = run("evaluate.py", "--input", prompts, "--output", tmp_path / "ev", "--model", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "no such model directory" in p.stderr


def crafted_report(name, a, b, outcome):
    judged = [
        {"kind": "score", "model": m, "category": "x", "score_a": x, "score_b": y}
        for m, xs, ys in [("Vanilla", [5, 6, 5], [6, 6, 7]), (name, a, b)]
        for x, y in zip(xs, ys)
    ]
    judged += [
        {"kind": "pairwise", "category": "x", "outcome": o, "model_first": "A", "model_second": "B"} for o in outcome
    ]
    return report.build_report(judged, ["Vanilla", name], "harmlessness")


def test_svg_has_one_point_per_model_and_the_favoured_region(tmp_path):
    import xml.etree.ElementTree as ET

    rep = crafted_report("SPA", [7, 8, 8], [5, 6, 6], ["win", "tie", "tie"])
    report.write(tmp_path, rep, ["Vanilla", "SPA"])
    root = ET.parse(tmp_path / "result.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    models = [g for g in root.iter(ns + "g") if g.get("class") == "model"]
    assert [g.get("data-name") for g in models] == ["Vanilla", "SPA"]
    assert all(len(g.findall(ns + "circle")) == 1 for g in models)
    y = {g.get("data-name"): float(g.find(ns + "circle").get("cy")) for g in models}
    assert y["SPA"] < y["Vanilla"]  # a higher primary score is drawn higher
    favoured = next(r for r in root.iter(ns + "rect") if r.get("class") == "favoured")
    assert float(favoured.get("y")) + float(favoured.get("height")) == pytest.approx(y["Vanilla"], abs=0.1)
    assert "](result.svg)" in (tmp_path / "report.md").read_text()


def test_gathered_table_equals_the_per_directory_reports(tmp_path):
    """The main table's rows (per category tables stay in each directory)."""
    dirs = []
    for name, a, b, o in [
        ("SPA", [7, 8, 8], [5, 6, 6], ["win", "tie", "lose"]),
        ("sft", [5, 5, 6], [7, 8, 7], ["lose"]),
    ]:
        d = tmp_path / name
        report.write(d, crafted_report(name, a, b, o), ["Vanilla", name])
        dirs.append(d)
    out = run("report.py", *dirs, "--output", tmp_path / "all").stdout
    rows = lambda text: [r for r in text.split("\n\n")[0].splitlines() if not r.startswith(("| Model", "|---"))]
    gathered = rows(out)
    assert [r.split(" | ")[0] for r in gathered] == ["| Vanilla", "| SPA", "| sft"]
    for d in dirs:
        for r in rows((d / "report.md").read_text()):
            assert r in gathered
    root = __import__("xml.etree.ElementTree", fromlist=["x"]).parse(tmp_path / "all" / "result.svg").getroot()
    assert sum(g.get("class") == "model" for g in root.iter("{http://www.w3.org/2000/svg}g")) == 3


def test_the_baseline_that_is_also_the_judge_is_loaded_once(tmp_path, tiny_model_dir, monkeypatch):
    """Two models answer, the baseline judges: two loads, not three, and the same records as a
    judge loaded on its own (a second run judges from a fresh load: its judgments are equal)."""
    loads = []
    real = common.load_for_inference
    monkeypatch.setattr(common, "load_for_inference", lambda name: loads.append(str(name)) or real(name))
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    inp = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Is {i} safe?"} for i in range(3)])
    argv = lambda out, judge: [
        "evaluate.py",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--model",
        str(other),
        "--baseline",
        str(tiny_model_dir),
        "--judge",
        str(judge),
        "--mode",
        "logits",
        "--max-new-tokens",
        "4",
        "--judge-max-tokens",
        "3",
    ]
    monkeypatch.setattr(sys, "argv", argv(tmp_path / "reused", tiny_model_dir))
    evaluate.main()
    assert loads == [str(other), str(tiny_model_dir)]  # the judge answered last and was not loaded again
    loads.clear()
    judge_copy = tmp_path / "judge"
    shutil.copytree(tiny_model_dir, judge_copy)
    monkeypatch.setattr(sys, "argv", argv(tmp_path / "fresh", judge_copy))
    evaluate.main()
    assert loads == [str(tiny_model_dir), str(other), str(judge_copy)]
    assert read_jsonl(tmp_path / "reused" / "judgments.jsonl") == read_jsonl(tmp_path / "fresh" / "judgments.jsonl")


def test_each_comparison_gets_its_own_two_verdicts(tmp_path, monkeypatch):
    """Both orders of a batch's comparisons go to the judge in one call: a judge that always
    prefers the answer saying 'good' must give 'win' where the model's answer is the good one
    and 'lose' where the baseline's is (3 comparisons in batches of 2)."""

    class Stub(judging.Judge):
        def ratings(self, items, objective):
            return [{"score": 5} for _ in items]

        def ask(self, conversations, parse):
            firsts = [c[-1]["content"].split("Answer A:")[1].split("Answer B:")[0] for c in conversations]
            return [parse("Winner: A" if "good" in a else "Winner: B") for a in firsts]

    monkeypatch.setattr(judging, "from_args", lambda *args: Stub())
    models = [("Vanilla", "base", None), ("SPA", "spa", None)]
    responses = {
        f"{n}/p{i}": {
            "id": f"{n}/p{i}",
            "prompt_id": f"p{i}",
            "prompt": f"question {i}",
            "model": n,
            "response": "good" if (n == "SPA") == (i % 2 == 0) else "bad",
        }
        for n, _, _ in models
        for i in range(3)
    }
    args = argparse.Namespace(
        primary="harmlessness",
        batch_size=2,
        overwrite=False,
        judge="base",
        mode="logits",
        judge_api_base=None,
        judge_model="m",
        judge_max_tokens=4,
    )
    judged = evaluate.judge_all(tmp_path / "j.jsonl", responses, models, args)
    outcomes = {r["prompt_id"]: r["outcome"] for r in judged if r["kind"] == "pairwise"}
    assert outcomes == {"p0": "win", "p1": "lose", "p2": "win"}
    assert sum(r["kind"] == "score" for r in judged) == 6


def test_a_model_named_pairwise_keeps_its_verdicts(tmp_path, tiny_model_dir):
    model = tmp_path / "pairwise"
    shutil.copytree(tiny_model_dir, model)
    p = run_here(
        "evaluate.py",
        "--input",
        write_jsonl(tmp_path / "e.jsonl", PROMPTS),
        "--output",
        tmp_path / "ev",
        "--model",
        model,
        "--baseline",
        tiny_model_dir,
        "--judge",
        tiny_model_dir,
        "--mode",
        "logits",
        "--max-new-tokens",
        3,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    judged = read_jsonl(tmp_path / "ev" / "judgments.jsonl")
    assert sum(j["kind"] == "pairwise" for j in judged) == 3 and sum(j["kind"] == "score" for j in judged) == 6
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["models"]["pairwise"]["n"] == 3 and rep["pairwise"]["n"] == 3


def test_ids_from_names_with_slashes_and_reports_of_like_names(tmp_path, tiny_model_dir):
    assert common.joined_id("a/b", "c") != common.joined_id("a", "b/c")
    assert common.joined_id("x%2F", "y") != common.joined_id("x/", "y")
    dirs = []
    for k, a in enumerate(([7, 8, 8], [5, 5, 6])):
        judged = [
            {"kind": "score", "model": m, "score_a": x, "score_b": 5, "category": "c"}
            for m, xs in (("Vanilla", [5, 5, 5]), ("model", a))
            for x in xs
        ]
        dirs.append(tmp_path / f"run{k}")
        report.write(dirs[-1], report.build_report(judged, ["Vanilla", "model"], "harmlessness"), ["Vanilla", "model"])
    p = run_here("report.py", *dirs, "--output", tmp_path / "all")
    assert p.returncode == 0, p.stderr
    models = json.loads((tmp_path / "all" / "report.json").read_text())["models"]
    assert list(models) == ["Vanilla", "model", f"model ({dirs[1]})"]  # both kept, the baseline once
    out = tmp_path / "run[1].jsonl"  # glob characters in the output's name
    write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = ["--input", tmp_path / "p.jsonl", "--output", out, "--model", tiny_model_dir, "--max-new-tokens", 2]
    assert run_here("sample.py", *args).returncode == 0
    assert "0 new, 3 resumed" in run_here("sample.py", *args).stdout and len(read_jsonl(out)) == 3


def test_reports_soups_pairs_and_conversations_name_the_bad_line(tmp_path, tiny_model_dir, tokenizer):
    for text, message in (
        ("", "not a JSON report"),
        ("{", "not a JSON report"),
        ('{"models": 1}', "not a report written"),
    ):
        (tmp_path / "ev").mkdir(exist_ok=True)
        (tmp_path / "ev" / "report.json").write_text(text)
        refused(run_here("report.py", tmp_path / "ev", "--output", tmp_path / "all"), message)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.intermediate_size = 48
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    refused(
        run_here(
            "oracle/soup.py",
            "--first",
            tiny_model_dir,
            "--second",
            tmp_path / "wide",
            "--weight",
            0.5,
            "--output",
            tmp_path / "soup",
        ),
        "differ in shape",
    )
    recs = write_jsonl(tmp_path / "d.jsonl", [denoise_record("a")])
    for k in (-1, 0):
        refused(
            run_here("pairs.py", "--input", recs, "--output", tmp_path / "p.jsonl", "--max-pairs-per-prompt", k),
            "must be an integer >= 1",
        )
    for prompt, message in (
        ([{"role": "narrator", "content": "x"}, {"role": "user", "content": "q"}], "unknown role"),
        ([{"role": "system", "content": "x"}], "must end with a user message"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "must end with a user message"),
    ):
        f = write_jsonl(tmp_path / "c.jsonl", [{"prompt": prompt, "chosen": "a", "rejected": "b"}])
        with pytest.raises(common.InputError, match=message):
            preference_data.load_pairs(f, tokenizer, 64, need_gap=False)


def test_a_report_without_readable_scores_draws_and_says_so(tmp_path):
    judged = [{"kind": "score", "model": m, "score_a": None, "score_b": None} for m in ("V", "S")]
    report.write(tmp_path, report.build_report(judged, ["V", "S"], "harmlessness"), ["V", "S"])
    assert "left out, no readable scores: V, S" in (tmp_path / "result.svg").read_text()


def test_evaluate_keys_answers_by_the_model(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    other = tmp_path / "b" / "model"
    shutil.copytree(tiny_model_dir, other)
    args = [
        "--input",
        tmp_path / "p.jsonl",
        "--output",
        tmp_path / "ev",
        "--judge",
        tiny_model_dir,
        "--mode",
        "logits",
        "--max-new-tokens",
        3,
    ]
    run("evaluate.py", *args, "--model", tiny_model_dir)
    p = run("evaluate.py", *args, "--model", other, check=False)
    refused(p, "responses.jsonl: was made with the models (--model, --baseline, their names and files)")


HOSTILE = 'tiny" onmouseover="alert(1)" x="<script>|`'


def test_names_in_the_svg_and_markdown_stay_text(tmp_path):
    """A model name (from --name, a folder's name or a colleague's eval folder) and a category
    carrying quotes, markup and a column break: the SVG parses with the name as one attribute
    value and one text node, and the Markdown table keeps its columns."""
    import xml.etree.ElementTree as ET

    rep = crafted_report(HOSTILE, [7, 7, 8], [5, 6, 6], ["win", "tie", "win"])
    rep["categories"] = {HOSTILE: {"models": rep["models"], "pairwise": None}}
    table = report.write(tmp_path, rep, ["Vanilla", HOSTILE])
    svg = ET.parse(tmp_path / "result.svg").getroot()
    groups = [g for g in svg.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "model"]
    assert [g.get("data-name") for g in groups] == ["Vanilla", HOSTILE]
    assert all(set(g.attrib) == {"class", "data-name", "stroke", "fill"} for g in groups)
    assert "<script>" not in (tmp_path / "result.svg").read_text()
    for line in table.splitlines():
        if line.startswith("|"):  # every row has as many cells as its header
            assert len(re.split(r"(?<!\\)\|", line)) in (11, 10), line
    assert "<script>" not in table  # no raw HTML: the quotes are then plain text


def test_metrics_svg_escapes_what_it_is_given(tmp_path):
    """Beyond the report: metrics_log's picture with a hostile series name parses and keeps it as text."""
    import xml.etree.ElementTree as ET

    import metrics_log

    metrics_log.COLOURS[HOSTILE] = "#000"
    try:
        text = metrics_log.panel("loss", {HOSTILE: [(1, 0.5), (2, 0.25)]}, 0, 0, 300, 200, 2)
    finally:
        del metrics_log.COLOURS[HOSTILE]
    root = ET.fromstring('<svg xmlns="http://www.w3.org/2000/svg">' + "".join(text) + "</svg>")
    assert [g.get("data-name") for g in root.iter("{http://www.w3.org/2000/svg}g")] == [HOSTILE]
