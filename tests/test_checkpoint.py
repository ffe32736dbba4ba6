"""Checkpoints: bit-exact resume, and a run killed in the middle of a save resumes from the last
complete checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.train.checkpoint import find_latest, load_checkpoint
from megatron_atlas.train.loop import train

REPO = Path(__file__).resolve().parent.parent
RUN = ["train.micro_batch_size=2", "train.seq_len=64", "train.log_every=1", "train.eval_every=0",
       "train.warmup_steps=2", "train.data.eval_batches=1"]


def _run(out_dir: Path, *overrides: str) -> dict:
    cfg = compose("titans", "tiny", "tiny", RUN + [f"train.out_dir={out_dir}", *overrides])
    return train(to_model_config(cfg), to_train_config(cfg), log=lambda line: None)


def _final_weights(out_dir: Path) -> dict:
    return load_checkpoint(find_latest(out_dir))["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_is_bit_exact(tmp_path):
    # the straight run builds its batches inline; the other 3 steps ahead on the prefetch thread,
    # which had built the batches of steps 5-7 when its step-4 checkpoint was written
    straight = _run(tmp_path / "straight", "train.steps=8", "train.prefetch_steps=0")
    ahead = _run(tmp_path / "ahead", "train.steps=8", "train.save_every=4", "train.prefetch_steps=3")
    assert ahead["losses"] == straight["losses"]
    step4 = tmp_path / "ahead" / "checkpoints" / "step-00000004"
    assert load_checkpoint(step4)["loader"]["consumed"] == 4 * 2   # the samples consumed, not built
    first = _run(tmp_path / "split", "train.steps=8", "train.exit_at_step=4")
    second = _run(tmp_path / "split", "train.steps=8", "train.resume=auto", "train.prefetch_steps=3")
    from_ahead = _run(tmp_path / "from-ahead", "train.steps=8", f"train.resume={step4}")
    assert len(straight["losses"]) == 8 and len(second["losses"]) == 4
    assert first["losses"] + second["losses"] == straight["losses"]       # identical floats
    assert from_ahead["losses"] == straight["losses"][4:]
    _assert_same_weights(_final_weights(tmp_path / "straight"), _final_weights(tmp_path / "split"))
    # the optimizer moments went through the checkpoint too
    a = load_checkpoint(find_latest(tmp_path / "straight"))["optimizer"]["state"]
    b = load_checkpoint(find_latest(tmp_path / "split"))["optimizer"]["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    _run(tmp_path, "train.steps=5", "train.save_every=1", "train.keep_last=2")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000004", "step-00000005"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000005"


_KILLED_DURING_SAVE = textwrap.dedent("""
    # Runs training, but stalls half-way through writing the step-4 checkpoint so that the
    # parent test can SIGKILL it there.
    import pathlib, sys, time
    import megatron_atlas.train.checkpoint as checkpoint
    write_file = checkpoint._write_file
    def stalling_write(path, write):
        if path.parent.name == "step-00000004.tmp" and path.name == "state.pt":
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            pathlib.Path(sys.argv[1]).touch()
            time.sleep(600)
        return write_file(path, write)
    checkpoint._write_file = stalling_write
    from megatron_atlas.train.__main__ import main
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    script, marker = tmp_path / "killed_run.py", tmp_path / "saving"
    script.write_text(_KILLED_DURING_SAVE)
    args = ["model=titans", "size=tiny", "train=tiny", *RUN, "train.steps=6", "train.save_every=2",
            f"train.out_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(marker), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the run never reached the step-4 save"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    root = out / "checkpoints"
    assert (root / "step-00000004.tmp").is_dir()                 # the torn write is there ...
    assert find_latest(out) == root / "step-00000002"            # ... and is not what resumes
    resumed = _run(out, "train.steps=6", "train.save_every=2", "train.resume=auto")
    assert len(resumed["losses"]) == 4                           # lost only the steps since step 2
    assert not list(root.glob("*.tmp"))                          # cleaned up by the next save
    straight = _run(tmp_path / "straight", "train.steps=6")
    assert straight["losses"][2:] == resumed["losses"]
    _assert_same_weights(_final_weights(tmp_path / "straight"), _final_weights(out))
