"""Data sets: the sparse-regression problem of Azulay et al. (2021, §9) and npz I/O."""

import numpy as np


def sparse_regression(num_samples: int = 100, dim: int = 1000, sparsity: int = 5,
                      noise_var: float = 0.01, num_test: int = 0, seed: int = 0):
    """The §9 problem of Azulay et al. 2021 (after Woodworth et al. 2020).

    `x ~ N(0, I_d)`, `y ~ N(⟨β*, x⟩, σ²)` with `β*` r*-sparse, non-zero entries
    `1/√r*` (on the first r* coordinates). Defaults: N = 100, d = 1000, r* = 5,
    σ² = 0.01. Returns a dict with `X`, `y`, `w_star` and, if `num_test > 0`,
    noiseless-label test data `X_test`, `y_test`.
    """
    rng = np.random.default_rng(seed)
    w_star = np.zeros(dim)
    w_star[:sparsity] = 1.0 / np.sqrt(sparsity)
    X = rng.standard_normal((num_samples, dim))
    y = X @ w_star + np.sqrt(noise_var) * rng.standard_normal(num_samples)
    out = dict(X=X, y=y, w_star=w_star)
    if num_test:
        Xt = rng.standard_normal((num_test, dim))
        out.update(X_test=Xt, y_test=Xt @ w_star)
    return out


def population_error(w, w_star):
    """Population square error `E_x (xᵀw − xᵀw*)² = ‖w − w*‖²` for `x ~ N(0, I)`
    (noise excluded), the quantity plotted in Azulay et al. Fig. 7.1."""
    w = np.asarray(w)
    return np.sum((w - np.asarray(w_star)) ** 2, axis=-1)
