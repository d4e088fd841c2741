"""cpu_speed.py: each trick gives what the plain path gives, and the stages run without it."""

import shutil
import subprocess
import sys

import pytest
import torch

import common
import cpu_speed
import generation
import policy_model
import judging
import train
from conftest import read_jsonl, ROOT, run, write_jsonl
from test_train import ARGS, grads, make_examples

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")


def plain_and_fast(model_dir, monkeypatch):
    """The same model twice: as transformers runs it, and as load_for_inference lays it out on the CPU."""
    monkeypatch.setenv("SPA_CPU_SPEED", "0")
    plain = common.load_for_inference(str(model_dir))
    monkeypatch.setenv("SPA_CPU_SPEED", "1")
    return plain, common.load_for_inference(str(model_dir))


@needs_onednn
def test_reordered_linear_computes_what_the_linear_computes():
    lin = torch.nn.Linear(48, 80, bias=False)
    x = torch.randn(3, 5, 48)
    got = cpu_speed.ReorderedLinear(lin)(x)
    assert got.shape == (3, 5, 80) and torch.allclose(got, lin(x), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_onednn_training_step_equals_the_f_linear_step(tiny_model_dir, tokenizer, monkeypatch):
    """One packed step with every linear layer's products on oneDNN (prepare_training) and with
    F.linear: the same loss, log-probs and gradients, the tied vocabulary head's included; the
    oneDNN products really ran, in forward and backward."""
    ex = make_examples(tokenizer)
    calls = []
    product = cpu_speed.onednn_product
    monkeypatch.setattr(cpu_speed, "onednn_product", lambda a, b: calls.append(a.requires_grad) or product(a, b))
    out = {}
    for onednn in (False, True):
        model, _ = common.load_model(str(tiny_model_dir))
        if onednn:
            cpu_speed.prepare_training(model)
            assert sum(isinstance(m, cpu_speed.OneDnnLinear) for m in model.modules()) == 2 * 7 + 1
        policy = policy_model.Policy(model, head_chunk=5, pack=True).train()
        with torch.no_grad():
            lp = policy_model.sequence_logps(policy, ex, tokenizer.pad_token_id)
        calls.clear()
        s, _ = train.train_step(policy, ex, [[0, 1], [2, 3]], ARGS, tokenizer.pad_token_id)
        out[onednn] = (torch.cat(lp), grads(model), s["loss"], model.get_input_embeddings().weight.grad.clone())
    (lp0, g0, l0, e0), (lp1, g1, l1, e1) = out[False], out[True]
    # forward products take activations that require gradients; backward's two per product (dx, dW) take dy
    assert calls.count(False) >= calls.count(True) >= 15
    assert torch.allclose(lp0, lp1, atol=1e-4, rtol=1e-5)
    assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-4) and g0.abs().sum() > 0
    assert torch.allclose(e0, e1, atol=1e-6, rtol=1e-4) and e0.abs().sum() > 0
    assert l0 == pytest.approx(l1, rel=1e-5)


def test_grouped_attention_gives_the_plain_logits(tiny_model_dir, tokenizer, monkeypatch):
    """Padded prompts (so a mask is passed) through the tiny model, whose two query heads share
    one key/value head: the same logits at every real position with either attention."""
    (plain, _), (fast, _) = plain_and_fast(tiny_model_dir, monkeypatch)
    assert fast.config._attn_implementation == cpu_speed.ATTENTION != plain.config._attn_implementation
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a b c d e f g h", "x", "one two three")]
    T = max(map(len, seqs))
    ids = torch.tensor([[tokenizer.pad_token_id] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        a, b = (
            m(input_ids=ids, attention_mask=mask, position_ids=cpu_speed.positions(mask)).logits for m in (plain, fast)
        )
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5, rtol=1e-5) and a[real].std() > 0


def real_kv(cache, mask):
    """Keys and values at the real (unpadded) prompt positions, in row and position order."""
    real = mask[:, :-1].bool()
    n = real.shape[1]
    return [(c.keys[:, :, :n].transpose(1, 2)[real], c.values[:, :, :n].transpose(1, 2)[real]) for c in cache.layers]


@pytest.mark.parametrize("chunk, interleaved", [(7, False), (40, True)])
def test_prefill_of_a_shared_prefix_and_shared_questions_fills_the_cache_of_one_pass(
    real_model_dir, chunk, interleaved
):
    """Judge-like prompts of different lengths: a prefix all share, runs of rows that also share a
    question (its answers, side by side or interleaved with another question's), and a row alone.
    The prefix prefilled once, each question once for its run, and the tails a few rows at a
    time leave the keys and values that one left-padded pass leaves at every real position."""
    model, tok = common.load_model(str(real_model_dir))
    shared = "Follow these principles: be kind, be honest, refuse harm. " * 3
    questions = {
        "Is it safe to eat raw chicken? Tell me why or why not, in detail.": ["No.", "It is not: salmonella."],
        "What is the capital of France? Answer in one word, please.": ["Paris.", "Lyon.", "It is Paris."],
        "Hi": ["Hello!"],
    }
    convs = [
        generation.user_turn(f"{shared}Question: {q} Answer: {a}") for q, answers in questions.items() for a in answers
    ]
    convs = convs[::2] + convs[1::2] if interleaved else convs
    seqs = [tok(generation.chat_text(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
    ids, mask, h, group, width = cpu_speed.prefix_and_tails(seqs, tok.pad_token_id)
    runs = [0, 1, 1, 0, 1, 2] if interleaved else [0, 0, 1, 1, 1, 2]  # a run is found wherever its rows are
    assert h > 20 and width >= cpu_speed.MIN_SHARED and group == runs  # both levels are under test
    T = max(map(len, seqs))
    left = (
        torch.tensor([[0] * (T - len(s)) + s for s in seqs]),
        torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs]),
    )
    with torch.no_grad():
        plain = cpu_speed.prefilled_cache(model, *left, 0, 4, chunk_tokens=0)  # left padding, nothing shared
        grouped = cpu_speed.prefilled_cache(model, ids, mask, h, 4, chunk_tokens=chunk, group=group, width=width)
    for (k0, v0), (k1, v1) in zip(real_kv(plain, left[1]), real_kv(grouped, mask)):
        assert torch.allclose(k0, k1, atol=1e-4) and torch.allclose(v0, v1, atol=1e-4)
    assert cpu_speed.common_prefix_length([[1, 2, 3, 4], [1, 2, 5, 6, 7]]) == 2
    assert cpu_speed.common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 1  # two tokens stay in each tail


def test_the_cpu_path_writes_the_plain_text_and_scores(real_model_dir, monkeypatch):
    """The embedded model, laid out for the CPU and plain: greedy and sampled answers identical,
    judge distributions equal to float tolerance (the judges' expected ratings, which the demo
    rounds), a question's judge prompts side by side; the shared-prefix prefill ran, at both levels."""
    (plain, tok), (fast, _) = plain_and_fast(real_model_dir, monkeypatch)
    prefixes, widths = [], []
    real = cpu_speed.shared_cache
    monkeypatch.setattr(cpu_speed, "shared_cache", lambda *a: prefixes.append(a[4]) or widths.append(a[5]) or real(*a))
    convs = [
        generation.user_turn(q)
        for q in ("How do I boil an egg?", "Tell me how to pick a lock.", "What is 12 times 12?")
    ]
    texts = [generation.generate(m, tok, convs, max_new_tokens=24, batch_size=3) for m in (plain, fast)]
    assert texts[0] == texts[1] and all(texts[0]) and prefixes and prefixes[0] > 10
    sampled = [
        generation.generate(m, tok, convs, max_new_tokens=16, temperature=1.0, batch_size=3, keys=["a", "b", "c"])
        for m in (plain, fast)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != texts[0]
    items = [(c[0]["content"], t) for c, *answers in zip(convs, texts[0], sampled[0]) for t in answers]
    judge = [judging.judge_conversation("harmlessness", q, t) for q, t in items]
    widths.clear()
    p0, p1 = (judging.rating_distribution(m, tok, judge, 6, groups=[q for q, _ in items]) for m in (plain, fast))
    assert torch.allclose(p0, p1, atol=1e-4) and float(p0.std()) > 0 and widths[0] >= cpu_speed.MIN_SHARED
    kept = fast._spa_prefix[0]  # the judge's prefix (the generation's before it), kept for the next batch
    p2 = judging.rating_distribution(fast, tok, judge, 2, groups=[q for q, _ in items])  # three batches reuse it
    assert len(kept) > 200 and torch.allclose(p0, p2, atol=1e-4)
    helpful = [judging.judge_conversation("helpfulness", q, t) for q, t in items]  # a prefix as long, not the same
    h0, h1 = (judging.rating_distribution(m, tok, helpful, 6) for m in (plain, fast))
    assert torch.allclose(h0, h1, atol=1e-4) and fast._spa_prefix[0] != kept


def test_the_stages_run_without_the_module(tmp_path, tiny_model_dir):
    """A copy of the project without cpu_speed.py samples, scores and trains (packing's default
    included) what SPA_CPU_SPEED=0 does with it."""
    import json
    import os

    from safetensors.torch import load_file

    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT, tree, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "tests", "cpu_speed.py", "__pycache__")
    )
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"Is thing {i} safe?"} for i in range(3)])
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"id": str(i), "prompt": f"Q{i}?", "chosen": "Careful. " * (i + 1), "rejected": "No.", "gap": 1 + i % 2}
            for i in range(4)
        ],
    )
    for where, env in ((tree, {}), (ROOT, {"SPA_CPU_SPEED": "0"})):
        out = tmp_path / where.name
        steps = [
            (
                "sample.py",
                "--input",
                prompts,
                "--output",
                out / "s.jsonl",
                "--num-candidates",
                2,
                "--max-new-tokens",
                4,
            ),
            ("score.py", "--input", out / "s.jsonl", "--output", out / "scored.jsonl", "--mode", "logits"),
            ("train.py", "--input", pairs, "--output", out / "model", "--batch-size", 2, "--grad-accum", 1),
        ]
        for script, *args in steps:
            p = subprocess.run(
                [sys.executable, str(where / script), "--model", str(tiny_model_dir), *map(str, args)],
                capture_output=True,
                text=True,
                env=dict(os.environ, **env),
            )
            assert p.returncode == 0, p.stderr[-2000:]
    a, b = tmp_path / "tree", tmp_path / ROOT.name
    for f in ("s.jsonl", "scored.jsonl"):
        assert read_jsonl(a / f) == read_jsonl(b / f)
    assert json.loads((a / "model" / "train_config.json").read_text())["pack"] is False
    assert json.loads((b / "model" / "train_config.json").read_text())["pack"] is False
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert run("sample.py", "--help").returncode == 0
