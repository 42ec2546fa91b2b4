"""Structure checks from the theory: predictor-space metrics and the Hessian-map condition.

If the predictor moves as `w̃̇ = H(w̃)⁻¹ Xᵀ r`, an implicit-bias potential Q with
`∇²Q = H` exists only if H is a *Hessian map* (Azulay et al. 2021, eq. 7):
`∂H_ij/∂w_k = ∂H_ik/∂w_j` for all i, j, k. Time warping (Azulay §5) multiplies H by
a scalar g(w) > 0 and can turn a non-Hessian map into one (math.md §5.2).
"""

import jax
import jax.numpy as jnp

from ._networks import AbstractNetwork, DiagonalNet, FullyConnectedNet


def tangent_metric_inverse(net: AbstractNetwork):
    """`J J^T` with `J = ∂w̃/∂θ` at the network's parameters: the predictor moves as
    `w̃̇ = (J Jᵀ) Xᵀ r`, so this is `H(w̃)⁻¹` evaluated at the current θ."""
    import equinox as eqx
    from jax.flatten_util import ravel_pytree

    params, frozen = eqx.partition(net, net.trainable())
    flat, unravel = ravel_pytree(params)
    J = jax.jacfwd(lambda v: eqx.combine(unravel(v), frozen).predictor())(flat)
    return J @ J.T


def predictor_metric(net: AbstractNetwork, *, warped: bool = False):
    """The predictor-space metric `H(w)` for the flow started at `net`, as a function of w.

    - Two-layer diagonal (any init): `H = diag(1/(2√(w² + κ²)))` (math.md §2.2–§2.3).
    - Fully connected neuron (m = 1, δ ≥ 0): `H = (a²I + wwᵀ/a²)⁻¹`,
      `a² = δ/2 + √(δ²/4 + ‖w‖²)` (math.md §2.5). With `warped=True`, `g·H` with
      `g(w) = a² q̂'(‖w‖)/‖w‖`, a Hessian map (Azulay §5; math.md §2.5).
    """
    if isinstance(net, DiagonalNet) and net.depth == 2:
        up, vp = net.plus
        um, vm = net.minus
        Nn = up**2 + vp**2 + um**2 + vm**2
        w0 = up * vp - um * vm
        kappa2 = 0.25 * (Nn**2 - 4 * w0**2)
        return lambda w: jnp.diag(1.0 / (2 * jnp.sqrt(w**2 + kappa2)))
    if isinstance(net, FullyConnectedNet) and net.depth == 2 and net.width == 1:
        delta = net.a[0] ** 2 - jnp.sum(net.weights[0] ** 2)

        def H(w):
            n2 = jnp.sum(w**2)
            a2 = delta / 2 + jnp.sqrt(delta**2 / 4 + n2)
            M = jnp.linalg.inv(a2 * jnp.eye(w.shape[0]) + jnp.outer(w, w) / a2)
            if warped:
                n = jnp.sqrt(n2)
                qp = 1.5 * jnp.sqrt(jnp.sqrt(n2 + delta**2 / 4) - delta / 2)
                M = (a2 * qp / n) * M
            return M

        return H
    raise NotImplementedError(f"no predictor metric implemented for {type(net).__name__}")


def hessian_map_violation(H, w) -> jax.Array:
    """Relative violation of Azulay eq. 7 at w: `max_ijk |∂_k H_ij − ∂_j H_ik| / max_ijk |∂_k H_ij|`,
    with derivatives by forward-mode autodiff."""
    T = jax.jacfwd(H)(jnp.asarray(w, dtype=float))  # T[i, j, k] = ∂H_ij/∂w_k
    return jnp.max(jnp.abs(T - jnp.swapaxes(T, 1, 2))) / jnp.max(jnp.abs(T))
