"""Scaling-law fits (megatron_atlas/sweep/fit.py) on losses made from known laws."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_atlas.sweep.fit import (FlopsModel, Law, allocation_exponents, fit_flops_model, fit_group,
                                      fit_law, isoflop_fit, optimal_allocation, parabola_minimum)

TRUTH = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)   # Hoffmann et al.'s fitted values


def _isoflop_rows(law: Law, flops: FlopsModel, budgets, noise: float, seed: int = 0, span: float = 1.0,
                  sizes: int = 7) -> list[dict]:
    """An IsoFLOP grid around the true optimum of every budget, losses with log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n_opt, _ = optimal_allocation(law, flops, C)
        for N in float(n_opt) * np.logspace(-span, span, sizes):
            D = C / flops(N)
            rows.append({"preset": "x", "budget": C, "params_non_embedding": N, "tokens": D,
                         "flops_per_token": float(flops(N)), "status": "done",
                         "final_loss": float(law(N, D) * math.exp(rng.normal(0.0, noise)))})
    return rows


def test_direct_fit_recovers_exponents_and_intervals_cover_the_truth():
    flops = FlopsModel(6.0, 1.0)
    rows = _isoflop_rows(TRUTH, flops, np.logspace(18, 22, 5), noise=0.003)
    fit = fit_group(rows, bootstrap=60, seed=1)["direct"]
    for key in ("alpha", "beta"):
        truth = getattr(TRUTH, key)
        assert abs(fit[key] / truth - 1) < 0.05, (key, fit[key])
        lo, hi = fit["intervals"][key]
        assert lo <= truth <= hi and hi - lo < 0.5 * truth, (key, lo, hi)
    a, b = allocation_exponents(TRUTH, flops)
    assert fit["intervals"]["a"][0] <= a <= fit["intervals"]["a"][1]
    assert abs(fit["a"] + fit["b"] - 1) < 1e-9   # gamma = 1: N_opt D_opt ~ C


def test_fit_law_is_exact_on_noiseless_data_from_a_grid_start_far_away():
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 6)))
    law = Law(E=2.5, A=80.0, B=3000.0, alpha=0.5, beta=0.45)
    got = fit_law(N, D, law(N, D))
    for key in ("E", "A", "B", "alpha", "beta"):
        assert getattr(got, key) == pytest.approx(getattr(law, key), rel=2e-3), key


def test_optimal_allocation_matches_a_brute_force_search_under_a_non_6n_flop_count():
    law, flops = Law(1.8, 300.0, 900.0, 0.3, 0.35), FlopsModel(40.0, 0.85)   # F(N) not 6N
    for C in (1e15, 1e18):
        n_opt, d_opt = optimal_allocation(law, flops, C)
        grid = np.logspace(0, 14, 200001)
        best = grid[np.argmin(law(grid, C / flops(grid)))]
        assert n_opt == pytest.approx(best, rel=1e-3) and d_opt == pytest.approx(C / flops(best), rel=1e-3)
    a, b = allocation_exponents(law, flops)
    n1, _ = optimal_allocation(law, flops, 1e15)
    n2, _ = optimal_allocation(law, flops, 1e18)
    assert math.log(n2 / n1) / math.log(1e3) == pytest.approx(a) and b == pytest.approx(1 - 0.85 * a)


def test_parabola_recovers_a_known_optimum_and_power_laws_through_the_vertices():
    rng = np.random.default_rng(0)
    budgets, N_all, L_all = [], [], []
    for C in (1e18, 1e19, 1e20, 1e21):
        x_opt = math.log10(0.2 * C ** 0.5)           # true N_opt = 0.2 C^0.5
        xs = x_opt + np.linspace(-0.8, 0.6, 8)      # not centred on the optimum
        L = 0.7 * (xs - x_opt) ** 2 + 3.0 - 0.1 * math.log10(C) + rng.normal(0, 1e-4, xs.size)
        vertex = parabola_minimum(10 ** xs, L)
        assert vertex is not None and vertex["in_range"]
        assert math.log10(vertex["N"]) == pytest.approx(x_opt, abs=0.01)
        budgets += [C] * xs.size
        N_all += list(10 ** xs)
        L_all += list(L)
    iso = isoflop_fit(np.array(budgets), np.array(N_all), np.array(L_all), FlopsModel(6.0, 1.0))
    assert iso["a"] == pytest.approx(0.5, abs=0.01) and iso["b"] == pytest.approx(0.5, abs=0.01)
    assert iso["N_coeff"] == pytest.approx(0.2, rel=0.1) and not iso["skipped"]


def test_parabola_method_on_the_law_lands_near_the_analytic_optimum():
    flops = FlopsModel(6.0, 1.0)
    rows = _isoflop_rows(TRUTH, flops, np.logspace(18, 21, 4), noise=0.0, span=0.5)
    out = fit_group(rows, bootstrap=0)
    for vertex in out["isoflop"]["minima"]:
        n_opt, _ = optimal_allocation(TRUTH, flops, vertex["budget"])
        assert vertex["N"] == pytest.approx(float(n_opt), rel=0.1)
    assert out["isoflop"]["a"] == pytest.approx(allocation_exponents(TRUTH, flops)[0], abs=0.03)


def test_parabola_refuses_too_few_sizes_and_downward_curves():
    assert parabola_minimum([1e6, 1e7], [3.0, 2.9]) is None
    assert parabola_minimum([1e6, 1e7, 1e8], [3.0, 3.2, 3.0]) is None   # a maximum, not a minimum


def test_flops_model_recovers_a_power_law():
    N = np.logspace(4, 8, 9)
    got = fit_flops_model(N, 12.0 * N ** 0.9)
    assert got.k == pytest.approx(12.0) and got.gamma == pytest.approx(0.9)


def test_fit_group_names_what_it_cannot_fit():
    rows = [{"preset": "x", "budget": 1e10, "params_non_embedding": 1e4, "tokens": 1e5, "flops_per_token": 6e4,
             "status": "partial", "final_loss": 3.0}]
    with pytest.raises(ValueError, match="at least 2 finished runs"):
        fit_group(rows, bootstrap=0)


def test_degenerate_runs_whose_fit_drives_a_coefficient_to_zero_still_bootstrap_and_plot(tmp_path):
    # the four runs of tests/test_sweep_cli.py's mini sweep: with scipy 1.17 the direct fit drives
    # log A to about -745, exp() gives A = 0.0, and the bootstrap's restart took log(0)
    runs = [(4144, 1088, 5.4302825927734375, 6e7, 55296.0), (20640, 320, 5.530635356903076, 6e7, 196608.0),
            (4144, 2176, 4.954333782196045, 1.2e8, 55296.0), (20640, 640, 5.473743438720703, 1.2e8, 196608.0)]
    rows = [{"preset": "t", "params_non_embedding": n, "tokens": d, "final_loss": loss, "budget": c,
             "flops_per_token": f, "flops": d * f, "status": "done"} for n, d, loss, c, f in runs]
    fit = fit_group(rows, bootstrap=10)
    assert fit["n_runs"] == 4 and fit["bootstrap"]["samples"] == 10
    assert any("not determined" in w for w in fit["warnings"])
    assert [o["budget"] for o in fit["direct"]["optimal"]] == [6e7, 1.2e8]
    from megatron_atlas.sweep.fit import report
    assert "direct fit: L =" in report({"by": "preset", "groups": {"t": fit}})
    from megatron_atlas.sweep.plot import plot_all
    for path in plot_all(rows, {"by": "preset", "groups": {"t": fit}}, tmp_path):
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_law_start_of_a_law_with_a_zero_coefficient_is_finite():
    from megatron_atlas.sweep.fit import law_start
    start = law_start(Law(E=1.0, A=0.0, B=2.0, alpha=0.3, beta=0.2))
    assert all(math.isfinite(v) for v in start) and start[0] < -100 and start[1] == pytest.approx(math.log(2.0))
    fitted = fit_law([1e6, 1e7, 1e8, 1e9] * 2, [1e9] * 4 + [1e10] * 4,
                     [2.0 + 3000 / d ** 0.4 for d in [1e9] * 4 + [1e10] * 4])
    assert law_start(fitted)[:3] == pytest.approx(list(fitted.log_coefficients))
