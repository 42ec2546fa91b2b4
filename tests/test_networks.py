import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ibflow as ib
from helpers import CATALOGUE, problem, rel


def _direct_conv_outputs(kernels, X):
    """f(x) = (x ⋆ w_1 ⋆ ⋯ ⋆ w_{L−1})ᵀ w_L with [x ⋆ w]_i = Σ_j x_{(i+j) mod d} w_j."""
    K = np.asarray(kernels)
    out = []
    for x in np.asarray(X):
        z = x
        for w in K[:-1]:
            d = len(z)
            z = np.array([sum(z[(i + j) % d] * w[j] for j in range(d)) for i in range(d)])
        out.append(z @ K[-1])
    return np.array(out)


@pytest.mark.parametrize("L", [2, 3])
def test_conv_dft_identity(L, getkey):
    # math.md T3.1: the FFT predictor reproduces the direct circular correlations.
    X, _ = problem(N=4, d=8)
    net = ib.ConvNet(jax.random.normal(getkey(), (L, 8)))
    np.testing.assert_allclose(net.outputs(X), _direct_conv_outputs(net.kernels, X), rtol=1e-12, atol=1e-12)


def _nets(getkey):
    d = 5
    return [
        ib.DiagonalNet(jax.random.normal(getkey(), (2, d)), jax.random.normal(getkey(), (2, d))),
        ib.DiagonalNet(jax.random.uniform(getkey(), (3, d), minval=0.3), jax.random.uniform(getkey(), (3, d), minval=0.3)),
        ib.FullyConnectedNet((jax.random.normal(getkey(), (d, 3)),), jax.random.normal(getkey(), (3,))),
        ib.FullyConnectedNet((jax.random.normal(getkey(), (d, 2)), jax.random.normal(getkey(), (2, 2))),
                             jax.random.normal(getkey(), (2,))),
        ib.ConvNet(jax.random.normal(getkey(), (2, d))),
        ib.ConvNet(jax.random.normal(getkey(), (3, d))),
    ]


def test_tensor_net_equivalence_outputs(getkey):
    X, _ = problem(N=4, d=5)
    for net in _nets(getkey):
        tnet = ib.as_tensor_net(net)
        np.testing.assert_allclose(tnet.predictor(), net.predictor(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(tnet.outputs(X), net.outputs(X), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("index", [0, 3] + [pytest.param(i, marks=pytest.mark.slow) for i in (1, 2, 4, 5)])
def test_tensor_net_equivalence_trajectories(index, getkey):
    """The same flow in two parameterisations: identical predictor trajectories."""
    X, y = problem(seed=index, N=3, d=5)
    net = _nets(getkey)[index]
    net = jax.tree_util.tree_map(lambda a: 0.5 * a, net)
    ts = jnp.array([0.05, 0.3, 1.0, 3.0])
    kw = dict(save_ts=ts, t_max=3.0, throw=False, rtol=1e-11, atol=1e-13)
    s1 = ib.gradient_flow(net, X, y, **kw)
    s2 = ib.gradient_flow(ib.as_tensor_net(net), X, y, **kw)
    assert s1.status == s2.status
    np.testing.assert_allclose(s1.trajectory_predictor, s2.trajectory_predictor, rtol=1e-8, atol=1e-10)
    # the tensor's data is frozen: only the parameter vectors move
    assert np.array_equal(ib.as_tensor_net(net).tensor, s2.network.tensor)


def test_structure_errors():
    with pytest.raises(ValueError, match="shape"):
        ib.DiagonalNet(jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="depth"):
        ib.DiagonalNet(jnp.ones((1, 3)), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="rows"):
        ib.FullyConnectedNet((jnp.ones((3, 2)), jnp.ones((3, 2))), jnp.ones(2))
    with pytest.raises(ValueError, match="a"):
        ib.FullyConnectedNet((jnp.ones((3, 2)),), jnp.ones(3))
    with pytest.raises(ValueError, match="slope"):
        ib.LeakyReLUNeuron(jnp.ones(3), jnp.asarray(1.0), slope=1.5)
    with pytest.raises(ValueError, match="tensor shape"):
        ib.TensorNet(jnp.ones((3, 2, 2)), (jnp.ones(2), jnp.ones(3)))
    with pytest.raises(ValueError, match="d = 4"):
        ib.gradient_flow(ib.linear_init(1.0, 3, direction=jnp.ones(3)), np.ones((2, 4)), np.ones(2))


def test_leaky_relu_outputs():
    net = ib.LeakyReLUNeuron(jnp.array([1.0, -2.0]), jnp.asarray(-1.5), slope=0.1)
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(net.outputs(X), [-1.5 * 1.0, -1.5 * 0.1 * -2.0])
    assert rel(net.predictor(), [-1.5, 3.0]) == 0


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_predictor_rounding_scale_bounds_the_terms(name):
    """`predictor_rounding_scale` is the size of the terms whose signed sum is w̃: at least |w̃|
    (triangle inequality), and for two-branch nets at least |branch₊| + |branch₋|."""
    net = CATALOGUE[name]()
    m = np.asarray(net.predictor_rounding_scale())
    assert m.shape == (net.dim,) and np.all(np.isfinite(m))
    assert np.all(m >= np.abs(np.asarray(net.predictor())) * (1 - 1e-14))
    if isinstance(net, ib.DiagonalNet):
        terms = np.abs(np.prod(np.asarray(net.plus), 0)) + np.abs(np.prod(np.asarray(net.minus), 0))
        assert np.all(m >= terms * (1 - 1e-14))
    if isinstance(net, ib.TiedDiagonalNet):
        np.testing.assert_allclose(m, np.abs(net.plus) ** net.depth + np.abs(net.minus) ** net.depth)
