"""Hugging Face export/import: for every preset at `tiny` (fp32) the exported folder loads with
`trust_remote_code` in a process where this project cannot be imported, its logits equal the native
model's, greedy generation of 50 tokens is identical, and native -> HF -> native is bit-exact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_atlas.configs import available, compose, to_model_config, to_train_config
from megatron_atlas.hf.convert import build_hf_model, export_hf, import_hf, load_native
from megatron_atlas.model import build_model
from megatron_atlas.train.checkpoint import load_checkpoint, save_checkpoint

PRESETS = available("model")
SHARDED = "atlas"            # exported with a tiny max shard size
PROMPT_LEN, NEW_TOKENS = 37, 50   # 37: not a multiple of the memory chunk (8), so a chunk is open
# Smaller than `tiny` so that 8 presets x 2 implementations x 50 decoding steps stay fast on 2 cores
# (Atlas decoding re-reads the open memory chunk every step).
SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.memory.chunk=8",
         "model.attention.window=16"]

# Runs in a fresh interpreter from a temporary cwd, with the project made unimportable: the editable
# install's finder is removed and the repository is dropped from sys.path; it then checks that no
# module of the project got imported. Triton is made unimportable too: an export must load without it.
_BLOCKED_LOADER = textwrap.dedent("""
    import importlib.util, json, sys
    sys.modules["triton"] = None   # `import triton` now raises ImportError
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "__editable__" not in (getattr(f, "__module__", "") or "") + type(f).__module__]
    sys.path[:] = [p for p in sys.path if p not in ("", REPO)]
    assert importlib.util.find_spec("megatron_atlas") is None, "project still importable"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    jobs = json.loads(sys.argv[1])
    results = {}
    for name, folder in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        ids = torch.load(folder + "/ids.pt")
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(ids[:1], max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
        results[name] = {"logits": logits, "generated": generated, "hello": tok("hello").input_ids,
                         "class": type(model).__module__}
    leaked = [m for m in sys.modules if m.split(".")[0] in ("megatron_atlas", "kernels")]
    torch.save({"results": results, "leaked": leaked}, sys.argv[2])
""")


def _configs(preset: str):
    cfg = compose(preset, "tiny", "tiny", SMALL)
    return to_model_config(cfg), to_train_config(cfg)


def _native_checkpoint(preset: str, root: Path) -> Path:
    model_cfg, train_cfg = _configs(preset)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    config_yaml = OmegaConf.to_yaml({"model": model_cfg, "train": train_cfg})
    return save_checkpoint(root / f"run_{preset}", 7, {"step": 7, "model": model.state_dict()}, config_yaml, 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every preset exported; the blocked subprocess's logits and generations for each."""
    root = tmp_path_factory.mktemp("hf")
    ids = torch.randint(0, 256, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
    jobs, checkpoints = {}, {}
    for preset in PRESETS:
        checkpoints[preset] = _native_checkpoint(preset, root)
        out = root / f"hf_{preset}"
        export_hf(checkpoints[preset], out, max_shard_size="60KB" if preset == SHARDED else "2GB",
                  log=lambda *_: None)
        torch.save(ids, out / "ids.pt")
        jobs[preset] = str(out)
    script = root / "load.py"
    script.write_text(f"REPO = {str(Path(__file__).resolve().parents[1])!r}\nNEW = {NEW_TOKENS}\n" + _BLOCKED_LOADER)
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "modules"), "PYTHONPATH": "",
           "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, str(script), json.dumps(jobs), str(root / "out.pt")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    loaded = torch.load(root / "out.pt", weights_only=False)
    return {"root": root, "ids": ids, "checkpoints": checkpoints, "jobs": jobs, **loaded}


def test_loading_imports_nothing_of_the_project(exported):
    assert exported["leaked"] == []
    for result in exported["results"].values():
        assert result["class"].startswith("transformers_modules.")


def _native(exported, preset):
    cfg, weights, _ = load_native(exported["checkpoints"][preset])
    native = build_model(cfg)
    native.load_state_dict(weights)
    return native.eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_hf_logits_and_greedy_generation_equal_native(exported, preset):
    """Logits to 1e-5; the HF greedy sequence is the native greedy one: at every generated position
    the native full forward's argmax is the token HF chose (one forward instead of 50 steps; decoding
    with the cache equals the full forward, tests/test_model.py)."""
    native = _native(exported, preset)
    ids = exported["ids"]
    result = exported["results"][preset]
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], native(ids), rtol=0, atol=1e-5)
        generated = result["generated"]
        assert generated.shape == (1, PROMPT_LEN + NEW_TOKENS)
        assert torch.equal(generated[:, :PROMPT_LEN], ids[:1])
        choices = native(generated[:, :-1])[0, PROMPT_LEN - 1:].argmax(-1)
    assert torch.equal(choices, generated[0, PROMPT_LEN:])


@pytest.mark.parametrize("preset", ["transformer", "atlas_mag"])
def test_hf_generation_equals_native_generate(exported, preset):
    native = _native(exported, preset)
    reference = native.generate(exported["ids"][:1], max_new_tokens=NEW_TOKENS)
    assert torch.equal(exported["results"][preset]["generated"], reference)


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in ("transformer", "atlas_mag")])
def test_hf_generation_equals_native_generate_other_presets(exported, preset):
    test_hf_generation_equals_native_generate(exported, preset)


def test_sharded_export_has_an_index_and_loads(exported):
    folder = Path(exported["jobs"][SHARDED])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    assert exported["results"][SHARDED]["logits"].isfinite().all()   # loaded in the blocked process


def test_auto_tokenizer_is_byte_level(exported):
    for result in exported["results"].values():
        assert result["hello"] == list(b"hello")
    # no end-of-document token; pad is an id past the 256 bytes, so no byte is taken for padding
    # (the prompts above hold byte 0 and generate infers no mask from it)
    config = json.loads((Path(exported["jobs"]["titans"]) / "config.json").read_text())
    assert config["pad_token_id"] == 256 and config.get("eos_token_id") is None


def test_native_hf_native_round_trip_is_bit_exact(exported, tmp_path):
    preset = "atlas_mag"
    before = load_checkpoint(exported["checkpoints"][preset])["model"]
    path = import_hf(exported["jobs"][preset], tmp_path / "back", log=lambda *_: None)
    after = load_checkpoint(path)
    assert after["step"] == 0 and set(after["model"]) == set(before)
    for name, tensor in before.items():
        assert after["model"][name].dtype == tensor.dtype and torch.equal(after["model"][name], tensor), name


def test_imported_checkpoint_resumes_training(exported, tmp_path):
    """The folder import_hf writes is accepted by the training loop's resume (fresh optimizer)."""
    from megatron_atlas.train.loop import train

    path = import_hf(exported["jobs"]["transformer"], tmp_path / "run", log=lambda *_: None)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    model_cfg = to_model_config(OmegaConf.merge(compose("transformer", "tiny", "tiny", SMALL), {"model": saved.model}))
    _, train_cfg = _configs("transformer")
    train_cfg.steps, train_cfg.resume, train_cfg.out_dir = 1, str(path), str(tmp_path / "run")
    train_cfg.eval_every = train_cfg.save_every = 0
    lines = []
    train(model_cfg, train_cfg, log=lines.append)
    assert any("resumed from" in line for line in lines), lines


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in fields(obj))
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@pytest.mark.parametrize("preset", ["atlas_mag"])
def test_generation_cache_is_constant_and_memory_keeps_learning(preset):
    model_cfg, _ = _configs(preset)
    torch.manual_seed(0)
    native = build_model(model_cfg)
    hf = build_hf_model(native.cfg, native.state_dict())
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():   # 32 and 96 tokens: both past the window (16), both on a chunk boundary (8)
        out = hf(ids[:, :32], use_cache=True)
        cache = out.past_key_values
        size_32 = _tensor_bytes(cache.groups[0].cache)
        state_32 = [t.clone() for t in cache.groups[0].cache.blocks[0]["memory"].state.weights.values()]
        out = hf(ids[:, 32:], past_key_values=cache)
        size_96 = _tensor_bytes(cache.groups[0].cache)
        state_96 = list(cache.groups[0].cache.blocks[0]["memory"].state.weights.values())
        assert out.logits.shape == (1, 64, 256)
        torch.testing.assert_close(out.logits, native(ids)[:, 32:], rtol=0, atol=1e-5)
    assert cache.seen_tokens == 96
    assert size_96 == size_32 > 0
    assert any(not torch.equal(a, b) for a, b in zip(state_32, state_96))
