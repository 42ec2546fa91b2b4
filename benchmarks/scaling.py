"""Scaling of the certified sweep with the dimension d and with the grid size (the issue
"Performance": d ∈ {1e2, 1e3, 1e4} and grid size), against one SciPy LSODA point.

    python benchmarks/scaling.py [--dims 100,1000,10000] [--grid-alphas 4,20,80] [--lsoda-max-dim 1000]

Per d, the Fig. 7.1 grid (20 α from 1e-5 to 0.25 × 5 shapes) on data of the Azulay §9 kind
(N = 100, or d/2 below d = 200 so that X stays wide), solved and certified by `ibflow.sweep`
in this process (default reduced mode):
- the first call, compilation included;
- a second call on a new data set of the same shapes, which reuses the compiled program;
- the largest relative error of either call against the dual-Newton reference at every point;
- one SciPy LSODA solve at α = 1.2e-3, s = 0 (the grid's middle). It is skipped above
  `--lsoda-max-dim`: its dense 4d × 4d Jacobian is 12.8 GB at d = 1e4.

Grid size at d = 1000: `n_alpha × 5` points. The program the d rows compiled is reused, so
these rows are warm; they report seconds per point and the largest error. Peak resident
memory is printed at the end.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

import ibflow as ib  # noqa: E402
from _common import (FIG71_SHAPES, fig71_alphas, grid_error, grid_references, lsoda, peak_rss_mib,  # noqa: E402
                     problem, table)


def certified_sweep(X, y, alphas):
    """`ibflow.sweep(certify=True)`: (seconds, dataset)."""
    t0 = time.perf_counter()
    ds = ib.sweep(X, y, alphas=alphas, shapes=FIG71_SHAPES, certify=True, progress=False)
    return time.perf_counter() - t0, ds


def max_error(ds, X, y, alphas):
    """The largest relative distance of the sweep's limits from the dual-Newton reference."""
    return grid_error(ds["predictor"].values, grid_references(X, y, alphas, FIG71_SHAPES)[0])


def counts(ds):
    n = ds["status"].size
    return f"{int((ds['status'].values == 'converged').sum())}/{n}", f"{int(ds['passed'].values.sum())}/{n}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="100,1000,10000")
    ap.add_argument("--grid-alphas", default="4,20,80", help="numbers of α at d = 1000 (× 5 shapes)")
    ap.add_argument("--lsoda-max-dim", type=int, default=1000)
    args = ap.parse_args()
    alphas = fig71_alphas()

    rows = []
    dims = [int(v) for v in args.dims.split(",")]
    for d in dims:
        N = 100 if d >= 200 else d // 2
        X, y, _ = problem(d, N, seed=0)
        t1, ds1 = certified_sweep(X, y, alphas)
        X2, y2, _ = problem(d, N, seed=1)
        t2, ds2 = certified_sweep(X2, y2, alphas)
        err = max(max_error(ds1, X, y, alphas), max_error(ds2, X2, y2, alphas))
        lsoda_s = "-"
        if d <= args.lsoda_max_dim:
            w, t_l, _, ok = lsoda(ib.diagonal_init(1.2e-3, 0.0, d), X, y)
            lsoda_s = f"{t_l:.2f}" + ("" if ok else " (not converged)")
        conv, cert = counts(ds1)
        rows.append([f"{d}", f"{N}", f"{t1:.1f}", f"{t2:.1f}", f"{t2 / 100 * 1e3:.0f}", f"{err:.1e}", conv, cert,
                     lsoda_s])
        print(f"done d = {d}", file=sys.stderr, flush=True)
    print(f"\n### Scaling with d: the Fig. 7.1 grid (100 points), ibflow.sweep(certify=True) in process; "
          f"device {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs\n")
    print(table(rows, ["d", "N", "1st call s (compile incl.)", "2nd call s (new data)", "ms / point (2nd)",
                       "max rel. error vs dual Newton", "converged", "certified", "LSODA s, one point (α = 1.2e-3)"]))

    rows = []
    X, y, _ = problem(1000, 100, seed=2)
    for n_alpha in (int(v) for v in args.grid_alphas.split(",")):
        grid = fig71_alphas(n_alpha)
        t, ds = certified_sweep(X, y, grid)
        conv, cert = counts(ds)
        rows.append([f"{n_alpha} × {len(FIG71_SHAPES)} = {ds['status'].size}", f"{t:.2f}", f"{t / ds['status'].size * 1e3:.0f}",
                     f"{max_error(ds, X, y, grid):.1e}", conv, cert])
        print(f"done {n_alpha} α", file=sys.stderr, flush=True)
    warm = "compiled program reused: warm" if 1000 in dims else "the first row compiles"
    print(f"\n### Scaling with the grid size, d = 1000, N = 100 ({warm})\n")
    print(table(rows, ["points", "wall s", "ms / point", "max rel. error vs dual Newton", "converged", "certified"]))
    print(f"\npeak resident memory: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
