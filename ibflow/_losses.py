"""Pluggable training losses.

Regression uses the square loss with the 1/(2N) normalisation of Azulay et al.
(2021, §2): `L(θ) = (1/(2N)) Σ_n (f(x_n; θ) − y_n)²`. The normalisation only
rescales time; no implicit-bias potential depends on it (math.md §0).
"""

import abc

import equinox as eqx
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
