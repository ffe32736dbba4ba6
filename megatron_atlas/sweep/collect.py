"""Gather every run of a sweep into one CSV row: losses, parameters, tokens, FLOPs, throughput.

Reads `metrics.jsonl` as `megatron_atlas/train/loop.py` writes it: `train` records (step, loss,
tokens, flops, tokens_per_s, ...), `eval` records (step, loss, perplexity, accuracy) and one
`summary` at the end. A resumed run appends to the file, so records of steps after its checkpoint
may appear twice: the later one wins. Parameters and FLOPs per token come from the plan. Lines that
are not JSON (a write cut off by a kill, or two trainers writing one file) are skipped, counted in
the `torn_lines` column and reported.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_atlas.sweep.grid import PlannedRun, read_plan

RESULTS_FILE = "results.csv"
COLUMNS = ("run_id", "preset", "budget", "status", "n_layers", "d_model", "n_heads", "params",
           "params_non_embedding", "flops_per_token", "steps_planned", "steps_done", "tokens", "flops",
           "final_loss", "smoothed_loss", "final_train_loss", "best_loss", "n_evals", "tokens_per_s",
           "elapsed_s", "torn_lines")


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(the JSON records of a metrics file, the 1-based numbers of the lines that are not JSON)."""
    if not Path(path).is_file():
        return [], []
    records, torn = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn.append(number)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            torn.append(number)
    return records, torn


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a metrics file (lines that are not JSON are left out)."""
    return read_metrics(path)[0]


def _by_step(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Records of one kind, one per step (the last written), in step order."""
    latest = {r["step"]: r for r in records if r.get("kind") == kind and "step" in r}
    return [latest[s] for s in sorted(latest)]


def smoothed(losses: list[float], k: int) -> float:
    """Mean of the last k evaluation losses (fewer when the run has fewer)."""
    tail = [x for x in losses[-k:] if math.isfinite(x)]
    return sum(tail) / len(tail) if tail else math.nan


def run_row(run: PlannedRun, directory: Path, status: str, smooth_k: int = 2) -> dict[str, Any]:
    records, torn = read_metrics(directory / "metrics.jsonl")
    evals, trains = _by_step(records, "eval"), _by_step(records, "train")
    summaries = [r for r in records if r.get("kind") == "summary"]
    eval_losses = [float(r["loss"]) for r in evals]
    last_train = trains[-1] if trains else {}
    rates = [float(r["tokens_per_s"]) for r in trains if r.get("step", 0) > 1 and "tokens_per_s" in r]
    summary = summaries[-1] if summaries else {}
    return {
        "run_id": run.run_id, "preset": run.preset, "budget": run.budget, "status": status,
        "n_layers": run.n_layers, "d_model": run.d_model, "n_heads": run.n_heads, "params": run.params,
        "params_non_embedding": run.params_non_embedding, "flops_per_token": run.flops_per_token,
        "steps_planned": run.steps, "steps_done": last_train.get("step", 0),
        "tokens": last_train.get("tokens", 0), "flops": last_train.get("flops", 0.0),
        "final_loss": eval_losses[-1] if eval_losses else math.nan,
        "smoothed_loss": smoothed(eval_losses, smooth_k),
        "final_train_loss": float(last_train.get("loss", math.nan)),
        "best_loss": min(eval_losses) if eval_losses else math.nan, "n_evals": len(eval_losses),
        # the summary's rate covers the whole run; the train records' mean excludes the first step
        "tokens_per_s": summary.get("tokens_per_s", sum(rates) / len(rates) if rates else math.nan),
        "elapsed_s": summary.get("elapsed_s", last_train.get("elapsed_s", math.nan)),
        "torn_lines": len(torn),
    }


def collect(out: Path, csv_path: Optional[Path] = None, smooth_k: int = 2,
            log: Callable[[str], None] = print) -> Path:
    """Writes one row per planned run (unfinished ones too, with their status) to the CSV."""
    from megatron_atlas.sweep.runner import run_dir, run_status   # runner imports this module
    _, runs = read_plan(out)
    rows = [run_row(r, run_dir(out, r), run_status(run_dir(out, r), r.steps), smooth_k) for r in runs]
    path = Path(csv_path) if csv_path else Path(out) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "partial", "pending")}
    log(f"collected {len(rows)} runs ({counts['done']} done, {counts['partial']} partial, "
        f"{counts['pending']} pending) -> {path}")
    for run, r in zip(runs, rows):
        if r["torn_lines"]:
            log(f"  {r['run_id']}: {r['torn_lines']} line(s) of {run_dir(out, run) / 'metrics.jsonl'} are not "
                "JSON and were skipped (a write cut off by a kill, or two trainers writing at once)")
    for r in rows:
        log(f"  {r['run_id']:<38} {r['status']:<8} loss {r['final_loss']:.4f} (smoothed {r['smoothed_loss']:.4f}) "
            f"N {r['params_non_embedding']:,} D {r['tokens']:,} {r['tokens_per_s']:.0f} tok/s")
    return path


def read_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of one or more results CSVs (e.g. two sweeps, one per architecture), numbers parsed."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        with Path(path).open(newline="") as f:
            for row in csv.DictReader(f):
                rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(value: str) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
