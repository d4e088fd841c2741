"""JSONL validation, resumable and atomic output, the sampler, reading prompts."""
import re

import pytest
import torch

import common
import jsonl
import generation
from conftest import ROOT, read_jsonl, run_here, write_jsonl


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(common.InputError, match="no such file"):
        jsonl.read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(common.InputError, match="empty file"):
        jsonl.read_prompts(tmp_path / "e.jsonl")


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(common.InputError, match=r"p\.jsonl:2: malformed JSON"):
        jsonl.read_prompts(f)


def test_missing_prompt_field_lists_keys(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "lang": "en"}])
    with pytest.raises(common.InputError, match=r"p\.jsonl:1: no prompt field.*\['lang', 'text'\]"):
        jsonl.read_prompts(f)


def test_prompt_not_a_string(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": ["a", "list"]}])
    with pytest.raises(common.InputError, match=r"p\.jsonl:2: field 'prompt' must be a non-empty string"):
        jsonl.read_prompts(f)


def test_instruction_and_question_fields_and_ids(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "do x"}, {"question": "why y?", "id": "q7"},
                                           {"ask": "z", "id": 3}])
    with pytest.raises(common.InputError):
        jsonl.read_prompts(f)
    recs = jsonl.read_prompts(f, limit=2)
    assert [(r["id"], r["prompt"]) for r in recs] == [("1", "do x"), ("q7", "why y?")]
    g = write_jsonl(tmp_path / "g.jsonl", [{"ask": "z"}])
    assert jsonl.read_prompts(g, prompt_field="ask")[0]["prompt"] == "z"


def test_output_resumes_parts_merges_in_input_order_and_refuses_foreign_output(tmp_path):
    from resumable import Output
    inputs = [{"id": str(i), "prompt": "p" * (5 - i)} for i in range(4)]
    out = tmp_path / "o.jsonl"
    w = Output(out, inputs, {"k": 1})
    assert [[r["id"] for r in b] for b in w.batches(2)] == [["3", "2"], ["1", "0"]]  # by length
    w.write([dict(inputs[3], x=3)])
    w.f.write(b'{"id": "2", "pro')  # a crash in the middle of a line
    w.__exit__(RuntimeError, None, None)  # leaving with an exception: no merge
    assert not out.exists() and (tmp_path / "o.jsonl.part0").exists()
    with Output(out, inputs, {"k": 1}) as w:
        assert [r["id"] for r in w.pending] == ["0", "1", "2"]  # the torn record is redone
        w.write([dict(r, x=int(r["id"])) for r in w.pending])
    assert [r["id"] for r in read_jsonl(out)] == ["0", "1", "2", "3"]  # input order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.jsonl.run.json"]
    before = out.read_bytes()
    with pytest.raises(common.InputError, match=r"was made with --k 1 \(now 2\)"):
        Output(out, inputs, {"k": 2})
    with pytest.raises(common.InputError, match=r"holds id '3', which is not in this input"):
        Output(out, inputs[:3], {"k": 1})
    changed = [dict(inputs[0], prompt="another")] + inputs[1:]
    with pytest.raises(common.InputError, match=r"input record\(s\) 0 changed"):
        Output(out, changed, {"k": 1})
    with pytest.raises(
        common.InputError, match=r"this run reads it, and would write or remove .*o\.jsonl \(--output\)"
    ):
        Output(out, inputs, {"k": 1}, reads=[out])
    assert out.read_bytes() == before  # nothing lost
    with Output(out, inputs, {"k": 2}, overwrite=True) as w:
        assert len(w.pending) == 4
        w.write([dict(r, x=0) for r in w.pending])


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    from resumable import Output
    inputs = [{"id": "a", "prompt": "x"}]
    with Output(tmp_path / "o.jsonl", inputs, {}) as w:
        with pytest.raises(common.InputError, match=r"another run is writing this output \(pid \d+"):
            Output(tmp_path / "o.jsonl", inputs, {})
        w.write([dict(inputs[0], y=1)])
    assert not (tmp_path / "o.jsonl.lock").exists()


def test_write_atomic_leaves_no_temp(tmp_path):
    jsonl.write_jsonl_atomic(tmp_path / "a.jsonl", [{"a": 1}])
    assert read_jsonl(tmp_path / "a.jsonl") == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


def test_sampler_matches_distribution_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    t = torch.ones(20000)
    u = torch.rand(20000, 1, generator=torch.Generator().manual_seed(0))
    out = generation.RowSampler(t, 1.0, u)(None, logits)
    freq = torch.bincount(out.argmax(-1), minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
    out = generation.RowSampler(t, 0.7, u)(None, logits)
    freq = torch.bincount(out.argmax(-1), minlength=4).float() / 20000
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.5 / 0.8) < 0.015  # tail beyond 0.8 mass is cut
    out = generation.RowSampler(torch.zeros(20000), 1.0, u)(None, logits)
    assert (out.argmax(-1) == 0).all()
    assert (out == 0).sum(-1).eq(1).all() and torch.isneginf(out).sum(-1).eq(3).all()  # a one-hot of the drawn token


def flags_of(source):
    return set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', source))


def test_every_stage_documents_its_flags():
    import inspect
    import score
    shared = {"add_common_args": flags_of(inspect.getsource(common.add_common_args)),
              "add_prompt_args": flags_of(inspect.getsource(common.add_prompt_args)),
              "add_judge_args": flags_of(inspect.getsource(score.add_judge_args))}
    from torch.distributed.run import get_args_parser
    theirs = [o for a in get_args_parser()._actions for o in a.option_strings]
    for script in ["sample.py", "score.py", "refine.py", "denoise.py", "pairs.py", "train.py", "evaluate.py"]:
        p = run_here(script, "--help")
        src = (ROOT / script).read_text()
        flags = flags_of(src).union(*(f for name, f in shared.items() if name + "(" in src))
        missing = [f for f in flags if f not in p.stdout]
        assert not missing, f"{script} --help lacks {missing}"
        # torchrun parses every option on its command line: no flag may be one of its own or a prefix of one
        clash = [f for f in flags if any(o.startswith(f) for o in theirs)]
        assert not clash, f"{script}: {clash} clash with torchrun's options"


def test_generate_matches_plain_generate_and_draws_per_row(tiny_model_dir):
    """generation.generate gives, greedy, what a plain `generate` gives one prompt at a time, and
    its samples are reproducible from the seed and depend on a row's key, not its neighbours."""
    from transformers import GenerationConfig
    model, tok = common.load_for_inference(str(tiny_model_dir))
    convs = [generation.user_turn(q) for q in ["Hi", "What is a longer question than the first one?", "Why?"]]
    got = generation.generate(model, tok, convs, max_new_tokens=8, batch_size=3)
    cfg = GenerationConfig(
        max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    for c, text in zip(convs, got):
        enc = tok(generation.chat_text(tok, c), return_tensors="pt", add_special_tokens=False)
        ref = model.generate(**enc, generation_config=cfg)[0, enc["input_ids"].shape[1]:]
        assert text == tok.decode(ref, skip_special_tokens=True).strip()
    a = generation.generate(model, tok, convs * 2, max_new_tokens=8, temperature=[1.0, 0.0, 1.5] * 2, seed=4)
    assert a == generation.generate(model, tok, convs * 2, max_new_tokens=8, temperature=[1.0, 0.0, 1.5] * 2, seed=4)
    assert a[1] == a[4] == got[1]  # temperature 0: the greedy answer
    assert a[0] != a[3] or a[2] != a[5]  # the same prompt under another key draws anew
    b = generation.generate(model, tok, convs[2:], max_new_tokens=8, temperature=[1.5], seed=4, keys=[2], batch_size=1)
    assert b[0] == a[2]  # a row's sample depends on its key, not on its neighbours or the batch size
