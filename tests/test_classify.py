"""Classification flows (exp/logistic losses, warped time) and max-margin certificates.

Independent facts used: the closed-form single-sample flow L(t) = 1/(1 + ‖x‖²t); the
plain-time gradient flow (`gradient_flow`, a different time variable and stopping
rule) at the same t; the hard-margin SVM from scipy's SLSQP; the ℓ1 max margin from
HiGHS; LP/SOCP strong duality; Soudry/Gunasekar/Ji–Telgarsky limits.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from helpers import filippov_leaky_neuron, rel

import ibflow as ib
from ibflow._cli import main
from ibflow._margin import margin_geometry, max_margin


def _data(seed, N, d):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    return X, np.sign(X @ rng.standard_normal(d))


def _svm_slsqp(X, y):
    Z = y[:, None] * X
    w0 = np.linalg.lstsq(Z, np.ones(len(y)), rcond=None)[0] * 2
    r = scipy.optimize.minimize(lambda w: w @ w, w0, jac=lambda w: 2 * w, method="SLSQP",
                                constraints=[dict(type="ineq", fun=lambda w: Z @ w - 1, jac=lambda w: Z)],
                                options=dict(ftol=1e-16, maxiter=2000))
    return r.x


def _cos_gap(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


X8, y8 = _data(1, 8, 6)


@pytest.mark.parametrize("loss", [ib.ExponentialLoss(), ib.LogisticLoss()])
def test_log_domain_losses(loss):
    z = jnp.array([0.3, -2.0, 4.0])
    naive = {"exp": jnp.exp(-z), "logistic": jnp.log1p(jnp.exp(-z))}[loss.name]
    assert np.isclose(loss.log_value(z, jnp.ones(3)), np.log(np.mean(naive)), rtol=1e-14)
    # Far beyond float64's range the log-loss, its gradient and the weights stay finite.
    big = jnp.array([1e5, 2e5, 1e5 + 1.0])
    lv, g = jax.value_and_grad(lambda f: loss.log_value(f, jnp.ones(3)))(big)
    assert np.isclose(lv, -1e5 + np.log(1 + np.exp(-1.0)) - np.log(3), rtol=1e-12)
    assert np.all(np.isfinite(g)) and np.isclose(-np.sum(g), 1.0, rtol=1e-12)


def test_single_sample_closed_form_time():
    # Linear model, one sample, exp loss: m' = ‖x‖² e^{−m}, so L(t) = 1/(1 + ‖x‖² t).
    x = np.array([[0.6, -1.2, 0.4]])
    sol = ib.margin_flow(ib.Linear(jnp.zeros(3)), x, np.array([1.0]), log_until_loss=-1000.0)
    L = float(sol.log_loss)
    log_t = -L + np.log1p(-np.exp(L)) - np.log(np.sum(x**2))  # 1/L = 1 + ‖x‖²t
    t_exact = np.logaddexp(0.0, log_t)
    assert sol.status == "converged" and abs(L + 1000.0) <= 1e-9  # the level itself
    assert abs(float(sol.log1p_t) - t_exact) < 1e-8 * abs(t_exact)


@pytest.mark.parametrize("make", [lambda d: ib.diagonal_init(1e-6, 0.0, d),
                                  lambda d: ib.fully_connected_init(0.5, 0.3, d, width=2, key=jax.random.key(1))],
                         ids=["diagonal", "fc"])
def test_warped_flow_equals_plain_time_flow(make):
    net = make(6)
    sol = ib.margin_flow(net, X8, y8, until_loss=1e-8, record_losses=[1e-2, 1e-5], rtol=1e-10, atol=1e-12)
    T = float(np.expm1(float(sol.log1p_t)))
    plain = ib.gradient_flow(net, X8, y8, loss=ib.ExponentialLoss(), loss_rtol=1e-30, t_max=1.5 * T,
                             save_ts=jnp.array([T]), rtol=1e-11, atol=1e-14, max_steps=100_000, throw=False)
    assert rel(sol.predictor, plain.trajectory_predictor[0]) < 1e-7
    assert abs(float(sol.log_loss) - np.log(float(plain.trajectory_loss[0]))) < 1e-7


@pytest.mark.parametrize("make", [lambda d: ib.Linear(jnp.zeros(d)),
                                  lambda d: ib.fully_connected_init(0.5, 0.0, d, width=3, key=jax.random.key(2))],
                         ids=["linear", "fc"])
def test_margin_flow_lands_on_its_levels(make):
    """The flow stops at the requested loss level (and records at the requested levels), not
    at the end of the step that crossed it (late steps span several per cent of log L: it had
    stopped at 1e-104 for 1e-100), and at the requested time when that comes first: in log L
    or log(1 + t), to 1000 ε (1 + |level|)."""
    net = make(6)
    flow = jax.jit(lambda T: ib.margin_flow(net, X8, y8, until_loss=1e-60, record_losses=[1e-3, 1e-20],
                                            until_time=T))
    sol = flow(jnp.inf)
    levels = np.log([1e-3, 1e-20, 1e-60])
    got = np.asarray(sol.record.log_loss)
    assert sol.status == "converged"
    assert np.all(np.abs(got - levels) <= 1e-10 * np.abs(levels)), got - levels
    assert float(sol.log_loss) == got[-1]
    # A horizon reached before the loss level (t = 1e12: L ~ 1/t there, far above 1e-60).
    timed = flow(1e12)
    assert timed.status == "converged" and float(timed.log_loss) > np.log(1e-60)
    assert abs(float(timed.log1p_t) - np.log1p(1e12)) <= 1e-10 * np.log1p(1e12)


def test_linear_aligns_with_svm_and_reference_solver():
    X, y = _data(4, 12, 5)
    w_svm = _svm_slsqp(X, y)
    u, lam, ok = ib.svm_l2((y[:, None] * X))
    assert ok and rel(u, w_svm) < 1e-6
    sol = ib.margin_flow(ib.Linear(jnp.zeros(5)), X, y, until_loss=1e-100)
    gaps = [_cos_gap(dv, w_svm) for dv in np.asarray(sol.record.direction)]
    assert gaps[-1] <= 1e-3
    assert gaps[-1] < gaps[0] / 10  # the O(1/log t) approach is visible across the levels


@pytest.mark.parametrize("depth,tol", [(2, 1e-3), (3, 1e-2)])
def test_fully_connected_aligns_with_svm(depth, tol):
    net = ib.fully_connected_init(0.01, 0.0, 6, width=1, depth=depth, key=jax.random.key(0))
    sol = ib.margin_flow(net, X8, y8, loss=ib.LogisticLoss(), until_loss=1e-100)
    assert _cos_gap(sol.predictor, _svm_slsqp(X8, y8)) <= tol
    if depth == 3:
        rank1, align = np.asarray(sol.record.layer_rank1), np.asarray(sol.record.layer_alignment)
        assert rank1.shape[1] == 2 and np.all(rank1[-1] > 0.95) and np.all(align[-1] > 0.999)
    # Balancedness W_lᵀW_l − W_{l+1}W_{l+1}ᵀ is conserved along the flow (math.md §5.1).
    assert float(sol.invariant_drift) < 1e-9


def test_diagonal_aligns_with_l1_max_margin():
    net = ib.diagonal_init(1e-2, 0.0, 6)
    sol = ib.margin_flow(net, X8, y8, until_loss=1e-200)
    Z = y8[:, None] * X8
    lp = scipy.optimize.linprog(np.ones(12), A_ub=-np.c_[Z, -Z], b_ub=-np.ones(8), bounds=(0, None), method="highs")
    assert _cos_gap(sol.predictor, lp.x[:6] - lp.x[6:]) <= 5e-2


def test_reference_solvers_are_optimal():
    X, y = _data(7, 7, 6)
    # DFT group-ℓ1 (conv, L = 2): strong duality Σλ = Φ(ρ*) and dual feasibility.
    g = margin_geometry(ib.ConvNet(jnp.ones((2, 6))))
    beta, lam, ok = max_margin(g, X, y)
    M = (y[:, None] * X) @ g.T.T
    assert ok and np.all(lam >= -1e-9) and np.min((y[:, None] * X) @ beta) > 1 - 1e-7
    assert np.isclose(np.sum(lam), g.objective(g.T @ beta), rtol=1e-6)
    v = M.T @ lam
    assert all(np.linalg.norm(v[grp]) <= c * (1 + 1e-6) for c, grp in zip(g.weights, g.groups))
    assert np.isclose(g.objective(g.T @ beta), np.sum(np.abs(np.fft.fft(beta))), rtol=1e-12)
    # ℓ_{2/3} (diagonal, L = 3) by reweighting: a KKT point on its support.
    g3 = margin_geometry(ib.diagonal_init(1.0, 0.0, 6, depth=3))
    beta, lam, ok = max_margin(g3, X, y)
    Z = y[:, None] * X
    supp = np.abs(beta) > 1e-6 * np.max(np.abs(beta))
    grad = (2 / 3) * np.abs(beta[supp]) ** (-1 / 3) * np.sign(beta[supp])
    act = Z @ beta < 1 + 1e-8
    lam, res = scipy.optimize.nnls(Z[act][:, supp].T, grad)
    assert ok and res / np.linalg.norm(grad) < 1e-6


CERT_CASES = {
    "linear": (lambda d: ib.Linear(jnp.zeros(d)), "l2-margin"),
    "fc2": (lambda d: ib.fully_connected_init(0.5, 0.0, d, width=3, key=jax.random.key(0)), "l2-margin"),
    "diagonal": (lambda d: ib.diagonal_init(1e-2, 0.0, d), "l1-margin"),
    "diagonal3": (lambda d: ib.diagonal_init(1e-2, 0.0, d, depth=3), "l2/L-margin"),
    "conv3": (lambda d: ib.conv_init(0.5, 0.0, d, depth=3, key=jax.random.key(0)), "l2/L-margin-dft"),
}


@pytest.mark.parametrize("case", list(CERT_CASES))
def test_margin_certificates_pass(case):
    make, name = CERT_CASES[case]
    net = make(6)
    sol = ib.margin_flow(net, X8, y8, until_loss=1e-100)
    cert = ib.certify_margin(sol, X8, y8, initial=net)
    assert cert.potential == name
    assert cert.passed, cert.reason
    assert cert.alignment <= cert.tolerances["alignment"] * cert.epsilon
    assert 0 <= cert.complementary_slackness and all(v >= 0 for v in cert.multipliers)


def test_margin_certificate_negative_controls():
    diag = ib.diagonal_init(1e-6, 0.0, 6)
    sol = ib.margin_flow(diag, X8, y8, until_loss=1e-100)
    assert ib.certify_margin(sol, X8, y8, initial=diag).passed
    wrong = ib.certify_margin(sol, X8, y8, initial=diag, potential="l2-margin")
    assert not wrong.passed and "aligned" in wrong.reason
    # A loss level too high for the asymptotic theory is not certified.
    early = ib.margin_flow(diag, X8, y8, until_loss=1e-5)
    cert = ib.certify_margin(early, X8, y8, initial=diag)
    assert not cert.passed and "too high" in cert.reason
    # Non-separable data: refused.
    Xb, yb = np.r_[X8, X8[:1]], np.r_[y8, -y8[:1]]
    with pytest.raises(ib.NotSeparableError):
        ib.check_separable(Xb, yb)
    with pytest.raises(ib.NotSeparableError):
        ib.certify_margin(sol, Xb, yb, initial=diag)
    # Misuse of the reference solver: clear errors, not an IndexError from inside.
    g = margin_geometry(diag)
    with pytest.raises(TypeError, match="MarginGeometry"):
        max_margin(X8, y8, 2)
    with pytest.raises(ValueError, match="columns"):
        max_margin(g, X8[:, :4], y8)
    with pytest.raises(ValueError, match=r"y \(N,\)"):
        max_margin(g, X8, y8[:-1])


def test_margin_flow_vmap_matches_single_runs():
    alphas = jnp.array([1e-3, 1e-1])
    nets = jax.vmap(lambda a: ib.diagonal_init(a, 0.0, 6))(alphas)
    batch = jax.vmap(lambda n: ib.margin_flow(n, X8, y8, until_loss=1e-50))(nets)
    for i, a in enumerate(alphas):
        one = ib.margin_flow(ib.diagonal_init(a, 0.0, 6), X8, y8, until_loss=1e-50)
        # Batched members step together (same τ grid as the slowest), so agree to the tolerance.
        assert _cos_gap(batch.predictor[i], one.predictor) < 1e-8


def test_leaky_relu_margin_flow_crosses_and_slides_on_its_kinks():
    """A leaky-ReLU neuron's classification flow crosses and slides on its kinks (stepping
    through them, it used to end `stalled` on these data): it follows an independent SciPy
    Filippov solution in plain time, before and after the hand-over to warped time at
    `L = 1/(2N)` (t ≈ 32 here), and reaches `L = 1e-100` at a certified Lyu-Li KKT direction."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 20))
    y = np.sign(X @ rng.standard_normal(20))
    w0, a0, rho = 0.3 * rng.standard_normal(20), -0.6, 0.2
    net = ib.LeakyReLUNeuron(jnp.asarray(w0), jnp.asarray(a0), rho)
    flow = jax.jit(lambda T: ib.margin_flow(net, X, y, until_loss=1e-100, until_time=T, throw=False))
    for T in (3.0, 300.0):
        sol = flow(T)
        assert sol.status == "converged"  # the horizon was reached
        t_end = float(jnp.expm1(sol.log1p_t))
        _, _, events, saved = filippov_leaky_neuron(X, y, w0, a0, rho, t_max=t_end, loss="exp", save_ts=[t_end])
        kinds = [k for k, _, _ in events]
        assert "slide" in kinds and "exit" in kinds and "cross" in kinds
        # The reference takes its events one at a time, right only where none coincide.
        assert len({t for _, _, t in events}) == len(events)
        assert rel(np.r_[sol.network.w, sol.network.a], saved[0]) < 1e-7
    sol = flow(jnp.inf)
    assert sol.status == "converged" and float(sol.log_loss) <= np.log(1e-100)
    assert float(sol.invariant_drift) < 1e-9  # a² − ‖w‖², across both phases
    cert = ib.certify_margin(sol, X, y, initial=net)
    assert cert.applicable and cert.passed, cert.reason


def test_bad_input():
    with pytest.raises(ValueError, match="below 1 and positive"):
        ib.margin_flow(ib.Linear(jnp.zeros(6)), X8, y8, until_loss=0.0)
    with pytest.raises(Exception, match="must be \\+1 or -1"):
        ib.margin_flow(ib.Linear(jnp.zeros(6)), X8, 2 * y8)
    with pytest.raises(ValueError, match="below 1"):
        ib.margin_flow(ib.Linear(jnp.zeros(6)), X8, y8, until_loss=2.0)
    with pytest.raises(TypeError, match="margin loss"):
        ib.margin_flow(ib.Linear(jnp.zeros(6)), X8, y8, loss=ib.SquareLoss())
    # A plain ReLU neuron (slope 0) has one output sign: labels of both signs cannot be separated
    # by it (refused on the host, before compiling; traced labels: the slow test below).
    assert np.any(y8 > 0) and np.any(y8 < 0)
    with pytest.raises(ValueError, match="one sign"):
        ib.margin_flow(ib.LeakyReLUNeuron(jnp.full(6, 0.1), jnp.asarray(1.0), 0.0), X8, y8)


@pytest.mark.slow
def test_relu_margin_flow_refuses_traced_labels_of_both_signs():
    """The same refusal when the labels are traced (checked inside the program), and one-signed
    labels pass the check (the same compiled program: y is a run-time value)."""
    relu = ib.LeakyReLUNeuron(jnp.full(6, 0.1), jnp.asarray(1.0), 0.0)
    flow = jax.jit(lambda y: ib.margin_flow(relu, X8, y, max_steps=8, throw=False).log_loss)
    with pytest.raises(Exception, match="one sign"):
        flow(jnp.asarray(y8))
    assert np.isfinite(flow(jnp.ones_like(jnp.asarray(y8))))


def test_cli_classification(tmp_path):
    np.savez(tmp_path / "c.npz", X=X8, y=y8)
    out = tmp_path / "r.json"
    rc = main(["run", "--data", str(tmp_path / "c.npz"), "--net", "fc", "--alpha", "0.5", "--loss", "exp",
               "--until-loss", "1e-400", "--certify", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["status"] == "converged" and r["stopped_at"] == "loss"
    assert r["log10_loss"] <= -400 and r["loss"] == 0.0 and r["margin"] > 0
    assert r["certificate"]["potential"] == "l2-margin" and r["certificate"]["passed"]
    assert [rec["alignment"] for rec in r["record"]][-1] < r["record"][0]["alignment"]
    np.savez(tmp_path / "n.npz", X=np.r_[X8, X8[:1]], y=np.r_[y8, -y8[:1]])
    rc = main(["run", "--data", str(tmp_path / "n.npz"), "--net", "linear", "--alpha", "1", "--loss", "logistic",
               "--out", str(out)])
    assert rc == 2 and json.loads(out.read_text())["status"] == "not separable"
    # A plain ReLU neuron's outputs share one sign: separable data, but not by it.
    rc = main(["run", "--data", str(tmp_path / "c.npz"), "--net", "leaky-relu", "--slope", "0", "--alpha", "1",
               "--loss", "exp", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 2 and r["status"] == "not separable" and "one sign" in r["reason"]
    rc = main(["run", "--data", str(tmp_path / "c.npz"), "--net", "linear", "--alpha", "1", "--loss", "exp",
               "--until-loss", "2", "--out", str(out)])
    assert rc == 2
    # A time horizon reached before the loss level: converged, and R.json says which rule ended it.
    rc = main(["run", "--data", str(tmp_path / "c.npz"), "--net", "linear", "--alpha", "1", "--loss", "exp",
               "--until-loss", "1e-50", "--until-time", "3", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["stopped_at"] == "time" and r["log10_loss"] > -50
    assert abs(r["t_end"] - 3.0) <= 1e-9
    rc = main(["run", "--data", str(tmp_path / "c.npz"), "--net", "linear", "--alpha", "1", "--loss", "exp",
               "--certify", "--potential", "ntk", "--out", str(out)])
    assert rc == 2


def test_moroshko_scale_vs_accuracy():
    from ibflow._moroshko import scale_vs_accuracy, sparse_classification

    D = sparse_classification(12, 20, seed=1)
    ds = scale_vs_accuracy(D["X"], D["y"], [1e-2, 10.0], log10_levels=(-2, -30, -300))
    assert np.all(ds["status"].values == "converged")
    l1, l2 = ds["l1_gap"].values, ds["l2_gap"].values
    # Kernel regime: large α at a modest loss sits near the ℓ2 max margin, small α does not.
    assert l2[1, 1] < 0.1 * l2[0, 1]
    # Driving the loss down moves the large-α flow towards the rich (ℓ1) limit (Moroshko et al.).
    assert l1[1, 2] < l1[1, 1] < l1[1, 0] and l2[1, 2] > l2[1, 1]
    # μ = α/γ with γ the minimum margin, and γ ≈ log(1/L) grows with the level reached.
    assert np.allclose(ds["mu"].values, ds["alpha"].values[:, None] / ds["margin"].values)
    assert np.all(np.diff(ds["margin"].values, axis=1) > 0)
