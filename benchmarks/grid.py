"""The full Azulay Fig. 7.1 grid (20 α from 1e-5 to 0.25 × 5 shapes, d = 1000, N = 100):
ibflow's certified sweep against the GD loop summed over the grid and against SciPy LSODA.

    python benchmarks/grid.py [--gd all|sample|none] [--lsoda-points K] [--dim D --samples N] [--seed S]

Four ibflow rows: the command line `ibflow sweep --certify` timed from outside (a fresh
process: start-up, import, compilation, solve, certificates, netCDF files and the figure,
the quantity the issue's acceptance compares with one LSODA point; default reduced mode)
with an empty compilation cache, the same again with the cache that run filled (on a
second data set of the same shapes: `IBFLOW_CACHE_DIR`, see the README), the same after
only `ibflow demo` (the README's main job, at the same sizes) filled a fresh cache, and
`ibflow.sweep(..., flow_kwargs=dict(mode="pure"))` in this process, the parameter ODE
itself (its wall time with and without import + compile), whose limits the reduced mode
must reproduce (printed: their largest relative difference). The GD loop summed over
the grid is measured point by point (`--gd all`, slow: tens of minutes) or on every 5th
α per shape and scaled up (`--gd sample`, stated as an estimate in the table).
"""

import argparse
import os
import sys
import tempfile
import time

T_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ibflow as ib  # noqa: E402
from _common import (FIG71_SHAPES, cli_demo, cli_sweep, fig71_alphas, gd_loop, grid_error, grid_references, lsoda,  # noqa: E402
                     peak_rss_mib, problem, rel, table)

T_IMPORTED = time.perf_counter()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--n-alpha", type=int, default=20)
    ap.add_argument("--gd", choices=["all", "sample", "none"], default="sample")
    ap.add_argument("--lsoda-points", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--no-certify", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="data set (sparse_regression seed)")
    args = ap.parse_args()
    X, y, w_star = problem(args.dim, args.samples, seed=args.seed)
    alphas, shapes = fig71_alphas(args.n_alpha), FIG71_SHAPES

    # The command line, timed from outside in a fresh process: cold (an empty compilation cache,
    # so compilation is included) and warm (the cache the cold run filled, on another data set
    # of the same shapes: what a second sweep of a study costs).
    tmp = tempfile.mkdtemp(prefix="ibflow-grid-")
    cache = os.path.join(tmp, "cache")
    t_cli = cli_sweep((X, y, w_star), tmp, "out", args.n_alpha, cache)
    t_warm = cli_sweep(problem(args.dim, args.samples, seed=args.seed + 1000), tmp, "warm", args.n_alpha, cache)
    # The README's order: `ibflow demo` (the main job, same sizes) first, in a fresh cache, then the sweep.
    demo_cache = os.path.join(tmp, "demo-cache")
    t_demo = cli_demo(tmp, demo_cache, args.dim, args.samples)
    t_after_demo = cli_sweep((X, y, w_star), tmp, "after-demo", args.n_alpha, demo_cache)
    import xarray as xr

    with xr.open_dataset(os.path.join(tmp, "out", "sweep.nc"), engine="h5netcdf") as cli:
        cli = cli.load()

    t0 = time.perf_counter()
    # In process: the pure parameter-space ODE (mode="pure", rtol 1e-10), the check that the
    # command line's default reduced mode computes the same limits.
    ds = ib.sweep(X, y, alphas=alphas, shapes=shapes, w_star=w_star, certify=not args.no_certify, progress=False,
                  chunk_size=args.chunk_size, flow_kwargs=dict(mode="pure"))
    t_sweep = time.perf_counter() - t0
    t_total = T_IMPORTED - T_START + t_sweep  # this process's import + the first (compiling) sweep

    # independent reference at every point (dual Newton)
    refs, t_ref = grid_references(X, y, alphas, shapes)
    n_points = len(alphas) * len(shapes)
    err_max, cli_err_max = grid_error(ds["predictor"].values, refs), grid_error(cli["predictor"].values, refs)

    rows = [["`ibflow sweep --certify` (command line, fresh process, empty compilation cache; reduced mode)",
             f"{t_cli:.1f}", f"{t_cli:.1f}", f"{cli_err_max:.1e}",
             f"{int((cli['status'].values == 'converged').sum())}/{n_points}",
             f"{int(cli['passed'].values.sum())}/{n_points}"]]
    rows += [["ibflow.sweep, pure parameter ODE (mode='pure')" + (" certified" if not args.no_certify else ""),
              f"{t_sweep:.1f}",
             f"{t_total:.1f}", f"{err_max:.1e}", f"{int((ds['status'].values == 'converged').sum())}/{n_points}"]]
    if not args.no_certify:
        rows[1].append(f"{int(ds['passed'].values.sum())}/{n_points}")
    else:
        rows[1].append("-")
    rows.append(["dual-Newton floor (all points)", f"{t_ref:.1f}", "-", "-", "-", "-"])
    rows.insert(1, ["the same, warm compilation cache (filled by the run above; another data set of the same "
                    "shapes)", f"{t_warm:.1f}", f"{t_warm:.1f}", "-", "-", "-"])
    rows.insert(2, [f"the same after `ibflow demo` only (the README's main job, {t_demo:.1f} s, filled a fresh "
                    "cache)", f"{t_after_demo:.1f}", f"{t_after_demo:.1f}", "-", "-", "-"])

    gd_note = ""
    if args.gd != "none":
        idx = [(i, j) for i in range(len(alphas)) for j in range(len(shapes))]
        if args.gd == "sample":
            idx = [(i, j) for (i, j) in idx if i % 5 == 2]
        t_gd, gd_err = 0.0, []
        for i, j in idx:
            net = ib.diagonal_init(alphas[i], shapes[j], args.dim)
            w, t, _, ok = gd_loop(net, X, y, time_limit=600)
            t_gd += t
            gd_err.append(rel(w, ds["predictor"].values[i, j, 0]))
        scale = n_points / len(idx)
        gd_note = "" if args.gd == "all" else f" (estimate: {len(idx)} points measured × {scale:.0f})"
        rows.append([f"GD loop η = 1e-3 summed{gd_note}", f"{t_gd * scale:.1f}", "-",
                     f"{min(gd_err):.1e} … {max(gd_err):.1e}", "-", "-"])
    lsoda_pts = []
    if args.lsoda_points:
        for i in np.linspace(0, len(alphas) - 1, args.lsoda_points).astype(int):
            w, t, _, ok = lsoda(ib.diagonal_init(alphas[i], 0.0, args.dim), X, y)
            lsoda_pts.append((alphas[i], t, rel(w, refs[i, shapes.index(0.0)])))  # its dual-Newton reference
        rows.append([f"SciPy LSODA, mean of {len(lsoda_pts)} point(s), × {n_points}",
                     f"{np.mean([t for _, t, _ in lsoda_pts]) * n_points:.1f}", "-",
                     f"{max(e for _, _, e in lsoda_pts):.1e}", "-", "-"])
    header = ["method", "wall s", "wall s incl. import+compile", "max rel. error vs dual Newton", "converged",
              "certified"]
    print(f"\n### Fig. 7.1 grid: {len(alphas)} α × {len(shapes)} s, d = {args.dim}, N = {args.samples}, "
          f"data seed {args.seed}; device {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs\n")
    print(table(rows, header))
    print(f"\nibflow.sweep incl. import + compile: {t_total:.1f} s for {n_points} points; "
          f"per point {t_sweep / n_points * 1e3:.0f} ms vs dual-Newton floor {t_ref / n_points * 1e3:.0f} ms "
          f"({t_sweep / max(t_ref, 1e-9):.1f}×); peak RSS {peak_rss_mib():.0f} MiB")
    for r in rows[4:]:
        print(f"{r[0]}: {float(r[1]) / t_cli:.1f}× the command line's time")
    fast_vs_pure = max(rel(cli["predictor"].values[i, j, 0], ds["predictor"].values[i, j, 0])
                       for i in range(len(alphas)) for j in range(len(shapes)))
    print(f"reduced (command line) vs pure (in process) limits: largest relative difference {fast_vs_pure:.1e}")
    for a, t, e in lsoda_pts:
        print(f"acceptance: `ibflow sweep` {t_cli:.1f} s cold ({t_warm:.1f} s warm) for {n_points} points vs SciPy LSODA "
              f"{t:.1f} s for one point (α = {a:.2g}, s = 0; error {e:.1e}): ratio {t_cli / t:.2f} "
              f"({t_warm / t:.2f} warm, {t_after_demo / t:.2f} after `ibflow demo`; ≤ 1 passes)")


if __name__ == "__main__":
    main()
