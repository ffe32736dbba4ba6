"""Sweep launch and collect (megatron_atlas/sweep/{runner,collect}.py) on fake run folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_atlas.sweep import runner
from megatron_atlas.sweep.collect import collect, read_results
from megatron_atlas.sweep.grid import plan_runs, write_plan
from megatron_atlas.sweep.spec import SweepSpec


def _fake_costs(model_cfg, seq_len):
    """Stand-in for the meta-device count: params and FLOPs/token grow with width (fast, no torch)."""
    n = 1000 * model_cfg.d_model
    return 2 * n, n, 8.0 * n


@pytest.fixture
def sweep(tmp_path) -> tuple[Path, list]:
    spec = SweepSpec(presets=["transformer"], size="tiny", train="tiny", budgets=[1e10, 2e10], depths=[1, 2, 3],
                     aspect_ratio=16, head_dim=16, min_steps=1, overrides=["train.seq_len=32"]).validate()
    runs = plan_runs(spec, log=lambda _: None, costs=_fake_costs)
    write_plan(spec, runs, tmp_path)
    return tmp_path, runs


def _metrics(directory: Path, records: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "metrics.jsonl").open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _checkpoint(directory: Path, step: int) -> None:
    ckpt = directory / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"")
    (directory / "checkpoints" / "latest").write_text(ckpt.name)


def _train(step: int, tokens_per_step: int, loss: float) -> dict:
    return {"kind": "train", "step": step, "loss": loss, "tokens": step * tokens_per_step,
            "flops": step * tokens_per_step * 1e3, "tokens_per_s": 100.0 + step, "elapsed_s": float(step)}


def _make_states(out: Path, runs: list) -> dict[str, str]:
    """runs 0..5 as: DONE marker, summary record, checkpoint only, metrics only, nothing, stale summary."""
    dirs = [runner.run_dir(out, r) for r in runs]
    (dirs[0]).mkdir(parents=True, exist_ok=True)
    (dirs[0] / runner.DONE_MARKER).write_text("1\n")
    tps = runs[1].tokens_per_step
    _metrics(dirs[1], [_train(runs[1].steps, tps, 3.0), {"kind": "eval", "step": runs[1].steps, "loss": 2.9},
                       {"kind": "summary", "steps": runs[1].steps, "tokens_per_s": 123.0, "elapsed_s": 9.0}])
    _checkpoint(dirs[2], 1)
    _metrics(dirs[3], [_train(1, runs[3].tokens_per_step, 4.0)])
    _metrics(dirs[5], [{"kind": "summary", "steps": runs[5].steps + 7}])   # a different plan's run
    return {runs[0].run_id: "done", runs[1].run_id: "done", runs[2].run_id: "partial",
            runs[3].run_id: "partial", runs[4].run_id: "pending", runs[5].run_id: "partial"}


def test_status_skip_and_resume(sweep):
    out, runs = sweep
    expected = _make_states(out, runs)
    assert runner.statuses(out) == expected
    assert runner.latest_checkpoint_step(runner.run_dir(out, runs[2])) == 1

    launched: list[list[str]] = []

    def finished(directory: Path) -> int:   # what a trainer that exits 0 leaves: its last train record
        run = next(r for r in runs if r.run_id == directory.name)
        _metrics(directory, [_train(run.steps, run.tokens_per_step, 2.0)])
        return 0

    def fake_run(command, directory, prefix, log):
        launched.append(command)
        return 1 if directory.name == runs[4].run_id else finished(directory)   # one run fails

    lines: list[str] = []
    outcomes = runner.launch_local(out, log=lines.append, run_one=fake_run)
    todo = [r.run_id for r in runs if expected[r.run_id] != "done"]
    assert [Path(c[c.index("train.resume=auto") - 1].split("=", 1)[1]).name for c in launched] == todo
    assert all(c[1:3] == ["-m", "megatron_atlas.train"] and "model=transformer" in c for c in launched)
    assert outcomes[runs[0].run_id] == outcomes[runs[1].run_id] == "skipped"
    assert outcomes[runs[4].run_id].startswith("failed (exit 1")
    assert any("resuming from step 1" in line for line in lines)
    assert not (runner.run_dir(out, runs[4]) / runner.DONE_MARKER).exists()
    # second launch: only the failed run is left
    launched.clear()
    runner.launch_local(out, log=lines.append, run_one=lambda c, d, p, log: launched.append(c) or finished(d))
    assert len(launched) == 1 and f"train.out_dir={runner.run_dir(out, runs[4])}" in launched[0]
    assert set(runner.statuses(out).values()) == {"done"}


def test_launcher_replaces_the_interpreter(sweep):
    out, runs = sweep
    command = runner.train_command(runs[0], runner.run_dir(out, runs[0]), "torchrun --nproc_per_node 2")
    assert command[:5] == ["torchrun", "--nproc_per_node", "2", "-m", "megatron_atlas.train"]


def test_slurm_array_covers_unfinished_runs_only(sweep):
    out, runs = sweep
    expected = _make_states(out, runs)
    command = runner.slurm_command(out, max_parallel=2, extra=["--partition=gpu"])
    todo = [str(i) for i, r in enumerate(runs) if expected[r.run_id] != "done"]
    assert command[0] == "sbatch" and command[1] == f"--array={','.join(todo)}%2"
    assert "--partition=gpu" in command and command[-2].endswith("launch/sweep_array.sbatch")
    assert Path(command[-2]).is_file() and command[-1] == str(out.resolve())
    assert runner.task_run_id(out, 3) == runs[3].run_id
    with pytest.raises(IndexError, match="task index 99"):
        runner.task_run_id(out, 99)
    for r in runs:   # done: the last step's record (a DONE marker alone would not outweigh a checkpoint)
        _metrics(runner.run_dir(out, r), [_train(r.steps, r.tokens_per_step, 2.0)])
    assert runner.slurm_command(out) is None


def test_collect_reads_losses_tokens_and_resumed_duplicates(sweep):
    out, runs = sweep
    directory, tps = runner.run_dir(out, runs[0]), runs[0].tokens_per_step
    s = runs[0].steps
    _metrics(directory, [_train(1, tps, 5.0), {"kind": "eval", "step": 1, "loss": 4.0},
                         {"kind": "eval", "step": 2, "loss": 3.5}])
    # killed after step 2's eval, resumed from step 1's checkpoint: step 2 is logged again
    _metrics(directory, [{"kind": "eval", "step": 2, "loss": 3.0}, _train(s, tps, 2.5),
                         {"kind": "eval", "step": s, "loss": 2.0},
                         {"kind": "summary", "steps": s, "tokens_per_s": 321.0, "elapsed_s": 7.0}])
    (directory / "metrics.jsonl").open("a").write('{"kind": "eval", "st')   # torn last line
    path = collect(out, smooth_k=2, log=lambda _: None)
    rows = {r["run_id"]: r for r in read_results([path])}
    row = rows[runs[0].run_id]
    assert row["status"] == "done" and row["final_loss"] == 2.0 and row["smoothed_loss"] == pytest.approx(2.5)
    assert row["best_loss"] == 2.0 and row["n_evals"] == 3 and row["final_train_loss"] == 2.5
    assert row["tokens"] == s * tps and row["steps_done"] == s and row["tokens_per_s"] == 321.0
    assert row["params_non_embedding"] == runs[0].params_non_embedding and row["budget"] == runs[0].budget
    pending = rows[runs[1].run_id]
    assert pending["status"] == "pending" and pending["final_loss"] != pending["final_loss"]   # nan
