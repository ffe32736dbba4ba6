"""Ablations at CPU scale: a grid of variants (a preset plus overrides) x seeds, each trained on
two tasks, evaluated, and summarised as mean +- std over the seeds.

  text   train on byte-level text shards (the README's main job, shortened); score the validation
         loss, a long document read by streaming (the whole history through the memory) and by
         sliding windows of the training length, at `long_tokens` (16x the training length by
         default), and the needle suite
  mqar   train on multi-query associative recall; score recall accuracy at growing numbers of
         key-value pairs (beyond the number trained on)

Every run trains in this process (no start-up per run) into `out/runs/<variant>-<task>-s<seed>`,
whose finished result is reused when the grid runs again.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_atlas.configs import compose, to_model_config, to_train_config

Log = Callable[[str], None]


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str
    overrides: tuple = ()
    note: str = ""


# The default grid: Atlas's exact rule against the scalable one and OmegaNet's gd rule, and the
# paper's orderings (Omega window, polynomial degree, deep memory, hybrids against SWA alone).
DEFAULT_VARIANTS = (
    Variant("atlas-muon", "atlas", ("model.memory.rule=muon",), "exact: Newton-Schulz on every token"),
    Variant("atlas-block16", "atlas", ("model.memory.ns_block=16",), "muon_block, one NS per chunk of 16"),
    Variant("atlas-block64", "atlas", ("model.memory.ns_block=64",), "muon_block, one NS per 64 tokens"),
    Variant("omeganet-gd", "omeganet", (), "the same memory with the gd rule"),
    Variant("atlas-c1", "atlas", ("model.memory.window=1",), "Omega window c = 1 (online)"),
    Variant("atlas-p1", "atlas", ("model.memory.degree=1",), "degree-1 features"),
    Variant("atlas-linear", "atlas", ("model.memory.kind=linear",), "linear memory instead of MLP"),
    Variant("atlas_mag", "atlas_mag", (), "hybrid: memory gated with SWA"),
    Variant("swa", "atlas_mag", ("model.block=swa",), "sliding-window attention alone"),
)


# Every memory preset as shipped (the README's main job, shortened): the long-context check.
PRESET_VARIANTS = tuple(Variant(p, p, (), "preset as shipped") for p in
                        ("titans", "omeganet", "dla", "atlas", "atlas_pp", "atlas_mag", "atlas_mal"))
GRIDS = {"default": DEFAULT_VARIANTS, "presets": PRESET_VARIANTS}


@dataclass
class Settings:
    shards: str
    seeds: Sequence[int] = (0, 1, 2)
    tasks: Sequence[str] = ("text", "mqar")
    text_steps: int = 60
    mqar_steps: int = 60
    seq_len: int = 128
    mqar_pairs_trained: int = 4
    mqar_pairs_eval: Sequence[int] = (4, 8, 16)
    mqar_samples: int = 64
    long_tokens: int = 2048
    niah_lengths: Sequence[int] = (256, 1024)
    niah_samples: int = 2
    extra: Sequence[str] = field(default_factory=tuple)   # overrides for every run


def _train_overrides(settings: Settings, task: str, seed: int, out_dir: Path) -> List[str]:
    common = [f"train.seed={seed}", f"train.seq_len={settings.seq_len}", f"train.out_dir={out_dir}",
              "train.tensorboard=false", "train.log_every=1000", "train.eval_every=0", "train.data.eval_batches=2"]
    if task == "text":
        return common + [f"train.steps={settings.text_steps}", "train.data.kind=shards",
                         f"train.data.shards.path={settings.shards}"]
    return common + [f"train.steps={settings.mqar_steps}", f"train.data.mqar.num_kv_pairs={settings.mqar_pairs_trained}"]


def _evaluate(task: str, run_dir: Path, settings: Settings, summary: Dict) -> Dict[str, float]:
    from megatron_atlas.eval import perplexity, suites
    from megatron_atlas.eval.lm import load_lm
    lm = load_lm(str(run_dir))
    out = {"val_loss": summary["eval_loss"]}
    if task == "text":
        ids = perplexity.shard_document(settings.shards, "val", settings.long_tokens)
        streaming = perplexity.streaming_perplexity(lm, ids)["perplexity"]
        sliding = perplexity.sliding_perplexity(lm, ids, settings.seq_len, settings.seq_len // 2)["perplexity"]
        out.update(streaming_ppl=streaming, sliding_ppl=sliding, streaming_over_sliding=streaming / sliding)
        rows = suites.run_niah(lm, settings.niah_lengths, (0.5,), ("number",), settings.niah_samples, 0,
                               log=lambda line: None)
        out["niah"] = statistics.fmean(r["accuracy"] for r in rows)
    else:
        vocab = to_train_config(compose("titans", "tiny", "tiny")).data.mqar.vocab_size
        rows = suites.run_mqar(lm, settings.mqar_pairs_eval, settings.seq_len, vocab, settings.mqar_samples, 0,
                               log=lambda line: None)
        out.update({f"mqar_{r['num_kv_pairs']}": r["accuracy"] for r in rows})
    return out


def run_one(variant: Variant, task: str, seed: int, settings: Settings, out: Path, log: Log) -> Dict:
    """Train and evaluate one (variant, task, seed), or read its saved result."""
    from megatron_atlas.train.loop import train
    run_dir = out / "runs" / f"{variant.name}-{task}-s{seed}"
    result_file = run_dir / "ablation.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    overrides = list(variant.overrides) + list(settings.extra) + _train_overrides(settings, task, seed, run_dir)
    cfg = compose(variant.preset, "tiny", "tiny", overrides)
    start = time.monotonic()
    torch.manual_seed(seed)
    summary = train(to_model_config(cfg), to_train_config(cfg), log=lambda line: None)
    metrics = _evaluate(task, run_dir, settings, summary)
    result = {"variant": variant.name, "task": task, "seed": seed, "seconds": time.monotonic() - start, **metrics}
    result_file.write_text(json.dumps(result, indent=1))
    log(f"  {variant.name:<14} {task:<4} seed {seed}: " + ", ".join(
        f"{k} {v:.3g}" for k, v in metrics.items()) + f" ({result['seconds']:.0f} s)")
    return result


def run_grid(variants: Sequence[Variant], settings: Settings, out: Path, log: Log = print) -> List[Dict]:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    total = len(variants) * len(settings.tasks) * len(settings.seeds)
    started = time.monotonic()
    for i, (variant, task, seed) in enumerate(((v, t, s) for v in variants for t in settings.tasks
                                               for s in settings.seeds), 1):
        results.append(run_one(variant, task, seed, settings, out, log))
        elapsed = time.monotonic() - started
        log(f"  [{i}/{total}] elapsed {elapsed / 60:.1f} min, eta {elapsed / i * (total - i) / 60:.1f} min")
    return results


def summarise(results: Sequence[Dict], variants: Sequence[Variant]) -> Dict[str, Dict[str, tuple]]:
    """variant -> "task.metric" -> (mean, std, n) over seeds."""
    table: Dict[str, Dict[str, tuple]] = {}
    for variant in variants:
        groups: Dict[str, List[float]] = {}
        for r in results:
            if r["variant"] != variant.name:
                continue
            for key, value in r.items():
                if key not in ("variant", "task", "seed", "seconds") and isinstance(value, (int, float)) \
                        and math.isfinite(value):
                    groups.setdefault(f"{r['task']}.{key}", []).append(float(value))
        table[variant.name] = {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else float("nan"), len(v))
                               for k, v in groups.items()}
    return table


def markdown(table: Dict[str, Dict[str, tuple]], variants: Sequence[Variant], columns: Sequence[str]) -> str:
    notes = {v.name: v.note for v in variants}
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, metrics in table.items():
        cells = []
        for column in columns:
            mean, std, _ = metrics.get(column, (float("nan"), float("nan"), 0))
            cells.append("-" if not math.isfinite(mean) else
                         f"{mean:.3g} +- {std:.2g}" if math.isfinite(std) else f"{mean:.3g}")
        lines.append(f"| {name} ({notes.get(name, '')}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: Dict[str, Dict[str, tuple]], columns: Sequence[str], path: Path, title: str) -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(table)
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 4), squeeze=False)
    for ax, column in zip(axes[0], columns):
        means = [table[n].get(column, (float("nan"),) * 3)[0] for n in names]
        stds = [table[n].get(column, (0.0, 0.0, 0))[1] for n in names]
        ax.barh(names, means, xerr=[s if math.isfinite(s) else 0.0 for s in stds], color="C0", alpha=0.7)
        ax.set_title(column, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
