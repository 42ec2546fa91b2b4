import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ibflow as ib


def test_diagonal_scale_shape_definitions():
    rng = np.random.default_rng(0)
    alpha, s = rng.uniform(1e-4, 3, 20), rng.uniform(-0.95, 0.95, 20)
    net = ib.diagonal_init(alpha, s)
    u, v = np.asarray(net.plus)
    # Azulay §7.1: α = |u||v|, s = (|v|/|u| − 1)/(|v|/|u| + 1)
    np.testing.assert_allclose(u * v, alpha, rtol=1e-13)
    np.testing.assert_allclose((v / u - 1) / (v / u + 1), s, rtol=1e-12, atol=1e-14)
    # √k = 2(u² + v²) = 4α(1 + s²)/(1 − s²)   (math.md §2.4)
    np.testing.assert_allclose(2 * (u**2 + v**2), 4 * alpha * (1 + s**2) / (1 - s**2), rtol=1e-12)
    # unbiased by default
    assert np.all(net.predictor() == 0)


def test_biased_and_depth():
    net = ib.diagonal_init(0.3, 0.2, 4, minus_alpha=0.1, minus_shape=-0.5)
    assert np.all(np.asarray(net.predictor()) > 0)
    for L in (3, 4):
        net = ib.diagonal_init(0.2, 0.4, 5, depth=L)
        np.testing.assert_allclose(jnp.prod(net.plus, axis=0), 0.2, rtol=1e-13)
        a, b = net.plus[0, 0], net.plus[-1, 0]
        np.testing.assert_allclose((b / a - 1) / (b / a + 1), 0.4, rtol=1e-12)


def test_fc_neuron_scale_shape(getkey):
    for alpha, s in [(0.05, 0.0), (0.5, 0.3), (2.0, 0.5), (1.0, -0.4)]:
        net = ib.fully_connected_init(alpha, s, 7, key=getkey())
        w, a = net.weights[0][:, 0], net.a[0]
        np.testing.assert_allclose(abs(a) * np.linalg.norm(w), alpha, rtol=1e-13)
        r = abs(a) / np.linalg.norm(w)
        np.testing.assert_allclose((r - 1) / (r + 1), s, rtol=1e-12, atol=1e-14)
        # δ = a² − ‖w‖² = 4αs/(1 − s²)  (math.md §2.5)
        np.testing.assert_allclose(a**2 - w @ w, 4 * alpha * s / (1 - s**2), rtol=1e-12, atol=1e-14)


def test_vmappable_in_alpha_and_shape():
    nets = jax.vmap(lambda a, s: ib.diagonal_init(a, s, 3))(jnp.array([0.1, 1.0]), jnp.array([0.0, 0.5]))
    assert nets.plus.shape == (2, 2, 3)


@pytest.mark.parametrize("alpha, shape, msg", [(0.0, 0.0, "alpha must be > 0"), (-1.0, 0.0, "alpha must be > 0"),
                                               (1.0, 1.0, r"\|s\| < 1"), (1.0, -1.2, r"\|s\| < 1"),
                                               (float("nan"), 0.0, "finite")])
def test_bad_scale_shape_raise(alpha, shape, msg):
    with pytest.raises(Exception, match=msg):
        jax.block_until_ready(ib.diagonal_init(alpha, shape, 3).plus)
    with pytest.raises(Exception, match=msg):
        jax.block_until_ready(jax.jit(lambda a, s: ib.diagonal_init(a, s, 3).plus)(alpha, shape))
