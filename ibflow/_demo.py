"""`ibflow demo`: a small certified scale-vs-shape sweep on the Azulay §9 problem."""

import os
import time

import numpy as np

from ._data import sparse_regression
from ._figures import plot_sweep
from ._sweep import sweep


def demo(out="ibflow-demo", dim=1000, samples=100, alphas=None, shapes=(0.0, 0.5, 0.9), seed=0, progress=True):
    """Two-layer diagonal nets on the §9 sparse-regression problem of Azulay et al. (2021) at
    its own size (d = 1000, N = 100, r* = 5), a 6 α × 3 s grid, every point certified against
    Azulay Thm 4.1. Prints a table and writes `out/sweep.nc` and `out/demo.png`. Returns the
    dataset.

    At the §9 size the demo's sweep chunks are the programs of any `ibflow sweep` of a
    two-layer diagonal net on data of that size (the same network, options and shapes): with
    the command line's compilation cache (`enable_compilation_cache`), a later sweep, on
    other data, reuses them instead of tracing and compiling again."""
    alphas = np.logspace(-5, 0, 6) if alphas is None else np.asarray(alphas)
    D = sparse_regression(num_samples=samples, dim=dim, num_test=500, seed=seed)
    t0 = time.perf_counter()
    ds = sweep(D["X"], D["y"], alphas=alphas, shapes=shapes, X_test=D["X_test"], y_test=D["y_test"],
               w_star=D["w_star"], certify=True, out=out, progress=progress)
    wall = time.perf_counter() - t0
    fig = plot_sweep(ds, os.path.join(out, "demo.png"))
    print(f"\nibflow demo: two-layer diagonal net, Azulay §9 problem (d = {dim}, N = {samples}, r* = 5)")
    print(f"{'alpha':>9} {'shape':>6} {'test error':>11} {'KKT residual':>13} {'ref. dist':>10} {'passed':>7}")
    for i, a in enumerate(ds["alpha"].values):
        for j, s in enumerate(ds["shape"].values):
            p = ds.isel(alpha=i, shape=j, seed=0)
            print(f"{a:9.1e} {s:6.2f} {float(p['test_error']):11.4e} {float(p['kkt_residual']):13.2e} "
                  f"{float(p['reference_distance']):10.2e} {str(bool(p['passed'])):>7}")
    n = int(ds["passed"].sum())
    print(f"{n}/{ds['passed'].size} points certified in {wall:.1f} s; dataset {os.path.join(out, 'sweep.nc')}, "
          f"figure {fig}")
    return ds
