"""Save with TP=2 x DP=1 under ZeRO-2 (with sequence parallelism), consolidate the DeepSpeed
checkpoint to one TP-free state dict, resume it with TP=1 x DP=2: the next loss equals the
uninterrupted run's (one process, same global batch; fp32, to 1e-5). The consolidated dict,
resharded to TP=2, gives back each TP rank's saved weights."""
from __future__ import annotations

import subprocess
import sys

import torch

from megatron_atlas.train.checkpoint import load_checkpoint
from tests.test_deepspeed_zero import REPO, RUN, TOL, consolidate, native, torchrun, train_losses


def test_tp2_zero2_checkpoint_resumes_as_tp1_dp2(tmp_path):
    straight = native(tmp_path / "straight", "train.micro_batch_size=2")["losses"]   # uninterrupted
    tp2 = tmp_path / "tp2"
    torchrun(2, RUN + ["parallel=tp2_zero2", "train.micro_batch_size=2", "train.exit_at_step=2",
                       f"train.out_dir={tp2}"])
    assert [abs(train_losses(tp2)[s] - straight[s - 1]) < TOL for s in (1, 2)] == [True, True]

    step2 = tp2 / "checkpoints" / "step-00000002"
    full = consolidate(step2, tmp_path / "full")
    assert full["step"] == 2 and full["consolidated_from"]["tp"] == 2
    # the checkpoint's own zero_to_fp32.py joins the TP shards too (DeepSpeed's copy saw rank 0 only)
    env = {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "fp32")], cwd=step2, env=env,
                   check=True, capture_output=True, timeout=120)
    fp32 = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=True)
    assert fp32.keys() == full["model"].keys()
    assert all(torch.equal(fp32[k], full["model"][k]) for k in fp32)
    resumed = tmp_path / "tp1dp2"
    torchrun(2, RUN + ["parallel=zero2", "train.micro_batch_size=1", f"train.resume={tmp_path / 'full'}",
                       f"train.out_dir={resumed}"])
    losses = train_losses(resumed)
    assert sorted(losses) == [3, 4]
    assert abs(losses[3] - straight[2]) < TOL, (losses, straight)

    # reshard back to TP=2: each rank's slice is the weights that rank saved
    subprocess.run([sys.executable, str(REPO / "tools" / "checkpoint_tool.py"), "reshard", str(tmp_path / "full"),
                    str(tmp_path / "tp2-again"), "--tp", "2"], check=True, capture_output=True, timeout=120)
    assert load_checkpoint(tmp_path / "tp2-again")["step"] == 2
    for rank in range(2):
        saved = torch.load(step2 / "deepspeed" / f"mp_rank_{rank:02d}_model_states.pt", weights_only=False)["module"]
        cut = torch.load(tmp_path / "tp2-again" / "tp" / f"model-tp{rank}-of-2.pt", weights_only=False)
        assert saved.keys() == cut.keys()
        assert all(torch.equal(saved[k], cut[k]) for k in saved)
