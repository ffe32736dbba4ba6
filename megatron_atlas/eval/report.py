"""results.json and a plot: accuracy against context length (MQAR: against key-value pairs), one
line per model, one panel per suite."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

from megatron_atlas.atomic import write_text_atomic

# suite -> (x key, x label, log2 x axis)
AXES = {"niah": ("length", "context length (tokens)", True),
        "babilong_qa1": ("length", "context length (tokens)", True),
        "babilong_qa2": ("length", "context length (tokens)", True),
        "mqar": ("num_kv_pairs", "key-value pairs", True)}


def curves(results: Dict[str, dict]) -> Dict[str, Dict[str, List[tuple]]]:
    """suite -> model -> [(x, mean accuracy over the other knobs)], sorted by x."""
    out: Dict[str, Dict[str, List[tuple]]] = {}
    for model, entry in results.items():
        for row in entry.get("rows", []):
            suite = row["suite"]
            if suite not in AXES:
                continue
            x = row[AXES[suite][0]]
            out.setdefault(suite, {}).setdefault(model, {}).setdefault(x, []).append(row["accuracy"])
    return {s: {m: sorted((x, sum(v) / len(v)) for x, v in xs.items()) for m, xs in models.items()}
            for s, models in out.items()}


def write_json(results: Dict[str, dict], path: Path, meta: dict) -> None:
    payload = {"meta": meta, "models": results, "curves": curves(results)}
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def plot(results: Dict[str, dict], path: Path, title: str = "") -> bool:
    """Writes the figure; False when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(results)
    if not data:
        return False
    suites = [s for s in AXES if s in data]
    cols = min(2, len(suites))
    rows = math.ceil(len(suites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, suite in zip(axes.flat, suites):
        key, label, log2 = AXES[suite]
        for model, points in sorted(data[suite].items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=model)
        if log2:
            ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.set_title(suite)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(suites):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
