"""Resume takes the newest checkpoint that verifies and says why; a named one is verified; a
checkpoint of another model is refused with the settings that differ."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_atlas.configs import compose, to_model_config
from megatron_atlas.errors import CheckpointError
from megatron_atlas.model.config import ConfigError
from megatron_atlas.train import checkpoint as ckpt
from megatron_atlas.train.resume import check_model_matches, select_resume


def _save(out: Path, step: int) -> Path:
    state = {"step": step, "model": {"w": torch.full((4,), float(step))}, "loader": {}}
    return ckpt.save_checkpoint(out, step, state, "model: {}\n", keep_last=0)


def test_auto_falls_back_past_damaged_newer_checkpoints_and_says_which(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    root = ckpt.checkpoint_dir(tmp_path)
    (root / "step-00000003" / ckpt.STATE_FILE).write_bytes(b"")                        # empty
    state = root / "step-00000002" / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:-10] + bytes(10))                              # flipped bytes
    lines: list[str] = []
    assert select_resume("auto", tmp_path, lines.append) == root / "step-00000001"
    assert "step-00000003: state.pt has 0 bytes" in lines[0]
    assert "step-00000002: state.pt does not match its sha256" in lines[0]
    assert lines[1].endswith("step-00000001, the newest checkpoint that verifies")


def test_auto_refuses_to_start_over_when_no_checkpoint_verifies(tmp_path):
    path = _save(tmp_path, 1)
    (path / ckpt.STATE_FILE).write_bytes(b"x")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints .* verifies"):
        select_resume("auto", tmp_path, print)


def test_auto_without_checkpoints_starts_from_zero(tmp_path):
    lines: list[str] = []
    assert select_resume("auto", tmp_path, lines.append) is None
    assert "starting from step 0" in lines[0]
    assert select_resume("none", tmp_path, lines.append) is None


def test_a_named_checkpoint_is_verified_and_a_missing_one_is_a_config_error(tmp_path):
    path = _save(tmp_path, 1)
    assert select_resume(str(path), tmp_path, print) == path
    with pytest.raises(ConfigError, match=r"train.resume=.*nowhere: no such checkpoint folder"):
        select_resume(str(tmp_path / "nowhere"), tmp_path, print)
    with pytest.raises(ConfigError, match="is not a checkpoint folder.*step-00000001"):
        select_resume(str(tmp_path), tmp_path, print)   # the run folder, not a step folder
    (path / ckpt.STATE_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match="does not verify: state.pt has 0 bytes"):
        select_resume(str(path), tmp_path, print)


def test_a_checkpoint_of_another_preset_is_refused_naming_the_settings(tmp_path):
    from omegaconf import OmegaConf
    titans = compose("titans", "tiny", "tiny")
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    (folder / "config.yaml").write_text(OmegaConf.to_yaml({"model": titans.model}))
    check_model_matches(folder, to_model_config(titans))   # the same model: fine
    other = to_model_config(compose("transformer", "tiny", "tiny"))
    with pytest.raises(ConfigError, match=r"another model: .*model\.block='lmm' \(this run: 'attn'\)"):
        check_model_matches(folder, other)
