"""bench/goals.py's generation goal: the FLOP floor counts what the model's products compute."""
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import goals  # noqa: E402


@pytest.mark.parametrize("packed", [False, True])
def test_floor_flops_are_the_flops_the_linear_layers_compute(tiny_model_dir, packed):
    """A forward over T tokens with logits at every position runs 2 x linear_weights FLOPs a
    token through its linear layers, as timed_products counts them (nn.Linear, or oneDNN's
    PackedLinear as inference runs on the CPU); its hooks are gone afterwards."""
    import common
    import inference_model
    if packed and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    model, _ = common.load_model(str(tiny_model_dir))
    if packed:
        inference_model.pack_linears(model)
        assert any(isinstance(m, inference_model.PackedLinear) for m in model.modules())
    T = 7
    with torch.no_grad(), goals.timed_products(model) as products:
        model(input_ids=torch.arange(3, 3 + T)[None], logits_to_keep=0)
    assert products["flops"] == 2 * goals.linear_weights(model.config) * T
    assert products["s"] > 0
    with torch.no_grad():
        model(input_ids=torch.arange(3, 3 + T)[None])
    assert products["flops"] == 2 * goals.linear_weights(model.config) * T
