"""ibflow against its peers, per initialisation, on the Azulay §9 problem (d = 1000, N = 100;
the fully connected neuron at d = 100, N = 40).

    python benchmarks/peers.py [--quick] [--skip-gd] [--skip-lsoda]

Prints a Markdown table: seconds per initialisation, function evaluations, relative
error vs the exact limit (dual Newton), and the ratios the performance goals name.
ibflow runs twice: with `gradient_flow`'s default tolerances (`ib.default_solver_tolerances`:
rtol 1e-10, 1e-11 at depth ≥ 3; the trajectory too) and at looser ones for the goal's accuracy
(relative error ≤ 1e-8): where the reduced coordinates apply, the tolerances and order a sweep
uses there (`ibflow._sweep.REDUCED_RTOL`, `REDUCED_ORDER`: the limit only, which path errors do
not move); elsewhere (the parameter ODE,
whose limit the path's error does move) `PURE_LOOSE` = rtol 1e-9, atol 1e-11 (at rtol 1e-8 the
depth-3 row erred by 1.7e-8: its limit error is ~2 × rtol, the FC neuron's ≤ 1e-2 × rtol).
The GD loop and LSODA get a time limit per run (reported as "> limit" when hit). ibflow's and the
dual-Newton floor's seconds are medians of up to 7 calls after the first (`_common.median_seconds`);
the peers, seconds to minutes a run, are timed once.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

import ibflow as ib  # noqa: E402
from ibflow._sweep import REDUCED_ATOL, REDUCED_ORDER, REDUCED_RTOL  # noqa: E402
from _common import gd_loop, ibflow_flow, lsoda, naive_diffrax, peak_rss_mib, problem, reference, rel, table  # noqa: E402

PURE_LOOSE = dict(rtol=1e-9, atol=1e-11)  # the parameter ODE's looser run (module docstring)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="d = 200, N = 40, fewer cases")
    ap.add_argument("--skip-gd", action="store_true")
    ap.add_argument("--skip-lsoda", action="store_true")
    ap.add_argument("--skip-diffrax", action="store_true")
    ap.add_argument("--limit", type=float, default=120.0, help="seconds allowed to each peer run")
    ap.add_argument("--tsit5-steps", type=int, default=200_000, help="step budget of the naive diffrax solve")
    args = ap.parse_args()
    dim, N = (200, 40) if args.quick else (1000, 100)
    X, y, _ = problem(dim, N)
    diag = [(a, s, 2) for a in (1e-4, 1e-2, 1.0) for s in (0.0, 0.9)] + [(1e-2, 0.0, 3)]
    if args.quick:
        diag = diag[::2]
    cases = [(f"α={a:g}, s={s:g}, L={L}", ib.diagonal_init(a, s, dim, depth=L), X, y) for a, s, L in diag]
    # The fully connected single neuron (Azulay Thm 6.1), d = 100, N = 40, the §9 kind of data.
    Xf, yf, _ = problem(100, 40)
    fc = [(1e-2, 0.5), (1.0, 0.0)][: 1 if args.quick else 2]
    cases += [(f"FC neuron α={a:g}, s={s:g}, d=100", ib.fully_connected_init(a, s, 100, key=jax.random.key(0)),
               Xf, yf) for a, s in fc]
    rows = []
    for label, net, X, y in cases:
        # Diagonal L = 2: the closed-form potential; L ≥ 3: DeepDiagonal (its layer ODE per
        # coordinate, an integration independent of the flow's); FC neuron: Thm 6.1's potential.
        # Dual Newton on each.
        ref, t_ref = reference(net, X, y)
        w, t_ib, t_first, fe_ib, ok = ibflow_flow(net, X, y)
        row = dict(case=label, ib=(t_ib, t_first, fe_ib, rel(w, ref), ok), ref=t_ref)
        loose = (dict(rtol=REDUCED_RTOL, atol=REDUCED_ATOL, solver=ib.LinearlyImplicitExtrapolation(REDUCED_ORDER))
                 if ib.reducible(net, ib.SquareLoss()) else PURE_LOOSE)
        w1, t1, _, fe1, ok1 = ibflow_flow(net, X, y, **loose)
        row["ib_limit"] = (t1, fe1, rel(w1, ref), ok1)
        if not args.skip_lsoda:
            w2, t2, fe2, ok2 = lsoda(net, X, y)
            row["lsoda"] = (t2, fe2, rel(w2, ref), ok2)
        if not args.skip_gd and not (isinstance(net, ib.DiagonalNet) and net.depth > 2):
            w3, t3, it3, ok3 = gd_loop(net, X, y, time_limit=args.limit)
            row["gd"] = (t3, it3, rel(w3, ref), ok3)
        if not args.skip_diffrax:
            w4, t4, fe4, ok4 = naive_diffrax(net, X, y, max_steps=args.tsit5_steps)
            row["dfx"] = (t4, fe4, rel(w4, ref), ok4)
        rows.append(row)
        print(f"done {row['case']}", file=sys.stderr, flush=True)

    def ratio(x):
        return f"{x:.2g}×" if x < 10 else f"{x:.0f}×"

    def fmt_peer(r, key):
        if key not in r:
            return ["-", "-", "-", "-"]
        t, fe, err, ok = r[key]
        return [f"{t:.3g}" + ("" if ok else " (not converged)"), f"{fe}", f"{err:.1e}",
                ratio(t / r['ib'][0])]

    out = []
    for r in rows:
        t, tf, fe, err, ok = r["ib"]
        lim = ["-"] * 5
        if "ib_limit" in r:
            t1, fe1, err1, ok1 = r["ib_limit"]
            lim = [f"{t1:.3g}", f"{fe1}", f"{err1:.1e}" + ("" if ok1 else " (!)"), ratio(t1 / r['ref']),
                   ratio(r['lsoda'][0] / t1) if "lsoda" in r else "-"]
        out.append([r["case"], f"{t:.3g}", f"{tf:.3g}", f"{fe}", f"{err:.1e}" + ("" if ok else " (!)"),
                    f"{r['ref'] * 1e3:.1f}", ratio(t / r['ref']), *lim,
                    *fmt_peer(r, "lsoda"), *fmt_peer(r, "gd"), *fmt_peer(r, "dfx")])
    header = ["case", "ibflow s", "ibflow s (1st call)", "ibflow fevals", "ibflow rel.err", "dual-Newton ms",
              "ibflow/floor", "ibflow s, loose tol.", "fevals", "rel.err", "/floor", "LSODA/ibflow (loose tol.)",
              "LSODA s", "LSODA fevals", "LSODA err", "LSODA/ibflow", "GD s", "GD iters", "GD err",
              "GD/ibflow", "Tsit5 s", "Tsit5 fevals", "Tsit5 err", "Tsit5/ibflow"]
    print(f"\n### Per initialisation, d = {dim}, N = {N}, device: {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs\n")
    print(table(out, header))
    print(f"\npeak resident memory: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
