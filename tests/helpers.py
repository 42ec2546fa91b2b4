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
