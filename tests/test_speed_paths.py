"""Every speed path gives what the plain path gives (issue 15): each pair of runs differs
only in the path taken, and must agree to float tolerance."""
from types import SimpleNamespace

import pytest
import torch

import common
import policy_model
import train
from test_train import grads, make_examples

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


def test_two_level_inverse_cdf_draws_what_one_scan_draws():
    """generation.inverse_cdf (block sums, then one block) picks the token a single float64
    cumulative sum over the whole vocabulary picks, for random rows, vocabularies that are
    not a multiple of the block, and zero-probability tokens."""
    import generation
    g = torch.Generator().manual_seed(0)
    for V, block in ((49152, 1024), (1000, 64), (37, 8)):
        w = torch.rand(300, V, generator=g) ** 8  # peaked rows
        w[:, ::3] = 0.0
        u = torch.rand(300, generator=g)
        cdf = w.double().cumsum(-1)
        expect = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None])[:, 0]
        got = generation.inverse_cdf(w, u, block)
        assert torch.equal(got, expect) and (w[torch.arange(300), got] > 0).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_head_prefill_generates_what_left_padding_generates(real_model_dir, temperature):
    """Prompts that share a long head (as refine's and the judges' do): the head prefilled
    once for the batch gives the same text as plain left-padded prompts, greedy and sampled."""
    import generation
    model, tok = common.load_model(str(real_model_dir))
    head = "Follow these principles: be kind, be honest, refuse harm. " * 4
    convs = [generation.user_turn(head + q) for q in ("Hi", "What is the capital of France?", "Can I mix bleach and "
                                                      "ammonia to clean my very dirty bathroom floor?")]
    seqs = [tok(generation.chat_text(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
    assert generation.head_and_tails(seqs, tok.pad_token_id)[2] > 20  # the path under test shares a head
    out = [generation.generate(model, tok, convs, max_new_tokens=12, temperature=temperature, num_return=2,
                               batch_size=3, share_head=share) for share in (False, True)]
    assert out[0] == out[1] and len({a for texts in out[0] for a in texts}) >= 3 and all(out[0])


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
    assert torch.allclose(out[0], out[1], atol=1e-6) and not torch.allclose(out[0], torch.cat([p.flatten() for p in start]))
