"""Shared tolerances, a tree-aware allclose and the catalogue of test problems.

Each catalogue case is (name, network factory, label factory): small problems
(N = 5, d = 12) whose gradient-flow limit is known independently (closed-form
potential + dual Newton solve), used across the flow, certificate and CLI tests.
"""

import contextlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import ibflow as ib

# Tolerances (math.md §7): float64 agreement of limits is 1e-12..1e-8; assert at 1e-7.
RTOL_LIMIT = 1e-7
DRIFT_TOL = 1e-9


def tree_allclose(a, b, rtol=1e-10, atol=1e-12):
    la, lb = jax.tree_util.tree_leaves(eqx.filter(a, eqx.is_array)), jax.tree_util.tree_leaves(
        eqx.filter(b, eqx.is_array)
    )
    return len(la) == len(lb) and all(np.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(la, lb))


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@contextlib.contextmanager
def count_compiles():
    """Collects one entry per XLA backend compilation made inside the block (`jax.monitoring`)."""
    compiles = []

    def listener(event, seconds, **kwargs):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def problem(seed=0, N=5, d=12):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    y = rng.standard_normal(N)
    return X, y


def _rng(seed):
    return np.random.default_rng(seed)


D = 12
CATALOGUE = {
    "linear": lambda: ib.linear_init(0.7, D, key=jax.random.PRNGKey(1)),
    "diag-thm4.1": lambda: ib.diagonal_init(0.05, 0.0, D),
    "diag-shape0.7": lambda: ib.diagonal_init(0.2, 0.7, D),
    "diag-per-coordinate": lambda: ib.diagonal_init(jnp.asarray(_rng(2).uniform(0.01, 1, D)),
                                                     jnp.asarray(_rng(3).uniform(-0.8, 0.8, D))),
    "diag-biased": lambda: ib.DiagonalNet(jnp.asarray(_rng(4).uniform(-1, 1, (2, D))),
                                           jnp.asarray(_rng(5).uniform(-1, 1, (2, D)))),
    "diag-depth3": lambda: ib.DiagonalNet(jnp.asarray(_rng(6).uniform(0.2, 1, (3, D))),
                                           jnp.asarray(_rng(7).uniform(0.2, 1, (3, D)))),
    "diag-depth4": lambda: ib.diagonal_init(0.5, -0.3, D, depth=4),
    "tied-D2": lambda: ib.tied_diagonal_init(0.3, D, w0=_rng(8).uniform(0.5, 1.5, D)),
    "tied-D3": lambda: ib.tied_diagonal_init(0.3, D, depth=3),
    "fc-neuron": lambda: ib.fully_connected_init(0.5, 0.3, D, key=jax.random.PRNGKey(2)),
    "fc-neuron-delta0": lambda: ib.fully_connected_init(0.3, 0.0, D, key=jax.random.PRNGKey(3)),
    "leaky-relu": lambda: ib.leaky_relu_init(0.5, 0.4, D, slope=0.2, key=jax.random.PRNGKey(4)),
}


#: Catalogue cases whose DeepDiagonal reference (an ODE per coordinate) is slow: run with -m slow.
SLOW_CASES = {"diag-depth4"}


def catalogue_params(names):
    """pytest params over catalogue names, the slow ones marked `slow`."""
    import pytest

    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in names]


def labels_for(name, y):
    """Leaky-ReLU with a > 0 needs labels reachable by a·σ(·): any sign is fine."""
    return y


def filippov_leaky_neuron(X, y, w0, a0, rho, t_max=1e12, rtol=1e-12, atol=1e-14, max_events=400, save_ts=None,
                          loss="square"):
    """An independent reference for the leaky-ReLU neuron's flow on the square loss
    `L = (1/2N) Σ (a σ(x_nᵀw) − y_n)²` (or, with `loss="exp"`, the exponential loss
    `L = (1/N) Σ exp(−y_n a σ(x_nᵀw))`), `σ(z) = max(z, ρz)`, as a Filippov solution (Filippov
    1988 §4): SciPy Radau between events, each piece with its samples' slopes fixed and w
    projected off the sliding samples' x_n; SciPy's event location (dense output) finds where a
    sample reaches its kink (it crosses, or slides when both sides' ż_n point at the kink) or a
    sliding sample's equivalent control λ_n leaves [ρ, 1] (it leaves to the slope-1 or slope-ρ
    side). Stops at `L ≤ 1e-26` (square loss) or `t_max`. Returns `(w, a, events)`, events `(kind, n, t)`,
    and with `save_ts` also the states `(w, a)` (len(save_ts), d + 1) at those times (Radau's
    dense output within each piece; NaN past the end).
    Written with NumPy and SciPy only, apart from ibflow's `_kinks` (the decisions are the same
    by design; the integrator, event location and linear algebra are not)."""
    from scipy.integrate import solve_ivp

    X, y = np.asarray(X, float), np.asarray(y, float)
    N, d = X.shape
    side = np.where(X @ w0 > 0, 1.0, rho)  # the slope of each sample not sliding
    S = np.zeros(N, bool)
    state, t, events = np.concatenate([w0, [a0]]).astype(float), 0.0, []
    save_ts = None if save_ts is None else np.asarray(save_ts, float)
    saved = None if save_ts is None else np.full((len(save_ts), d + 1), np.nan)

    def projector():
        if not S.any():
            return np.eye(d)
        XS = X[S]
        return np.eye(d) - XS.T @ np.linalg.solve(XS @ XS.T, XS)

    def dloss(f):  # ∂L/∂f_n
        return (f - y) / N if loss == "square" else -y * np.exp(-y * f) / N

    def parts(s):
        w, a = s[:-1], s[-1]
        z = np.where(S, 0.0, X @ w)
        r = dloss(a * side * z)
        return w, a, z, r, X.T @ (r * a * side * ~S)

    def rhs(t, s, P):
        _, _, z, r, gw = parts(s)
        return np.concatenate([-(P @ gw), [-(r @ (side * z))]])

    def control(s):  # λ on S
        _, a, _, r, g_rest = parts(s)
        XS = X[S]
        return -np.linalg.solve(XS @ XS.T, XS @ g_rest) / (r[S] * a)

    def project(s):
        if S.any():
            XS = X[S]
            s[:-1] -= XS.T @ np.linalg.solve(XS @ XS.T, XS @ s[:-1])
        return s

    for _ in range(max_events):
        # Events due at once: sliding samples whose λ has left [ρ, 1].
        while S.any():
            lam = control(state)
            out = np.where((lam < rho - 1e-12) | (lam > 1 + 1e-12))[0]
            if not len(out):
                break
            n = np.where(S)[0][out[0]]
            S[n], side[n] = False, (1.0 if lam[out[0]] > 1 else rho)
            state = project(state)
            events.append(("exit", n, t))
        P = projector()
        funcs = []
        for n in range(N):
            if S[n]:
                k = int(np.sum(S[:n]))
                fn = lambda t, s, P, k=k: (control(s)[k] - rho) * (1 - control(s)[k])
            else:
                fn = lambda t, s, P, n=n, sg=(1.0 if side[n] == 1.0 else -1.0): sg * (X[n] @ s[:-1])
            fn.terminal, fn.direction = True, -1
            funcs.append(fn)

        def converged(t, s, P):
            if loss != "square":
                return 1.0
            w, a = s[:-1], s[-1]
            f = a * np.maximum(X @ w, rho * (X @ w))
            return np.log(0.5 * np.mean((f - y) ** 2)) - np.log(1e-26)

        converged.terminal, converged.direction = True, -1
        sol = solve_ivp(rhs, (t, t_max), state, method="Radau", rtol=rtol, atol=atol, events=funcs + [converged],
                        args=(P,), dense_output=save_ts is not None)
        if save_ts is not None:
            inside = (save_ts >= t) & (save_ts <= sol.t[-1])
            if inside.any():
                saved[inside] = sol.sol(save_ts[inside]).T
        state, t = sol.y[:, -1].copy(), sol.t[-1]
        hit = [n for n in range(N) if len(sol.t_events[n])]
        if sol.status != 1 or len(sol.t_events[N]) or not hit:
            break
        n = hit[0]
        if S[n]:
            lam = control(state)[int(np.sum(S[:n]))]
            S[n], side[n] = False, (1.0 if lam > (1 + rho) / 2 else rho)
            state = project(state)
            events.append(("exit", n, t))
            continue
        v = {}
        for slope in (1.0, rho):
            old, side[n] = side[n], slope
            v[slope] = X[n] @ rhs(t, state, P)[:-1]
            side[n] = old
        if v[1.0] < 0 < v[rho]:
            S[n] = True
            state = project(state)
            events.append(("slide", n, t))
        else:
            side[n] = rho if side[n] == 1.0 else 1.0
            events.append(("cross", n, t))
    if save_ts is not None:
        return state[:-1], state[-1], events, saved
    return state[:-1], state[-1], events
