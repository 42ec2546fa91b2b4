"""Moroshko et al. (NeurIPS 2020): initialisation scale vs training accuracy.

For two-layer diagonal networks on separable data with the exponential loss, the
normalised predictor `β̃ = β/γ` (γ the minimum margin) solves, along the flow, the
stationarity conditions of `min Q_μ(β̃) s.t. Zβ̃ ≥ 1` with Woodworth's potential at the
effective scale `μ = α/γ` (math.md §4.5; α here is the product of the layer scales,
Moroshko's `α^D`). Large μ: kernel regime (ℓ2 max margin); μ → 0 *together with*
complementary slackness: rich regime (ℓ1 max margin). Since γ ≈ log(1/L), the
transition is governed jointly by α and by how far the loss has been driven, and the
rich limit can need losses far below 1e-100.

`scale_vs_accuracy` runs one vmapped `margin_flow` over an α grid and records, at each
loss level, γ, μ, and the alignment `1 − cos` of β with the ℓ1 and ℓ2 max-margin
predictors.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ._classify import margin_flow
from ._init import diagonal_init
from ._losses import ExponentialLoss
from ._margin import check_separable, margin_geometry, max_margin
from ._networks import Linear


def sparse_classification(num_samples: int = 20, dim: int = 40, sparsity: int = 3, seed: int = 0):
    """Gaussian inputs labelled by a sparse separator: `y = sign(⟨β*, x⟩)`, β* r*-sparse
    with entries 1/√r* (the classification analogue of Azulay's §9 problem)."""
    rng = np.random.default_rng(seed)
    w_star = np.zeros(dim)
    w_star[:sparsity] = 1.0 / np.sqrt(sparsity)
    X = rng.standard_normal((num_samples, dim))
    return dict(X=X, y=np.sign(X @ w_star), w_star=w_star)


def scale_vs_accuracy(X, y, alphas, *, log10_levels=(-2, -5, -10, -20, -50, -100, -200, -500, -1000),
                      depth: int = 2, max_steps: int = 4096):
    """The kernel → rich transition of diagonal networks as a function of α and of the
    loss level reached (module docstring). Returns an `xarray.Dataset` with dims
    `(alpha, level)`: `log10_loss`, `margin` γ, `mu` = α/γ, `l1_gap` and `l2_gap`
    (1 − cos with the ℓ1 / ℓ2 max-margin predictors), `l1_ratio` (‖β̃‖₁ / ‖β_ℓ1‖₁),
    and per-α `status`."""
    import xarray as xr

    from ._results import status_words

    X = np.asarray(X, float)
    y = np.asarray(y, float)
    check_separable(X, y)
    d = X.shape[1]
    levels = sorted((float(v) for v in log10_levels), reverse=True)
    nets = jax.vmap(lambda a: diagonal_init(a, 0.0, d, depth=depth))(jnp.asarray(alphas, float))
    ln10 = float(np.log(10.0))

    def run(net):
        return margin_flow(net, X, y, loss=ExponentialLoss(), log_until_loss=levels[-1] * ln10,
                           log_record_losses=[v * ln10 for v in levels[:-1]], max_steps=max_steps, throw=False)

    sol = jax.jit(jax.vmap(run))(nets)
    template = diagonal_init(1.0, 0.0, d)
    b1, _, _ = max_margin(margin_geometry(template), X, y)
    b2, _, _ = max_margin(margin_geometry(Linear(jnp.zeros(d))), X, y)
    dirs = np.asarray(sol.record.direction)  # (alpha, level, d)
    unit = lambda v: v / np.linalg.norm(v)
    Z = y[:, None] * X
    margins = np.einsum("nd,ald->aln", Z, dirs).min(-1)
    l1_ratio = np.abs(dirs).sum(-1) / margins / np.abs(b1).sum()
    gamma = np.asarray(sol.record.margin)
    return xr.Dataset(
        dict(
            log10_loss=(("alpha", "level"), np.asarray(sol.record.log_loss) / ln10),
            margin=(("alpha", "level"), gamma),
            mu=(("alpha", "level"), np.asarray(alphas)[:, None] / gamma),
            l1_gap=(("alpha", "level"), 1 - dirs @ unit(b1)),
            l2_gap=(("alpha", "level"), 1 - dirs @ unit(b2)),
            l1_ratio=(("alpha", "level"), l1_ratio),
            status=(("alpha",), status_words(sol.result)),
        ),
        coords=dict(alpha=np.asarray(alphas, float), level=np.asarray(levels)),
        attrs=dict(source="Moroshko et al. 2020 (math.md §4.5)", depth=depth, loss="exp (mean)"),
    )
