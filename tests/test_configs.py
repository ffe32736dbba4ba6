"""YAML configs + schemas: every preset x size composes; overrides; errors name the key and the choices."""
from __future__ import annotations

import pytest

from megatron_atlas.configs import available, compose, parse_cli, to_model_config, to_train_config
from megatron_atlas.model.config import ConfigError

PRESETS = ["atlas", "atlas_mag", "atlas_mal", "atlas_pp", "dla", "omeganet", "titans", "transformer"]
SIZES = ["1.3B", "170M", "340M", "760M", "tiny"]


def test_the_expected_files_exist():
    assert available("model") == PRESETS
    assert available("size") == SIZES
    assert {"default", "tiny"} <= set(available("train"))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_size_composes(preset, size):
    cfg = compose(preset, size)
    model = to_model_config(cfg)
    assert model.preset == preset
    assert to_train_config(cfg).tokens_per_step == 8 * 16 * 4096


def test_presets_define_the_paper_models():
    def memory(preset, size="tiny"):
        m = to_model_config(compose(preset, size)).memory
        return m.kind, m.rule, m.loss, m.window, m.degree

    assert memory("titans") == ("mlp", "gd", "l2", 1, 1)
    assert memory("omeganet") == ("mlp", "gd", "l2", 4, 2)
    # the Atlas presets run muon_block; at size=tiny its ns_block is 1 (the exact per-token rule),
    # at the paper sizes one Newton-Schulz per 2048 tokens
    assert memory("atlas") == ("mlp", "muon_block", "l2", 4, 2)
    assert memory("atlas_pp") == ("gated_mlp", "muon_block", "l2", 4, 2)
    assert to_model_config(compose("atlas", "tiny")).memory.ns_block == 1
    assert {to_model_config(compose(p, s)).memory.ns_block for p in ("atlas", "atlas_mag")
            for s in ("170M", "1.3B")} == {2048}
    assert memory("dla")[:3] == ("mlp", "gd", "dot")
    assert not to_model_config(compose("dla", "tiny")).memory.momentum
    blocks = {p: to_model_config(compose(p, "tiny")).block for p in PRESETS}
    assert blocks["atlas_mag"] == "mag" and blocks["atlas_mal"] == "mal"
    assert blocks["transformer"] == "attn" and blocks["atlas"] == "lmm"


def test_sizes_follow_table_7():
    shapes = {s: to_model_config(compose("atlas", s)) for s in SIZES}
    assert [(shapes[s].n_layers, shapes[s].d_model, shapes[s].n_heads) for s in ("170M", "340M", "760M", "1.3B")] \
        == [(12, 768, 16), (24, 1024, 16), (24, 1536, 16), (18, 2048, 8)]
    assert shapes["1.3B"].target_params == 1_300_000_000 and shapes["1.3B"].vocab_size == 32000
    tiny = shapes["tiny"]
    assert (tiny.vocab_size, tiny.d_model, tiny.n_layers, tiny.memory.chunk, tiny.attention.window) == \
        (256, 64, 2, 16, 32)


def test_overrides_win_and_parse_yaml_scalars():
    cfg = compose("atlas", "tiny", "tiny", ["train.lr=1e-3", "model.n_layers=3", "model.head_dim=null",
                                            "train.schedule=wsd", "model.memory={window: 2, rule: gd}",
                                            "model.tie_embeddings=true"])
    model, train = to_model_config(cfg), to_train_config(cfg)
    assert train.lr == pytest.approx(1e-3) and train.schedule == "wsd"
    assert model.n_layers == 3 and model.head_dim is None and model.tie_embeddings
    assert (model.memory.window, model.memory.rule, model.memory.degree) == (2, "gd", 2)


def test_interpolations_resolve_against_the_whole_config():
    cfg = compose("dla", "tiny", "tiny", ["train.out_dir=runs/${model.preset}-${model.d_model}"])
    assert to_train_config(cfg).out_dir == "runs/dla-64"


def test_parse_cli_selects_files_and_overrides():
    cfg = parse_cli(["model=titans", "size=tiny", "train=tiny", "train.steps=7"])
    assert to_model_config(cfg).preset == "titans" and to_train_config(cfg).steps == 7
    assert to_train_config(parse_cli(["model=titans", "size=tiny"])).seq_len == 4096   # train=default


def _error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        compose(*args, **kwargs)
    return str(info.value)


def test_unknown_key_names_it_and_close_matches():
    message = _error("atlas", "tiny", "tiny", ["model.d_modle=32"])
    assert "model.d_modle" in message and "model.d_model" in message
    assert "model.d_model" in _error("atlas", "tiny", "tiny", ["d_model=32"])
    message = _error("atlas", "tiny", "tiny", ["model.window=8"])
    assert "model.memory.window" in message and "model.attention.window" in message


def test_bad_value_names_key_value_and_allowed_values():
    message = _error("atlas", "tiny", "tiny", ["model.memory.rule=adam"])
    assert "model.memory.rule" in message and "adam" in message and "gd" in message and "muon" in message
    message = _error("atlas", "tiny", "tiny", ["train.schedule=linear"])
    assert "train.schedule" in message and "linear" in message and "cosine, wsd, constant" in message
    message = _error("atlas", "tiny", "tiny", ["model.d_model=wide"])
    assert "model.d_model" in message and "wide" in message and "integer" in message
    message = _error("atlas", "tiny", "tiny", ["train.data.kind=text"])
    assert "train.data.kind" in message and "synthetic_mqar" in message
    assert "train.lr" in _error("atlas", "tiny", "tiny", ["train.lr=0"])


def test_bad_names_list_the_available_files():
    message = _error("atlass", "tiny")
    assert "atlass" in message and "did you mean 'atlas'" in message and "transformer" in message
    message = _error("atlas", "2B")
    assert "2B" in message and "170M" in message and "tiny" in message
    assert "default" in _error("atlas", "tiny", "fast")


def test_malformed_override_and_options_are_reported():
    assert "key=value" in _error("atlas", "tiny", "tiny", ["train.lr"])
    assert "section" in _error("atlas", "tiny", "tiny", ["model.memory=3"])
    with pytest.raises(ConfigError, match="size=NAME"):
        parse_cli(["model=atlas"])
    with pytest.raises(ConfigError, match="--lr"):
        parse_cli(["model=atlas", "size=tiny", "--lr=3"])
