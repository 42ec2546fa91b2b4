"""Reference minimisers of `Q(w) s.t. Xw = y`, independent of the gradient flow.

- `dual_newton`: damped Newton on the convex N-dimensional dual
  `F(ν) = Σ Q*((Xᵀν)) − y·ν`, whose gradient is `X φ⁻¹(Xᵀν) − y` and Hessian
  `X Dφ⁻¹(Xᵀν) Xᵀ` (math.md §0.2, §6). Only φ⁻¹ is needed: the step length is an
  exact line search on the directional derivative (F is convex along the Newton
  direction), which also handles overflow of exponential mirror maps (tiny α) by
  treating a non-finite trial point as an overshoot. Its own convergence check:
  `‖Xφ⁻¹(Xᵀν) − y‖ ≤ max(10·tol, 4·floor(ν))·‖y‖`, the floor being the residual that
  rounding alone leaves at ν (`dual_newton`).
- `min_l1`: min ‖w‖₁ s.t. Xw = y as a linear program (SciPy/HiGHS).
- `min_l2`: the minimum-norm interpolator.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._potentials import AbstractPotential


class ReferenceSolution(eqx.Module):
    """`w`: the minimiser; `nu`: the dual variable (`φ(w) = Xᵀν`); `residual`:
    relative primal residual; `iterations`; `converged`."""

    w: jax.Array
    nu: jax.Array
    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


@eqx.filter_jit
def dual_newton(potential: AbstractPotential, X, y, *, tol: float = 1e-13, max_iter: int = 200,
                line_search_iters: int = 60) -> ReferenceSolution:
    """argmin Q(w) s.t. Xw = y by damped Newton on the dual (module docstring).

    Stops when the relative primal residual r is at most `tol`, or when below `1e3·tol` a step
    no longer halves it, and reports `converged` for `r ≤ max(10·tol, 4·floor(ν))`.
    `floor(ν)` is the residual that float64 rounding alone puts into `Xφ⁻¹(Xᵀν) − y` (an RMS
    model): z = Xᵀν errs by `ε(Σ_n X_nj² ν_n²)^{1/2}` in coordinate j, moving w by Dφ⁻¹ times
    that (the jvp along that error for a non-separable potential), and w itself errs by ε|w|.
    Where the dual variable is large (a square, ill-conditioned X: d = N = 100, cond 530, small
    α) Newton stalls at 0.8-1.1 times it, ~8e-13, above 10·tol; on the Azulay §9 problem
    (d = 1000, N = 100) it is 2e-16 to 1e-15, below tol, and changes nothing."""
    X = jnp.asarray(X)
    y = jnp.asarray(y)
    ynorm = jnp.maximum(jnp.linalg.norm(y), jnp.finfo(y.dtype).tiny)
    eps = jnp.finfo(X.dtype).eps
    X2 = X**2

    def floor(nu, v, w):  # v = Xᵀν, w = φ⁻¹(v)
        dz = eps * jnp.sqrt(X2.T @ nu**2)
        dw = jnp.abs(potential.inverse_mirror_jvp(v, dz))
        return jnp.linalg.norm(jnp.sqrt(X2 @ (dw**2 + (eps * w) ** 2) + (eps * y) ** 2)) / ynorm

    def evaluate(nu):
        """`(∇F(ν), s)`: the dual gradient and, for a separable potential, `s = diag Dφ⁻¹(Xᵀν)`,
        which gives the Hessian `X diag(s) Xᵀ`; one evaluation of φ⁻¹ (with its slope) per
        point, carried to the next iteration instead of evaluated again there."""
        v = X.T @ nu
        if potential.separable:
            w, s = potential.inverse_mirror_and_slope(v)
        else:
            w, s = potential.inverse_mirror(v), jnp.zeros((), X.dtype)
        return X @ w - y, s

    def hess(nu, s):
        if potential.separable:
            return (X * s) @ X.T
        v = X.T @ nu
        cols = jax.vmap(lambda xn: potential.inverse_mirror_jvp(v, xn))(X)  # (N, d)
        return X @ cols.T

    def cond(state):
        nu, g, _, it, r_prev = state
        r = jnp.linalg.norm(g) / ynorm
        # Near tol, a step that no longer halves the residual has reached the rounding floor.
        stalled = (r <= 1e3 * tol) & (r > 0.5 * r_prev)
        return (it < max_iter) & ~(r <= tol) & ~stalled

    def body(state):
        nu, g, s, it, _ = state
        r_prev = jnp.linalg.norm(g) / ynorm
        H = hess(nu, s)
        H = H + 1e-300 * jnp.eye(H.shape[0])
        p = jnp.linalg.solve(H, g)  # Newton direction: ν ← ν − t p
        slope0 = -g @ p  # h'(0) < 0
        deriv = lambda t: -(evaluate(nu - t * p)[0] @ p)
        g1, s1 = evaluate(nu - p)
        d1 = -(g1 @ p)
        accept_full = jnp.isfinite(d1) & (d1 <= 0.5 * jnp.abs(slope0))

        def ls_cond(state):
            _, _, i, found = state
            return (i < line_search_iters) & ~found

        def ls_body(state):
            lo, hi, i, _ = state
            mid = 0.5 * (lo + hi)
            dm = deriv(mid)
            # Stop at a step whose slope is within half of the initial one (|h'(t)| ≤ |h'(0)|/2,
            # a strong Wolfe curvature condition): an exact minimiser of h buys nothing that the
            # next Newton step does not, and each trial costs a φ⁻¹ evaluation (DeepDiagonal: a
            # layer solve). A non-finite slope (overflow) counts as an overshoot.
            found = jnp.isfinite(dm) & (jnp.abs(dm) <= 0.5 * jnp.abs(slope0))
            below = jnp.isfinite(dm) & (dm < 0)
            lo, hi = jnp.where(below | found, mid, lo), jnp.where(below & ~found, hi, mid)
            return lo, hi, i + 1, found

        # The bisection runs only when the full Newton step overshoots (or overflows).
        lo, hi = jax.lax.cond(
            accept_full,
            lambda: (jnp.asarray(1.0, nu.dtype), jnp.asarray(1.0, nu.dtype)),
            lambda: jax.lax.while_loop(ls_cond, ls_body, (jnp.asarray(0.0, nu.dtype), jnp.asarray(1.0, nu.dtype),
                                                          0, False))[:2],
        )
        nu_new = nu - jnp.where(accept_full, 1.0, jnp.where(lo > 0, lo, 0.5 * hi)) * p
        g_new, s_new = jax.lax.cond(accept_full, lambda: (g1, s1), lambda: evaluate(nu_new))
        return nu_new, g_new, s_new, it + 1, r_prev

    nu0 = jnp.zeros(X.shape[0], X.dtype)
    nu, g, _, it, _ = jax.lax.while_loop(cond, body, (nu0, *evaluate(nu0), 0, jnp.asarray(jnp.inf, X.dtype)))
    v = X.T @ nu
    w = potential.inverse_mirror(v)
    res = jnp.linalg.norm(X @ w - y) / ynorm
    return ReferenceSolution(w, nu, res, it, res <= jnp.maximum(10 * tol, 4 * floor(nu, v, w)))


def min_l1(X, y):
    """min ‖w‖₁ s.t. Xw = y (LP with w = p − q, p, q ≥ 0; SciPy's HiGHS). Returns
    `(w, nu)` with ν the equality multipliers (sign chosen so that Xᵀν ∈ ∂‖w‖₁)."""
    from scipy.optimize import linprog

    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    N, d = X.shape
    res = linprog(np.ones(2 * d), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None), method="highs",
                  options=dict(primal_feasibility_tolerance=1e-10, dual_feasibility_tolerance=1e-10))
    if res.status != 0:
        raise RuntimeError(f"l1 linear program failed: {res.message}")
    w = res.x[:d] - res.x[d:]
    nu = np.asarray(res.eqlin.marginals)
    return w, nu


def min_l2(X, y, w0=None):
    """argmin ‖w − w0‖₂ s.t. Xw = y: `w0 + Xᵀ(XXᵀ)⁻¹(y − Xw0)`."""
    X = np.asarray(X, dtype=float)
    w0 = np.zeros(X.shape[1]) if w0 is None else np.asarray(w0, dtype=float)
    return w0 + X.T @ np.linalg.solve(X @ X.T, np.asarray(y) - X @ w0)
