"""Scaling-law figures (PNG, matplotlib Agg), one per question:

    isoflop.png    at a fixed budget, which model size is best? (loss vs N per budget, parabolas, vertices)
    frontier.png   how does the best loss fall with compute? (all runs, the frontier, the fitted law)
    optimal.png    how should N and D grow with compute? (vertices and power laws, direct fit)

Several groups (architectures) share each figure: colour is the budget, marker and line style the group.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megatron_atlas.sweep.fit import FlopsModel, Law, optimal_allocation

MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only: no display on clusters and CI
    import matplotlib.pyplot as plt
    return plt


def _law(group: dict[str, Any]) -> tuple[Law, FlopsModel]:
    d, f = group["direct"], group["flops_model"]
    return Law(d["E"], d["A"], d["B"], d["alpha"], d["beta"]), FlopsModel(f["k"], f["gamma"])


def _drawable(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """The points of a curve that a log-log axis can show: a degenerate fit (a coefficient fitted to
    zero) gives N_opt = 0 and D_opt = inf, which matplotlib refuses to log-scale."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return x[keep], y[keep]


def _has_positive_data(ax: Any) -> bool:
    """Whether a log axis would have anything to show (lines or markers with positive, finite y)."""
    ys = [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]
    ys += [np.asarray(c.get_offsets(), float).reshape(-1, 2)[:, 1] for c in ax.collections]
    return any(bool(np.any(np.isfinite(y) & (y > 0))) for y in ys)


def _groups(rows: Sequence[dict[str, Any]], by: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r[by]), []).append(r)
    return groups


def _done(rows: Sequence[dict[str, Any]], loss: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status", "done") == "done" and r[loss] == r[loss]]


def plot_isoflop(rows: Sequence[dict[str, Any]], fit: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    by = fit["by"]
    groups = _groups(rows, by)
    budgets = sorted({float(r["budget"]) for r in rows})
    cmap = plt.get_cmap("viridis")
    colour = {C: cmap(i / max(1, len(budgets) - 1) * 0.9) for i, C in enumerate(budgets)}
    fig, ax = plt.subplots(figsize=(7, 5))
    for gi, (name, g_rows) in enumerate(groups.items()):
        g = fit["groups"][name]
        loss, params = g["loss_column"], g["params_column"]
        g_rows = _done(g_rows, loss)
        law, flops = _law(g)
        vertices = {m["budget"]: m for m in g["isoflop"]["minima"]}
        for C in budgets:
            sel = [r for r in g_rows if float(r["budget"]) == C]
            if not sel:
                continue
            N = np.array([r[params] for r in sel], float)
            ax.scatter(N, [r[loss] for r in sel], color=colour[C], marker=MARKERS[gi % len(MARKERS)], zorder=3,
                       label=f"{name}, C={C:.2g}" if len(groups) > 1 else f"C={C:.2g}")
            xs = np.logspace(np.log10(N.min()) - 0.15, np.log10(N.max()) + 0.15, 100)
            if C in vertices:
                c2, c1, c0 = vertices[C]["coeffs"]
                x = np.log10(xs)
                ax.plot(xs, c2 * x * x + c1 * x + c0, color=colour[C], ls=LINESTYLES[gi % len(LINESTYLES)], lw=1.2)
                ax.scatter([vertices[C]["N"]], [vertices[C]["loss"]], color=colour[C], marker="*", s=180,
                           edgecolor="k", zorder=4)
            ax.plot(*_drawable(xs, law(xs, C / flops(xs))), color=colour[C], ls=":", lw=0.8, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel(f"N ({params.replace('_', ' ')})")
    ax.set_ylabel(f"validation loss ({loss})")
    ax.set_title("IsoFLOP curves: parabola per budget (solid), vertex (*), direct fit (dotted)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path, plt)


def plot_frontier(rows: Sequence[dict[str, Any]], fit: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for gi, (name, g_rows) in enumerate(_groups(rows, fit["by"]).items()):
        g = fit["groups"][name]
        loss = g["loss_column"]
        g_rows = _done(g_rows, loss)
        colour = f"C{gi}"
        flops = np.array([r["flops"] for r in g_rows], float)
        losses = np.array([r[loss] for r in g_rows], float)
        ax.scatter(flops, losses, color=colour, marker=MARKERS[gi % len(MARKERS)], alpha=0.5, label=f"{name} runs")
        order = np.argsort(flops)
        frontier = np.minimum.accumulate(losses[order])
        ax.step(flops[order], frontier, where="post", color=colour, lw=1.5, label=f"{name} best so far")
        law, fm = _law(g)
        cs = np.logspace(np.log10(flops.min()) - 0.3, np.log10(flops.max()) + 0.5, 100)
        n_opt, d_opt = optimal_allocation(law, fm, cs)
        ax.plot(*_drawable(cs, law(n_opt, d_opt)), color=colour, ls="--", label=f"{name} fit at (N_opt, D_opt)")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (per-architecture count)")
    ax.set_ylabel("validation loss")
    ax.set_title("Loss-compute frontier")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path, plt)


def plot_optimal(fit: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for gi, (name, g) in enumerate(fit["groups"].items()):
        colour = f"C{gi}"
        law, fm = _law(g)
        optimal = g["direct"]["optimal"]
        budgets = np.array([o["budget"] for o in optimal])
        cs = np.logspace(np.log10(budgets.min()) - 0.3, np.log10(budgets.max()) + 0.5, 100)
        curves = optimal_allocation(law, fm, cs)
        iso = g["isoflop"]
        for ax, key, curve, exponent, iso_exp in ((axes[0], "N", curves[0], g["direct"]["a"], iso["a"]),
                                                  (axes[1], "D", curves[1], g["direct"]["b"], iso["b"])):
            ax.plot(*_drawable(cs, curve), color=colour, ls="--", label=f"{name} direct fit ~ C^{exponent:.2f}")
            mid = np.array([o[key] for o in optimal])
            lo_hi = [o.get(f"{key}_interval") for o in optimal]
            shown = np.isfinite(mid) & (mid > 0)
            if shown.all():
                err = (np.abs(np.array(lo_hi, float).T - mid) if all(iv and np.all(np.isfinite(iv)) and min(iv) > 0
                                                                     for iv in lo_hi)
                       else None)   # bootstrap interval from fit.json, when there is one
                ax.errorbar(budgets, mid, yerr=err, color=colour, fmt="x", capsize=3, alpha=0.8)
            elif shown.any():
                ax.scatter(budgets[shown], mid[shown], color=colour, marker="x", alpha=0.8)
            if iso["minima"]:
                cb = np.array([m["budget"] for m in iso["minima"]])
                ax.scatter(cb, [m[key] for m in iso["minima"]], color=colour, marker=MARKERS[gi % len(MARKERS)],
                           edgecolor="k", zorder=3, label=f"{name} IsoFLOP vertices")
                coeff = iso.get(f"{key}_coeff")
                if coeff and np.isfinite(iso_exp):
                    ax.plot(cs, coeff * cs ** iso_exp, color=colour, ls="-", lw=1,
                            label=f"{name} parabolas ~ C^{iso_exp:.2f}")
            if _has_positive_data(ax):
                ax.set_xscale("log")
                ax.set_yscale("log")
            else:   # a degenerate direct fit and no vertices: say so rather than fail on an empty log axis
                ax.text(0.5, 0.5, "nothing positive and finite to draw", ha="center", transform=ax.transAxes)
            ax.set_xlabel("training FLOPs C")
            ax.set_ylabel(f"compute-optimal {key} ({'parameters' if key == 'N' else 'tokens'})")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle("Compute-optimal model size and data")
    return _save(fig, path, plt)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(rows: Sequence[dict[str, Any]], fit: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    return [plot_isoflop(rows, fit, out_dir / "isoflop.png"), plot_frontier(rows, fit, out_dir / "frontier.png"),
            plot_optimal(fit, out_dir / "optimal.png")]
