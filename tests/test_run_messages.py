"""Bad settings and damaged inputs stop `python -m megatron_atlas.train` (and the sweep CLI) with a
message naming the key or the file, not a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.train.__main__ import main
from megatron_atlas.train.preflight import out_of_memory_message

RUN = ["train=tiny", "train.steps=1", "train.seq_len=32", "train.micro_batch_size=2", "train.eval_every=0",
       "train.data.eval_batches=1", "train.tensorboard=false", "train.warmup_steps=1", "train.device=cpu"]


def _main(capsys, out: Path, *args: str, model: str = "titans") -> tuple[int, str]:
    rc = main([f"model={model}", "size=tiny", *RUN, f"train.out_dir={out}", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_missing_resume_path(tmp_path, capsys):
    rc, err = _main(capsys, tmp_path, f"train.resume={tmp_path / 'gone'}")
    assert rc == 2 and f"train.resume={tmp_path / 'gone'}: no such checkpoint folder" in err


def test_memory_degree_too_large_is_refused_before_allocating(tmp_path, capsys):
    rc, err = _main(capsys, tmp_path, "model.memory.degree=12", model="atlas")
    assert rc == 2 and "model.memory.degree=12" in err and "125,970" in err


def test_tp_that_does_not_divide_the_heads(tmp_path, capsys):
    rc, err = _main(capsys, tmp_path, "parallel.tp=3")
    assert rc == 2 and "parallel.tp=3" in err and "model.n_heads=4" in err


def test_cuda_requested_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = _main(capsys, tmp_path, "train.device=cuda")
    assert rc == 2 and "train.device=cuda but torch sees no CUDA device" in err


def test_shard_path_without_kind_shards(tmp_path, capsys):
    rc, err = _main(capsys, tmp_path, "train.data.shards.path=data/x")
    assert rc == 2 and "train.data.shards.path is set but train.data.kind=synthetic_mqar" in err


def test_override_value_that_is_not_yaml(tmp_path, capsys):
    rc, err = _main(capsys, tmp_path, "train.lr=[1]=2")
    assert rc == 2 and "override 'train.lr=[1]=2'" in err


def test_resuming_another_presets_checkpoint(tmp_path, capsys):
    assert _main(capsys, tmp_path)[0] == 0
    rc, err = _main(capsys, tmp_path, "train.resume=auto", "train.steps=2", model="transformer")
    assert rc == 2 and "is of another model" in err and "model.block='lmm' (this run: 'attn')" in err


def test_damaged_checkpoint_is_a_message(tmp_path, capsys):
    assert _main(capsys, tmp_path)[0] == 0
    state = tmp_path / "checkpoints" / "step-00000001" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    rc, err = _main(capsys, tmp_path, "train.resume=auto", "train.steps=2")
    assert rc == 1 and "error: checkpoint" in err and "state.pt has 1,000 bytes" in err


def test_out_of_memory_names_the_settings_that_size_it():
    cfg = compose("atlas", "tiny", "tiny")
    error = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 2063892480 bytes.")
    message = out_of_memory_message(error, to_model_config(cfg), to_train_config(cfg))
    assert "train.micro_batch_size=" in message and "model.memory.degree=2" in message
    assert out_of_memory_message(RuntimeError("shape mismatch"), to_model_config(cfg), to_train_config(cfg)) is None


@pytest.mark.parametrize("override, says", [("budgets=[1e11]=3", "not valid YAML"),
                                             ("overrides=[[1]]", "is not a KEY=VALUE string")])
def test_sweep_override_errors(tmp_path, capsys, override, says):
    from megatron_atlas.sweep.cli import main as sweep_main
    rc = sweep_main(["plan", "--config", "tiny", "--out", str(tmp_path), "--dry-run", override])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err
