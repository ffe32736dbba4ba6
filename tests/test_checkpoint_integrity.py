"""Checkpoints are loaded without running code, verified against their checksums, never written
from NaN state, pruned without losing the last good one, and a failed save leaves no torn folder."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_atlas.errors import CheckpointError, DiskFull, NonFiniteState
from megatron_atlas.train import checkpoint as ckpt
from megatron_atlas.train.manifest import MANIFEST, write_manifest

REPO = Path(__file__).resolve().parent.parent


class _RunsCode:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint does to weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state(step: int = 1) -> dict:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": ckpt.rng_state(),
            "loader": {"seed": 0, "epoch": 0, "consumed": step}}


def _save(out: Path, step: int, keep_last: int = 0) -> Path:
    return ckpt.save_checkpoint(out, step, _state(step), "model: {}\n", keep_last)


def _flip(path: Path, offset: int = -200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --- loading runs no code ----------------------------------------------------------------------

def test_crafted_state_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    torch.save({"step": 1, "model": {}, "x": _RunsCode(marker)}, folder / ckpt.STATE_FILE)
    with pytest.raises(CheckpointError, match="refusing to load .*posix.system"):
        ckpt.load_checkpoint(folder)
    assert not marker.exists()


def test_checkpoint_tool_info_and_hf_export_refuse_a_crafted_file(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    torch.save({"step": 1, "model": {}, "x": _RunsCode(marker)}, folder / ckpt.STATE_FILE)
    (folder / "config.yaml").write_text("model: {}\n")
    info = subprocess.run([sys.executable, str(REPO / "tools" / "checkpoint_tool.py"), "info", str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 1 and "refusing to load" in info.stderr and "Traceback" not in info.stderr
    from megatron_atlas.hf.convert import read_native
    bare = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _RunsCode(marker)}, bare)
    with pytest.raises(CheckpointError, match="refusing"):
        read_native(bare, config=folder / "config.yaml")
    assert not marker.exists()


def _deepspeed_folder(root: Path, module_payload) -> Path:
    folder = root / "step-00000002"
    (folder / ckpt.DEEPSPEED_TAG).mkdir(parents=True)
    torch.save({"step": 2, "loader": {}, "layout": {"tp": 1, "cp": 1, "dp": 1, "zero_stage": 0}},
               folder / ckpt.DEEPSPEED_STATE_FILE)
    torch.save({"module": module_payload}, folder / ckpt.DEEPSPEED_TAG / "mp_rank_00_model_states.pt")
    (folder / "config.yaml").write_text("model: {}\n")
    write_manifest(folder)
    return folder


def test_deepspeed_folder_with_a_crafted_pickle_is_refused_before_deepspeed_reads_it(tmp_path):
    marker = tmp_path / "ran"
    good = _deepspeed_folder(tmp_path / "good", {"w": torch.zeros(2)})
    assert ckpt.load_deepspeed_state(good)["step"] == 2
    bad = _deepspeed_folder(tmp_path / "bad", _RunsCode(marker))
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: it pickles posix.system"):
        ckpt.load_deepspeed_state(bad)
    assert not marker.exists()


# --- checksums -----------------------------------------------------------------------------------

def test_every_checkpoint_has_a_manifest_and_flipped_bytes_are_caught(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / MANIFEST).read_text())["files"]
    assert set(manifest) == {ckpt.STATE_FILE, "config.yaml"}
    assert ckpt.verify_checkpoint(path) is None
    _flip(path / ckpt.STATE_FILE)
    assert "state.pt does not match its sha256" in ckpt.verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="state.pt does not match its sha256"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_truncated_or_empty_state_is_named(tmp_path, damage):
    path = _save(tmp_path, 1)
    state = path / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:100] if damage == "truncate" else b"")
    assert "state.pt has" in ckpt.verify_checkpoint(path, hashes=False)
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        ckpt.load_checkpoint(path)


def test_checkpoints_without_a_manifest_are_checked_by_their_zip_crcs(tmp_path):
    path = _save(tmp_path, 1)
    (path / MANIFEST).unlink()   # as written before manifests existed
    assert ckpt.verify_checkpoint(path) is None
    _flip(path / ckpt.STATE_FILE, offset=1200)   # inside a tensor's bytes
    assert "fails its CRC check" in ckpt.verify_checkpoint(path)


def test_loaded_negative_second_moments_are_refused(tmp_path):
    """Damage the manifest cannot see (it was rewritten): the values are checked after loading."""
    state = _state()
    state["optimizer"]["state"][0]["exp_avg_sq"][0, 0] = -1.0
    path = tmp_path / "step-00000001"
    path.mkdir()
    torch.save(state, path / ckpt.STATE_FILE)
    write_manifest(path)
    with pytest.raises(CheckpointError, match=r"optimizer\.state\.0\.exp_avg_sq \(negative values\)"):
        ckpt.load_checkpoint(path)


# --- never from NaN, retention keeps the last good one -----------------------------------------

def test_no_checkpoint_is_written_from_nan_state(tmp_path):
    _save(tmp_path, 1)
    state = _state(2)
    state["model"]["weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteState, match=r"step 2: model\.weight \(NaN/inf\)"):
        ckpt.save_checkpoint(tmp_path, 2, state, "", keep_last=1)
    root = ckpt.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
    assert ckpt.find_latest(tmp_path).name == "step-00000001"


def test_retention_never_deletes_the_last_good_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    root = ckpt.checkpoint_dir(tmp_path)
    for step in (2, 3):   # damaged after they were written
        state = root / f"step-{step:08d}" / ckpt.STATE_FILE
        state.write_bytes(state.read_bytes()[:50])
    _save(tmp_path, 4, keep_last=2)
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000001", "step-00000002", "step-00000003", "step-00000004"]
    _save(tmp_path, 5, keep_last=2)   # two good ones: everything older goes
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000004", "step-00000005"]


def test_retained_counts_good_checkpoints_only():
    names = ["a", "b", "c", "d", "e"]
    good = {"a", "c", "e"}.__contains__
    assert ckpt.retained(names, 2, good) == ["a", "b"]
    assert ckpt.retained(names, 3, good) == []
    assert ckpt.retained(names, 0, good) == []
    assert ckpt.retained(names, 1, lambda n: False) == []


# --- a failed save -------------------------------------------------------------------------------

def test_disk_full_during_a_save_removes_the_torn_folder_and_says_so(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFull, match="no space left on the device while writing the checkpoint of step 2"):
        ckpt.save_checkpoint(tmp_path, 2, _state(2), "", keep_last=1)
    monkeypatch.setattr(torch, "save", real_save)
    root = ckpt.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
    assert ckpt.verify_checkpoint(root / "step-00000001") is None


_LIMITED_WRITE = """
import resource, signal, sys, torch
from megatron_atlas.train import checkpoint as ckpt
out = sys.argv[1]
state = {"step": 2, "model": {"w": torch.zeros(1 << 20)}}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
try:
    ckpt.save_checkpoint(out, 2, state, "", keep_last=1)
except Exception as e:
    print(type(e).__name__)
"""


def test_a_real_failed_write_leaves_no_tmp_folder(tmp_path):
    """The file-size limit makes the kernel refuse the write part-way (no mock)."""
    done = subprocess.run([sys.executable, "-c", _LIMITED_WRITE, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "RuntimeError", done.stderr[-2000:]
    assert list(ckpt.checkpoint_dir(tmp_path).iterdir()) == []


def test_remove_torn_temporaries(tmp_path):
    _save(tmp_path, 1)
    torn = ckpt.temporary_dir(tmp_path, 2)
    torn.mkdir()
    (torn / ckpt.STATE_FILE).write_bytes(b"half")
    assert ckpt.remove_torn_temporaries(tmp_path) == ["step-00000002.tmp"]
    assert not torn.exists() and (ckpt.checkpoint_dir(tmp_path) / "step-00000001").is_dir()
