"""Pluggable training losses.

Regression uses the square loss with the 1/(2N) normalisation of Azulay et al.
(2021, §2): `L(θ) = (1/(2N)) Σ_n (f(x_n; θ) − y_n)²`. The normalisation only
rescales time; no implicit-bias potential depends on it (math.md §0).
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class AbstractLoss(eqx.Module):
    """A loss `L(F, y)` of the network outputs `F ∈ R^N`, with its Gauss–Newton
    curvature `∂²L/∂F_n²` (used by the stiff solver's Woodbury linear solves)."""

    name: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def __call__(self, outputs: Float[Array, " N"], y: Float[Array, " N"]) -> Float[Array, ""]:
        """Loss value."""

    @abc.abstractmethod
    def curvature(self, outputs: Float[Array, " N"], y: Float[Array, " N"]) -> Float[Array, " N"]:
        """Diagonal of the Hessian of the loss with respect to the outputs."""

    @abc.abstractmethod
    def floor(self, y: Float[Array, " N"]) -> Float[Array, ""]:
        """The smallest loss level that float64 round-off lets a flow certify."""


class SquareLoss(AbstractLoss):
    """`(1/(2N)) Σ_n (F_n − y_n)²` (Azulay et al. 2021, §2)."""

    name = "square"

    def __call__(self, outputs, y):
        return 0.5 * jnp.mean((outputs - y) ** 2)

    def curvature(self, outputs, y):
        return jnp.full_like(outputs, 1.0 / outputs.shape[0])

    def floor(self, y):
        # Residuals below ~64 ulps of the labels are round-off, not progress.
        eps = jnp.finfo(y.dtype).eps
        return 0.5 * (64 * eps) ** 2 * jnp.maximum(jnp.mean(y**2), jnp.finfo(y.dtype).tiny)


# ---------------------------------------------------------------------------------------
# Exponentially tailed classification losses, in the log domain (math.md §4)
# ---------------------------------------------------------------------------------------


def _log_softplus(u):
    """`log(log(1 + eᵘ))`, stable for every u (and with a stable gradient).

    For u < −30, `log(1 + eᵘ) = eᵘ(1 − eᵘ/2 + …)`, so the value is `u − eᵘ/2` to
    float64 precision; the two branches see clipped inputs so neither overflows."""
    lo = jnp.minimum(u, -30.0)
    hi = jnp.maximum(u, -30.0)
    return jnp.where(u < -30.0, lo - 0.5 * jnp.exp(lo), jnp.log(jnp.logaddexp(0.0, hi)))


class AbstractMarginLoss(AbstractLoss):
    """A margin loss `L = (1/N) Σ_n ℓ(z_n)`, `z_n = y_n f(x_n; θ)`, with an exponential
    tail, computed in the log domain: `log_value` stays finite (and its gradient
    non-zero) at loss levels far below the float64 range (1e-300 and beyond).

    Labels are ±1. `weights` are the softmax-like multipliers `p_n = −∂ log L/∂z_n ≥ 0`
    (Σ p_n ≤ 1), which concentrate on the support vectors as L → 0.
    """

    @abc.abstractmethod
    def log_terms(self, z: Float[Array, " N"]) -> Float[Array, " N"]:
        """`log ℓ(z_n)` for each margin."""

    def log_value(self, outputs, y) -> Float[Array, ""]:
        """`log L`, stable at any loss level."""
        logs = self.log_terms(y * outputs)
        return jax.nn.logsumexp(logs) - jnp.log(outputs.shape[0])

    def weights(self, outputs, y) -> Float[Array, " N"]:
        """`p_n = −∂ log L/∂z_n`."""
        return -jax.grad(lambda z: jax.nn.logsumexp(self.log_terms(z)))(y * outputs)

    def __call__(self, outputs, y):
        return jnp.exp(self.log_value(outputs, y))

    def curvature(self, outputs, y):
        hess = jax.vmap(jax.grad(jax.grad(lambda z: jnp.exp(self.log_terms(z[None])[0]))))
        return hess(y * outputs) / outputs.shape[0]

    def floor(self, y):
        return jnp.zeros((), y.dtype)


class ExponentialLoss(AbstractMarginLoss):
    """`L = (1/N) Σ_n exp(−y_n f(x_n))` (Soudry et al. 2018; Moroshko et al. 2020 use the
    sum, which shifts log L by log N and changes nothing else)."""

    name = "exp"

    def log_terms(self, z):
        return -z


class LogisticLoss(AbstractMarginLoss):
    """`L = (1/N) Σ_n log(1 + exp(−y_n f(x_n)))` (Soudry et al. 2018; Lyu & Li 2020)."""

    name = "logistic"

    def log_terms(self, z):
        return _log_softplus(-z)


def loss_by_name(name: str) -> AbstractLoss:
    """`"square"`, `"exp"` or `"logistic"`."""
    losses = {"square": SquareLoss, "exp": ExponentialLoss, "logistic": LogisticLoss}
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(losses)}")
    return losses[name]()
