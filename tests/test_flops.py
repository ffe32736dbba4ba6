"""FLOP accounting: one meta-device block times n_layers equals counting the whole model."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_atlas.configs import compose, to_model_config
from megatron_atlas.model import build_model
from megatron_atlas.train.flops import mfu, training_flops_per_token


@pytest.mark.parametrize("preset", ["titans", "atlas_mag", "transformer"])
def test_per_token_flops_equal_a_full_model_count(preset):
    model = build_model(to_model_config(compose(preset, "tiny", "tiny")), device="meta")
    length = 64
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, length, dtype=torch.long)).sum().backward()
    expected = counter.get_total_flops() / (2 * length)
    assert training_flops_per_token(model.cfg, length) == pytest.approx(expected, rel=1e-9)


def test_memory_update_and_window_are_counted_beyond_6n():
    per_token = {}
    for preset in ("titans", "atlas", "transformer"):
        model = build_model(to_model_config(compose(preset, "tiny", "tiny")), device="meta")
        per_token[preset] = training_flops_per_token(model.cfg, 128)
        assert per_token[preset] > 6 * model.num_parameters(exclude_embeddings=True)
    # Muon orthogonalises every token's momentum: by far the costliest inner update
    assert per_token["atlas"] > 10 * per_token["titans"]
    # counting on the meta device leaves nothing behind that breaks a real forward pass
    model = build_model(to_model_config(compose("atlas", "tiny", "tiny")))
    assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long))).all()


def test_mfu():
    assert mfu(1e9, 1e3, peak_tflops=1.0) == pytest.approx(1.0)
    assert mfu(1e9, 1e3, peak_tflops=0.0) == 0.0
