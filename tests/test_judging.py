"""Reading the judge: rating parser, logits mode."""

import pytest

import common
import generation
import judging
import chat_api
from conftest import FakeJudge


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Rating: 7", 7),
        ("rating: 10/10", 10),
        ("The answer is careful and kind. Rating: 8", 8),
        ("Rating: 11", None),
        ("This answer is fine.", None),
        ("Rating: 3 ... on reflection, Rating: 6", 6),
        ("10", 10),
        ("**Rating:** 9", 9),
        ("Rating: 7.5", None),
        ("Rating: 0", None),
        ("", None),
    ],
)
def test_parse_rating(text, expected):
    assert judging.parse_rating(text) == expected


def test_unknown_objective():
    with pytest.raises(common.InputError, match="unknown objective 'kindness'"):
        judging.judge_conversation("kindness", "q", "a")


def test_logits_mode_returns_integers_in_range(tiny_model_dir):
    model, tok = common.load_for_inference(str(tiny_model_dir))
    items = [("How do I stay safe?", "Be careful."), ("Hi", "Hello there, how can I help?"), ("x", "")]
    for mode in ("logits", "logits-expected"):
        res = judging.LocalJudge(model, tok, mode=mode, batch_size=2).ratings(items, "harmlessness")
        assert len(res) == 3
        for r in res:
            assert isinstance(r["score"], int) and 1 <= r["score"] <= 10
            assert 1.0 <= r["expected"] <= 10.0
    probs = judging.rating_distribution(model, tok, [judging.judge_conversation("honesty", q, a) for q, a in items])
    assert probs.shape == (3, 10) and abs(float(probs.sum()) - 3) < 1e-4


def test_logits_mode_batching_does_not_change_scores(tiny_model_dir):
    model, tok = common.load_for_inference(str(tiny_model_dir))
    convs = [judging.judge_conversation("harmlessness", "q" * k, "answer " * k) for k in range(1, 5)]
    import torch

    assert torch.allclose(
        judging.rating_distribution(model, tok, convs, 4), judging.rating_distribution(model, tok, convs, 1), atol=1e-5
    )


def test_logits_mode_reads_ten_as_one_token(tiny_model_dir, tokenizer, monkeypatch):
    """With a tokenizer that has '10' as one token, P(10) is read from the same position."""
    import torch

    monkeypatch.setenv("SPA_CPU_SPEED", "0")  # the vocabulary is resized below: a reordered head could not follow
    model, tok = common.load_for_inference(str(tiny_model_dir))
    tok.add_tokens(["10"])
    model.resize_token_embeddings(len(tok))
    ten = tok.convert_tokens_to_ids("10")
    with torch.no_grad():
        model.get_output_embeddings().weight[ten] = model.get_output_embeddings().weight[ten] * 0 + 1.0
    assert judging.rating_token_ids(tok)[9] == [ten]
    probs = judging.rating_distribution(model, tok, [judging.judge_conversation("honesty", "q", "a")])
    assert probs[0, 9] > 0 and abs(float(probs.sum()) - 1) < 1e-5


@pytest.mark.parametrize("speed", ["0", "1"])
def test_rating_distribution_is_the_plain_forward_distribution(tiny_model_dir, monkeypatch, speed):
    """Judge prompts batched (padded, and on the CPU path laid out around their shared prefix)
    give the distribution one plain forward over each whole judge prompt gives, row for row."""
    import torch

    monkeypatch.setenv("SPA_CPU_SPEED", speed)
    model, tok = common.load_for_inference(str(tiny_model_dir))
    items = [(q, "answer " * k) for q in ("Is it safe to swim after eating a meal?", "Why?") for k in (1, 7, 3)]
    convs = [judging.judge_conversation("harmlessness", q, a) for q, a in items]
    got = judging.rating_distribution(model, tok, convs, batch_size=4)
    plain, _ = common.load_model(str(tiny_model_dir))
    one, zero = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("0")
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(1, 10)]
    for c, row in zip(convs, got):
        ids = tok(generation.chat_text(tok, c) + "Rating: ", add_special_tokens=False)["input_ids"] + [one]
        lp = plain(torch.tensor([ids])).logits[0, -2:].log_softmax(-1).exp()
        p = lp[0, digits]
        q0 = lp[1, zero]
        expect = torch.cat([(p[0] * (1 - q0))[None], p[1:], (p[0] * q0)[None]])
        assert torch.allclose(row, expect / expect.sum(), atol=1e-5)


def test_an_http_judge_retries_errors_and_nulls_unreadable(judge_server):
    reply = chat_api.chat_completion(judge_server, "m", [{"role": "user", "content": "hi"}], backoff=0.01)
    assert reply.startswith("Short reason") and len(FakeJudge.requests) == 2  # 500, then success
    j = judging.HttpJudge(api_base=judge_server, model="m", concurrency=2, timeout=5, backoff=0.01)
    n0 = len(FakeJudge.requests)
    got = [s["score"] for s in j.ratings([("q", "a fine answer"), ("q", "UNRATABLE")], "harmlessness")]
    assert isinstance(got[0], int) and got[1] is None
    assert len(FakeJudge.requests) - n0 == 3  # the unreadable reply was asked once more
