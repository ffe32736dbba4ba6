"""Every preset at `tiny`: builds, trains (loss falls on a memorised batch), and decodes with its cache
exactly as the full forward pass does."""
from __future__ import annotations

import pytest
import torch

from megatron_atlas.configs import available, compose, to_model_config
from megatron_atlas.model import build_model

PRESETS = available("model")


def _tiny(preset: str, *overrides: str):
    return to_model_config(compose(preset, "tiny", "tiny", list(overrides)))


def test_all_presets_have_configs():
    assert set(PRESETS) == {"titans", "omeganet", "atlas", "atlas_pp", "atlas_mag", "atlas_mal", "dla",
                            "transformer"}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_overfits_a_batch(preset):
    torch.manual_seed(0)
    model = build_model(_tiny(preset))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0                     # ~ln(256) at init
    assert losses[-1] < 0.6 * losses[0], losses


def _float64_model_and_ids(cfg, batch: int, length: int, seed: int):
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    return model, ids


@torch.no_grad()
def _decode(model, ids, prompt: int):
    """Logits of `ids` through the cache: the first `prompt` tokens at once, then one at a time."""
    cache = model.new_cache(ids.shape[0])
    pieces = [model.step(ids[:, :prompt], cache)] if prompt else []
    pieces += [model.step(ids[:, t:t + 1], cache) for t in range(prompt, ids.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_decoding_equals_full_forward(preset):
    # chunk 4 and window 6 make 23 tokens cross several chunk and window boundaries
    model, ids = _float64_model_and_ids(_tiny(preset, "model.memory.chunk=4", "model.attention.window=6"),
                                        batch=2, length=23, seed=2)
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(_decode(model, ids, prompt=7), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("preset", ["atlas_mag", "titans"])
def test_persistent_tokens_decode_and_change_outputs(preset):
    cfg = _tiny(preset, "model.n_persist=3", "model.memory.chunk=4", "model.attention.window=5")
    model, ids = _float64_model_and_ids(cfg, batch=1, length=15, seed=3)
    with torch.no_grad():
        full = model(ids)
        stepped = _decode(model, ids, prompt=0)
        model.persistent.add_(1.0)
        shifted = model(ids)
    torch.testing.assert_close(stepped, full, rtol=1e-10, atol=1e-10)
    assert full.shape == (1, 15, cfg.vocab_size)
    assert (shifted - full).abs().max() > 1e-3


def test_generate_greedy_matches_argmax_of_full_forward():
    model = build_model(_tiny("atlas", "model.memory.chunk=4")).double().eval()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (2, 13)
    with torch.no_grad():
        logits = model(out[:, :-1])
    torch.testing.assert_close(logits[:, 4:].argmax(-1), out[:, 5:])


def test_decoding_cache_is_constant_in_context_length():
    model = build_model(_tiny("atlas_mag", "model.memory.chunk=4", "model.attention.window=6")).eval()
    cache = model.new_cache(1)

    def cached_elements():
        total = 0
        for block in cache.blocks:
            mem, att = block["memory"], block["attention"]
            total += sum(t.numel() for t in mem.pending.values())
            total += sum(t.numel() for t in (att.k_sink, att.v_sink, att.k_recent, att.v_recent))
            if mem.state is not None:
                total += sum(w.numel() for w in mem.state.weights.values())
        return total

    sizes = []
    with torch.no_grad():
        for t in range(40):
            model.step(torch.tensor([[t % 256]]), cache)
            if t in (19, 39):  # same position within a memory chunk
                sizes.append(cached_elements())
    assert sizes[0] == sizes[1]
