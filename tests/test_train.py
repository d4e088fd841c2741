"""Eq. 3 and its variants, the weights over an optimizer step, answer tokens, the loop."""

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

import common
import policy_model
import preference_data
import train

from conftest import read_jsonl, run, write_jsonl

LS = lambda x: math.log(1 / (1 + math.exp(-x)))  # log sigmoid


def test_losses_against_hand_computed_values():
    lp_c, lp_r = torch.tensor([-10.0, -6.0]), torch.tensor([-20.0, -4.0])
    n_c, n_r = torch.tensor([5.0, 3.0]), torch.tensor([4.0, 2.0])
    beta, gamma = 2.0, 0.5
    # simpo: r = beta * logp / n -> pair 1: -4 vs -10, pair 2: -4 vs -4
    loss, rc, rr = train.preference_losses(lp_c, lp_r, n_c, n_r, None, "simpo", beta, gamma)
    assert rc.tolist() == [-4.0, -4.0] and rr.tolist() == [-10.0, -4.0]
    assert loss.tolist() == pytest.approx([-LS(6 - 0.5), -LS(0 - 0.5)])
    # spa: gaps 3 and 1, mean 2 -> w = 1.5, 0.5 (alpha 1); alpha 2 -> 2.25, 0.25
    w = train.uncertainty_weights(torch.tensor([3.0, 1.0]), 2.0, 1.0)
    assert w.tolist() == [1.5, 0.5]
    assert train.uncertainty_weights(torch.tensor([3.0, 1.0]), 2.0, 2.0).tolist() == [2.25, 0.25]
    loss, _, _ = train.preference_losses(lp_c, lp_r, n_c, n_r, w, "spa", beta, gamma)
    assert loss.tolist() == pytest.approx([-1.5 * LS(5.5), -0.5 * LS(-0.5)])
    # dpo: reference -12, -18 and -5, -5; beta 0.1 -> r_c = 0.1*2, r_r = 0.1*-2 ; r_c = 0.1*-1, r_r = 0.1*1
    loss, rc, rr = train.preference_losses(
        lp_c, lp_r, n_c, n_r, None, "dpo", 0.1, gamma, torch.tensor([-12.0, -5.0]), torch.tensor([-18.0, -5.0])
    )
    assert rc.tolist() == pytest.approx([0.2, -0.1]) and rr.tolist() == pytest.approx([-0.2, 0.1])
    assert loss.tolist() == pytest.approx([-LS(0.4), -LS(-0.2)])
    # sft: mean NLL of the chosen tokens
    loss, _, _ = train.preference_losses(lp_c, lp_r, n_c, n_r, None, "sft", beta, gamma)
    assert loss.tolist() == pytest.approx([2.0, 2.0])


def test_all_zero_gaps_give_weight_one_and_zero_gap_gets_zero():
    assert train.uncertainty_weights(torch.zeros(3), 0.0, 1.0).tolist() == [1.0, 1.0, 1.0]
    assert train.uncertainty_weights(torch.tensor([0.0, 2.0]), 1.0, 1.0).tolist() == [0.0, 2.0]


def test_answer_logps_only_reads_answer_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    lp, n = policy_model.answer_logps(logits, torch.nn.Identity(), ids, mask)
    full = logits.log_softmax(-1)
    expect = [full[0, 2, ids[0, 3]] + full[0, 3, ids[0, 4]], sum(full[1, t - 1, ids[1, t]] for t in range(2, 6))]
    assert torch.allclose(lp, torch.stack(expect)) and n.tolist() == [2, 4]
    # changing the prompt's tokens and the logits there changes nothing at the answer positions
    ids2, logits2 = ids.clone(), logits.clone()
    ids2[0, :2], logits2[0, :2] = 3, 0.0
    assert torch.equal(policy_model.answer_logps(logits2, torch.nn.Identity(), ids2, mask)[0], lp)


def test_chunked_head_gives_the_same_log_probs_and_gradients():
    """Chunks of 2 positions, recomputed in backward, equal one pass over all positions."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=False)
    ids = torch.randint(0, 13, (3, 7))
    mask = torch.rand(3, 7) > 0.3
    results = []
    for chunk in (2, 1000):
        hidden = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        head.zero_grad()
        lp, _ = policy_model.answer_logps(hidden, head, ids, mask, chunk=chunk)
        (lp * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((lp.detach(), hidden.grad, head.weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)
    assert results[0][2].abs().sum() > 0


def test_answer_logps_match_the_full_forward(tiny_model_dir, tokenizer):
    """The projection at answer positions only gives the log-probs of a plain full forward."""
    model, _ = common.load_model(str(tiny_model_dir))
    ex = make_examples(tokenizer, 2)
    lp_c, lp_r, n_c, _ = policy_model.sequence_logps(policy_model.Policy(model), ex, tokenizer.pad_token_id)
    ids, n_p = ex[0]["chosen"]
    full = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expect = sum(full[t - 1, ids[t]] for t in range(n_p, len(ids)))
    assert torch.allclose(lp_c[0], expect, atol=1e-4) and n_c[0] == len(ids) - n_p


def test_prompt_tokens_do_not_change_masked_answer_logps(tiny_model_dir, tokenizer):
    model, _ = common.load_model(str(tiny_model_dir))
    ex = lambda prompt: {
        "chosen": preference_data.tokenize_answer(tokenizer, prompt, "Stay safe.", 64),
        "rejected": preference_data.tokenize_answer(tokenizer, prompt, "No.", 64),
        "gap": 1.0,
    }
    a, b = ex("Is it safe?"), ex("Is this dangerous thing actually safe to do at home?")
    ida, na = a["chosen"]
    idb, nb = b["chosen"]
    assert ida[na:] == idb[nb:] and ida[:na] != idb[:nb]  # same answer tokens after different prompts
    mask = preference_data.collate([a], tokenizer.pad_token_id)["answer_mask"]
    assert mask[0].sum() == len(ida) - na


def test_one_bos_and_prompt_is_a_prefix(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.bos_token = "<|endoftext|>"  # a template that starts with a BOS, as Llama 3's does
    tok.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    ids, n_prompt = preference_data.tokenize_answer(tok, "Hello?", "Hi there.", 128)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[n_prompt:]) == "Hi there.<|im_end|>\n"  # answer side, end of turn included


def test_truncation_drops_long_prompts_and_empty_answers(tmp_path, tokenizer):
    long = "word " * 200
    f = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "ok", "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "gap": 2},
            {"id": "long", "prompt": long, "chosen": "a", "rejected": "b", "gap": 2},
        ],
    )
    ex, dropped = preference_data.load_pairs(f, tokenizer, 100)
    assert [e["id"] for e in ex] == ["ok"]
    assert dropped == {"prompt_too_long": 1, "empty_answer": 0, "identical_after_truncation": 0, "truncated": 0}
    n_prompt = preference_data.tokenize_answer(tokenizer, "Hi", "x", 10_000)[1]
    ex, dropped = preference_data.load_pairs(f, tokenizer, n_prompt + 1, limit=1)  # one answer token fits
    assert len(ex) == 1
    assert preference_data.tokenize_answer(tokenizer, "Hi", "Hello!", n_prompt) == "prompt_too_long"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(common.InputError, match="denoising or the margin removed everything"):
        preference_data.load_pairs(tmp_path / "empty.jsonl", tokenizer, 100)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "gap": 1}])
    with pytest.raises(common.InputError, match=r"bad\.jsonl:1: missing field 'rejected'"):
        preference_data.load_pairs(bad, tokenizer, 100)


def make_examples(tokenizer, n=4):
    texts = [
        ("Is it safe to mix bleach and ammonia?", "No, it makes toxic gas.", "Sure, go ahead."),
        ("What is 2+2?", "4.", "5, obviously, as everyone knows."),
        ("Can I stop my antibiotics early?", "Ask your doctor first.", "Yes."),
        ("Where does my neighbour live?", "I can't share that.", "At 12 Main St."),
    ]
    return [
        {
            "chosen": preference_data.tokenize_answer(tokenizer, p, c, 128),
            "rejected": preference_data.tokenize_answer(tokenizer, p, r, 128),
            "gap": float(g),
            "id": str(i),
            "line": i,
        }
        for i, ((p, c, r), g) in enumerate(zip(texts[:n], [3, 1, 0, 4]))
    ]


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulation_gives_the_same_gradient(tiny_model_dir, tokenizer):
    ex = make_examples(tokenizer)
    args = SimpleNamespace(loss="spa", alpha=1.0, beta=2.5, gamma=1.375)
    out = []
    for micro in ([[0], [1], [2], [3]], [[0, 1, 2, 3]]):
        model, _ = common.load_model(str(tiny_model_dir))
        s, n = train.train_step(policy_model.Policy(model, head_chunk=7), ex, micro, args, tokenizer.pad_token_id)
        assert n == 4 and s["zero_w"] == 1  # the pair with gap 0 has weight 0
        out.append((grads(model), s["loss"]))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert out[0][1] == pytest.approx(out[1][1], abs=1e-5)


def test_a_few_steps_raise_the_margin(tmp_path, tiny_model_dir, tokenizer):
    pairs = [
        {"id": str(i), "prompt": p, "chosen": c, "rejected": r, "gap": 2}
        for i, (p, c, r) in enumerate(
            [("Hi", "Hello, how can I help?", "Go away."), ("Is fire hot?", "Yes, fire is hot.", "No.")]
        )
    ]
    f = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run(
        "train.py",
        "--input",
        f,
        "--output",
        tmp_path / "m",
        "--model",
        tiny_model_dir,
        "--lr",
        3e-3,
        "--epochs",
        8,
        "--batch-size",
        2,
        "--grad-accum",
        1,
        "--warmup-ratio",
        0,
        "--save-every",
        0,
    )
    m = read_jsonl(tmp_path / "m" / "metrics.jsonl")
    assert len(m) == 8
    assert m[-1]["rewards/margins"] > m[0]["rewards/margins"] + 0.1
    assert set(m[0]) >= {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "logps/chosen",
        "weight/mean",
        "weight/min",
        "weight/max",
        "weight/zero",
        "lr",
        "grad_norm",
        "tokens_per_s",
    }


ARGS = SimpleNamespace(loss="spa", alpha=1.0, beta=2.5, gamma=1.375)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_step_equals_the_padded_step(tiny_model_dir, tokenizer, checkpointing):
    """One step over pairs of different lengths: packed (one row, attention within each
    sequence) and padded give the same loss, log-probs and gradients."""
    ex = make_examples(tokenizer)
    assert len({len(e["chosen"][0]) for e in ex} | {len(e["rejected"][0]) for e in ex}) > 2  # padding would differ
    out = {}
    for pack in (False, True):
        model, _ = common.load_model(str(tiny_model_dir))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        policy = policy_model.Policy(model, head_chunk=5, pack=pack).train()
        with torch.no_grad():
            lp = policy_model.sequence_logps(policy, ex, tokenizer.pad_token_id)
        s, _ = train.train_step(policy, ex, [[0, 1], [2, 3]], ARGS, tokenizer.pad_token_id)
        out[pack] = (torch.cat(lp), grads(model), s["loss"])
    (lp0, g0, l0), (lp1, g1, l1) = out[False], out[True]
    assert torch.allclose(lp0, lp1, atol=1e-4, rtol=1e-5)
    assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-4) and g0.abs().sum() > 0
    assert l0 == pytest.approx(l1, rel=1e-5)


def test_packed_attention_sees_only_its_own_sequence(tiny_model_dir, tokenizer):
    """A sequence's log-probs do not depend on what is packed before it."""
    ex = make_examples(tokenizer)
    model, _ = common.load_model(str(tiny_model_dir))
    policy = policy_model.Policy(model, pack=True).eval()
    with torch.no_grad():
        alone = policy_model.sequence_logps(policy, ex[3:], tokenizer.pad_token_id)[0]
        after_others = policy_model.sequence_logps(policy, ex, tokenizer.pad_token_id)[0][3:]
    assert torch.allclose(alone, after_others, atol=1e-5)


def test_fused_adamw_steps_like_the_foreach_adamw():
    """train.py's fused AdamW (one kernel, no temporaries) makes the steps torch's default makes."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=g), torch.randn(7, generator=g)]
    grads_seq = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(3)]
    out = []
    for fused in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused, foreach=not fused)
        for gs in grads_seq:
            for p, gr in zip(params, gs):
                p.grad = gr.clone()
            opt.step()
        out.append(torch.cat([p.detach().flatten() for p in params]))
    assert torch.allclose(out[0], out[1], atol=1e-6) and not torch.allclose(
        out[0], torch.cat([p.flatten() for p in start])
    )


@pytest.mark.parametrize("gap", [-4, float("nan"), float("inf"), "3", True, "abc", None])
def test_gaps_are_validated(tmp_path, tokenizer, gap):
    text = json.dumps(
        {"prompt": "q", "chosen": "a", "rejected": "b", "gap": gap}
    )  # NaN, Infinity as Python writes them
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "gap": 1}) + "\n" + text + "\n"
    )
    with pytest.raises(common.InputError, match=r"p\.jsonl:2: gap must be a finite number >= 0"):
        preference_data.load_pairs(tmp_path / "p.jsonl", tokenizer, 64)


def test_truncated_pairs_are_counted_and_those_cut_to_the_same_tokens_dropped(tmp_path, tokenizer):
    """Two answers that share their beginning, cut inside it, would train as a pair of equal
    texts at their full gap weight: dropped and counted; a pair cut where they still differ is
    kept and counted as truncated; the log says both."""
    rows = [
        {
            "id": "same",
            "prompt": "Hi",
            "chosen": "The answer is yes, of course.",
            "rejected": "The answer is no.",
            "gap": 3,
        },
        {
            "id": "differ",
            "prompt": "Hi",
            "chosen": "Yes, gladly, here it is.",
            "rejected": "No, never, go away.",
            "gap": 2,
        },
    ]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    n_prompt = preference_data.tokenize_answer(tokenizer, "Hi", "x", 10_000)[1]
    ex, counts = preference_data.load_pairs(f, tokenizer, n_prompt + 2)  # two answer tokens: "The answer"
    assert [e["id"] for e in ex] == ["differ"]
    assert counts == {"prompt_too_long": 0, "empty_answer": 0, "identical_after_truncation": 1, "truncated": 1}
    ex, counts = preference_data.load_pairs(f, tokenizer, 10_000)  # nothing cut: both kept, none counted
    assert len(ex) == 2 and counts["truncated"] == counts["identical_after_truncation"] == 0


def test_metrics_svg_draws_the_chosen_and_rejected_rewards(tmp_path):
    import xml.etree.ElementTree as ET

    import metrics_log

    rows = [{"step": 0, "eval_loss": 1.0, "eval_rewards/chosen": -2.0, "eval_rewards/rejected": -2.5}]
    rows += [
        {
            "step": s,
            "loss": 1.0 / s,
            "rewards/chosen": -2.0 - s,
            "rewards/rejected": -3.0 - 2 * s,
            "rewards/margins": 1.0 + s,
            "rewards/accuracies": 0.5,
        }
        for s in (1, 2)
    ]
    root = ET.fromstring(metrics_log.training_svg(rows))
    series = {
        (g.get("data-panel"), g.get("data-name")): len(list(g.iter("{http://www.w3.org/2000/svg}circle")))
        for g in root.iter("{http://www.w3.org/2000/svg}g")
    }
    assert series[("chosen reward", "train")] == 2 and series[("rejected reward", "train")] == 2
    assert series[("chosen reward", "eval")] == 1 and series[("rejected reward", "eval")] == 1
    assert metrics_log.trl_names(rows[0]) == {
        "eval/loss": 1.0,
        "eval/rewards/chosen": -2.0,
        "eval/rewards/rejected": -2.5,
    }


def test_report_to_tensorboard_writes_event_files_or_names_the_package(tmp_path, monkeypatch):
    import metrics_log

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "tensorboard", None)
        with pytest.raises(common.InputError, match="--report-to tensorboard needs the package tensorboard"):
            metrics_log.tracker("tensorboard", tmp_path, {})
        pytest.skip("tensorboard is not installed (an optional package): its absence is what was tested")
    m = metrics_log.Metrics(tmp_path / "metrics.jsonl", 0, "tensorboard")
    m.write({"step": 1, "loss": 0.5, "rewards/chosen": -1.0})
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))
