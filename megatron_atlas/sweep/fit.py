"""Scaling-law fits: the parametric law fitted directly, and the IsoFLOP-parabola method.

Direct (Hoffmann et al. 2022, approach 3): L(N, D) = E + A/N^alpha + B/D^beta, written as
    log L = LSE(a - alpha log N, b - beta log D, e),   A = e^a, B = e^b, E = e^e,
and fitted by minimising the Huber loss (delta 1e-3) of the log-space residuals with L-BFGS from the
best points of a grid of initialisations (the objective has many poor local minima).

FLOPs per token are per architecture (`training_flops_per_token`), so C = F(N) D with F fitted as a
power law F = k N^gamma over the sweep's models (gamma = 1 is 6N). The compute-optimal split under
that constraint is closed-form:
    N_opt = (alpha A C^beta / (gamma beta B k^beta))^(1 / (alpha + gamma beta)),   D_opt = C / F(N_opt)
so N_opt ~ C^a with a = beta / (alpha + gamma beta) and D_opt ~ C^b with b = 1 - gamma a.

IsoFLOP parabolas (approach 2): per budget, L against log N is fitted with a parabola; its vertex is
that budget's N_opt (D_opt = C / F(N_opt)); power laws through the vertices give a and b.

Intervals: percentile bootstrap over runs, resampled with replacement within each budget.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from scipy.optimize import minimize

from megatron_atlas.sweep.blas import one_blas_thread

HUBER_DELTA = 1e-3
GRID = {"a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "e": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5), "alpha": (0.1, 0.25, 0.5, 1.0, 2.0),
        "beta": (0.1, 0.25, 0.5, 1.0, 2.0)}
_ORDER = ("a", "b", "e", "alpha", "beta")
_BOUNDS = [(None, None), (None, None), (None, None), (0.0, 10.0), (0.0, 10.0)]


@dataclass
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan
    # (a, b, e) = (log A, log B, log E) as fitted: A = e^a underflows to 0 when a degenerate fit drives
    # a term out (a << 0), and the bootstrap restarts from these, not from log(A)
    log_coefficients: Optional[tuple[float, float, float]] = None

    def __call__(self, N: Any, D: Any) -> Any:
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)


@dataclass
class FlopsModel:
    """Training FLOPs per token as k * N^gamma."""
    k: float
    gamma: float

    def __call__(self, N: Any) -> Any:
        return self.k * np.power(N, self.gamma)


def _objective(x: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of LSE(a - alpha log N, b - beta log D, e) - log L, and its gradient."""
    a, b, e, alpha, beta = x
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_l
    weights /= total
    small = np.abs(r) <= delta
    # divided by delta: the linear branch has slope 1, so L-BFGS's tolerances (absolute for values
    # below 1) do not stop it early on the tiny raw Huber values
    value = np.where(small, 0.5 * r * r / delta, np.abs(r) - 0.5 * delta).sum()
    dr = np.where(small, r / delta, np.sign(r))
    grad = np.array([(dr * weights[0]).sum(), (dr * weights[1]).sum(), (dr * weights[2]).sum(),
                     -(dr * weights[0] * log_n).sum(), -(dr * weights[1] * log_d).sum()])
    return float(value), grad


def _grid_starts(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float, count: int) -> np.ndarray:
    """The `count` best points of GRID by objective (evaluated all at once)."""
    mesh = np.stack(np.meshgrid(*(np.array(GRID[k]) for k in _ORDER), indexing="ij"), -1).reshape(-1, 5)
    a, b, e, alpha, beta = (mesh[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(mesh), len(log_n)))])
    r = np.logaddexp.reduce(terms, axis=0) - log_l
    value = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1)
    return mesh[np.argsort(value)[:count]]


def fit_law(N: Sequence[float], D: Sequence[float], L: Sequence[float], delta: float = HUBER_DELTA,
            n_starts: int = 8, extra_starts: Sequence[Sequence[float]] = ()) -> Law:
    """Best L-BFGS fit over the grid's best `n_starts` initialisations (+ `extra_starts`, in the
    (a, b, e, alpha, beta) parametrisation)."""
    log_n, log_d, log_l = (np.log(np.asarray(v, dtype=np.float64)) for v in (N, D, L))
    if not (np.all(np.isfinite(log_n)) and np.all(np.isfinite(log_d)) and np.all(np.isfinite(log_l))):
        raise ValueError("fit_law needs positive, finite N, D and L")
    starts = list(_grid_starts(log_n, log_d, log_l, delta, n_starts)) + [np.asarray(s) for s in extra_starts]
    best = None
    for x0 in starts:
        res = minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                       bounds=_BOUNDS, options={"maxiter": 1000})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return Law(math.exp(e), math.exp(a), math.exp(b), float(alpha), float(beta), float(best.fun * delta),
               (float(a), float(b), float(e)))


def law_start(law: Law) -> list[float]:
    """The law as an L-BFGS start in (a, b, e, alpha, beta); a zero coefficient starts far below 1."""
    if law.log_coefficients is not None:
        a, b, e = law.log_coefficients
    else:
        a, b, e = (math.log(v) if v > 0 else -700.0 for v in (law.A, law.B, law.E))
    return [a, b, e, law.alpha, law.beta]


def fit_flops_model(N: Sequence[float], flops_per_token: Sequence[float]) -> FlopsModel:
    """Least squares of log F on log N (one model size: gamma = 1 through that point)."""
    log_n, log_f = np.log(np.asarray(N, float)), np.log(np.asarray(flops_per_token, float))
    if np.ptp(log_n) == 0:
        return FlopsModel(float(np.exp(log_f.mean() - log_n.mean())), 1.0)
    gamma, intercept = np.polyfit(log_n, log_f, 1)
    return FlopsModel(float(np.exp(intercept)), float(gamma))


def optimal_allocation(law: Law, flops: FlopsModel, C: Any) -> tuple[Any, Any]:
    """(N_opt, D_opt) minimising law(N, D) subject to flops(N) * D = C (module docstring)."""
    C = np.asarray(C, dtype=np.float64)
    g, k = flops.gamma, flops.k
    with np.errstate(all="ignore"):
        n_opt = (law.alpha * law.A * C ** law.beta / (g * law.beta * law.B * k ** law.beta)) ** (
            1.0 / (law.alpha + g * law.beta))
    return n_opt, C / flops(n_opt)


def allocation_exponents(law: Law, flops: FlopsModel) -> tuple[float, float]:
    """(a, b) with N_opt ~ C^a and D_opt ~ C^b."""
    denom = law.alpha + flops.gamma * law.beta
    a = law.beta / denom if denom > 0 else math.nan
    return a, 1.0 - flops.gamma * a


def parabola_minimum(N: Sequence[float], L: Sequence[float]) -> Optional[dict[str, Any]]:
    """Vertex of L = c2 x^2 + c1 x + c0 with x = log10 N; None without 3 distinct sizes or when the
    parabola opens downward (no minimum)."""
    x, y = np.log10(np.asarray(N, float)), np.asarray(L, float)
    if len(np.unique(x)) < 3:
        return None
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return None
    x_opt = -c1 / (2 * c2)
    return {"N": float(10 ** x_opt), "loss": float(c0 - c1 * c1 / (4 * c2)), "coeffs": [float(c2), float(c1), float(c0)],
            "in_range": bool(x.min() <= x_opt <= x.max())}


def power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(exponent, coefficient) of y = coefficient * x^exponent by least squares in log space."""
    if len(x) < 2 or np.ptp(np.log(np.asarray(x, float))) == 0:
        return math.nan, math.nan
    slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(slope), float(math.exp(intercept))


def isoflop_fit(budgets: np.ndarray, N: np.ndarray, L: np.ndarray, flops: FlopsModel) -> dict[str, Any]:
    """Per-budget parabola vertices and the power laws N_opt ~ C^a, D_opt ~ C^b through them."""
    minima, skipped = [], []
    for C in np.unique(budgets):
        sel = budgets == C
        vertex = parabola_minimum(N[sel], L[sel])
        if vertex is None:
            skipped.append(f"budget {C:.3g}: needs >= 3 sizes and an upward parabola")
            continue
        minima.append({"budget": float(C), **vertex, "D": float(C / flops(vertex["N"]))})
    result: dict[str, Any] = {"minima": minima, "skipped": skipped, "a": math.nan, "b": math.nan}
    if len(minima) >= 2:
        cs = [m["budget"] for m in minima]
        result["a"], result["N_coeff"] = power_law(cs, [m["N"] for m in minima])
        result["b"], result["D_coeff"] = power_law(cs, [m["D"] for m in minima])
    return result


def _interval(samples: list[float], level: float) -> list[float]:
    finite = np.asarray([s for s in samples if s is not None and np.isfinite(s)], float)
    if len(finite) < 2:
        return [math.nan, math.nan]
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]


def _resample(budgets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices resampled with replacement within each budget."""
    return np.concatenate([rng.choice(np.flatnonzero(budgets == C), size=int((budgets == C).sum()))
                           for C in np.unique(budgets)])


@one_blas_thread()
def fit_group(rows: Sequence[dict[str, Any]], loss: str = "final_loss", params: str = "params_non_embedding",
              bootstrap: int = 200, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Both methods on one architecture's finished runs, with bootstrap intervals."""
    warn: list[str] = []
    usable = [r for r in rows if r.get("status", "done") == "done" and r[loss] == r[loss] and r[loss] > 0]
    if len(usable) < len(rows):
        warn.append(f"{len(rows) - len(usable)} of {len(rows)} runs left out (unfinished or no {loss})")
    if len(usable) < 2:
        raise ValueError(f"need at least 2 finished runs with a {loss}, have {len(usable)}")
    N = np.array([r[params] for r in usable], float)
    D = np.array([r["tokens"] for r in usable], float)
    L = np.array([r[loss] for r in usable], float)
    budgets = np.array([r["budget"] for r in usable], float)
    flops = fit_flops_model(N, [r["flops_per_token"] for r in usable])
    if len(usable) < 5:
        warn.append(f"{len(usable)} runs for 5 law parameters: the direct fit is not determined")

    law = fit_law(N, D, L)
    iso = isoflop_fit(budgets, N, L, flops)
    grid_c = np.unique(budgets)
    rng = np.random.default_rng(seed)
    keys = ("E", "A", "B", "alpha", "beta", "a", "b", "iso_a", "iso_b")
    samples: dict[str, list[float]] = {k: [] for k in keys}
    n_samples: list[np.ndarray] = []
    d_samples: list[np.ndarray] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # degenerate resamples (e.g. one size twice) are expected
        for _ in range(bootstrap):
            idx = _resample(budgets, rng)
            f = fit_flops_model(N[idx], [usable[i]["flops_per_token"] for i in idx])
            boot = fit_law(N[idx], D[idx], L[idx], n_starts=1, extra_starts=[law_start(law)])
            a, b = allocation_exponents(boot, f)
            n_opt, d_opt = optimal_allocation(boot, f, grid_c)
            n_samples.append(n_opt)
            d_samples.append(d_opt)
            iso_b = isoflop_fit(budgets[idx], N[idx], L[idx], f)
            for key, value in (("E", boot.E), ("A", boot.A), ("B", boot.B), ("alpha", boot.alpha),
                               ("beta", boot.beta), ("a", a), ("b", b), ("iso_a", iso_b["a"]),
                               ("iso_b", iso_b["b"])):
                samples[key].append(value)
    a, b = allocation_exponents(law, flops)
    n_opt, d_opt = optimal_allocation(law, flops, grid_c)
    intervals = {k: _interval(v, level) for k, v in samples.items()} if bootstrap else {}
    optimal = []
    for j, C in enumerate(grid_c):
        entry = {"budget": float(C), "N": float(n_opt[j]), "D": float(d_opt[j]),
                 "loss": float(law(n_opt[j], d_opt[j])),
                 "in_range": bool(N.min() <= n_opt[j] <= N.max())}
        if bootstrap:
            entry["N_interval"] = _interval([s[j] for s in n_samples], level)
            entry["D_interval"] = _interval([s[j] for s in d_samples], level)
        optimal.append(entry)
    if law.A == 0.0 or law.B == 0.0 or law.alpha in (0.0, 10.0) or law.beta in (0.0, 10.0):
        warn.append("the direct fit is degenerate (a coefficient fitted to 0 or an exponent at its bound): "
                    "its N_opt and D_opt are meaningless")
    if any(not m["in_range"] for m in iso["minima"]):
        warn.append("some IsoFLOP vertices lie outside the sizes run at that budget (extrapolated)")
    return {
        "n_runs": len(usable), "loss_column": loss, "params_column": params,
        "flops_model": {"k": flops.k, "gamma": flops.gamma},
        "direct": {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta, "a": a, "b": b,
                   "objective": law.objective, "optimal": optimal,
                   "intervals": {k: intervals[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")} if bootstrap else {}},
        # with few sizes per budget most resamples repeat a size and lose the parabola: say how many kept it
        "isoflop": {**iso, "intervals": {"a": intervals["iso_a"], "b": intervals["iso_b"]} if bootstrap else {},
                    "bootstrap_valid": int(np.isfinite(np.asarray(samples["iso_a"], float)).sum())},
        "bootstrap": {"samples": bootstrap, "level": level, "seed": seed},
        "warnings": warn,
    }


def fit_results(rows: Sequence[dict[str, Any]], by: str = "preset", **kwargs: Any) -> dict[str, Any]:
    """`fit_group` per value of the `by` column (e.g. one fit per architecture)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row[by]), []).append(row)
    return {"by": by, "groups": {name: fit_group(group, **kwargs) for name, group in groups.items()}}


def _fmt_interval(iv: Sequence[float], fmt: str) -> str:
    return f" [{iv[0]:{fmt}}, {iv[1]:{fmt}}]" if iv and all(np.isfinite(iv)) else ""


def report(fit: dict[str, Any]) -> str:
    """The fit in words: exponents with intervals, and the optimal N and D per budget."""
    lines = []
    for name, g in fit["groups"].items():
        d, iso = g["direct"], g["isoflop"]
        iv = d.get("intervals", {})
        level = int(round(100 * g["bootstrap"]["level"]))
        lines.append(f"== {fit['by']}={name}: {g['n_runs']} runs, loss column {g['loss_column']}, "
                     f"N = {g['params_column']}; FLOPs/token = {g['flops_model']['k']:.3g} N^{g['flops_model']['gamma']:.3f}")
        lines.append(f"direct fit: L = {d['E']:.3f}{_fmt_interval(iv.get('E'), '.3f')} + {d['A']:.4g} / N^{d['alpha']:.3f}"
                     f"{_fmt_interval(iv.get('alpha'), '.3f')} + {d['B']:.4g} / D^{d['beta']:.3f}{_fmt_interval(iv.get('beta'), '.3f')}"
                     f"   ({level}% bootstrap intervals, {g['bootstrap']['samples']} resamples)")
        lines.append(f"  N_opt ~ C^{d['a']:.3f}{_fmt_interval(iv.get('a'), '.3f')}, "
                     f"D_opt ~ C^{d['b']:.3f}{_fmt_interval(iv.get('b'), '.3f')}")
        for o in d["optimal"]:
            lines.append(f"  C {o['budget']:.3g}: N_opt {o['N']:.4g}{_fmt_interval(o.get('N_interval'), '.3g')}, "
                         f"D_opt {o['D']:.4g}{_fmt_interval(o.get('D_interval'), '.3g')}, loss {o['loss']:.4f}"
                         + ("" if o["in_range"] else "  (outside the sizes run)"))
        iiv = iso.get("intervals", {})
        valid = (f"   (intervals from the {iso['bootstrap_valid']} of {g['bootstrap']['samples']} resamples that kept "
                 "a vertex at >= 2 budgets)" if g["bootstrap"]["samples"] else "")
        lines.append(f"IsoFLOP parabolas: N_opt ~ C^{iso['a']:.3f}{_fmt_interval(iiv.get('a'), '.3f')}, "
                     f"D_opt ~ C^{iso['b']:.3f}{_fmt_interval(iiv.get('b'), '.3f')}{valid}")
        for m in iso["minima"]:
            lines.append(f"  C {m['budget']:.3g}: N_opt {m['N']:.4g}, D_opt {m['D']:.4g}, loss {m['loss']:.4f}"
                         + ("" if m["in_range"] else "  (vertex outside the sizes run)"))
        lines += [f"  skipped {s}" for s in iso["skipped"]]
        lines += [f"warning: {w}" for w in g["warnings"]]
    return "\n".join(lines)
