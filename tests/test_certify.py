import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ibflow as ib
from helpers import CATALOGUE, RTOL_LIMIT, SLOW_CASES, catalogue_params, problem, rel
from test_flow import solve_case


@pytest.mark.parametrize("name", catalogue_params(sorted(CATALOGUE)))
def test_certificate_passes(name):
    """math.md T1.x, T2.x, T3.x: the flow's limit is the potential's constrained minimiser."""
    net, sol = solve_case(name)
    X, y = problem()
    cert = ib.certify(sol, X, y, initial=net)
    assert cert.applicable, cert.reason
    assert cert.passed, cert.reason
    assert cert.kkt_residual <= RTOL_LIMIT and cert.reference_distance <= RTOL_LIMIT
    assert cert.primal_residual <= 1e-8


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_wrong_potential_fails(name):
    """Negative control: the same limit certified against plain ℓ2 must fail."""
    net, sol = solve_case(name)
    X, y = problem()
    cert = ib.certify(sol, X, y, initial=net, potential="l2")
    assert cert.applicable and not cert.passed
    assert cert.kkt_residual > 1e-3


def test_small_alpha_diagonal_is_not_l2_but_near_l1():
    X, y = problem(seed=7)
    net = ib.diagonal_init(1e-6, 0.0, X.shape[1])
    sol = ib.gradient_flow(net, X, y)
    assert not ib.certify(sol, X, y, initial=net, potential="l2").passed
    assert ib.certify(sol, X, y, initial=net).passed
    l1 = ib.certify(sol, X, y, initial=net, potential="l1")
    assert l1.reference_distance < 0.05  # a few per cent from ℓ1 at α = 1e-6 (logarithmic approach)


def test_delta_negative_is_refused(getkey):
    X, y = problem()
    net = ib.fully_connected_init(0.5, -0.4, X.shape[1], key=getkey())  # δ = 4αs/(1−s²) < 0
    sol = ib.gradient_flow(net, X, y)
    cert = ib.certify(sol, X, y, initial=net)
    assert not cert.applicable and not cert.passed and "delta" in cert.reason


def test_wide_fc_at_finite_scale_not_covered(getkey):
    X, y = problem()
    net = ib.fully_connected_init(0.5, 0.3, X.shape[1], width=5, key=getkey())
    sol = ib.gradient_flow(net, X, y)
    cert = ib.certify(sol, X, y, initial=net)
    assert not cert.applicable and not cert.passed


def test_relu_not_covered(getkey):
    X, y = problem()
    net = ib.leaky_relu_init(0.5, 0.3, X.shape[1], slope=0.0, key=getkey())
    assert isinstance(ib.implicit_potential(net), ib.NotCovered)


def test_unconverged_flow_fails():
    X, y = problem()
    net = CATALOGUE["diag-thm4.1"]()
    sol = ib.gradient_flow(net, X, y, max_steps=5, throw=False)
    cert = ib.certify(sol, X, y, initial=net)
    assert not cert.passed and "max_steps" in cert.reason


def test_leaky_relu_negative_output_weight():
    """Thm 8.1 with a(0) < 0: labels −σ⁻¹(−y)."""
    X, y = problem(seed=8)
    net = ib.LeakyReLUNeuron(jnp.asarray(np.random.default_rng(0).standard_normal(12) * 0.3),
                             jnp.asarray(-0.9), slope=0.3)
    sol = ib.gradient_flow(net, X, y)
    cert = ib.certify(sol, X, y, initial=net)
    assert cert.passed, cert.reason


def test_prop62_balanced_many_neurons():
    """Prop 6.2: Δ = 0 (W = u aᵀ, ‖u‖ = 1) with m = 3 neurons: potential q̂_0 = ‖w‖^{3/2}."""
    X, y = problem(seed=9)
    u = np.random.default_rng(1).standard_normal(12)
    u /= np.linalg.norm(u)
    a = np.array([0.4, -0.3, 0.5])
    net = ib.FullyConnectedNet((jnp.asarray(np.outer(u, a)),), jnp.asarray(a))
    sol = ib.gradient_flow(net, X, y)
    cert = ib.certify(sol, X, y, initial=net)
    assert cert.applicable and cert.passed, cert.reason


def test_thm63_anti_ntk_error_scales_with_init(getkey):
    """Thm 6.3: m = 4 neurons, infinitesimal init → min-ℓ2; error ~ proportional to scale."""
    X, y = problem(seed=10)
    w2 = ib.min_l2(X, y)
    key = getkey()
    errs = []
    for scale in (1e-2, 1e-3):  # per-layer scale; α = |a|‖w‖ = scale²
        net = ib.fully_connected_init(scale**2, 0.0, 12, width=4, key=key)
        errs.append(rel(ib.gradient_flow(net, X, y).predictor, w2))
    assert errs[1] < errs[0] / 3 and errs[1] < 1e-2


def test_ntk_limit_of_fc_neuron(getkey):
    """App. G: for large α at fixed s the limit tends to the B-matrix (NTK) minimiser; labels
    shifted so the initial residual stays O(1) (math.md §2.7 test caveat)."""
    X, y0 = problem(seed=11)
    d = []
    for alpha in (10.0, 100.0):
        net = ib.fully_connected_init(alpha, 0.3, 12, key=jax.random.PRNGKey(5))
        y = X @ np.asarray(net.predictor()) + y0
        sol = ib.gradient_flow(net, X, y)
        d.append(ib.certify(sol, X, y, initial=net, potential="ntk").reference_distance)
    assert d[1] < d[0] / 3


@pytest.mark.parametrize("L", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_orthogonally_decomposable_tensor_net(L):
    """Yun et al. §3.3: a real orthogonally decomposable TensorNet is a one-branch diagonal
    net in ρ = ⊙U_lᵀv_l on inputs Sx; its limit minimises the diagonal potential there."""
    rng = np.random.default_rng(L)
    N, d, m, k = 5, 8, 9, 11
    X, y = rng.normal(size=(N, d)), rng.normal(size=N)
    S = rng.normal(size=(m, d))
    Us = [np.linalg.qr(rng.normal(size=(k, m)))[0] for _ in range(L)]
    vs = [rng.uniform(0.3, 1.0, size=k) * (1 + 0.5 * l) for l in range(L)]
    net = ib.orthogonal_tensor_net(S, Us, vs)
    assert rel(net.predictor(), S.T @ net.transformed()) < 1e-12
    sol = ib.gradient_flow(net, X, y)
    cert = ib.certify(sol, X, y, initial=net)
    assert cert.passed, cert.reason
    assert cert.kkt_residual <= RTOL_LIMIT and cert.reference_distance <= RTOL_LIMIT
    # Second method: the one-branch diagonal net on the transformed data X Sᵀ.
    plus = jnp.stack([jnp.asarray(U).T @ jnp.asarray(v) for U, v in zip(Us, vs)])
    diag = ib.gradient_flow(ib.DiagonalNet(plus, jnp.zeros_like(plus)), X @ S.T, y)
    assert rel(sol.network.transformed(), diag.predictor) < 1e-8
    assert not ib.certify(sol, X, y, initial=net, potential="l2").passed
    with pytest.raises(ValueError, match="orthonormal"):
        ib.orthogonal_tensor_net(S, [2 * U for U in Us], vs)


def test_conv_regression_has_no_potential():
    """Real kernels: a conjugate frequency pair moves with the isotropic metric
    (|a|²+|b|²)I₂ = √(δ²+4|ρ|²)I₂, which violates the Hessian-map condition (Azulay eq. 7)."""
    a, b = jnp.array([0.3, 0.5]), jnp.array([-0.8, 0.2])
    rho = lambda v: jnp.array([v[0] * v[2] - v[1] * v[3], v[0] * v[3] + v[1] * v[2]])  # complex a·b
    J = jax.jacfwd(rho)(jnp.concatenate([a, b]))
    np.testing.assert_allclose(J @ J.T, (a @ a + b @ b) * jnp.eye(2), rtol=1e-14)
    H = lambda r: jnp.eye(2) / jnp.sqrt(0.3**2 + 4 * jnp.sum(r**2))
    assert float(ib.hessian_map_violation(H, jnp.array([0.4, -0.7]))) > 0.5
    pot = ib.implicit_potential(ib.conv_init(0.5, 0.2, 6, key=jax.random.PRNGKey(0)))
    assert isinstance(pot, ib.NotCovered) and "Hessian" in pot.reason


def test_certify_batch_agrees_with_certify(getkey):
    """The sweep's batched certificate (one vmapped mirror map, one lstsq for all ν) equals `certify`
    point by point over the whole catalogue, a network no theorem covers, an unconverged flow
    and a wrong limit, mixed in one batch."""
    X, y = problem()
    nets, sols = zip(*(solve_case(name) for name in sorted(set(CATALOGUE) - SLOW_CASES)))
    nets, preds = list(nets), [np.asarray(s.predictor) for s in sols]
    statuses, drifts = [s.status for s in sols], [float(s.invariant_drift) for s in sols]
    nets.append(ib.fully_connected_init(1.0, -0.5, X.shape[1], key=getkey()))  # δ < 0: not covered
    preds.append(preds[0])
    statuses.append("converged")
    drifts.append(0.0)
    statuses[1] = "max_steps"  # certificate must fail on status alone
    preds[2] = preds[2] * (1 + 1e-4)  # a limit off the constraint set
    certs = ib.certify_batch(np.stack(preds), statuses, drifts, nets, X, y)
    for net, w, status, drift, cert in zip(nets, preds, statuses, drifts, certs):
        row = type("Row", (), dict(status=status, invariant_drift=drift, predictor=w))
        one = ib.certify(row, X, y, initial=net)
        assert (cert.potential, cert.applicable, cert.passed, cert.reason) == (
            one.potential, one.applicable, one.passed, one.reason)
        for f in ("kkt_residual", "reference_distance", "primal_residual"):
            a, b = getattr(cert, f), getattr(one, f)
            assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= 1e-12 + 1e-6 * abs(b), (f, a, b)
    assert [c.passed for c in certs].count(False) >= 3


def test_warm_up_batch_compiles_what_certify_batch_runs(caplog):
    """`warm_up_batch` (what a sweep runs while its first chunk compiles) compiles the batched
    mirror map and the dual Newton for the batch's shapes: certify_batch on a batch of the
    same size then compiles neither, while a batch of another size (not warmed) compiles the
    mirror map again, so the check can fail."""
    from ibflow._certify import warm_up_batch

    X, y = problem(seed=5, N=6, d=11)  # shapes no other test here compiles for
    nets = [ib.diagonal_init(a, s, 11) for a, s in ((0.1, 0.0), (0.5, 0.3), (2.0, -0.6))]
    sols = [ib.gradient_flow(n, X, y) for n in nets]
    args = (np.stack([np.asarray(s.predictor) for s in sols]), [s.status for s in sols],
            [float(s.invariant_drift) for s in sols])

    def compiled(call):
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
            out = call()
        return out, [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]

    _, warm = compiled(lambda: warm_up_batch(nets, X, y))
    assert any("_mirror_batch" in m for m in warm) and any("dual_newton" in m for m in warm), warm
    certs, again = compiled(lambda: ib.certify_batch(*args, nets, X, y))
    assert not any("_mirror_batch" in m or "dual_newton" in m for m in again), again
    assert all(c.passed for c in certs), [c.reason for c in certs]
    _, other_size = compiled(lambda: ib.certify_batch(*(a[:2] for a in args), nets[:2], X, y))
    assert any("_mirror_batch" in m for m in other_size), other_size


def test_warm_up_compiles_what_certify_runs(caplog):
    """`warm_up` (what `ibflow run --certify` runs while its flow compiles) compiles the dual
    Newton of the initialisation's potential: `certify` of the flow then compiles no dual
    Newton and passes, while a certificate against a potential that was not warmed (ℓ2)
    compiles its own, so the check can fail; ℓ1 and uncovered networks need nothing."""
    from ibflow._certify import reference_arguments, warm_up

    X, y = problem(seed=6, N=7, d=13)  # shapes no other test here compiles for
    net = ib.diagonal_init(0.3, 0.2, 13)

    def compiled(call):
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
            out = call()
        return out, [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]

    _, warm = compiled(lambda: warm_up(reference_arguments(net, X, y)))
    assert any("dual_newton" in m for m in warm), warm
    sol = ib.gradient_flow(net, X, y)
    cert, again = compiled(lambda: ib.certify(sol, X, y, initial=net))
    assert not any("dual_newton" in m for m in again), again
    assert cert.passed, cert.reason
    _, other = compiled(lambda: ib.certify(sol, X, y, initial=net, potential="l2"))
    assert any("dual_newton" in m for m in other), other
    assert reference_arguments(net, X, y, "l1") is None
    assert reference_arguments(ib.fully_connected_init(0.5, 0.1, 13, width=3, key=jax.random.PRNGKey(0)), X, y) is None


def test_certify_batch_rank_deficient_data():
    """A repeated sample makes X rank-deficient: the stationarity residual is still the exact
    projection on range(Xᵀ), in the batch as in `certify` (a QR-based shortcut projects on a
    spurious extra direction here), for the flow's limit and for a point off the KKT set."""
    X, y = problem(seed=3, N=6)
    X[5], y[5] = X[4], y[4]
    net = ib.diagonal_init(0.1, 0.0, X.shape[1])
    sol = ib.gradient_flow(net, X, y)
    w = np.asarray(sol.predictor)
    off = w + 1e-3 * np.random.default_rng(0).standard_normal(w.shape)
    from ibflow._certify import stationarity_projector

    for projector in (None, stationarity_projector(X)):  # lstsq per batch, or the sweep's one SVD
        certs = ib.certify_batch(np.stack([w, off]), [sol.status] * 2, [float(sol.invariant_drift)] * 2, [net] * 2,
                                 X, y, projector=projector)
        for v, cert in zip((w, off), certs):
            row = type("Row", (), dict(status=sol.status, invariant_drift=float(sol.invariant_drift), predictor=v))
            one = ib.certify(row, X, y, initial=net)
            assert abs(cert.kkt_residual - one.kkt_residual) <= 1e-12 + 1e-9 * one.kkt_residual
            assert (cert.passed, cert.reason) == (one.passed, one.reason)
        assert certs[0].kkt_residual <= RTOL_LIMIT and certs[1].kkt_residual > 1e-4
