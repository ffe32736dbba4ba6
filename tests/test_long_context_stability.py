"""The memory stays in the regime it was trained in when it runs far past its training length.

Found on tiny Atlas trained at T = 128 (README main job): the streaming perplexity of a 4,096-token
document was 33,042 against 54.5 sliding. The cause: with retention towards zero, the learned
initial weights W0 decay as prod(alpha) (0.9935^512 = 0.04), so past a few hundred tokens the
memory is made of inner updates alone, a state the model never saw while training on 128 tokens,
and its normalised output points anywhere. Anchored retention (the default, `anchor=True`) decays
the fast weights towards W0 instead: the state stays W0 plus a bounded deviation at any length.
"""
from __future__ import annotations

import pytest
import torch

from megatron_atlas.configs import compose, to_model_config
from megatron_atlas.model.memory_layer import MemoryLayer

MEMORY_PRESETS = ["titans", "omeganet", "dla", "atlas", "atlas_pp"]


def _states(preset: str, length: int, anchor: bool, checkpoints):
    """The memory's first-layer weights W_t of a tiny layer at the given token counts (trained-like
    gates: the init biases give retention ~0.993, inner lr ~1e-3, momentum ~0.5)."""
    cfg = to_model_config(compose(preset, "tiny", "tiny", [f"model.memory.anchor={str(anchor).lower()}",
                                                           "model.memory.impl=chunked"]))
    torch.manual_seed(0)
    layer = MemoryLayer(cfg)
    x = torch.randn(1, length, cfg.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, _ = layer._project(x, None)
        name = layer.op_cfg.weight_names[-1]     # the layer that reads the (lifted) keys
        w0 = layer.operator_params()[name][None]
        states, state, start = {}, None, 0
        for stop in checkpoints:
            piece = {n: t[:, start:stop] for n, t in tokens.items()}
            _, state = layer._memory(piece, state)
            states[stop] = state.weights[name]
            start = stop
    return w0, states


def _w0_share(w0: torch.Tensor, w: torch.Tensor) -> float:
    """How much of W0 the state still holds: <W, W0> / ||W0||^2, the worst head."""
    return float(((w * w0).sum((-2, -1)) / w0.square().sum((-2, -1))).min())


@pytest.mark.parametrize("preset", MEMORY_PRESETS)
def test_anchored_state_stays_bounded_and_near_its_initial_weights_past_32x_the_chunk(preset):
    w0, states = _states(preset, 1024, anchor=True, checkpoints=(128, 1024))
    for length, w in states.items():
        ratio = float((w.norm(dim=(-2, -1)) / w0.norm(dim=(-2, -1))).max())
        assert ratio < 2.0, (preset, length, ratio)
        assert _w0_share(w0, w) > 0.5, (preset, length)
    # the state at 8x the length is as close to W0 as at the length itself: a steady state
    assert abs(_w0_share(w0, states[1024]) - _w0_share(w0, states[128])) < 0.3


@pytest.mark.parametrize("preset", ["titans", "atlas"])
def test_retention_towards_zero_loses_the_initial_weights(preset):
    """What the anchor prevents (and what this test file would not see without it)."""
    w0, states = _states(preset, 1024, anchor=False, checkpoints=(128, 1024))
    assert _w0_share(w0, states[1024]) < 0.1 < _w0_share(w0, states[128])
