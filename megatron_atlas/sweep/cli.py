"""`python tools/sweep.py {plan,launch,status,collect,fit,plot,all} ...` (see --help of each)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

DESCRIPTION = """\
Scaling-law sweeps. A sweep folder (--out) holds plan.json, runs/<id>/ (run.yaml, then the
trainer's config.yaml, metrics.jsonl, checkpoints/, train.log, DONE), results.csv, fit.json, plots/.

  plan     IsoFLOP grid from configs/sweep/*.yaml: budgets x depths x presets -> run configs
  launch   train the runs locally one after another (or --slurm: a job array); skips finished
           runs and resumes unfinished ones from their checkpoints
  status   done / partial / pending per run
  collect  final and smoothed validation loss, params, tokens, FLOPs, throughput -> results.csv
  fit      L(N, D) = E + A/N^alpha + B/D^beta (Huber, log space, bootstrap) and IsoFLOP parabolas
  plot     isoflop.png, frontier.png, optimal.png
  all      plan + launch + collect + fit + plot

example (the README demo, about 10 minutes on 2 CPU cores):
  python tools/sweep.py all --config configs/sweep/tiny.yaml --out runs/sweep_tiny
"""


def _log(line: str) -> None:
    print(line, flush=True)


def cmd_plan(args: argparse.Namespace) -> int:
    from megatron_atlas.sweep.grid import plan_runs, plan_table, write_plan
    from megatron_atlas.sweep.spec import load_spec
    spec = load_spec(args.config, args.set)
    runs = plan_runs(spec, log=_log)
    _log(plan_table(runs))
    if args.dry_run:
        return 0
    path = write_plan(spec, runs, Path(args.out))
    _log(f"planned {len(runs)} runs ({len(spec.presets)} presets x {len(spec.budgets)} budgets x "
         f"{len(spec.depths)} depths, before any dropped) -> {path}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from megatron_atlas.sweep import runner
    out = Path(args.out)
    if args.slurm:
        runner.launch_slurm(out, args.dry_run, args.max_parallel, args.sbatch_arg, log=_log)
        return 0
    only = list(args.only or [])
    if args.index is not None:
        only.append(runner.task_run_id(out, args.index))
    if args.dry_run:
        _, runs = runner.read_plan(out)
        for run in runs:
            if not only or run.run_id in only:
                directory = runner.run_dir(out, run)
                status = runner.run_status(directory, run.steps)
                _log(f"# {run.run_id}: {status}" + ("" if status == "done" else
                     "\n" + " ".join(runner.train_command(run, directory, args.launcher))))
        return 0
    outcomes = runner.launch_local(out, only or None, args.launcher, log=_log)
    failed = [k for k, v in outcomes.items() if v.startswith("failed")]
    stopped = sum(v.startswith("stopped") for v in outcomes.values())
    busy = sum(v == "busy" for v in outcomes.values())
    extra = (f", {stopped} stopped early" if stopped else "") + (f", {busy} busy (another launch trains them)"
                                                                 if busy else "")
    _log(f"launch: {sum(v == 'ran' for v in outcomes.values())} ran, "
         f"{sum(v == 'skipped' for v in outcomes.values())} skipped (done){extra}, {len(failed)} failed")
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from megatron_atlas.sweep.runner import statuses
    result = statuses(Path(args.out))
    for run_id, status in result.items():
        _log(f"{status:<8} {run_id}")
    _log(", ".join(f"{s}: {sum(v == s for v in result.values())}" for s in ("done", "partial", "pending")))
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from megatron_atlas.sweep.collect import collect
    collect(Path(args.out), args.csv, args.smooth_k, log=_log)
    return 0


def _csv_paths(args: argparse.Namespace) -> list[Path]:
    from megatron_atlas.sweep.collect import RESULTS_FILE
    paths = [Path(p) for p in args.csv] if args.csv else [Path(args.out) / RESULTS_FILE]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no results CSV at {p}: run `tools/sweep.py collect` first")
    return paths


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from megatron_atlas.sweep.collect import read_results
    rows = read_results(_csv_paths(args))
    if args.compare:
        present = {str(r[args.by]) for r in rows}
        missing = [c for c in args.compare if c not in present]
        if missing:
            raise ValueError(f"--compare {' '.join(missing)}: no runs with {args.by} = that; present: "
                             f"{', '.join(sorted(present))}")
        rows = [r for r in rows if str(r[args.by]) in args.compare]
    if not rows:
        raise ValueError("no runs to fit")
    return rows


def _fit(args: argparse.Namespace, rows: list[dict[str, Any]], bootstrap: int) -> dict[str, Any]:
    from megatron_atlas.sweep.fit import fit_results
    return fit_results(rows, by=args.by, loss=args.loss, params=args.params, bootstrap=bootstrap,
                       level=args.level, seed=args.seed)


def cmd_fit(args: argparse.Namespace) -> int:
    from megatron_atlas.atomic import write_text_atomic
    from megatron_atlas.sweep.fit import report
    rows = _rows(args)
    start = time.perf_counter()
    _log(f"fitting {len(rows)} runs ({args.bootstrap} bootstrap resamples) ...")
    fit = _fit(args, rows, args.bootstrap)
    _log(report(fit))
    path = Path(args.fit_out) if args.fit_out else Path(args.out) / "fit.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(fit, indent=1))
    _log(f"fit written to {path} ({time.perf_counter() - start:.1f}s)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from megatron_atlas.sweep.plot import plot_all
    rows = _rows(args)
    fit = None
    stored = Path(args.fit) if args.fit else Path(args.out) / "fit.json"
    groups = {str(r[args.by]) for r in rows}
    if stored.is_file():
        fit = json.loads(stored.read_text())
        if fit.get("by") != args.by or not groups <= set(fit["groups"]):
            fit = None   # made for other runs: refit below
    if fit is None:   # point estimates only: intervals come from `fit`
        fit = _fit(args, rows, 0)
    fit = {**fit, "groups": {k: v for k, v in fit["groups"].items() if k in groups}}
    plots_dir = Path(args.plots_dir) if args.plots_dir else Path(args.out) / "plots"
    for path in plot_all(rows, fit, plots_dir):
        _log(f"wrote {path}")
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    steps = [("plan", cmd_plan), ("launch", cmd_launch), ("collect", cmd_collect), ("fit", cmd_fit),
             ("plot", cmd_plot)]
    for name, step in steps:
        _log(f"==== {name}")
        rc = step(args)
        if rc and name != "launch":
            return rc
        if rc:
            _log("some runs failed: collecting and fitting the finished ones")
    _log(f"==== sweep finished in {time.perf_counter() - start:.0f}s: {args.out}")
    return 0


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the sweep folder")


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", nargs="+", help="results CSV(s) (default: OUT/results.csv); several CSVs "
                   "(e.g. one sweep per architecture) are fitted and drawn together")
    p.add_argument("--by", default="preset", help="column whose values are fitted and drawn separately "
                   "(default: preset, i.e. one law per architecture)")
    p.add_argument("--compare", nargs="+", metavar="NAME",
                   help="only these values of --by, on one figure (e.g. --compare atlas transformer)")
    p.add_argument("--loss", default="final_loss", choices=("final_loss", "smoothed_loss", "best_loss"),
                   help="validation loss column (default final_loss: the eval at the end of the schedule)")
    p.add_argument("--params", default="params_non_embedding", choices=("params_non_embedding", "params"),
                   help="N: parameters without embeddings (default) or all")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/sweep.py", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def plan_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="configs/sweep/NAME.yaml or NAME")
        p.add_argument("set", nargs="*", metavar="KEY=VALUE",
                       help="sweep overrides, e.g. budgets=[1e10,1e11] depths=[1,2,3] presets=[atlas,transformer]")

    def launch_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--slurm", action="store_true", help="submit unfinished runs as a job array "
                       "(launch/sweep_array.sbatch; one array task per run)")
        p.add_argument("--max-parallel", type=int, default=0, help="Slurm: at most this many tasks at once")
        p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                       help="extra sbatch argument, e.g. --sbatch-arg=--partition=gpu (repeatable)")
        p.add_argument("--launcher", help='replaces the interpreter in each run\'s command, e.g. '
                       '"torchrun --nproc_per_node 8"')

    def fit_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0: none)")
        p.add_argument("--fit-out", help="fit JSON path (default OUT/fit.json)")

    def plot_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plots-dir", help="where the PNGs go (default OUT/plots)")
        p.add_argument("--fit", help="fit JSON with intervals (default OUT/fit.json when it covers the "
                       "runs drawn; otherwise point fits are made)")

    p = sub.add_parser("plan", help="write the IsoFLOP grid's run configs and plan.json",
                       description="Plan an IsoFLOP grid: for each budget C and depth, width and heads by "
                       "the size rule (megatron_atlas/sweep/grid.py) and D = C / training FLOPs per token.")
    _add_out(p)
    plan_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("launch", help="run the plan (locally or as a Slurm array)",
                       description="Train every unfinished run: locally one after another (progress and "
                       "each run's evals on the console, full output in runs/<id>/train.log), or --slurm. "
                       "Finished runs are skipped; unfinished ones resume (train.resume=auto).")
    _add_out(p)
    launch_args(p)
    p.add_argument("--only", nargs="+", metavar="RUN_ID", help="only these runs")
    p.add_argument("--index", type=int, help="only the run of this Slurm array task index")
    p.add_argument("--dry-run", action="store_true", help="print the commands (sbatch with --slurm) instead")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("status", help="done / partial / pending per run")
    _add_out(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("collect", help="gather the runs' metrics into results.csv")
    _add_out(p)
    p.add_argument("--csv", help="CSV path (default OUT/results.csv)")
    p.add_argument("--smooth-k", type=int, default=2, help="smoothed_loss = mean of the last k evals")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("fit", help="fit the scaling law and IsoFLOP parabolas; write fit.json",
                       description="Direct fit of L(N, D) = E + A/N^alpha + B/D^beta and IsoFLOP parabolas, "
                       "with percentile-bootstrap intervals over runs; prints compute-optimal N and D per budget.")
    _add_out(p)
    _add_fit_options(p)
    fit_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("plot", help="isoflop.png, frontier.png, optimal.png")
    _add_out(p)
    _add_fit_options(p)
    plot_args(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("all", help="plan, launch (local), collect, fit and plot in one go")
    _add_out(p)
    plan_args(p)
    _add_fit_options(p)
    fit_args(p)
    plot_args(p)
    p.add_argument("--launcher", help='replaces the interpreter in each run\'s command')
    p.add_argument("--smooth-k", type=int, default=2, help="smoothed_loss = mean of the last k evals")
    p.set_defaults(func=cmd_all, dry_run=False, slurm=False, only=None, index=None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)   # --help exits here, before torch is imported
    from megatron_atlas.errors import FaultError
    from megatron_atlas.model.config import ConfigError
    if args.command == "all":
        args.csv, args.fit_out = None, None
    try:
        return args.func(args)
    except (ConfigError, FaultError, FileNotFoundError, KeyError, IndexError, ValueError,
            subprocess.CalledProcessError) as e:
        print(f"sweep {args.command}: {e}", file=sys.stderr)
        return 2
