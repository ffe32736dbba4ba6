"""The `parallel` section: composition, overrides and clear errors; the DeepSpeed config built from
it; the mpu adapter's answers; activation checkpointing leaves the training numbers unchanged."""
from __future__ import annotations

import pytest

from megatron_atlas.configs import compose, to_model_config, to_parallel_config, to_train_config
from megatron_atlas.model.config import ConfigError
from megatron_atlas.parallel.state import ParallelState
from megatron_atlas.train.deepspeed_engine import deepspeed_config
from megatron_atlas.train.loop import train
from megatron_atlas.train.mpu import DeepSpeedMPU


def _parallel(*overrides: str, parallel: str = "default"):
    return to_parallel_config(compose("titans", "tiny", "tiny", list(overrides), parallel=parallel))


def test_parallel_files_and_overrides_compose():
    assert _parallel().zero_stage == 0 and _parallel().tp == 1
    p = _parallel("parallel.zero_stage=3", "parallel.activation_checkpointing=true", parallel="tp2_zero2")
    assert (p.tp, p.sequence_parallel, p.zero_stage, p.activation_checkpointing) == (2, True, 3, True)
    assert p.deepspeed_config_name == "zero3"


@pytest.mark.parametrize("override, message", [
    ("parallel.zero_stage=4", "parallel.zero_stage=4 is not allowed; choose one of 0, 1, 2, 3"),
    ("parallel.tp=0", "parallel.tp=0 must be >= 1"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel=true needs parallel.tp > 1"),
    ("parallel.deepspeed=zero9", "parallel.deepspeed='zero9': no "),
    ("parallel.engine=fast", "parallel.engine='fast' is not allowed"),
    ("parallel.zero=2", "unknown key 'parallel.zero'"),
])
def test_bad_parallel_settings_name_the_value(override, message):
    with pytest.raises(ConfigError) as error:
        _parallel(override)
    assert message in str(error.value)


def test_deepspeed_config_takes_batch_clipping_and_precision_from_train():
    cfg = compose("titans", "tiny", "tiny", ["train.micro_batch_size=3", "train.grad_accum=2",
                                             "train.grad_clip=0.5"], parallel="zero2")
    ds = deepspeed_config(to_parallel_config(cfg), to_train_config(cfg), dp_size=4, bf16=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}   # never a bf16 module
    assert ds["torch_autocast"]["enabled"] and ds["torch_autocast"]["dtype"] == "bfloat16"
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["zero_optimization"]["stage"] == 2
    mismatched = compose("titans", "tiny", "tiny", ["parallel.deepspeed=zero1"], parallel="zero2")
    with pytest.raises(ValueError, match="sets ZeRO stage 1 but parallel.zero_stage=2"):
        deepspeed_config(to_parallel_config(mismatched), to_train_config(mismatched), dp_size=1, bf16=False)


def test_mpu_adapter_reports_the_layout():
    state = ParallelState(tp_size=2, cp_size=1, dp_size=3, tp_rank=1, dp_rank=2)
    mpu = DeepSpeedMPU(state)
    assert (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()) == (1, 2)
    assert (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()) == (1, 2)
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (2, 3)
    assert mpu.get_data_parallel_group_ranks() == [1, 3, 5] and mpu.get_tensor_model_parallel_src_rank() == 4
    assert not hasattr(mpu, "get_sequence_parallel_world_size")   # ours is Megatron SP, not Ulysses


def test_activation_checkpointing_gives_the_same_training(tmp_path, monkeypatch):
    from megatron_atlas.train import recompute
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", counted)

    def run(name: str, *extra: str) -> list[float]:
        cfg = compose("titans", "tiny", "tiny", ["train.steps=3", "train.seq_len=32", "train.eval_every=0",
                                                    "train.data.eval_batches=1", "train.tensorboard=false",
                                                    "train.data.mqar.num_kv_pairs=2",
                                                    f"train.out_dir={tmp_path / name}", *extra])
        return train(to_model_config(cfg), to_train_config(cfg), log=lambda line: None,
                     parallel_cfg=to_parallel_config(cfg))["losses"]
    plain = run("plain")
    assert not calls
    recomputed = run("recomputed", "parallel.activation_checkpointing=true")
    assert len(calls) >= 3 * 2   # every block of every training step went through torch's checkpoint
    assert len(plain) == 3 and all(abs(a - b) < 1e-6 for a, b in zip(plain, recomputed)), (plain, recomputed)


def test_deepspeed_checkpoints_count_as_complete_but_need_consolidation(tmp_path):
    import torch

    from megatron_atlas.train.checkpoint import (DEEPSPEED_STATE_FILE, find_latest, fresh_temporary_dir,
                                                 load_checkpoint, publish_checkpoint)
    tmp = fresh_temporary_dir(tmp_path, 7)
    torch.save({"step": 7}, tmp / DEEPSPEED_STATE_FILE)
    torn = fresh_temporary_dir(tmp_path, 9)   # a save that never finished
    torch.save({"step": 9}, torn / DEEPSPEED_STATE_FILE)
    final = publish_checkpoint(tmp, "model: {}\n", keep_last=2)
    assert find_latest(tmp_path) == final and (tmp_path / "checkpoints" / "latest").read_text() == "step-00000007"
    assert not torn.exists()   # cleaned up by the completed save
    with pytest.raises(FileNotFoundError, match="is a DeepSpeed checkpoint.*checkpoint_tool.py consolidate"):
        load_checkpoint(final)
