"""Folder locks name their holder; a sweep is not launched twice, nor a run trained twice; a run
stopped early by train.exit_at_step is not marked done; a fresh start keeps an earlier metrics file;
collect reports the lines it skips."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_atlas.errors import LockHeld
from megatron_atlas.locks import LAUNCH_LOCK, TRAIN_LOCK, folder_lock
from megatron_atlas.sweep import runner
from megatron_atlas.sweep.collect import collect, read_results
from megatron_atlas.sweep.grid import plan_runs, write_plan
from megatron_atlas.sweep.spec import SweepSpec
from megatron_atlas.train.metrics import MetricsWriter

REPO = Path(__file__).resolve().parent.parent

_HOLD = textwrap.dedent("""
    import sys, time
    from megatron_atlas.locks import folder_lock
    with folder_lock(sys.argv[1], sys.argv[2], "a test"):
        print("held", flush=True)
        time.sleep(60)
""")


def _holder(folder: Path, name: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), name], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_folder_lock_names_the_holders_pid_and_host(tmp_path):
    import socket
    proc = _holder(tmp_path, TRAIN_LOCK)
    try:
        with pytest.raises(LockHeld, match=rf"pid {proc.pid} on host {socket.gethostname()}"):
            with folder_lock(tmp_path, TRAIN_LOCK, "training"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with folder_lock(tmp_path, TRAIN_LOCK, "training"):   # the kernel dropped the killed holder's lock
        pass


def _fake_costs(model_cfg, seq_len):
    n = 1000 * model_cfg.d_model
    return 2 * n, n, 8.0 * n


@pytest.fixture
def sweep(tmp_path) -> tuple[Path, list]:
    spec = SweepSpec(presets=["transformer"], size="tiny", train="tiny", budgets=[1e10], depths=[1, 2],
                     aspect_ratio=16, head_dim=16, min_steps=1, overrides=["train.seq_len=32"]).validate()
    runs = plan_runs(spec, log=lambda _: None, costs=_fake_costs)
    write_plan(spec, runs, tmp_path)
    return tmp_path, runs


def _train_record(directory: Path, step: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "train", "step": step, "loss": 1.0}) + "\n")


def test_a_second_launch_of_one_sweep_folder_is_refused(sweep):
    out, _ = sweep
    proc = _holder(out, LAUNCH_LOCK)
    try:
        with pytest.raises(LockHeld, match=f"pid {proc.pid}"):
            runner.launch_local(out, log=lambda _: None, run_one=lambda *a: pytest.fail("trained"))
    finally:
        proc.kill()
        proc.wait()


def test_a_run_another_launch_is_training_is_passed_over(sweep):
    out, runs = sweep
    busy = runner.run_dir(out, runs[0])
    proc = _holder(busy, LAUNCH_LOCK)
    trained: list[str] = []

    def finish(command, directory, prefix, log):
        trained.append(directory.name)
        _train_record(directory, runs[1].steps)
        return 0
    try:
        outcomes = runner.launch_local(out, only=[r.run_id for r in runs], log=lambda _: None, run_one=finish)
    finally:
        proc.kill()
        proc.wait()
    assert outcomes == {runs[0].run_id: "busy", runs[1].run_id: "ran"} and trained == [runs[1].run_id]


def test_a_run_that_exited_at_exit_at_step_is_not_done(sweep):
    out, runs = sweep
    run = runs[0]

    def exit_early(command, directory, prefix, log):   # what train.exit_at_step does: exit 0 at step 2
        _train_record(directory, 2)
        return 0
    outcomes = runner.launch_local(out, only=[run.run_id], log=lambda _: None, run_one=exit_early)
    directory = runner.run_dir(out, run)
    assert outcomes[run.run_id] == "stopped at step 2" and not (directory / runner.DONE_MARKER).exists()
    assert runner.run_status(directory, run.steps) == "partial"
    # a DONE marker that main wrote for such a run (with the summary's `steps = train.steps`)
    (directory / runner.DONE_MARKER).write_text(f"{run.steps}\n")
    with (directory / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "summary", "steps": run.steps}) + "\n")
    assert runner.run_status(directory, run.steps) == "partial"
    _train_record(directory, run.steps)
    assert runner.run_status(directory, run.steps) == "done"


def test_collect_counts_and_reports_lines_that_are_not_json(sweep):
    out, runs = sweep
    directory = runner.run_dir(out, runs[0])
    _train_record(directory, 1)
    with (directory / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st{"kind": "eval", "step": 1, "loss": 2.0}\n')   # two writers interleaved
    _train_record(directory, 2)
    lines: list[str] = []
    rows = {r["run_id"]: r for r in read_results([collect(out, log=lines.append)])}
    assert rows[runs[0].run_id]["torn_lines"] == 1 and rows[runs[1].run_id]["torn_lines"] == 0
    assert any("1 line(s) of" in line and "not JSON" in line for line in lines)


def test_a_fresh_start_sets_an_earlier_metrics_file_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 7}\n')
    writer = MetricsWriter(path)            # e.g. train.resume=auto that found no checkpoint
    writer.write("train", step=1)
    writer.close()
    assert (tmp_path / "metrics.1.jsonl").read_text() == '{"kind": "train", "step": 7}\n'
    assert json.loads(path.read_text())["step"] == 1
    MetricsWriter(path, append=True).close()   # a resume appends, sets nothing aside
    assert not (tmp_path / "metrics.2.jsonl").exists()
