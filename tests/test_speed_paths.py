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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_onednn_step_equals_the_f_linear_step(tiny_model_dir, tokenizer, checkpointing, monkeypatch):
    """One packed step with every linear layer's products on oneDNN (train.py's default on the
    CPU in float32) and with F.linear: the same loss, log-probs and gradients, the tied
    vocabulary head's included; the oneDNN products really ran, in forward and backward."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    ex = make_examples(tokenizer)
    calls = []
    import inference_model
    product = inference_model.onednn_product
    monkeypatch.setattr(inference_model, "onednn_product", lambda a, b: calls.append(a.requires_grad) or product(a, b))
    out = {}
    for onednn in (False, True):
        model, _ = common.load_model(str(tiny_model_dir))
        if onednn:
            assert policy_model.use_onednn(model) == 2 * 7 + 1  # 7 projections a layer, the vocabulary head
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        policy = policy_model.Policy(model, head_chunk=5, pack=True).train()
        with torch.no_grad():
            lp = policy_model.sequence_logps(policy, ex, tokenizer.pad_token_id)
        calls.clear()
        s, _ = train.train_step(policy, ex, [[0, 1], [2, 3]], ARGS, tokenizer.pad_token_id)
        out[onednn] = (torch.cat(lp), grads(model), s["loss"], model.get_input_embeddings().weight.grad.clone())
    (lp0, g0, l0, e0), (lp1, g1, l1, e1) = out[False], out[True]
    # in the step, forward products (and checkpointing's recomputed ones) take activations that
    # require gradients, backward's two per forward product (dx, dW) take dy, which does not
    assert calls.count(False) >= calls.count(True) >= 2 * 15
    assert torch.allclose(lp0, lp1, atol=1e-4, rtol=1e-5)
    assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-4) and g0.abs().sum() > 0
    assert torch.allclose(e0, e1, atol=1e-6, rtol=1e-4) and e0.abs().sum() > 0
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


def real_kv(cache, mask):
    """Keys and values at the real (unpadded) prompt positions, in row and position order."""
    real = mask[:, :-1].bool()
    n = real.shape[1]
    return [(l.keys[:, :, :n].transpose(1, 2)[real], l.values[:, :, :n].transpose(1, 2)[real]) for l in cache.layers]


def test_shared_head_prefill_fills_the_cache_left_padding_fills(real_model_dir):
    """Prompts that share a long head (as refine's and the judges' do): the head prefilled
    once for the batch leaves the keys and values that plain left padding leaves, and greedy
    decoding writes the same text. (Sampled text is not compared: a float-rounding difference
    in the logits may move a draw across a token boundary; measured here on the code before
    and after issue 15's second round alike.)"""
    import generation
    model, tok = common.load_model(str(real_model_dir))
    head = "Follow these principles: be kind, be honest, refuse harm. " * 4
    convs = [generation.user_turn(head + q) for q in ("Hi", "What is the capital of France?", "Can I mix bleach and "
                                                      "ammonia to clean my very dirty bathroom floor?")]
    seqs = [tok(generation.chat_text(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
    layouts = [generation.head_and_tails(seqs, tok.pad_token_id, share) for share in (False, True)]
    assert layouts[1][2] > 20  # the path under test shares a head
    with torch.no_grad():
        kv = [real_kv(generation.prefilled_cache(model, ids, mask, h, 1, 4), mask) for ids, mask, h in layouts]
    for (k0, v0), (k1, v1) in zip(*kv):
        assert torch.allclose(k0, k1, atol=1e-4) and torch.allclose(v0, v1, atol=1e-4)
    out = [generation.generate(model, tok, convs, max_new_tokens=12, batch_size=3, share_head=share)
           for share in (False, True)]
    assert out[0] == out[1] and all(t[0] for t in out[0])
    sampled = [generation.generate(model, tok, convs, max_new_tokens=12, temperature=1.0, num_return=2, batch_size=3)
               for _ in range(2)]
    assert sampled[0] == sampled[1] and len({a for texts in sampled[0] for a in texts}) >= 3  # seeded, diverse


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


# ----------------------------------------------------------------------------- inference layout (inference_model.py)

def plain_and_fast(model_dir, monkeypatch):
    """The same model twice: as transformers runs it, and as common.load_for_inference prepares it."""
    monkeypatch.setenv("SPA_PLAIN_INFERENCE", "1")
    plain = common.load_for_inference(str(model_dir))
    monkeypatch.setenv("SPA_PLAIN_INFERENCE", "0")
    return plain, common.load_for_inference(str(model_dir))


def test_packed_linear_computes_what_the_linear_computes():
    import inference_model
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    lin = torch.nn.Linear(48, 80, bias=False)
    x = torch.randn(3, 5, 48)
    got = inference_model.PackedLinear(lin)(x)
    assert got.shape == (3, 5, 80) and torch.allclose(got, lin(x), atol=1e-5, rtol=1e-5)


def test_grouped_attention_gives_the_plain_logits(tiny_model_dir, tokenizer, monkeypatch):
    """Padded prompts (so a mask is passed) through the tiny model, whose two query heads share
    one key/value head: the same logits at every real position with either layout."""
    import generation
    (plain, _), (fast, _) = plain_and_fast(tiny_model_dir, monkeypatch)
    assert fast.config._attn_implementation == "spa_inference" and plain.config._attn_implementation != "spa_inference"
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a b c d e f g h", "x", "one two three")]
    ids, mask, _ = generation.head_and_tails(seqs, tokenizer.pad_token_id, share_head=False)
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask, position_ids=generation.positions(mask)).logits for m in (plain, fast))
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5, rtol=1e-5) and a[real].std() > 0


def test_attention_over_a_shared_head_is_the_one_pass_attention():
    """The head read once and merged with each row's tail (inference_model.head_then_tail_attention)
    against one SDPA pass over the whole keys; one query has no tail key at all (a pad)."""
    import inference_model
    torch.manual_seed(0)
    B, KV, M, D, S, head = 3, 2, 5, 8, 9, 4
    q, key, value = torch.randn(B, KV, M, D), torch.randn(B, KV, S, D), torch.randn(B, KV, S, D)
    key[:, :, :head], value[:, :, :head] = key[:1, :, :head], value[:1, :, :head]
    mask = torch.rand(B, 1, M, S) > 0.4
    mask[..., :head] = True
    mask[1, 0, 2, head:] = False
    want = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=0.3)
    got = inference_model.head_then_tail_attention(q, key, value, mask, head, 0.3)
    assert torch.allclose(got, want, atol=1e-5) and want.std() > 0


def test_attention_over_a_prefix_shared_by_runs_of_rows_is_the_one_pass_attention():
    """Each run of 2 rows (a prompt's samples) shares its first keys, some of them padding:
    read once per run from its first row, merged with each row's own keys; the other rows'
    copies hold garbage (prefilled_cache does not write them) and must not be read."""
    import inference_model
    torch.manual_seed(0)
    B, KV, M, D, S, head, n = 6, 2, 3, 8, 9, 5, 2
    q, key, value = torch.randn(B, KV, M, D), torch.randn(B, KV, S, D), torch.randn(B, KV, S, D)
    key[:, :, :head] = key[::n, :, :head].repeat_interleave(n, 0)
    value[:, :, :head] = value[::n, :, :head].repeat_interleave(n, 0)
    mask = torch.rand(B, 1, 1, S) > 0.3
    mask[..., :head] = (torch.rand(B // n, 1, 1, head) > 0.3).repeat_interleave(n, 0)
    mask[:, :, :, 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=0.3)
    key[1::n, :, :head], value[1::n, :, :head] = float("nan"), float("nan")
    got = inference_model.head_then_tail_attention(q, key, value, mask, head, 0.3, n)
    assert torch.allclose(got, want, atol=1e-5) and want.std() > 0


def test_samples_read_their_prompt_once_and_write_the_plain_text(real_model_dir, monkeypatch):
    """Greedy samples (2 per prompt) with each prompt's keys read once for its samples and
    written to their first row only: the plain model's text; the split ran."""
    import generation
    import inference_model
    (plain, tok), (fast, _) = plain_and_fast(real_model_dir, monkeypatch)
    runs = []
    monkeypatch.setattr(inference_model, "MIN_SHARED_PREFIX", 1)  # these prompts are short
    real = inference_model.head_then_tail_attention
    monkeypatch.setattr(inference_model, "head_then_tail_attention", lambda *a: runs.append(a[-1]) or real(*a))
    convs = [generation.user_turn(q) for q in ("How do I boil an egg?", "Name a colour.", "What is 12 times 12?")]
    texts = [generation.generate(m, tok, convs, max_new_tokens=16, batch_size=3, num_return=2) for m in (plain, fast)]
    assert texts[0] == texts[1] and set(runs) == {2} and all(t[0] for t in texts[0])


def test_samples_read_their_prompt_once_without_grouped_query_heads(tmp_path, tokenizer, monkeypatch):
    """A model with as many key/value heads as query heads (no grouped-query attention): the
    split still runs (the copies it leaves unwritten must never be read) and greedy samples
    are the plain model's."""
    import generation
    import inference_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (plain, tok), (fast, _) = plain_and_fast(tmp_path, monkeypatch)
    runs = []
    monkeypatch.setattr(inference_model, "MIN_SHARED_PREFIX", 1)
    real = inference_model.head_then_tail_attention
    monkeypatch.setattr(inference_model, "head_then_tail_attention", lambda *a: runs.append(a[-1]) or real(*a))
    convs = [generation.user_turn(q) for q in ("How do I boil an egg?", "Name a colour.")]
    texts = [generation.generate(m, tok, convs, max_new_tokens=8, batch_size=2, num_return=2) for m in (plain, fast)]
    assert texts[0] == texts[1] and set(runs) == {2}


def test_filled_length_of_a_static_cache_mask():
    import inference_model
    mask = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    mask[0, 0, 0, 2:5] = True
    mask[1, 0, 0, :3] = True
    assert inference_model.filled_length(mask) == 5


@pytest.mark.parametrize("chunk", [7, 40])
def test_prefill_in_row_groups_fills_the_cache_of_one_pass(real_model_dir, chunk):
    """Prompts of different lengths after a shared head: prefilled a few rows at a time (each
    group padded to its own longest tail), the cache holds the keys and values of one pass
    over all rows at every real position, and greedy decoding writes the same text."""
    import generation
    model, tok = common.load_model(str(real_model_dir))
    head = "Follow these principles: be kind, be honest, refuse harm. " * 3
    convs = [generation.user_turn(head + q) for q in ("Hi", "What is the capital of France? Answer in one word.",
                                                      "Name a colour.", "Is it safe to eat raw chicken? Why or why not?")]
    seqs = sorted((tok(generation.chat_text(tok, c), add_special_tokens=False)["input_ids"] for c in convs), key=len)
    ids, mask, h = generation.head_and_tails(seqs, tok.pad_token_id)
    with torch.no_grad():
        one, grouped = (generation.prefilled_cache(model, ids, mask, h, 2, 4, chunk_tokens=c) for c in (0, chunk))
    m2 = mask.repeat_interleave(2, 0)
    for (k0, v0), (k1, v1) in zip(real_kv(one, m2), real_kv(grouped, m2)):
        assert torch.allclose(k0, k1, atol=1e-4) and torch.allclose(v0, v1, atol=1e-4)
    old = generation.PREFILL_TOKENS
    texts = []
    for c in (0, chunk):
        generation.PREFILL_TOKENS = c
        try:
            texts.append(generation.generate(model, tok, convs, max_new_tokens=10, batch_size=4))
        finally:
            generation.PREFILL_TOKENS = old
    assert texts[0] == texts[1] and all(t[0] for t in texts[0])


def test_fast_inference_writes_the_plain_text_and_scores(real_model_dir, monkeypatch):
    """The embedded model, prepared and plain: greedy answers identical, judge distributions
    equal to float tolerance (the judges' expected ratings, which the demo rounds)."""
    import generation
    import score
    import inference_model
    (plain, tok), (fast, _) = plain_and_fast(real_model_dir, monkeypatch)
    merged = []  # decoding read the shared head (the chat template's system prompt) once
    monkeypatch.setattr(inference_model, "MIN_SHARED_HEAD", 1)  # the demo's heads are longer than these prompts'
    real = inference_model.head_then_tail_attention
    monkeypatch.setattr(inference_model, "head_then_tail_attention", lambda *a: merged.append(a[2].shape[2]) or real(*a))
    convs = [generation.user_turn(q) for q in ("How do I boil an egg?", "Tell me how to pick a lock.",
                                               "What is 12 times 12?")]
    texts = [generation.generate(m, tok, convs, max_new_tokens=24, batch_size=3) for m in (plain, fast)]
    assert texts[0] == texts[1] and merged
    judge = [score.judge_conversation("harmlessness", c[0]["content"], t[0]) for c, t in zip(convs, texts[0])]
    p0, p1 = (score.rating_distribution(m, tok, judge, batch_size=3) for m in (plain, fast))
    assert torch.allclose(p0, p1, atol=1e-4) and float(p0.std()) > 0
