"""Reading the judge: rating parser, logits mode."""
import pytest

import common
import score


@pytest.mark.parametrize("text,expected", [
    ("Rating: 7", 7), ("rating: 10/10", 10), ("The answer is careful and kind. Rating: 8", 8),
    ("Rating: 11", None), ("This answer is fine.", None), ("Rating: 3 ... on reflection, Rating: 6", 6),
    ("10", 10), ("**Rating:** 9", 9), ("Rating: 7.5", None), ("Rating: 0", None), ("", None),
])
def test_parse_rating(text, expected):
    assert score.parse_rating(text) == expected


def test_unknown_objective():
    with pytest.raises(common.InputError, match="unknown objective 'kindness'"):
        score.judge_conversation("kindness", "q", "a")


def test_logits_mode_returns_integers_in_range(tiny_model_dir):
    model, tok = common.load_for_inference(str(tiny_model_dir))
    items = [("How do I stay safe?", "Be careful."), ("Hi", "Hello there, how can I help?"), ("x", "")]
    for mode in ("logits", "logits-expected"):
        res = score.score_answers(model, tok, items, "harmlessness", mode, batch_size=2)
        assert len(res) == 3
        for r in res:
            assert isinstance(r["score"], int) and 1 <= r["score"] <= 10
            assert 1.0 <= r["expected"] <= 10.0
    probs = score.rating_distribution(model, tok, [score.judge_conversation("honesty", q, a) for q, a in items])
    assert probs.shape == (3, 10) and abs(float(probs.sum()) - 3) < 1e-4


def test_logits_mode_batching_does_not_change_scores(tiny_model_dir):
    model, tok = common.load_for_inference(str(tiny_model_dir))
    convs = [score.judge_conversation("harmlessness", "q" * k, "answer " * k) for k in range(1, 5)]
    import torch
    assert torch.allclose(score.rating_distribution(model, tok, convs, 4),
                          score.rating_distribution(model, tok, convs, 1), atol=1e-5)
