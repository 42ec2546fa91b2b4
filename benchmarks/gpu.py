"""GPU (or any device) benchmark: the Fig. 7.1-style grid at d ∈ {1e3, 1e4, 1e5}, float64 and
float32, on whatever JAX device exists. One command:

    python benchmarks/gpu.py [--dims 1000,10000,100000] [--n-alpha 20] [--out table.md]

Each (d, dtype) runs in its own subprocess (float32 needs `IBFLOW_NO_X64=1` before JAX starts)
and reports wall time with and without compilation, steps, the largest relative error of
sampled points against the dual-Newton reference (float64 reference in both cases), and peak
memory: the process's resident set and, where the device reports it (GPUs), the device's peak
bytes in use (`Device.memory_stats()["peak_bytes_in_use"]`).
"""

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
import jax, jax.numpy as jnp, numpy as np
import ibflow as ib
dim, n_alpha, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
D = ib.sparse_regression(num_samples=100, dim=dim, seed=0)
X, y = D["X"], D["y"]
f32 = dtype == "float32"
if f32:
    X, y = X.astype(np.float32), y.astype(np.float32)
alphas = np.logspace(-5, np.log10(0.25), n_alpha)
shapes = [0.0, 0.5, 0.7, 0.9, 0.99]
t0 = time.perf_counter()
ds = ib.sweep(X, y, alphas=alphas, shapes=shapes, progress=False, chunk_size=len(alphas) * len(shapes))
t_first = time.perf_counter() - t0
t0 = time.perf_counter()
ds = ib.sweep(X, y, alphas=alphas * 1.0001, shapes=shapes, progress=False, chunk_size=len(alphas) * len(shapes))
t_second = time.perf_counter() - t0
errs = []
for i in range(0, n_alpha, max(1, n_alpha // 4)):
    for j in (0, 4):
        net = ib.diagonal_init(float(ds.alpha[i]), shapes[j], dim)
        ref = np.asarray(ib.dual_newton(ib.implicit_potential(net), D["X"], D["y"]).w)
        w = ds["predictor"].values[i, j, 0]
        errs.append(float(np.linalg.norm(w - ref) / np.linalg.norm(ref)))
st = ds["status"].values.ravel()
import resource
stats = jax.devices()[0].memory_stats() or {}
peak_device = stats.get("peak_bytes_in_use")
print("RESULT " + json.dumps(dict(dim=dim, dtype=dtype, device=jax.devices()[0].device_kind, jax=jax.__version__,
      platform=jax.devices()[0].platform, points=int(st.size), converged=int((st == "converged").sum()),
      first=t_first, second=t_second, max_steps=int(ds["num_steps"].max()), max_err=max(errs),
      total=time.perf_counter() - t_start, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      peak_device_mib=None if peak_device is None else peak_device / 2**20)))
"""


def _mib(value):
    """A memory column's cell: '–' where the row has no such reading (a CPU device, an older row)."""
    return "–" if value is None else f"{value:.0f}"


def table(rows, n_alpha):
    """The Markdown table of measured rows (dicts as the child prints them)."""
    dev = rows[0]["device"] if rows else "?"
    jax_version = rows[0].get("jax", "?") if rows else "?"
    lines = [f"### Fig. 7.1-style grid ({n_alpha} α × 5 s, N = 100) on {dev} (jax {jax_version})", "",
             "| d | dtype | points converged | 1st call s (incl. compile) | 2nd call s | ms / point | max steps | "
             "max rel. err vs dual Newton | peak host RSS MiB | peak device MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dim']} | {r['dtype']} | {r['converged']}/{r['points']} | {r['first']:.2f} | "
                     f"{r['second']:.2f} | {r['second'] / r['points'] * 1e3:.1f} | {r['max_steps']} | {r['max_err']:.1e} | "
                     f"{_mib(r.get('peak_rss_mib'))} | {_mib(r.get('peak_device_mib'))} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="1000,10000,100000")
    ap.add_argument("--dtypes", default="float64,float32",
                    help="float32 runs the solver at order 5 (`ibflow.default_solver`); its reference is float64")
    ap.add_argument("--n-alpha", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None, help="append each row as a JSON line here as soon as it is measured")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--from-json", default=None, help="print the table of rows saved by --json instead of measuring")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print(table([json.loads(line) for line in f if line.strip()], args.n_alpha))
        return
    rows = []
    for dim in [int(d) for d in args.dims.split(",")]:
        for dtype in args.dtypes.split(","):
            env = dict(os.environ)
            if dtype == "float32":
                env["IBFLOW_NO_X64"] = "1"
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, "-c", CHILD, str(dim), str(args.n_alpha), dtype], env=env,
                                   capture_output=True, text=True, timeout=args.timeout)
                line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                if not line:
                    print(f"d={dim} {dtype}: failed\n{p.stderr[-1500:]}", file=sys.stderr)
                    continue
                r = json.loads(line[0][7:])
            except subprocess.TimeoutExpired:
                print(f"d={dim} {dtype}: timed out after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
                continue
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    text = table(rows, args.n_alpha)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
