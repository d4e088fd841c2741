"""train.py's throughput figures: the FLOPs of a step, MFU and peak memory, and their panels."""

import xml.etree.ElementTree as ET

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import metrics_log


@pytest.mark.parametrize("tied", [True, False])
def test_a_steps_flops_count_the_decoder_at_every_token_and_the_head_at_answers(tied):
    h, i, kv, layers, vocab = 32, 64, 16, 3, 100
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg)
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h  # attention, MLP, norms; the final norm
    head = vocab * h
    assert metrics_log.flops_per_step(model, 1000, 300, frozen_base=False) == 6 * body * 1000 + 6 * head * 300
    assert metrics_log.flops_per_step(model, 1000, 300, frozen_base=True) == 4 * body * 1000 + 4 * head * 300


def test_mfu_is_the_flops_rate_over_the_devices_peak(monkeypatch):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2))
    s = {"sequence_tokens": 4000, "tokens": 1000}
    flops = metrics_log.flops_per_step(model, 4000, 1000, frozen_base=False)
    row = lambda bf16=True: metrics_log.throughput(s, 2.0, model, False, bf16)
    assert row() == {"tokens_per_s": 2000.0}  # the CPU: no MFU, no GPU memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    assert row() == {"tokens_per_s": 2000.0, "mfu": pytest.approx(flops / 2.0 / 989e12), "peak_memory_gib": 3.0}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert row()["mfu"] == pytest.approx(flops / 2.0 / 756e12)
    assert "mfu" not in row(bf16=False)  # float32 has another peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert set(row()) == {"tokens_per_s", "peak_memory_gib"}


def test_the_picture_draws_throughput_where_the_rows_hold_it():
    rows = [{"step": s, "loss": 1.0, "tokens_per_s": 100.0 * s} for s in (1, 2, 3)]
    panels = lambda rows: {
        g.get("data-panel") for g in ET.fromstring(metrics_log.training_svg(rows)).iter() if g.get("data-panel")
    }
    assert "tokens/s" in panels(rows) and "MFU" not in panels(rows)
    rows = [dict(r, mfu=0.4, peak_memory_gib=20.0) for r in rows]
    assert {"tokens/s", "MFU", "peak memory (GiB)"} <= panels(rows)
