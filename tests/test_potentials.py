import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ibflow as ib
from helpers import CATALOGUE, catalogue_params, count_compiles, problem, rel

RNG = np.random.default_rng(11)
W = jnp.asarray(RNG.standard_normal(12) * 0.7)


def _potentials():
    out = {name: ib.implicit_potential(CATALOGUE[name]()) for name in sorted(CATALOGUE)}
    net = CATALOGUE["fc-neuron"]()
    out["ntk-diag"] = ib.named_potential("ntk", CATALOGUE["diag-shape0.7"]())
    out["ntk-fc"] = ib.named_potential("ntk", net)
    out["l2"] = ib.L2()
    return out


POTS = _potentials()


@pytest.mark.parametrize("name", catalogue_params(sorted(POTS)))
def test_round_trip(name):
    pot = POTS[name]
    v = jnp.asarray(np.random.default_rng(1).standard_normal(12) * 0.1)
    w = pot.inverse_mirror(v)
    np.testing.assert_allclose(pot.mirror(w), v, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(pot.inverse_mirror(pot.mirror(w)), w, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", catalogue_params(sorted(POTS)))
def test_eager_maps_compile_once(name):
    """Called eagerly (outside any jit) a second time, on new values, the mirror maps compile
    nothing (they once traced fresh closures on every call: 2.2 s per DeepDiagonal call)."""
    pot = POTS[name]
    v = jnp.asarray(np.random.default_rng(2).standard_normal(12) * 0.1)
    pot.mirror(pot.inverse_mirror(v))  # compiles
    v2 = 0.5 * v  # (an eager multiply compiles too, the first time in a process)
    with count_compiles() as compiles:
        w = pot.inverse_mirror(v2)
        back = pot.mirror(w)
    assert compiles == [], f"{len(compiles)} compilations on the second call"
    np.testing.assert_allclose(back, v2, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", catalogue_params(sorted(POTS)))
def test_inverse_mirror_and_slope_matches_central_differences(name):
    """The value and diagonal derivative that dual Newton carries between iterates: φ⁻¹ itself
    and a central difference of it (h = 1e-5; DeepDiagonal's layer ODE errs by ~1e-13, so the
    difference quotient is good to ~1e-7 there). Non-separable potentials have no such diagonal."""
    pot = POTS[name]
    v = jnp.asarray(np.random.default_rng(3).standard_normal(12) * 0.1)
    if not pot.separable:
        with pytest.raises(TypeError, match="not separable"):
            pot.inverse_mirror_and_slope(v)
        return
    w, slope = pot.inverse_mirror_and_slope(v)
    np.testing.assert_allclose(w, pot.inverse_mirror(v), rtol=1e-12, atol=1e-14)
    h = 1e-5
    fd = (pot.inverse_mirror(v + h) - pot.inverse_mirror(v - h)) / (2 * h)
    np.testing.assert_allclose(slope, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in sorted(POTS) if not isinstance(POTS[n], (ib.DeepDiagonal, ib.TiedDiagonal))])
def test_gradient_of_value_is_mirror(name):
    pot = POTS[name]
    np.testing.assert_allclose(jax.grad(pot.value)(W), pot.mirror(W), rtol=1e-10, atol=1e-12)


def test_thm41_closed_form_matches_paper():
    """Azulay Thm 4.1: q_k(x) = (√k/4)[1 − √(1+4x²/k) + (2x/√k) arcsinh(2x/√k)], √k = 2(u² + v²)."""
    net = ib.diagonal_init(0.3, 0.4, 12)
    u, v = net.plus
    sk = 2 * (u**2 + v**2)
    x = W
    qk = sk / 4 * (1 - jnp.sqrt(1 + 4 * x**2 / sk**2) + 2 * x / sk * jnp.arcsinh(2 * x / sk))
    np.testing.assert_allclose(ib.implicit_potential(net).value(x), jnp.sum(qk), rtol=1e-12)


def test_deep_diagonal_matches_closed_forms():
    # L = 2: the ODE route equals Azulay App. B's closed form.
    net = CATALOGUE["diag-biased"]()
    v = jnp.asarray(np.random.default_rng(2).standard_normal(12) * 0.5)
    deep = ib.DeepDiagonal(net.plus, net.minus)
    np.testing.assert_allclose(deep.inverse_mirror(v), ib.implicit_potential(net).inverse_mirror(v), rtol=1e-11, atol=1e-13)
    # balanced L = 3 layers a·1: the untied branch at G equals the tied (Woodworth Thm 3) one at G/3.
    a, b = 0.6, 0.9
    deep = ib.DeepDiagonal(jnp.full((3, 12), a), jnp.full((3, 12), b))
    tied = ib.TiedDiagonal(jnp.full(12, a), jnp.full(12, b), 3)
    v = v * 0.3
    np.testing.assert_allclose(deep.inverse_mirror(v), tied.inverse_mirror(v / 3), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("a, b", [(0.2, 0.3), (0.05, 0.02)])
def test_deep_diagonal_mirror_near_the_blow_up(a, b):
    """`DeepDiagonal.mirror` inverts φ⁻¹ across its whole domain. For balanced L = 3 layers
    a·1 (plus) and b·1 (minus) the untied branch at G is the tied one (Woodworth Thm 3, closed
    form) at G/3, finite on −1/b < G < 1/a; roots up to 95 % of the way to either pole, where
    Newton's first steps from 0 overshoot into the blow-up and the safeguard bisects, must come
    back to the closed form's v."""
    deep = ib.DeepDiagonal(jnp.full((3, 12), a), jnp.full((3, 12), b))
    tied = ib.TiedDiagonal(jnp.full(12, a), jnp.full(12, b), 3)
    v = jnp.linspace(-0.95 / b, 0.95 / a, 12)
    w = tied.inverse_mirror(v / 3)  # the closed form, independent of the layer ODE
    assert np.all(np.isfinite(np.asarray(w)))
    np.testing.assert_allclose(deep.mirror(w), v, rtol=1e-10, atol=1e-12)


def test_woodworth_D2_formula():
    # math.md §1.2: β = 2α²w0² sinh(4G) for w±(0) = α w0.
    w0 = jnp.asarray(np.random.default_rng(3).uniform(0.5, 1.5, 12))
    pot = ib.TiedDiagonal(0.3 * w0, 0.3 * w0, 2)
    v = W * 0.2
    np.testing.assert_allclose(pot.inverse_mirror(v), 2 * 0.09 * w0**2 * jnp.sinh(4 * v), rtol=1e-13)


def test_dual_newton_tiny_alpha_and_l1_limit():
    """α down to 1e-12 without overflow; the limit approaches min-ℓ1 as α → 0 (math.md T1.3)."""
    X, y = problem(seed=5, N=5, d=12)
    _, nu = ib.min_l1(X, y)
    w1, _ = ib.min_l1(X, y)
    excess = []
    for alpha in [1e-2, 1e-6, 1e-12]:
        pot = ib.implicit_potential(ib.diagonal_init(alpha, 0.0, 12))
        ref = ib.dual_newton(pot, X, y)
        assert bool(ref.converged) and np.all(np.isfinite(ref.w))
        excess.append(np.sum(np.abs(ref.w)) / np.sum(np.abs(w1)) - 1)
    assert excess[0] > excess[1] > excess[2] >= -1e-9
    assert excess[2] < 1e-2


def test_dual_newton_on_a_square_X_stops_at_its_rounding_floor():
    """d = N = 100 (cond(X) ≈ 530): the constraint set is one point, `X⁻¹y` (a closed form).
    At a small α the dual variable is large and rounding of Xᵀν keeps the residual near 1e-12,
    above 10·tol; the solve stops there (it ran all 200 iterations before) and reports
    convergence, with the minimiser right to 1e-10."""
    D = ib.sparse_regression(num_samples=100, dim=100, seed=4)
    X, y = D["X"], D["y"]
    w_exact = np.linalg.solve(X, y)
    for net in (ib.diagonal_init(1e-6, 0.0, 100), ib.tied_diagonal_init(4.3e-6, 100)):
        ref = ib.dual_newton(ib.implicit_potential(net), X, y)
        assert bool(ref.converged) and int(ref.iterations) < 50
        assert rel(ref.w, w_exact) < 1e-10


def test_large_alpha_ntk_limit():
    # k → ∞: the Thm 4.1 minimiser tends to the tangent-kernel (here plain ℓ2) solution.
    X, y = problem(seed=6)
    w2 = ib.min_l2(X, y)
    d = [rel(ib.dual_newton(ib.implicit_potential(ib.diagonal_init(a, 0.0, 12)), X, y).w, w2) for a in (1.0, 10.0, 100.0)]
    assert d[0] > d[1] > d[2] and d[2] < 1e-5


def test_hessian_map_condition():
    """Azulay eq. 7 (math.md §5.2): diagonal metrics and the warped FC metric are Hessian
    maps; the FC neuron's metric and I + wwᵀ are not."""
    w = jnp.asarray(np.random.default_rng(4).standard_normal(5))
    diag = ib.predictor_metric(ib.DiagonalNet(jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 5))),
                                              jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (2, 5)))))
    fc = ib.fully_connected_init(0.7, 0.3, 5, key=jax.random.PRNGKey(0))
    assert ib.hessian_map_violation(diag, w) < 1e-12
    assert ib.hessian_map_violation(ib.predictor_metric(fc, warped=True), w) < 1e-8
    assert ib.hessian_map_violation(ib.predictor_metric(fc), w) > 0.1
    assert ib.hessian_map_violation(lambda x: jnp.eye(5) + jnp.outer(x, x), w) > 0.1


@pytest.mark.parametrize("name", ["diag-biased", "fc-neuron"])
def test_metric_matches_network_tangent_kernel(name):
    """H(w̃)⁻¹ from the formula equals J Jᵀ of the actual parameterisation, at points of the
    flow (where the conserved quantities hold)."""
    X, y = problem()
    net = CATALOGUE[name]()
    H = ib.predictor_metric(net)
    sol = ib.gradient_flow(net, X, y, save_ts=jnp.array([1.0]), t_max=1.0, throw=False)
    mid = sol.network
    np.testing.assert_allclose(jnp.linalg.inv(H(mid.predictor())), ib.tangent_metric_inverse(mid), rtol=1e-8, atol=1e-10)
