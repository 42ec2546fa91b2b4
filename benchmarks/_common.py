"""Shared set-up for the benchmarks: the Azulay §9 problem, the exact limit (dual Newton),
and the peers a researcher would otherwise use, run on identical problems.

Peers (issue "Performance"): the plain GD loop of the original papers (NumPy, learning rate
1e-3, stop at train MSE < 1e-10), SciPy `solve_ivp` LSODA (rtol 1e-10, atol 1e-14) on the
same parameter ODE, and a naive diffrax solve (Tsit5 + PID controller, stop on loss).
"""

import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

import ibflow as ib


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: The shapes of Azulay et al. 2021 Fig. 7.1; its α are `fig71_alphas`.
FIG71_SHAPES = (0.0, 0.5, 0.7, 0.9, 0.99)


def fig71_alphas(n_alpha=20):
    """The Fig. 7.1 grid's scales: `n_alpha` α log-spaced from 1e-5 to 0.25."""
    return np.logspace(-5, np.log10(0.25), n_alpha)


def cli_sweep(data, workdir, name, n_alpha, cache_dir):
    """Wall seconds of `ibflow sweep --certify` of the Fig. 7.1 grid (`n_alpha` × `FIG71_SHAPES`,
    two-layer diagonal net) on `data = (X, y, w_star)`, run in a fresh process as a user runs it
    and timed from outside (start-up, import, compilation, solve, certificates, files, figure),
    with `IBFLOW_CACHE_DIR=cache_dir`. Its results are in `workdir/name/sweep.nc`."""
    path = os.path.join(workdir, f"{name}.npz")
    np.savez(path, X=data[0], y=data[1], w_star=data[2])
    cmd = [sys.executable, "-m", "ibflow", "sweep", "--data", path, "--net", "diagonal",
           "--alpha", f"1e-5:0.25:{n_alpha}", "--shape", ",".join(map(str, FIG71_SHAPES)), "--certify",
           "--out", os.path.join(workdir, name), "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, IBFLOW_CACHE_DIR=cache_dir))
    return time.perf_counter() - t0


def cli_demo(workdir, cache_dir, dim=1000, samples=100):
    """Wall seconds of `ibflow demo --dim dim --samples samples` (the README's main job) in a fresh
    process with `IBFLOW_CACHE_DIR=cache_dir`; its files go to `workdir/demo`."""
    cmd = [sys.executable, "-m", "ibflow", "demo", "--out", os.path.join(workdir, "demo"), "--dim", str(dim),
           "--samples", str(samples)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, IBFLOW_CACHE_DIR=cache_dir))
    return time.perf_counter() - t0


def problem(dim=1000, samples=100, seed=0):
    D = ib.sparse_regression(num_samples=samples, dim=dim, seed=seed)
    return D["X"], D["y"], D["w_star"]


def median_seconds(fn, repeats=7, budget=2.0):
    """`(result, seconds)`: the last result of `fn()` and the median wall time of up to `repeats`
    calls, as many as fit in `budget` seconds (at least one). Callers warm `fn` up first. A single
    10-50 ms call on this shared 2-core machine was seen to vary by 2x between runs."""
    times = []
    while not times or (len(times) < repeats and sum(times) < budget):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def reference(net, X, y):
    """The exact limit (dual Newton on the network's implicit potential: Thm 4.1 / App. B in closed
    form for two layers, `DeepDiagonal` for deeper diagonal nets) and its wall time (median of
    calls after the first, `median_seconds`)."""
    pot = ib.implicit_potential(net)
    solve = lambda: jax.block_until_ready(ib.dual_newton(pot, X, y).w)
    solve()
    w, seconds = median_seconds(solve)
    return np.asarray(w), seconds


def grid_references(X, y, alphas, shapes):
    """The dual-Newton limit of the two-layer diagonal net at every (α, s) of a grid, shape
    (len(alphas), len(shapes), d), and the seconds those solves took in all."""
    refs = np.zeros((len(alphas), len(shapes), X.shape[1]))
    seconds = 0.0
    for i, a in enumerate(alphas):
        for j, s in enumerate(shapes):
            pot = ib.implicit_potential(ib.diagonal_init(a, s, X.shape[1]))
            t0 = time.perf_counter()
            refs[i, j] = np.asarray(ib.dual_newton(pot, X, y).w)
            seconds += time.perf_counter() - t0
    return refs, seconds


def grid_error(predictor, refs):
    """The largest relative distance of a sweep's `predictor (alpha, shape, seed, dim)` (seed 0)
    from `grid_references`."""
    return max(rel(predictor[i, j, 0], refs[i, j]) for i in range(refs.shape[0]) for j in range(refs.shape[1]))


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def numpy_model(net):
    """`(θ0, grad)` for the NumPy peers, with `grad(θ, X, y) -> (∇L(θ), L(θ), w̃(θ))` and the
    package's loss `L = ½·mean(r²)`: the diagonal net (any depth) and the two-layer fully
    connected net (`xᵀW a`, any width)."""
    if isinstance(net, ib.DiagonalNet):
        L, d = net.plus.shape
        theta0 = np.concatenate([np.asarray(net.plus).ravel(), np.asarray(net.minus).ravel()])

        def grad(theta, X, y):
            P = theta.reshape(2, L, d)
            prod_p, prod_m = np.prod(P[0], 0), np.prod(P[1], 0)
            r = X @ (prod_p - prod_m) - y
            g = X.T @ r / len(y)
            out = np.empty_like(P)
            for l in range(L):
                out[0, l] = g * np.prod(np.delete(P[0], l, 0), 0)
                out[1, l] = -g * np.prod(np.delete(P[1], l, 0), 0)
            return out.ravel(), 0.5 * np.mean(r**2), prod_p - prod_m

        return theta0, grad
    if isinstance(net, ib.FullyConnectedNet) and net.depth == 2:
        W0 = np.asarray(net.weights[0])
        d, m = W0.shape
        theta0 = np.concatenate([W0.ravel(), np.asarray(net.a)])

        def grad(theta, X, y):
            W, a = theta[:d * m].reshape(d, m), theta[d * m:]
            w = W @ a
            r = X @ w - y
            g = X.T @ r / len(y)
            return np.concatenate([np.outer(g, a).ravel(), W.T @ g]), 0.5 * np.mean(r**2), w

        return theta0, grad
    raise TypeError(f"no NumPy peer model for {type(net).__name__}")


def gd_loop(net, X, y, lr=1e-3, mse_tol=1e-10, max_iter=50_000_000, time_limit=120.0):
    """The original papers' GD loop (NumPy): θ ← θ − η∇L until train MSE < 1e-10."""
    theta, grad = numpy_model(net)
    t0 = time.perf_counter()
    it = 0
    while it < max_iter:
        g, loss, w = grad(theta, X, y)
        if 2 * loss < mse_tol:
            break
        theta -= lr * g
        it += 1
        if it % 1000 == 0 and time.perf_counter() - t0 > time_limit:
            return w, time.perf_counter() - t0, it, False
    return w, time.perf_counter() - t0, it, True


def lsoda(net, X, y, loss_rtol=1e-24, rtol=1e-10, atol=1e-14, t_max=1e12):
    """SciPy LSODA on the parameter ODE θ̇ = −∇L(θ), stopped by an event at the same loss
    target as ibflow."""
    from scipy.integrate import solve_ivp

    theta0, grad = numpy_model(net)
    target = loss_rtol * grad(theta0, X, y)[1]
    nfev = [0]

    def f(t, th):
        nfev[0] += 1
        return -grad(th, X, y)[0]

    def event(t, th):
        return np.log(grad(th, X, y)[1]) - np.log(target)

    event.terminal = True
    t0 = time.perf_counter()
    sol = solve_ivp(f, (0, t_max), theta0, method="LSODA", rtol=rtol, atol=atol, events=event)
    wall = time.perf_counter() - t0
    w = grad(sol.y[:, -1], X, y)[2]
    return w, wall, nfev[0], sol.status == 1


def naive_diffrax(net, X, y, max_steps=200_000):
    """Tsit5 + PID (diffrax), stop on the same loss target: the first attempt the issue describes."""
    import diffrax as dfx

    sol = ib.gradient_flow(net, X, y, solver=dfx.Tsit5(), max_steps=max_steps, throw=False)
    jax.block_until_ready(sol.predictor)
    t0 = time.perf_counter()
    sol = ib.gradient_flow(net, X, y, solver=dfx.Tsit5(), max_steps=max_steps, throw=False)
    jax.block_until_ready(sol.predictor)
    return np.asarray(sol.predictor), time.perf_counter() - t0, int(sol.num_steps) * 6, sol.status == "converged"


def ibflow_flow(net, X, y, **kw):
    """ibflow's default solve; returns (w, seconds after compilation (median of further calls,
    `median_seconds`), compile+run seconds, fevals, ok)."""
    def solve():
        sol = ib.gradient_flow(net, X, y, throw=False, **kw)
        jax.block_until_ready(sol.predictor)
        return sol

    t0 = time.perf_counter()
    solve()
    first = time.perf_counter() - t0
    sol, seconds = median_seconds(solve)
    return np.asarray(sol.predictor), seconds, first, int(sol.num_fevals), sol.status == "converged"


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)
