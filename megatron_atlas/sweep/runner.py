"""Launch a planned sweep: locally one run after another, or as a Slurm job array.

A run is `done` when its checkpoints or its `train` records reach the planned step count (the
DONE marker is written then; on its own it counts only when nothing contradicts it, e.g. after the
checkpoints were cleaned up); `partial` when it has a checkpoint or metrics but is not done, also a
run that exited 0 early (`train.exit_at_step`): it continues from its latest checkpoint, since every
run is launched with `train.resume=auto`; `pending` otherwise. Done runs are skipped, so rerunning
`launch` after a crash, a time limit or a cancelled array only does what is left.

Locks (megatron_atlas/locks.py): a whole-plan launch holds the sweep folder's lock, so a second one
stops with the holder named; every launch (array tasks too) holds a run folder's lock while it
trains that run, and passes over runs another launch is training.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_atlas.atomic import write_text_atomic
from megatron_atlas.errors import LockHeld
from megatron_atlas.locks import LAUNCH_LOCK, folder_lock
from megatron_atlas.sweep.collect import read_records
from megatron_atlas.sweep.grid import PlannedRun, read_plan
from megatron_atlas.sweep.spec import SweepSpec
from megatron_atlas.train.metrics import format_duration

REPO = Path(__file__).resolve().parents[2]
DONE_MARKER = "DONE"
ARRAY_SCRIPT = REPO / "launch" / "sweep_array.sbatch"
STATUSES = ("done", "partial", "pending")


def run_dir(out: Path, run: PlannedRun) -> Path:
    return Path(out) / "runs" / run.run_id


def latest_checkpoint_step(directory: Path) -> Optional[int]:
    """Step of the checkpoint `train.resume=auto` would load (None when there is none)."""
    from megatron_atlas.train.checkpoint import find_latest
    path = find_latest(directory)
    if path is None:
        return None
    digits = "".join(ch for ch in path.name if ch.isdigit())
    return int(digits) if digits else None


def steps_reached(directory: Path, records: Optional[list] = None) -> int:
    """The furthest step the run's latest checkpoint or its `train` records show (0: none)."""
    records = read_records(directory / "metrics.jsonl") if records is None else records
    trained = [int(r["step"]) for r in records if r.get("kind") == "train" and "step" in r]
    return max([latest_checkpoint_step(directory) or 0, *trained])


def run_status(directory: Path, planned_steps: int) -> str:
    """`done`, `partial` or `pending` (module docstring)."""
    records = read_records(directory / "metrics.jsonl")
    reached = steps_reached(directory, records)
    if reached >= planned_steps or ((directory / DONE_MARKER).is_file() and reached == 0):
        return "done"
    if records or reached or latest_checkpoint_step(directory) is not None:
        return "partial"
    return "pending"


def train_command(run: PlannedRun, directory: Path, launcher: Optional[str] = None) -> list[str]:
    """`python -m megatron_atlas.train ...`; `launcher` (e.g. "torchrun --nproc_per_node 8")
    replaces the interpreter."""
    head = shlex.split(launcher) if launcher else [sys.executable]
    return [*head, "-m", "megatron_atlas.train", *run.train_args(directory)]


def shards_to_prepare(runs: Sequence[PlannedRun]) -> Optional[Path]:
    """The shard folder the runs read when it has no index.json yet (None: nothing to prepare)."""
    from megatron_atlas.configs import compose
    cfg = compose(runs[0].preset, runs[0].size, runs[0].train, runs[0].overrides)
    if cfg.train.data.kind != "shards":
        return None
    path = Path(cfg.train.data.shards.path)
    return None if (path / "index.json").is_file() else path


def ensure_data(spec: SweepSpec, runs: Sequence[PlannedRun], log: Callable[[str], None] = print) -> None:
    """Runs tools/prepare_data.py with the spec's `data_prep` arguments when the shards are missing."""
    path = shards_to_prepare(runs)
    if path is None:
        return
    if spec.data_prep is None:
        raise FileNotFoundError(f"the runs read shards from {path}, which has no index.json; make them with "
                                f"tools/prepare_data.py --out {path} ... (or set data_prep in the sweep config)")
    command = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--out", str(path), *spec.data_prep]
    log(f"preparing shards: {shlex.join(command)}")
    subprocess.run(command, check=True)


def _run_one(command: list[str], directory: Path, prefix: str, log: Callable[[str], None]) -> int:
    """Runs the trainer with its output in `directory/train.log`; echoes evals and the end."""
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if env.pop("SWEEP_OPENBLAS_DEFAULTED", None):   # set by tools/sweep.py for the fit, not for training
        env.pop("OPENBLAS_NUM_THREADS", None)
    with (directory / "train.log").open("a") as logfile:
        logfile.write(f"$ {shlex.join(command)}\n")
        logfile.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            logfile.write(line)
            logfile.flush()
            if line.startswith(("eval ", "done:", "resumed", "config error", "training stopped", "error:",
                                "Traceback")):
                log(f"{prefix} {line.rstrip()}")
        return proc.wait()


def launch_local(out: Path, only: Optional[Sequence[str]] = None, launcher: Optional[str] = None,
                 log: Callable[[str], None] = print,
                 run_one: Callable[[list[str], Path, str, Callable[[str], None]], int] = _run_one) -> dict[str, str]:
    """Runs every unfinished run of the plan in order; returns {run_id: outcome}. A whole-plan
    launch holds the sweep folder's lock (LockHeld when another one does)."""
    if only:
        return _launch(out, only, launcher, log, run_one)
    with folder_lock(out, LAUNCH_LOCK, "a sweep launch"):
        return _launch(out, only, launcher, log, run_one)


def _launch(out: Path, only: Optional[Sequence[str]], launcher: Optional[str], log: Callable[[str], None],
            run_one: Callable[[list[str], Path, str, Callable[[str], None]], int]) -> dict[str, str]:
    spec, runs = read_plan(out)
    if only:
        unknown = sorted(set(only) - {r.run_id for r in runs})
        if unknown:
            raise KeyError(f"not in the plan of {out}: {', '.join(unknown)}")
        runs = [r for r in runs if r.run_id in set(only)]
    ensure_data(spec, runs, log)
    total_flops = sum(r.flops for r in runs)
    done_flops, start, outcomes = 0.0, time.perf_counter(), {}
    for i, run in enumerate(runs, 1):
        directory = run_dir(out, run)
        status = run_status(directory, run.steps)
        prefix = f"[{i}/{len(runs)}] {run.run_id}"
        if status == "done":
            log(f"{prefix}: done, skipped")
            outcomes[run.run_id] = "skipped"
            total_flops -= run.flops
            continue
        t0 = time.perf_counter()
        try:
            with folder_lock(directory, LAUNCH_LOCK, f"sweep run {run.run_id}"):
                status = run_status(directory, run.steps)   # again: another launch may have finished it
                outcomes[run.run_id] = "skipped" if status == "done" else \
                    _train_run(run, directory, status, prefix, launcher, log, run_one)
        except LockHeld as e:
            outcomes[run.run_id] = "busy"
            log(f"{prefix}: passed over: {e}")
        if outcomes[run.run_id] in ("busy", "skipped"):
            total_flops -= run.flops
            continue
        done_flops += run.flops
        elapsed = time.perf_counter() - start
        eta = elapsed / done_flops * (total_flops - done_flops) if done_flops else float("nan")
        log(f"{prefix}: {format_duration(time.perf_counter() - t0)} | sweep {100 * done_flops / max(total_flops, 1e-30):.0f}% "
            f"of FLOPs to run, elapsed {format_duration(elapsed)}, eta {format_duration(eta)}")
    return outcomes


def _train_run(run: PlannedRun, directory: Path, status: str, prefix: str, launcher: Optional[str],
               log: Callable[[str], None], run_one: Callable[[list[str], Path, str, Callable[[str], None]], int]) -> str:
    """Trains one run (resuming it); DONE only once its steps are all there. Returns the outcome."""
    step = latest_checkpoint_step(directory) if status == "partial" else None
    log(f"{prefix}: {'resuming from step ' + str(step) if step else 'starting'} "
        f"({run.steps} steps, {run.tokens:,} tokens, {run.flops:.3g} FLOPs)")
    rc = run_one(train_command(run, directory, launcher), directory, prefix, log)
    if rc != 0:
        log(f"{prefix}: FAILED with exit code {rc}; log: {directory / 'train.log'}")
        return f"failed (exit {rc}; see {directory / 'train.log'})"
    reached = steps_reached(directory)
    if reached < run.steps:   # exit 0 before the end: train.exit_at_step, a time-limited job
        log(f"{prefix}: stopped at step {reached} of {run.steps}; launch again to continue")
        return f"stopped at step {reached}"
    write_text_atomic(directory / DONE_MARKER, f"{run.steps}\n")
    return "ran"


def slurm_command(out: Path, max_parallel: int = 0, extra: Sequence[str] = ()) -> Optional[list[str]]:
    """`sbatch --array=...` over the unfinished runs (indices into out/slurm/tasks.txt); None when
    every run is done. Writes the task list."""
    spec, runs = read_plan(out)
    slurm_dir = Path(out) / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(slurm_dir / "tasks.txt", "".join(f"{r.run_id}\n" for r in runs))
    todo = [str(i) for i, r in enumerate(runs) if run_status(run_dir(out, r), r.steps) != "done"]
    if not todo:
        return None
    array = ",".join(todo) + (f"%{max_parallel}" if max_parallel > 0 else "")
    return ["sbatch", f"--array={array}", f"--job-name=sweep-{spec.name}",
            f"--output={slurm_dir.resolve()}/%A_%a.out", *extra, str(ARRAY_SCRIPT), str(Path(out).resolve())]


def launch_slurm(out: Path, dry_run: bool, max_parallel: int = 0, extra: Sequence[str] = (),
                 log: Callable[[str], None] = print) -> Optional[list[str]]:
    spec, runs = read_plan(out)
    command = slurm_command(out, max_parallel, extra)
    if command is None:
        log("every run is done; nothing to submit")
        return None
    if dry_run:
        log(shlex.join(command))
        return command
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch is not on PATH (no Slurm here); use --dry-run to see the command")
    ensure_data(spec, runs, log)   # once, before the array tasks start reading
    subprocess.run(command, check=True)
    return command


def task_run_id(out: Path, index: int) -> str:
    """The run of array task `index` (a line of out/slurm/tasks.txt, else the plan's order)."""
    tasks = Path(out) / "slurm" / "tasks.txt"
    ids = tasks.read_text().split() if tasks.is_file() else [r.run_id for r in read_plan(out)[1]]
    if not 0 <= index < len(ids):
        raise IndexError(f"task index {index} is outside the {len(ids)} runs of {out}")
    return ids[index]


def statuses(out: Path) -> dict[str, str]:
    _, runs = read_plan(out)
    return {r.run_id: run_status(run_dir(out, r), r.steps) for r in runs}
