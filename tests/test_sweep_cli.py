"""tools/sweep.py end to end: a real mini sweep through the CLI, reruns that skip, comparison plots."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from megatron_atlas.sweep.cli import main
from megatron_atlas.sweep.fit import FlopsModel, Law, optimal_allocation

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "sweep.py"
MINI = """\
name: mini
presets: [transformer]
size: tiny
train: tiny
budgets: [6.0e7, 1.2e8]
depths: [1, 2]
aspect_ratio: 16
head_dim: 16
min_steps: 5
flops_tolerance: 0.1
evals_per_run: 1
overrides: [train.micro_batch_size=2, train.seq_len=32, train.tensorboard=false, train.data.eval_batches=1]
"""


def _sweep(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_mini_sweep_end_to_end_then_rerun_skips(tmp_path):
    config, out = tmp_path / "mini.yaml", tmp_path / "sweep"
    config.write_text(MINI)
    # 4 runs of 5-34 steps: about a minute on 2 idle cores, mostly process start-up
    done = _sweep("all", "--config", str(config), "--out", str(out), "--bootstrap", "10")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "launch: 4 ran, 0 skipped (done), 0 failed" in done.stdout
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    for r in rows:
        assert int(r["steps_done"]) == int(r["steps_planned"]) >= 5
        assert float(r["flops"]) == float(r["tokens"]) * float(r["flops_per_token"])
        assert 0 < float(r["final_loss"]) < 6 and float(r["tokens_per_s"]) > 0
        assert int(r["params_non_embedding"]) < int(r["params"])
    fit = json.loads((out / "fit.json").read_text())["groups"]["transformer"]
    assert fit["n_runs"] == 4 and math.isfinite(fit["direct"]["alpha"]) and len(fit["direct"]["optimal"]) == 2
    assert "compute-optimal" not in done.stderr and "N_opt" in done.stdout
    for name in ("isoflop.png", "frontier.png", "optimal.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    again = _sweep("launch", "--out", str(out))
    assert again.returncode == 0 and "launch: 0 ran, 4 skipped (done), 0 failed" in again.stdout
    slurm = _sweep("launch", "--out", str(out), "--slurm", "--dry-run")
    assert slurm.returncode == 0 and "every run is done" in slurm.stdout


def test_every_subcommand_has_help():
    for command in ("plan", "launch", "status", "collect", "fit", "plot", "all"):
        result = _sweep(command, "--help", timeout=60)
        assert result.returncode == 0 and "--out" in result.stdout, command


def _fake_csv(path: Path, preset: str, law: Law, flops: FlopsModel) -> Path:
    """An IsoFLOP grid's results as collect writes them, losses from a known law."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "preset", "budget", "status", "params", "params_non_embedding", "flops_per_token",
                         "tokens", "flops", "final_loss", "smoothed_loss", "best_loss"])
        for C in (1e17, 1e18, 1e19):
            n_opt, _ = optimal_allocation(law, flops, C)
            for i, N in enumerate(float(n_opt) * np.logspace(-0.6, 0.6, 5)):
                D, L = C / flops(N), float(law(N, C / flops(N)))
                writer.writerow([f"{preset}-{C:g}-{i}", preset, C, "done", 1.2 * N, N, flops(N), D, C, L, L, L])
    return path


def test_two_architectures_on_one_figure_is_one_flag(tmp_path, capsys):
    a = _fake_csv(tmp_path / "a.csv", "atlas", Law(1.7, 400.0, 400.0, 0.34, 0.28), FlopsModel(20.0, 1.0))
    b = _fake_csv(tmp_path / "b.csv", "transformer", Law(1.8, 400.0, 400.0, 0.30, 0.30), FlopsModel(6.0, 1.0))
    assert main(["fit", "--out", str(tmp_path), "--csv", str(a), str(b), "--bootstrap", "0"]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert set(fit["groups"]) == {"atlas", "transformer"}
    assert abs(fit["groups"]["atlas"]["direct"]["alpha"] - 0.34) < 0.02
    assert main(["plot", "--out", str(tmp_path), "--csv", str(a), str(b), "--compare", "atlas", "transformer"]) == 0
    assert all((tmp_path / "plots" / n).stat().st_size > 10_000 for n in ("isoflop.png", "frontier.png", "optimal.png"))
    assert main(["plot", "--out", str(tmp_path), "--csv", str(a), "--compare", "atlas", "dla"]) == 2
    assert "--compare dla: no runs with preset = that" in capsys.readouterr().err
