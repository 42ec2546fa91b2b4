"""SciPy LSODA at *every* point of the Fig. 7.1 grid (20 α from 1e-5 to 0.25 × 5 shapes,
d = 1000, N = 100), against one cold `ibflow sweep --certify` of the whole grid.

    python benchmarks/lsoda_grid.py [--workers 2] [--seed 0] [--n-alpha 20] [--out FILE.npz]

Issue 6's acceptance compares the command line's wall time for the 100-point grid with
"100 × (SciPy LSODA seconds for one point) / 100", i.e. with one LSODA solve. LSODA's cost
varies ~1000× over the grid (0.15 s where it never forms a finite-difference Jacobian, to minutes
at α ~ 1e-5), so `grid.py`'s three s = 0 points leave open which point is meant. This script
measures them all:

- the command line, cold (fresh process, empty compilation cache), timed from outside first,
  on an idle machine; its limits are checked against the dual-Newton reference at every point;
- LSODA (`_common.lsoda`: rtol 1e-10, atol 1e-14, the same loss target) at every (α, s), in
  `--workers` processes with one BLAS thread each (LSODA is serial; with 2 workers on 2 cores
  each solve has a core to itself), its error against the same reference.

It prints the distribution of LSODA's seconds per point, their mean (= LSODA summed over the
grid / 100, the issue's "100 × one point" read as the grid's own cost) and at how many points
one LSODA solve takes longer than the command line's whole grid. `--out` saves the per-point
seconds, function evaluations and errors.
"""

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

#: The worker processes' environment: one BLAS thread each. LSODA is serial, and two workers each
#: multi-threading their small matrix-vector products would only contend for the 2 cores.
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _lsoda_point(job):
    """One LSODA solve in a worker process: (i, j, seconds, fevals, converged, w)."""
    i, j, alpha, shape, dim, samples, seed = job
    import ibflow as ib
    from _common import lsoda, problem

    X, y, _ = problem(dim, samples, seed=seed)
    w, wall, nfev, ok = lsoda(ib.diagonal_init(alpha, shape, dim), np.asarray(X), np.asarray(y))
    return i, j, wall, nfev, ok, np.asarray(w)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--n-alpha", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="data set (sparse_regression seed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="save per-point results (.npz)")
    args = ap.parse_args()

    from _common import FIG71_SHAPES, cli_sweep, fig71_alphas, grid_error, grid_references, problem, rel

    X, y, w_star = problem(args.dim, args.samples, seed=args.seed)
    alphas = fig71_alphas(args.n_alpha)

    # The command line first, on an idle machine (fresh process, empty compilation cache).
    tmp = tempfile.mkdtemp(prefix="ibflow-lsoda-grid-")
    t_cli = cli_sweep((X, y, w_star), tmp, "out", args.n_alpha, os.path.join(tmp, "cache"))

    import xarray as xr

    with xr.open_dataset(os.path.join(tmp, "out", "sweep.nc"), engine="h5netcdf") as cli:
        cli = cli.load()
    refs, t_ref = grid_references(X, y, alphas, FIG71_SHAPES)
    cli_err = grid_error(cli["predictor"].values, refs)
    certified = int(cli["passed"].values.sum())

    # LSODA at every point, slowest (small α) first so that the workers finish together.
    jobs = [(i, j, float(alphas[i]), s, args.dim, args.samples, args.seed)
            for i in range(len(alphas)) for j, s in enumerate(FIG71_SHAPES)]
    shape = (len(alphas), len(FIG71_SHAPES))
    seconds, fevals, errors = np.zeros(shape), np.zeros(shape, int), np.zeros(shape)
    ok = np.zeros(shape, bool)
    t0 = time.perf_counter()
    # Spawned, not forked: this process has started JAX's threads, which a fork would copy. The
    # workers inherit `ONE_THREAD` (read when their NumPy loads); the command line above ran without.
    os.environ.update(ONE_THREAD)
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, j, wall, nfev, conv, w in pool.map(_lsoda_point, jobs):
            seconds[i, j], fevals[i, j], ok[i, j], errors[i, j] = wall, nfev, conv, rel(w, refs[i, j])
    t_lsoda_wall = time.perf_counter() - t0

    n = seconds.size
    q = np.quantile(seconds, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    print(f"\n### LSODA at every point of the Fig. 7.1 grid ({len(alphas)} α × {len(FIG71_SHAPES)} s, "
          f"d = {args.dim}, N = {args.samples}, data seed {args.seed}; {args.workers} worker processes, {os.cpu_count()} CPUs)\n")
    print("| quantity | value |\n|---|---|")
    print(f"| `ibflow sweep --certify`, cold, the whole grid | {t_cli:.1f} s, max rel. error {cli_err:.1e}, "
          f"{certified}/{n} certified |")
    print(f"| LSODA summed over the grid ({int(ok.sum())}/{n} reached the loss target) | {seconds.sum():.0f} s "
          f"({t_lsoda_wall:.0f} s wall in {args.workers} workers) |")
    print("| LSODA per point: min / 10 % / 25 % / median / 75 % / 90 % / max | "
          + " / ".join(f"{v:.2f}" for v in q) + " s |")
    print(f"| LSODA per point, mean (= the sum / {n}) | {seconds.mean():.2f} s |")
    print(f"| LSODA's largest rel. error vs dual Newton | {errors.max():.1e} |")
    print(f"| dual-Newton floor, all points | {t_ref:.1f} s |")
    print(f"\nacceptance read as the grid's own LSODA cost (sum / {n}): ratio {t_cli / seconds.mean():.2f} "
          f"(≤ 1 passes); LSODA summed over the grid is {seconds.sum() / t_cli:.0f}× the command line")
    print(f"points where one LSODA solve takes longer than the command line's whole grid: "
          f"{int((seconds >= t_cli).sum())}/{n}")
    print("\nLSODA seconds per point (rows α, columns s):\n")
    print("| α | " + " | ".join(f"s = {s}" for s in FIG71_SHAPES) + " |\n|---|" + "---|" * len(FIG71_SHAPES))
    for i, a in enumerate(alphas):
        print(f"| {a:.2e} | " + " | ".join(f"{seconds[i, j]:.2f}" for j in range(len(FIG71_SHAPES))) + " |")
    if args.out:
        np.savez(args.out, alphas=alphas, shapes=np.asarray(FIG71_SHAPES), seconds=seconds, fevals=fevals,
                 errors=errors, converged=ok, cli_seconds=t_cli, cli_error=cli_err)


if __name__ == "__main__":
    main()
