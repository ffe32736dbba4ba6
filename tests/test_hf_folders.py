"""Hugging Face folders: a re-export replaces the earlier one whole (no stale weights or index), an
export never mixes into a foreign folder, an import never takes over an existing run, and eval
runs a folder's own code only with --trust-remote-code."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.hf.convert import export_hf, import_hf, load_hf_weights
from megatron_atlas.model import build_model
from megatron_atlas.train.checkpoint import find_latest, save_checkpoint

SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.memory.chunk=8"]


def _checkpoint(root: Path, seed: int) -> Path:
    cfg = compose("titans", "tiny", "tiny", SMALL)
    model_cfg, train_cfg = to_model_config(cfg), to_train_config(cfg)
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    config_yaml = OmegaConf.to_yaml({"model": model_cfg, "train": train_cfg})
    return save_checkpoint(root / f"run{seed}", 1, {"step": 1, "model": model.state_dict()}, config_yaml, 1)


def _quiet(*_: object) -> None:
    pass


def test_reexport_replaces_the_earlier_export(tmp_path):
    a, b = _checkpoint(tmp_path, 0), _checkpoint(tmp_path, 1)
    out = tmp_path / "hf"
    export_hf(a, out, max_shard_size="60KB", log=_quiet)   # sharded: an index and several files
    assert (out / "model.safetensors.index.json").is_file()
    export_hf(b, out, log=_quiet)                          # one file now
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    _, weights, _ = load_hf_weights(out)
    want = torch.load(b / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], want[k]) for k in want)
    assert not list(tmp_path.glob(".hf.*"))   # no temporary or old folder left beside it


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not an export of this project"):
        export_hf(_checkpoint(tmp_path, 0), out, log=_quiet)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_import_refuses_an_existing_run(tmp_path):
    run = _checkpoint(tmp_path, 0).parent.parent
    (run / "config.yaml").write_text("theirs\n")
    hf = tmp_path / "hf"
    export_hf(_checkpoint(tmp_path, 1), hf, log=_quiet)
    before = (run / "checkpoints" / "latest").read_text()
    with pytest.raises(FileExistsError, match="already holds a run"):
        import_hf(hf, run, log=_quiet)
    assert (run / "checkpoints" / "latest").read_text() == before
    assert (run / "config.yaml").read_text() == "theirs\n"
    assert find_latest(import_hf(hf, tmp_path / "fresh", log=_quiet).parent.parent) is not None


_CONFIGURATION = """
from pathlib import Path
from transformers import PretrainedConfig
Path({marker!r}).touch()   # importing this file is running the folder's code


class TinyConfig(PretrainedConfig):
    model_type = "reliability_tiny"

    def __init__(self, vocab_size=8, **kwargs):
        self.vocab_size = vocab_size
        super().__init__(**kwargs)
"""

_MODELING = """
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput
from .configuration_tiny import TinyConfig


class TinyLM(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.table = torch.nn.Embedding(config.vocab_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return CausalLMOutput(logits=self.table(input_ids))
"""


def _foreign_folder(root: Path, marker: Path) -> Path:
    from safetensors.torch import save_file
    folder = root / "foreign"
    folder.mkdir()
    (folder / "configuration_tiny.py").write_text(_CONFIGURATION.format(marker=str(marker)))
    (folder / "modeling_tiny.py").write_text(_MODELING)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "reliability_tiny", "vocab_size": 8, "architectures": ["TinyLM"],
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyLM"}}))
    save_file({"table.weight": torch.zeros(8, 8)}, str(folder / "model.safetensors"))
    return folder


def test_eval_runs_a_folders_own_code_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    from megatron_atlas.eval.__main__ import main
    from megatron_atlas.eval.lm import load_lm
    marker = tmp_path / "code-ran"
    folder = _foreign_folder(tmp_path, marker)
    rc = main([str(folder), "--out", str(tmp_path / "eval"), "--suites", "mqar", "--kv-pairs", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "ships its own model code" in err and "--trust-remote-code" in err
    assert not marker.exists()
    lm = load_lm(str(folder), trust_remote_code=True)
    assert marker.exists() and lm.forward(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 8)


def test_eval_loads_this_projects_export_without_remote_code(tmp_path):
    from megatron_atlas.eval.lm import load_lm
    out = tmp_path / "hf"
    export_hf(_checkpoint(tmp_path, 0), out, log=_quiet)
    (out / "modeling_atlas.py").write_text("raise SystemExit('the folder code ran')\n")
    assert load_lm(str(out)).native   # AtlasLM from the safetensors: the folder's code is not run
