"""Run-time value checks and the host-validated mode (`ibflow._checks`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ibflow as ib
from ibflow._checks import checks_enabled, host_validated
from ibflow._sweep import _chunk_solver, _solver_fn


@pytest.fixture(scope="module")
def small():
    D = ib.sparse_regression(num_samples=6, dim=10, seed=3)
    return jnp.asarray(D["X"]), jnp.asarray(D["y"])


def test_mode_is_scoped():
    assert checks_enabled()
    with host_validated():
        assert not checks_enabled()
    assert checks_enabled()


def test_init_checks_left_out_only_inside_host_validated():
    with pytest.raises(Exception, match="alpha must be > 0"):
        jax.jit(lambda a: ib.diagonal_init(a, 0.0, 3).plus)(-1.0).block_until_ready()
    with host_validated():
        f = jax.jit(lambda a: ib.diagonal_init(a, 0.0, 3).plus)
        out = f(-1.0)  # no check in this trace: the caller promised to validate on the host
    assert np.isnan(np.asarray(out)).any()


def test_check_free_trace_of_gradient_flow_is_not_reused(small):
    """`gradient_flow` traced inside `host_validated()` caches a program without checks; a later
    ordinary call with the same shapes must not reuse it (the mode is a static argument)."""
    X, y = small
    net = ib.diagonal_init(0.1, 0.0, X.shape[1])
    with host_validated():
        loss = jax.jit(lambda X: ib.gradient_flow(net, X, y, throw=False).loss)(X)
    assert float(loss) < 1e-20
    with pytest.raises(Exception, match="X contains NaN"):
        ib.gradient_flow(net, X.at[0, 0].set(jnp.nan), y, throw=False).loss.block_until_ready()


def test_check_free_trace_of_margin_flow_is_not_reused():
    """The same for `margin_flow`, traced under `jax.jit` inside `host_validated()` as the command
    line compiles it (`_cli._kept_flow`, after checking the labels on the host): the check-free
    jitted program reaches the eager call's limit and records, and an ordinary call with labels
    outside {-1, +1} still raises. (Under `jax.jit` the loss levels must be host arithmetic: a
    `float(jnp.log(level))` there was a tracer and raised.)"""
    rng = np.random.default_rng(1)
    X = jnp.asarray(rng.standard_normal((6, 4)))
    y = jnp.sign(X @ jnp.asarray(rng.standard_normal(4)))
    net = ib.fully_connected_init(0.5, 0.2, 4, key=jax.random.PRNGKey(0))
    kw = dict(until_loss=1e-30, record_losses=[1e-3, 1e-10], throw=False)
    with host_validated():
        free = jax.jit(lambda n: ib.margin_flow(n, X, y, **kw))(net)
    checked = ib.margin_flow(net, X, y, **kw)
    assert free.status == checked.status == "converged"
    np.testing.assert_allclose(np.asarray(free.predictor), np.asarray(checked.predictor), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(free.record.margin), np.asarray(checked.record.margin), rtol=1e-8)
    with pytest.raises(Exception, match="labels y must be"):
        ib.margin_flow(net, X, 2 * y, **kw).predictor.block_until_ready()


def test_sweep_checks_data_on_the_host(small):
    X, y = small
    with pytest.raises(ValueError, match="finite"):
        ib.sweep(np.where(np.eye(*X.shape, dtype=bool), np.nan, X), y, alphas=[0.1], shapes=[0.0], progress=False)


@pytest.mark.parametrize("kind", ["diagonal", "fc"])
def test_sweep_chunk_program_has_no_host_callback(small, kind):
    """The precondition of asynchronous chunk dispatch and of the persistent compilation cache."""
    X, y = small
    solve = _chunk_solver(_solver_fn(kind, X.shape[1], 2, 2, 0.2, {}))
    z = jnp.zeros(2)
    text = solve.lower(z + 0.1, z, jnp.zeros(2, int), z, X, y).as_text()
    assert "callback" not in text
    assert "custom_call" in text or "dot_general" in text  # a real program was lowered


def test_mixed_precision_inputs_are_promoted(small):
    """A float32 network with float64 data (or the reverse) runs in the working precision: the
    same limits as the same values given in float64 (to the solver's tolerance: the programs
    compile apart, and the float32-data one differed by 1e-12). `margin_flow` and `train` used
    to fail inside the solver on such inputs ("carry input and carry output must have equal
    types")."""
    X, y = small
    cast = lambda dtype: lambda tree: jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)
    f32, f64 = cast(jnp.float32), cast(jnp.float64)
    net = ib.fully_connected_init(0.5, 0.2, X.shape[1], width=2, key=jax.random.key(0))
    runs = [(lambda n, X, y: ib.gradient_flow(n, X, y), y),
            (lambda n, X, y: ib.margin_flow(n, X, y, until_loss=1e-20), jnp.sign(y)),
            (lambda n, X, y: ib.train(n, X, y, step_size=1e-2), y)]
    for run, target in runs:
        for args in ((f32(net), X, target), (net, f32(X), f32(target))):
            out, ref = run(*args), run(*f64(args))
            assert out.status == ref.status == "converged" and out.predictor.dtype == jnp.float64
            np.testing.assert_allclose(out.predictor, ref.predictor, rtol=1e-9, atol=1e-12)
