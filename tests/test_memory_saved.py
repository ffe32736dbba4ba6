"""What the memory operator keeps for its backward: all of it visible to saved-tensor hooks (so
activation checkpointing frees it), and for the chunk loop one state per chunk, not chunk x state."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from kernels.memory import MemoryConfig, memory_forward
from megatron_atlas.model.config import MemoryLayerConfig, ModelConfig
from megatron_atlas.model.memory_layer import MemoryLayer

from .memory_cases import leaves, make_inputs


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages packed by saved-tensor hooks while `run()` records its graph."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["mlp", "gated_mlp"])
def test_muon_chunk_loop_saves_one_state_per_chunk(kind):
    cfg = MemoryConfig(kind=kind, rule="muon", window=2, chunk=16)
    d_hidden, d = 16, 8
    state_bytes = 8 * 2 * len(cfg.weight_names) * d_hidden * d   # float64 weights + momenta, per head

    def saved(length):
        q, k, v, gates, params = make_inputs(cfg, batch=1, length=length, heads=2, d_k=d, d_v=d,
                                             d_hidden=d_hidden)
        leaves(q, k, v, gates, params)
        return _saved_bytes(lambda: memory_forward(q, k, v, gates, params, cfg, impl="chunked"))

    per_chunk = (saved(8 * cfg.chunk) - saved(4 * cfg.chunk)) / 4 / 2   # per chunk and head
    # one state plus the chunk's own inputs (q, k, v, 4 gates: 16 tokens x 28 floats = 3.6 KB)
    inputs = 8 * cfg.chunk * (3 * d + 4)
    assert per_chunk <= 1.1 * (state_bytes + inputs), (per_chunk, state_bytes, inputs)
    assert per_chunk < 0.2 * cfg.chunk * state_bytes   # what keeping every token's state would cost


def _live_tensor_bytes() -> int:
    gc.collect()
    storages = {}
    with warnings.catch_warnings():   # isinstance() on some module objects warns of deprecations
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("preset", [dict(kind="mlp", rule="gd", window=1),
                                    dict(kind="mlp", rule="muon", window=2, degree=2),
                                    dict(kind="gated_mlp", rule="gd", window=2)])
def test_checkpointed_memory_layer_keeps_no_chunk_states(preset):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=4, memory=MemoryLayerConfig(chunk=16, impl="chunked", **preset))
    layer = MemoryLayer(cfg)
    x = torch.randn(2, 256, 64, requires_grad=True)
    reference = layer(x)[0]
    reference.square().sum().backward()
    expected = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    del reference

    before = _live_tensor_bytes()
    y = checkpoint(lambda inp: layer(inp)[0], x, use_reentrant=False)
    held = _live_tensor_bytes() - before
    # the output itself, plus small change; 16 chunk-start states of 4 heads would be far more
    assert held <= 2 * y.numel() * y.element_size() + 64 * 1024, held
    y.square().sum().backward()   # the recompute gives the same gradients
    got = [p.grad for p in layer.parameters()] + [x.grad]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
