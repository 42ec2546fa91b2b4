"""Discrete optimisers against the flow: GD/SGD/momentum/Adam with optax, sharpness by
Lanczos, edge-of-stability flags and the step-size bias of the limit.

Gradient flow is the η → 0 idealisation of gradient descent. With a finite step η the
limit moves by O(η) (a genuine step-size implicit bias; Nacson et al. 2022 for diagonal
nets; math.md §7), and GD can only converge to minima whose sharpness
`λ_max(∇²L) ≤ 2/η` (linear stability of the GD map; Vardi 2023 "Dynamical stability";
with heavy-ball momentum β the bound is `(2 + 2β)/η`). When the sharpness rises above
2/η the loss stops decreasing monotonically: the edge of stability (Cohen et al. 2021).

`train` runs any of these optimisers jit-compiled (`lax.while_loop` over chunks of
`lax.fori_loop` steps), stops on the same rule as the flow (`L ≤ max(loss_rtol·L(θ₀),
floor)`), and measures the sharpness every `sharpness_every` steps by Lanczos iteration
on Hessian-vector products (no dense Hessian). Loss and time conventions are those of
`gradient_flow` (square loss 1/(2N)); the discrete time after k steps is `t = kη`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array

from ._checks import checks_enabled, value_check
from ._flow import check_data, invariant_drift
from ._losses import AbstractLoss, SquareLoss
from ._networks import AbstractNetwork
from ._results import RESULTS, status_word

OPTIMIZERS = ("gd", "sgd", "momentum", "adam")


#: Relative Ritz residual at which `sharpness` stops its Lanczos iteration (see `lanczos_top_eigenvalue`).
SHARPNESS_RTOL = 1e-10
#: Most Lanczos iterations `sharpness` takes (capped at the number of parameters, where Lanczos is exact).
SHARPNESS_MAX_ITERS = 300


def lanczos_top_eigenvalue(hvp, dim: int, key, num_iters: int = 30, rtol: float = 0.0):
    """Largest eigenvalue of the symmetric operator `hvp` (R^dim → R^dim) by Lanczos iteration
    with full reorthogonalisation. Returns `(λ_max, λ_min of the Krylov space)`.

    `rtol = 0`: exactly `min(num_iters, dim)` iterations (exact once `num_iters ≥ dim`, up to
    round-off; fewer can be far off when the top of the spectrum is clustered: 1e-5–1e-4
    relative after 30 iterations on diagonal nets with P = 400–800 parameters, twenty-fourth
    session). `rtol > 0` (static): after each iteration the top Ritz pair `(θ, V s)` of the
    k×k Lanczos matrix T_k gets its residual `‖H V s − θ V s‖ = β_k |s_k|` (Parlett, *The
    Symmetric Eigenvalue Problem*, §13.2; `s` from the three-term recurrence of T_k run from
    its last row, `_ritz_last_component`), and the iteration stops once it is
    `≤ rtol·|θ|` (rtol raised to 100 ε of the working precision if below it): an eigenvalue of
    H then lies within `rtol·|θ|` of θ (Weyl/Bauer–Fike for symmetric operators), and within
    `(rtol·θ)²/gap` in practice. It also stops at an
    invariant subspace (β_k = 0) or after `min(num_iters, dim)` iterations, whichever is
    first. jit/vmap-safe (a vmapped call iterates until its last member stops)."""
    return _lanczos(hvp, dim, key, num_iters, rtol)[:2]


def _lanczos(hvp, dim: int, key, num_iters: int = 30, rtol: float = 0.0):
    """`lanczos_top_eigenvalue` and the top Ritz pair's residual `‖H u − λ_max u‖` (u the Ritz
    vector; an eigenvalue of H lies within it): `(λ_max, λ_min, residual)`."""
    k = min(num_iters, dim)
    v0 = jax.random.normal(key, (dim,))
    v0 = v0 / jnp.linalg.norm(v0)
    V = jnp.zeros((k + 1, dim), v0.dtype).at[0].set(v0)
    alphas = jnp.zeros(k, v0.dtype)
    betas = jnp.zeros(k, v0.dtype)

    def lanczos_step(i, V, alphas, betas):
        v = V[i]
        w = hvp(v)
        a = jnp.dot(w, v)
        # Full reorthogonalisation against every previous vector, twice (Kahan's "twice is enough").
        for _ in range(2):
            w = w - V.T @ (V @ w)
        b = jnp.linalg.norm(w)
        ok = b > 1e-12 * jnp.maximum(jnp.abs(a), 1.0)
        V = V.at[i + 1].set(jnp.where(ok, w / jnp.where(ok, b, 1.0), 0.0))
        return V, alphas.at[i].set(a), betas.at[i].set(jnp.where(ok, b, 0.0)), ok

    if rtol == 0:
        def body(i, carry):
            return lanczos_step(i, *carry)[:3]

        V, alphas, betas = jax.lax.fori_loop(0, k, body, (V, alphas, betas))
        # After an invariant subspace (β = 0) the rest of T is zeros: use the block before it.
        size = jnp.where(jnp.any(betas == 0), jnp.argmax(betas == 0) + 1, k)
    else:
        # Below ~100 ε of |θ| the residual is round-off (float32: 1.2e-5): stop there at the latest.
        rtol = max(rtol, 100 * float(jnp.finfo(v0.dtype).eps))

        def cond(carry):
            i, _, _, _, done = carry
            return (i < k) & ~done

        def adaptive_body(carry):
            i, V, alphas, betas, _ = carry
            V, alphas, betas, ok = lanczos_step(i, V, alphas, betas)
            theta, _ = tridiagonal_extreme_eigenvalues(alphas, betas[:-1], size=i + 1)
            residual = betas[i] * _ritz_last_component(alphas, betas[:-1], theta, i + 1)
            return i + 1, V, alphas, betas, ~ok | (residual <= rtol * jnp.abs(theta))

        size, V, alphas, betas, _ = jax.lax.while_loop(cond, adaptive_body,
                                                       (0, V, alphas, betas, jnp.zeros((), bool)))
    top, bottom = tridiagonal_extreme_eigenvalues(alphas, betas[:-1], size=size)
    residual = betas[size - 1] * _ritz_last_component(alphas, betas[:-1], top, size)
    return top, bottom, residual


def _ritz_last_component(diag, offdiag, theta, size):
    """`|s_{k−1}| / ‖s‖` for the eigenvector s of the leading `size` × `size` block T_k of the
    symmetric tridiagonal (`diag`, `offdiag`) at its eigenvalue `theta`.

    s is built from its last component by the rows of `(T_k − θ)s = 0` read upwards,
    `s_{j−1} = ((θ − a_j) s_j − b_j s_{j+1}) / b_{j−1}` from `s_{k−1} = 1`, `s_k = 0`, rescaled
    at every row (no overflow). Once a Ritz pair has converged its s decays along the Krylov
    basis, so this recurrence runs in its growing, stable direction and gives the small
    `|s_{k−1}|` to relative accuracy; before, the result is O(1) and only says "not yet".
    The off-diagonal entries inside the block must be nonzero (Lanczos stops at a zero)."""
    m = diag.shape[0]
    b = jnp.concatenate([offdiag, jnp.zeros(1, diag.dtype)])  # b[j] couples rows j and j + 1
    tiny = jnp.finfo(diag.dtype).tiny

    def body(carry, j):
        s_j, s_next, sumsq, last = carry
        s_prev = ((theta - diag[j]) * s_j - b[j] * s_next) / b[j - 1]
        scale = jnp.maximum(jnp.maximum(jnp.abs(s_prev), jnp.abs(s_j)), tiny)
        s_prev, s_j = s_prev / scale, s_j / scale
        new = (s_prev, s_j, sumsq / scale**2 + s_prev**2, last / scale)
        active = j < size
        return jax.tree_util.tree_map(lambda n, o: jnp.where(active, n, o), new, carry), None

    one, zero = jnp.ones((), diag.dtype), jnp.zeros((), diag.dtype)
    (_, _, sumsq, last), _ = jax.lax.scan(body, (one, zero, one, one), jnp.arange(m - 1, 0, -1))
    return jnp.abs(last) / jnp.sqrt(sumsq)


def tridiagonal_extreme_eigenvalues(diag, offdiag, iters: int = 110, size=None):
    """Largest and smallest eigenvalues of the symmetric tridiagonal matrix
    (`diag`, `offdiag`) by Sturm-sequence bisection (Wilkinson; Golub & Van Loan §8.4.1),
    to full float64 precision. Pure array operations: no LAPACK call inside the training
    loop (batched LAPACK calls inside vmapped loops have hung XLA's CPU backend).
    `size` (may be traced): use only the leading `size` × `size` block (default: all)."""
    n = diag.shape[0]
    index = jnp.arange(n)
    if size is None:
        size = n
    else:
        offdiag = jnp.where(index[:-1] < size - 1, offdiag, 0.0)
    b2 = jnp.concatenate([jnp.zeros(1, diag.dtype), offdiag**2])
    tiny = jnp.finfo(diag.dtype).tiny

    def count_below(x):
        def body(carry, abj):
            d_prev, cnt = carry
            a, bb, j = abj
            d = a - x - bb / d_prev
            d = jnp.where(d == 0, -tiny, d)
            return (d, cnt + ((d < 0) & (j < size))), None

        init = (jnp.ones((), diag.dtype), jnp.zeros((), jnp.int32))
        (_, cnt), _ = jax.lax.scan(body, init, (diag, b2, index))
        return cnt

    r = jnp.abs(jnp.concatenate([offdiag, jnp.zeros(1, diag.dtype)])) + jnp.abs(
        jnp.concatenate([jnp.zeros(1, diag.dtype), offdiag]))
    inside = index < size
    lo0, hi0 = jnp.min(jnp.where(inside, diag - r, jnp.inf)), jnp.max(jnp.where(inside, diag + r, -jnp.inf))

    def bisect(pred):
        def body(_, lh):
            lo, hi = lh
            mid = 0.5 * (lo + hi)
            go_left = pred(count_below(mid))
            return jnp.where(go_left, lo, mid), jnp.where(go_left, mid, hi)

        lo, hi = jax.lax.fori_loop(0, iters, body, (lo0, hi0))
        return 0.5 * (lo + hi)

    top = bisect(lambda c: c >= size)  # smallest x with every eigenvalue below it
    bottom = bisect(lambda c: c >= 1)  # smallest x with one eigenvalue below it
    return top, bottom


@eqx.filter_jit
def sharpness(net: AbstractNetwork, X, y, *, loss: AbstractLoss = SquareLoss(), key=None,
              num_iters: int = SHARPNESS_MAX_ITERS, rtol: float = SHARPNESS_RTOL,
              with_residual: bool = False):
    """`λ_max(∇²_θ L)` at `net` by Lanczos on Hessian-vector products (no dense Hessian).

    Iterates until the top Ritz pair's residual is `≤ rtol·λ` (an eigenvalue of the Hessian
    lies within that distance; see `lanczos_top_eigenvalue`), or for `num_iters` iterations
    (at most the number of parameters P, where Lanczos is exact); `rtol = 0`: exactly
    `min(num_iters, P)`. Checked against dense Hessians (`jax.hessian` + `eigvalsh`) on
    diagonal, fully connected, convolutional and leaky-ReLU nets to ≤ 1e-8 relative, including
    clustered spectra where 30 fixed iterations were 1e-4 off (tests). Memory:
    `(num_iters + 1)·P` for the Krylov basis. Jitted: an eager call with new values of the same
    shapes reuses the compiled program (the Hessian-vector closure made here would otherwise be
    compiled again on every call). `with_residual=True`: `(λ, r)` with r the Ritz residual
    `‖Hu − λu‖` (an eigenvalue of the Hessian lies within r of λ; above `rtol·λ` only if
    `num_iters` ran out first)."""
    params, frozen = eqx.partition(net, net.trainable())
    flat, unravel = ravel_pytree(params)
    f = lambda v: loss(eqx.combine(unravel(v), frozen).outputs(X), y)
    hvp = lambda v: jax.jvp(jax.grad(f), (flat,), (v,))[1]
    key = jax.random.PRNGKey(0) if key is None else key
    top, _, residual = _lanczos(hvp, flat.size, key, num_iters, rtol)
    return (top, residual) if with_residual else top


def stability_bound(optimizer: str, step_size, momentum: float = 0.9):
    """The largest sharpness at which the optimiser's fixed points are linearly stable:
    `2/η` (GD, SGD), `(2 + 2β)/η` (heavy ball); ∞ for Adam (no such bound)."""
    if optimizer in ("gd", "sgd"):
        return 2.0 / step_size
    if optimizer == "momentum":
        return (2.0 + 2.0 * momentum) / step_size
    return jnp.inf * step_size


def make_optimizer(optimizer: str, step_size, momentum: float = 0.9) -> optax.GradientTransformation:
    """The optax transformation for a name; the step size is an injected hyperparameter
    (an array in the optimiser state), so it can be vmapped and changed without recompiling."""
    if optimizer in ("gd", "sgd"):
        return optax.inject_hyperparams(optax.sgd)(learning_rate=step_size)
    if optimizer == "momentum":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=step_size, momentum=momentum)
    if optimizer == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=step_size)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")


class TrainSolution(eqx.Module):
    """Result of `train`.

    - `network`, `predictor`, `loss`, `loss0`, `loss_target`: as for `FlowSolution`.
    - `steps`: optimiser steps taken (`t = steps·η` in flow time for GD).
    - `max_sharpness`: largest λ_max(∇²L) measured (every `sharpness_every` steps and at
      the end); `final_sharpness` at the end; `stability_bound`: 2/η (GD/SGD),
      (2+2β)/η (momentum), ∞ (Adam).
    - `edge_of_stability`: the sharpness exceeded the bound at some point.
    - `loss_increases`: number of steps at which the (full-batch) loss went up.
    - `history_steps`, `history_loss`, `history_sharpness`: one entry per sharpness
      measurement (the first `history` of them; unused slots are NaN / −1).
    - `invariant_drift`: as for `FlowSolution` (GD drifts by O(η²) per step).
    - `result`: `RESULTS` (`successful`: converged to a linearly stable minimum;
      `unstable`: diverged, or ended above the stability bound, or the reference
      minimum it was asked to reach is unstable at this η; `max_steps_reached`).
    """

    network: AbstractNetwork
    predictor: Array
    loss: Array
    loss0: Array
    loss_target: Array
    steps: Array
    max_sharpness: Array
    final_sharpness: Array
    stability_bound: Array
    edge_of_stability: Array
    loss_increases: Array
    history_steps: Array
    history_loss: Array
    history_sharpness: Array
    invariant_drift: Array
    result: RESULTS

    @property
    def status(self) -> str:
        return status_word(self.result)


def train(
    net: AbstractNetwork,
    X,
    y,
    *,
    optimizer: str = "gd",
    step_size: float,
    loss: AbstractLoss = SquareLoss(),
    momentum: float = 0.9,
    batch_size: int | None = None,
    key=None,
    label_noise: float = 0.0,
    loss_rtol: float = 1e-24,
    max_steps: int = 2_000_000,
    sharpness_every: int = 100,
    lanczos_iters: int = 30,
    history: int = 512,
    reference_sharpness=None,
    divergence_factor: float = 1e8,
    throw: bool = True,
) -> TrainSolution:
    """Train `net` on (X, y) with a discrete optimiser until the flow's stopping rule fires.

    **Arguments:**

    - `optimizer`: `"gd"` (full batch), `"sgd"` (mini-batches of `batch_size` drawn
      without replacement with `key`), `"momentum"` (heavy ball, `momentum` β; mini-batch
      if `batch_size`), `"adam"`. `step_size` η (an array is fine: vmappable).
    - `label_noise`: std of Gaussian noise added to the batch labels at every step (SGD
      with label noise); the loss then never reaches 0 and the run ends at `max_steps`.
    - `loss_rtol`: stop when `L ≤ max(loss_rtol·L(θ₀), loss.floor(y))` (the flow's rule).
    - `sharpness_every`: steps between Lanczos sharpness measurements (`lanczos_iters`
      iterations each: a monitor); `history`: how many measurements are kept. The final
      sharpness is computed as by `sharpness` (iterated to a 1e-10 relative Ritz residual, at
      most max(`lanczos_iters`, 300) iterations).
    - `reference_sharpness`: sharpness of the minimum the run is meant to reach (e.g. the
      gradient flow's limit); above the stability bound the result is `unstable`: GD
      cannot converge to it.
    - `divergence_factor`: `L > divergence_factor·L(θ₀)` counts as divergence (unstable).
    - `throw`: raise unless the run converged to a stable minimum.

    jit/vmap-safe over the network's arrays, `step_size` and `key`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if batch_size is not None and optimizer not in ("sgd", "momentum", "adam"):
        raise ValueError("batch_size applies to sgd, momentum and adam")
    if optimizer == "sgd" and batch_size is None:
        raise ValueError("optimizer 'sgd' needs batch_size")
    dtype = jnp.result_type(float)
    key = jax.random.PRNGKey(0) if key is None else key
    ref = jnp.asarray(jnp.nan if reference_sharpness is None else reference_sharpness, dtype)
    return _train(net, X, y, loss, optimizer, jnp.asarray(step_size, dtype), momentum, batch_size, key,
                  jnp.asarray(label_noise, dtype), jnp.asarray(loss_rtol, dtype), max_steps, sharpness_every,
                  lanczos_iters, history, ref, jnp.asarray(divergence_factor, dtype), throw, checks_enabled())


@eqx.filter_jit
def _train(net, X, y, loss, optimizer, step_size, momentum, batch_size, key, label_noise, loss_rtol, max_steps,
           sharpness_every, lanczos_iters, history, reference_sharpness, divergence_factor, throw, checks):
    net, X, y = check_data(net, X, y, checks)  # checks: static, see `_checks`
    N = X.shape[0]
    if batch_size is not None and not 1 <= batch_size <= N:
        raise ValueError(f"batch_size must lie in [1, N = {N}], got {batch_size}")
    step_size = value_check(step_size, ~(step_size > 0) | ~jnp.isfinite(step_size), "step_size must be finite and > 0",
                            checks)
    y = value_check(y, ~jnp.all(jnp.isfinite(y)), "y contains NaN or inf", checks)

    params, frozen = eqx.partition(net, net.trainable())
    flat0, unravel = ravel_pytree(params)
    P = flat0.size

    def loss_on(flat, Xb, yb):
        return loss(eqx.combine(unravel(flat), frozen).outputs(Xb), yb)

    full = lambda flat: loss_on(flat, X, y)
    loss0 = full(flat0)
    target = jnp.maximum(loss_rtol * loss0, loss.floor(y))
    opt = make_optimizer(optimizer, step_size, momentum)
    bound = stability_bound(optimizer, step_size, momentum)
    key, lkey = jax.random.split(key)

    def sharp(flat, iters=lanczos_iters, rtol=0.0):
        hvp = lambda v: jax.jvp(jax.grad(full), (flat,), (v,))[1]
        return lanczos_top_eigenvalue(hvp, P, lkey, iters, rtol)[0]

    def bad(L):
        return ~jnp.isfinite(L) | (L > divergence_factor * loss0)

    def step(_, carry):
        flat, opt_state, key, L, steps, incs, done = carry
        key, kb, kn = jax.random.split(key, 3)
        if batch_size is None:
            Xb, yb = X, y
        else:
            idx = jax.random.choice(kb, N, (batch_size,), replace=False)
            Xb, yb = X[idx], y[idx]
        yb = yb + label_noise * jax.random.normal(kn, yb.shape)
        g = jax.grad(loss_on)(flat, Xb, yb)
        upd, new_state = opt.update(g, opt_state, flat)
        new = optax.apply_updates(flat, upd)
        newL = full(new)
        keep = lambda a, b: jnp.where(done, a, b)
        incs = incs + (~done & (newL > L)).astype(incs.dtype)
        steps = steps + (~done).astype(steps.dtype)
        flat = keep(flat, new)
        opt_state = jax.tree_util.tree_map(keep, opt_state, new_state)
        L = keep(L, newL)
        done = done | (L <= target) | bad(L) | (steps >= max_steps)
        return flat, opt_state, key, L, steps, incs, done

    def chunk_cond(carry):
        inner, _, _ = carry
        return ~inner[-1]

    def chunk_body(carry):
        inner, hist, (count, smax) = carry
        inner = jax.lax.fori_loop(0, sharpness_every, step, inner)
        flat, L, steps = inner[0], inner[3], inner[4]
        s = sharp(flat)
        s = jnp.where(bad(L), jnp.nan, s)
        hs, hl, hsh = hist
        slot = jnp.minimum(count, history - 1)
        write = count < history
        hs = hs.at[slot].set(jnp.where(write, steps, hs[slot]))
        hl = hl.at[slot].set(jnp.where(write, L, hl[slot]))
        hsh = hsh.at[slot].set(jnp.where(write, s, hsh[slot]))
        return inner, (hs, hl, hsh), (count + 1, jnp.fmax(smax, s))

    zero = jnp.zeros((), jnp.int32)
    s0 = sharp(flat0)
    inner0 = (flat0, opt.init(flat0), key, loss0, zero, zero, loss0 <= target)
    hist0 = (jnp.full(history, -1, jnp.int32).at[0].set(0), jnp.full(history, jnp.nan).at[0].set(loss0),
             jnp.full(history, jnp.nan).at[0].set(s0))
    inner, hist, (_, smax) = jax.lax.while_loop(chunk_cond, chunk_body, (inner0, hist0, (jnp.ones((), jnp.int32), s0)))
    flat, _, _, L, steps, incs, _ = inner
    # The final sharpness decides stability at the limit: Lanczos to its residual test (`sharpness`).
    final_sharp = sharp(flat, max(lanczos_iters, SHARPNESS_MAX_ITERS), SHARPNESS_RTOL)
    final_sharp = jnp.where(bad(L), jnp.nan, final_sharp)
    smax = jnp.fmax(smax, final_sharp)
    converged = L <= target
    tol = 1 + 1e-8
    res = RESULTS.where(converged, RESULTS.successful, RESULTS.max_steps_reached)
    unstable = (
        bad(L)
        | (converged & (final_sharp > tol * bound))
        | (~converged & (smax > tol * bound))
        | (reference_sharpness > tol * bound)
    )
    res = RESULTS.where(unstable, RESULTS.unstable, res)
    final = eqx.combine(unravel(flat), frozen)
    drift = invariant_drift(net, final)
    out = TrainSolution(
        network=final,
        predictor=final.predictor(),
        loss=L,
        loss0=loss0,
        loss_target=target,
        steps=steps,
        max_sharpness=smax,
        final_sharpness=final_sharp,
        stability_bound=jnp.asarray(bound, X.dtype),
        edge_of_stability=smax > tol * bound,
        loss_increases=incs,
        history_steps=hist[0],
        history_loss=hist[1],
        history_sharpness=hist[2],
        invariant_drift=drift,
        result=res,
    )
    if throw:
        out = res.error_if(out, res != RESULTS.successful)
    return out
