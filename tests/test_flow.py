import functools
import inspect

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm

import ibflow as ib
from helpers import CATALOGUE, DRIFT_TOL, filippov_leaky_neuron, problem, rel


@functools.lru_cache(maxsize=None)
def solve_case(name):
    X, y = problem()
    net = CATALOGUE[name]()
    return net, ib.gradient_flow(net, X, y, mode="pure")


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_converges_and_conserves(name):
    """The parameter ODE itself (mode="pure"), where conserved quantities can drift."""
    net, sol = solve_case(name)
    assert sol.status == "converged"
    assert sol.loss <= 1e-24 * sol.loss0 or sol.loss <= sol.loss_target
    assert sol.predictor.dtype == jnp.float64
    # balancedness (Du et al. 2018; math.md §5.1): drift ≤ 1e-9 relative
    assert sol.invariant_drift <= DRIFT_TOL


def test_linear_closed_form_trajectory():
    """Linear model: w(t) = w0 + Xᵀ(XXᵀ)⁻¹(I − exp(−XXᵀ t/N))(y − Xw0)."""
    X, y = problem(seed=3)
    net = ib.linear_init(0.5, X.shape[1], key=jax.random.PRNGKey(0))
    ts = jnp.array([0.1, 1.0, 5.0, 20.0])
    sol = ib.gradient_flow(net, X, y, save_ts=ts)
    w0 = np.asarray(net.w)
    A = X @ X.T
    for t, w in zip(np.asarray(ts), np.asarray(sol.trajectory_predictor)):
        exact = w0 + X.T @ np.linalg.solve(A, (np.eye(len(y)) - expm(-A * t / len(y))) @ (y - X @ w0))
        assert rel(w, exact) < 1e-9


@pytest.mark.parametrize("name", ["tied-D2", "diag-thm4.1", "diag-biased"])
def test_mirror_trajectory_stays_in_row_space(name):
    """Closed-form trajectories (math.md §1.2, §2.3): w̃(t) = φ⁻¹(Xᵀν(t)) for every t, i.e.
    φ(w̃(t)) lies in the row space of X along the whole flow, not only in the limit."""
    X, y = problem()
    net = CATALOGUE[name]()
    pot = ib.implicit_potential(net)
    sol = ib.gradient_flow(net, X, y, save_ts=jnp.array([0.2, 1.0, 3.0, 10.0]))
    P = X.T @ np.linalg.solve(X @ X.T, X)
    traj = np.asarray(sol.trajectory_predictor)
    traj = traj[np.all(np.isfinite(traj), axis=1)]  # times after convergence are not reached
    assert len(traj) >= 2
    for w in traj:
        g = np.asarray(pot.mirror(jnp.asarray(w)))
        assert np.linalg.norm(g - P @ g) <= 1e-8 * max(np.linalg.norm(g), 1e-12)


def test_loss_non_increasing_along_trajectory():
    X, y = problem()
    sol = ib.gradient_flow(CATALOGUE["diag-depth3"](), X, y, save_ts=jnp.logspace(-2, 3, 30))
    L = np.asarray(sol.trajectory_loss)
    L = L[np.isfinite(L)]
    assert len(L) > 5 and np.all(np.diff(L) <= 1e-15)


def _warp(net):
    p = jnp.concatenate([net.plus.ravel(), net.minus.ravel()])
    return 1 + 0.5 * jnp.sin(jnp.sum(p)) ** 2 + jnp.sum(p**2)


def test_time_warping_invariance():
    """Azulay §5 / math.md §5.3: θ̇ = −g(θ)∇L visits the same points; same limit."""
    X, y = problem()
    net = CATALOGUE["diag-biased"]()
    a = ib.gradient_flow(net, X, y)
    b = ib.gradient_flow(net, X, y, warp=_warp)
    assert rel(b.predictor, a.predictor) < 1e-9
    assert not np.isclose(float(a.t_end), float(b.t_end), rtol=1e-3)


def test_pure_mode_solvers_agree():
    """Kvaerno5 (diffrax's own implicit solver, dense Jacobian) gives the same limit."""
    X, y = problem()
    net = CATALOGUE["diag-shape0.7"]()
    a = ib.gradient_flow(net, X, y, mode="pure")
    b = ib.gradient_flow(net, X, y, solver=dfx.Kvaerno5(), max_steps=100_000, mode="pure")
    assert b.status == "converged"
    assert rel(b.predictor, a.predictor) < 1e-8


def test_explicit_solver_agrees_then_stalls():
    """Tsit5 (explicit) reaches the same limit at a loose loss target, and stalls on the
    stiff tail of the default 1e-24 target (why the default solver is implicit)."""
    X, y = problem()
    net = ib.diagonal_init(2.0, 0.0, X.shape[1])
    a = ib.gradient_flow(net, X, y, mode="pure")
    b = ib.gradient_flow(net, X, y, solver=dfx.Tsit5(), loss_rtol=1e-14, max_steps=100_000, mode="pure")
    assert rel(b.predictor, a.predictor) < 1e-6
    c = ib.gradient_flow(net, X, y, solver=dfx.Tsit5(), max_steps=20 * int(a.num_steps), throw=False, mode="pure")
    assert c.status == "max_steps"


def _lsoda_limit(net, X, y, t_end):
    """The parameter ODE integrated by SciPy's LSODA (exact gradient and Hessian by autodiff,
    rtol 1e-13) up to `t_end`: an independent second method for a flow's limit."""
    from scipy.integrate import solve_ivp

    params, static = eqx.partition(net, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    loss = lambda p: 0.5 * jnp.mean((jnp.asarray(X) @ eqx.combine(unravel(p), static).predictor() - y) ** 2)
    grad, hess = jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))
    sol = solve_ivp(lambda t, p: -np.asarray(grad(p)), (0.0, t_end), np.asarray(flat), method="LSODA",
                    rtol=1e-13, atol=1e-16, jac=lambda t, p: -np.asarray(hess(p)))
    return np.asarray(eqx.combine(unravel(jnp.asarray(sol.y[:, -1])), static).predictor()), float(loss(sol.y[:, -1]))


@pytest.mark.parametrize("kind,alpha,key,seed", [("fc", 100.0, 2, 11), ("fc", 300.0, 5, 11), ("fc", 1000.0, 4, 11),
                                                  ("conv", 30.0, 1, 21), ("conv", 300.0, 2, 22)])
def test_large_scale_flow_reaches_its_limit(kind, alpha, key, seed):
    """Fully connected neurons and convolutional nets at a large scale (outputs ~1e2 to 1e4),
    labels near the initial outputs: the extrapolation solver's rounding noise
    (`GradientFlowProblem.stop_level`) kept these flows at a loss 1e2-1e4 above the 1e-24
    target until max_steps (found on an H200, then on the CPU at these initialisations).
    The limit must match SciPy LSODA on the same parameter ODE."""
    X, y0 = problem(seed=seed)
    init = ib.fully_connected_init if kind == "fc" else ib.conv_init
    net = init(alpha, 0.3, X.shape[1], key=jax.random.PRNGKey(key))
    y = X @ np.asarray(net.predictor()) + y0
    sol = ib.gradient_flow(net, X, y, throw=False)
    assert sol.status == "converged" and sol.loss <= sol.loss_target
    assert 0 < sol.end_jump < 1e-9  # the end-game only removes rounding noise
    w_ref, loss_ref = _lsoda_limit(net, X, y, t_end=100.0 / alpha)
    assert loss_ref < 1e-20 * float(sol.loss0)  # LSODA itself reached the limit
    assert rel(sol.predictor, w_ref) < 1e-10


def test_deep_nets_default_tolerances_keep_the_limit():
    """Depth-≥3 nets learn incrementally from small initialisations and their limits move with
    the solver's rtol, so their default is 1e-11 (`default_solver_tolerances`). This depth-3
    diagonal net (random signs, scale 0.015, N = 9, d = 25) ended 1.8e-9 from its limit at the two-layer
    default rtol 1e-10 and 1.4e-10 at 1e-11 (measured against the same flow at rtol 1e-13, which
    diffrax's Kvaerno5, a dense-Jacobian method, matched to 1.4e-11 at rtol 1e-11 and 1e-12 in
    26k-43k steps, too slow here). The limit below is the flow at rtol 1e-12 (3.3e-11 from rtol
    1e-13's); against it the old default ends 1.8e-9 off and fails the bound, the new 1.0e-10."""
    rng = np.random.default_rng(8)
    X, y = rng.standard_normal((9, 25)), rng.standard_normal(9)
    net = ib.DiagonalNet(*(jnp.asarray(0.015 * rng.uniform(-1, 1, (3, 25))) for _ in range(2)))
    assert ib.default_solver_tolerances(net) == (1e-11, 1e-13)
    assert ib.default_solver_tolerances(ib.diagonal_init(0.1, 0.0, 25)) == (1e-10, 1e-12)
    assert ib.default_solver_tolerances(net, jnp.float32) == (1e-5, 1e-9)
    limit = ib.gradient_flow(net, X, y, rtol=1e-12, atol=1e-14).predictor
    assert rel(ib.gradient_flow(net, X, y).predictor, limit) <= 5e-10


def test_output_noise_estimates_the_parameter_rounding_response():
    """`GradientFlowProblem.output_noise` estimates `(Σ_i J_ni² θ_i²)^{1/2}` with random-sign
    probes; against the exact value from the Jacobian (mean over outputs, squared), within
    the estimator's spread for 4 probes × 5 outputs."""
    X, y = problem(seed=11)
    for net in (ib.fully_connected_init(30.0, 0.3, 12, width=3, key=jax.random.PRNGKey(1)),
                ib.diagonal_init(0.7, 0.5, 12)):
        params, frozen = eqx.partition(net, net.trainable())
        prob = ib.GradientFlowProblem(frozen, jnp.asarray(X), jnp.asarray(y), ib.SquareLoss(), jnp.zeros(()))
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        J = jax.jacobian(lambda p: eqx.combine(unravel(p), frozen).outputs(jnp.asarray(X)))(flat)
        exact = np.mean(np.asarray(J) ** 2 @ np.asarray(flat) ** 2)
        estimate = float(np.mean(np.asarray(prob.output_noise(params)) ** 2))
        assert exact / 3 < estimate < 3 * exact


def test_jit_vmap_agree_and_do_not_recompile():
    X, y = problem()
    alphas = jnp.array([0.05, 0.3, 1.0])
    shapes = jnp.array([0.0, 0.5, -0.3])
    traces = []

    def one(a, s):
        traces.append(1)
        return ib.gradient_flow(ib.diagonal_init(a, s, X.shape[1]), X, y).predictor

    eager = np.stack([one(a, s) for a, s in zip(alphas, shapes)])
    jitted = eqx.filter_jit(one)
    j = np.stack([jitted(a, s) for a, s in zip(alphas, shapes)])
    n_after_jit = len(traces)
    jitted(alphas[0] * 1.3, shapes[1] * 0.2)  # new values, same abstract signature
    assert len(traces) == n_after_jit, "jit recompiled for new values"
    v = jax.vmap(one)(alphas, shapes)
    jv = jax.jit(jax.vmap(one))
    jv_out = jv(alphas, shapes)
    n = len(traces)
    jv(alphas * 1.1, shapes * 0.5)
    assert len(traces) == n, "jit(vmap) recompiled for new values"
    for other in (j, v, jv_out):
        np.testing.assert_allclose(other, eager, rtol=1e-9, atol=1e-12)


def test_vmap_over_networks_directly():
    X, y = problem()
    nets = jax.vmap(lambda a: ib.diagonal_init(a, 0.2, X.shape[1]))(jnp.array([0.1, 1.0]))
    sols = eqx.filter_vmap(lambda n: ib.gradient_flow(n, X, y, throw=False))(nets)
    assert sols.predictor.shape == (2, X.shape[1])
    assert list(ib.status_words(sols.result)) == ["converged", "converged"]


def test_failure_statuses():
    X, y = problem()
    net = CATALOGUE["diag-thm4.1"]()
    sol = ib.gradient_flow(net, X, y, max_steps=5, throw=False)
    assert sol.status == "max_steps" and not sol.converged
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(ib.gradient_flow(net, X, y, max_steps=5).predictor)
    sol = ib.gradient_flow(net, X, y, t_max=1e-3, throw=False)
    assert sol.status == "not_converged"


def test_bad_inputs_raise():
    X, y = problem()
    net = CATALOGUE["diag-thm4.1"]()
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(Exception, match="X contains NaN"):
        jax.block_until_ready(ib.gradient_flow(net, Xn, y).predictor)
    with pytest.raises(ValueError, match="same N"):
        ib.gradient_flow(net, X, y[:3])


def test_nonfinite_flow_is_reported():
    # A flow that blows up (labels far beyond float range) must not claim convergence.
    X, y = problem()
    sol = ib.gradient_flow(CATALOGUE["tied-D3"](), X, y * 1e200, throw=False, max_steps=200)
    assert sol.status != "converged"


def _kink_case(seed):
    """Random data (N = 5, d = 12) and a leaky-ReLU neuron (ρ = 0.1) whose flow slides on kinks
    (found with `filippov_leaky_neuron`): seed 2 slides on two kinks at once, seed 66 starts a
    slide whose equivalent controls at once push another sample off its kink."""
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((5, 12)), rng.standard_normal(5)
    return X, y, rng.standard_normal(12) * 0.5, 1.0, 0.1


@pytest.mark.parametrize("seed", [2, 66])
def test_kink_sliding_follows_the_filippov_solution(seed):
    """Where a leaky-ReLU flow reaches a kink (wᵀx_n = 0) from a side whose field points back, the
    exact flow slides along it (Filippov); ibflow must follow it to the same limit as an
    independent SciPy event-driven solution (Radau, its own event location), keep a² − ‖w‖², and
    converge (before, every such flow ended `stalled` on the kink)."""
    X, y, w0, a0, rho = _kink_case(seed)
    w_ref, a_ref, events = filippov_leaky_neuron(X, y, w0, a0, rho)
    kinds = [e[0] for e in events]
    assert kinds.count("slide") >= 2 and "exit" in kinds  # the case exercises sliding
    sol = ib.gradient_flow(ib.LeakyReLUNeuron(jnp.asarray(w0), jnp.asarray(a0), rho), X, y)
    assert sol.status == "converged"
    assert rel(sol.predictor, a_ref * w_ref) < 1e-9
    assert float(sol.invariant_drift) < DRIFT_TOL
    assert float(sol.loss) <= float(sol.loss_target)


@pytest.mark.slow  # the default suite's jit(vmap) kink flow: test_relu_dead_samples_end_as_dead_samples
def test_kink_flow_under_vmap():
    """`jit(vmap)` over leaky-ReLU initialisations (pieces and event location in lock-step):
    every member follows its own SciPy Filippov solution."""
    X, y, w0, a0, rho = _kink_case(2)
    W = np.stack([w0, np.random.default_rng(7).standard_normal(12) * 0.5, -w0])
    A = np.array([a0, 0.7, -1.2])
    solve = jax.jit(jax.vmap(lambda w, a: ib.gradient_flow(ib.LeakyReLUNeuron(w, a, rho), X, y, throw=False)))
    sol = solve(jnp.asarray(W), jnp.asarray(A))
    assert list(ib.status_words(sol.result)) == ["converged"] * 3
    for i in range(3):
        w_ref, a_ref, _ = filippov_leaky_neuron(X, y, W[i], A[i], rho)
        assert rel(sol.predictor[i], a_ref * w_ref) < 1e-9, i


@pytest.mark.slow  # one more compilation of a kink flow
def test_kink_flow_past_its_event_budget_stalls(monkeypatch):
    """A kink flow that needs more events than its budget (`_kinks.EVENTS_PER_SAMPLE·N +
    EXTRA_EVENTS`, here cut to 2 where the flow takes more) ends `stalled`, and raises with
    `throw=True`: its pattern is no longer followed, so its state is not reported as a limit."""
    import ibflow._kinks as kinks

    X, y, w0, a0, rho = _kink_case(2)
    assert len(filippov_leaky_neuron(X, y, w0, a0, rho)[2]) > 2
    net = ib.LeakyReLUNeuron(jnp.asarray(w0), jnp.asarray(a0), rho)
    monkeypatch.setattr(kinks, "EVENTS_PER_SAMPLE", 0)
    monkeypatch.setattr(kinks, "EXTRA_EVENTS", 2)
    jax.clear_caches()  # the budget is read at trace time: no program traced with the default
    try:
        assert ib.gradient_flow(net, X, y, throw=False).status == "stalled"
        with pytest.raises(Exception, match="more kink events than its budget"):
            ib.gradient_flow(net, X, y)
    finally:
        jax.clear_caches()  # nor one traced with this budget left for the next tests


def test_kink_flow_trajectory_and_horizon():
    """The trajectory at `save_ts` (times before, between and after the slides) and the state at
    a horizon `t_max` inside a slide both follow the SciPy Filippov solution (one compiled flow:
    the horizon is an array argument)."""
    X, y, w0, a0, rho = _kink_case(2)
    _, _, events = filippov_leaky_neuron(X, y, w0, a0, rho)
    times = np.array(sorted({0.5 * events[0][2]} | {e[2] * f for e in events[:6] for f in (0.99, 1.01)}))
    _, _, _, ref = filippov_leaky_neuron(X, y, w0, a0, rho, save_ts=times)
    net = ib.LeakyReLUNeuron(jnp.asarray(w0), jnp.asarray(a0), rho)
    sol = ib.gradient_flow(net, X, y, save_ts=jnp.asarray(times), throw=False)
    assert sol.status == "converged"
    for t, pred, (*w_t, a_t) in zip(times, np.asarray(sol.trajectory_predictor), ref):
        assert rel(pred, a_t * np.asarray(w_t)) < 1e-9, t
    sliding_at = next(e[2] for e in events if e[0] == "slide") * 1.01
    cut = ib.gradient_flow(net, X, y, save_ts=jnp.asarray(times), t_max=sliding_at, throw=False)
    assert cut.status == "not_converged" and float(cut.t_end) == pytest.approx(sliding_at)
    w_t, a_t, _ = filippov_leaky_neuron(X, y, w0, a0, rho, t_max=sliding_at)
    assert rel(cut.network.w, w_t) < 1e-9 and abs(float(cut.network.a) - a_t) < 1e-9
    assert np.min(np.abs(X @ np.asarray(cut.network.w))) < 1e-12  # on the kink
    assert np.all(np.isinf(np.asarray(cut.ts)[times > sliding_at]))  # no saves past the horizon


def test_relu_dead_samples_end_as_dead_samples():
    """ρ = 0 (plain ReLU): a sample left on the flat side gets no gradient (and one on its kink is
    held there, its equivalent control tending to 0), so the flow converges to a
    non-interpolating point. ibflow must stop there (the other samples' loss at its target) with
    status `dead_samples`, never `converged`, at the SciPy Filippov solution's limit, its loss
    the held samples' `Σ y_n²/(2N)` (those whose reference output is 0). In the same vmapped
    batch, an initialisation whose samples all stay alive must still end `converged`."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((5, 12)), rng.standard_normal(5)
    w0 = rng.standard_normal(12) * 0.5
    w_ref, a_ref, _ = filippov_leaky_neuron(X, y, w0, 1.0, 0.0, t_max=1e6)
    held = np.abs(a_ref * np.maximum(X @ w_ref, 0.0)) < 1e-12
    assert held.any() and not held.all()  # the reference ends at a positive loss
    # Second member: X w_fit = |y| > 0 puts every sample on the slope-1 side, with labels it can fit.
    w_fit = np.linalg.lstsq(X, np.abs(y), rcond=None)[0] + 0.01 * w0
    y_fit = -np.abs(y)
    w_ref1, a_ref1, _ = filippov_leaky_neuron(X, y_fit, w_fit, -1.0, 0.0)
    batch = jax.jit(jax.vmap(lambda w, a, yy: ib.gradient_flow(ib.LeakyReLUNeuron(w, a, 0.0), X, yy, throw=False)))(
        jnp.asarray(np.stack([w0, w_fit])), jnp.asarray([1.0, -1.0]), jnp.asarray(np.stack([y, y_fit])))
    assert list(ib.status_words(batch.result)) == ["dead_samples", "converged"]
    assert rel(batch.predictor[0], a_ref * w_ref) < 1e-9
    assert float(batch.loss[0]) == pytest.approx(0.5 * np.mean(np.where(held, y, 0.0) ** 2), rel=1e-12)
    assert np.all(np.asarray(batch.invariant_drift) < DRIFT_TOL)
    assert rel(batch.predictor[1], a_ref1 * w_ref1) < 1e-9
    assert float(batch.loss[1]) <= float(batch.loss_target[1])


@pytest.mark.slow
def test_kink_flow_at_the_azulay_size_is_certified():
    """At the Azulay §9 size (d = 1000, N = 100) a leaky-ReLU flow from a random small init meets
    dozens of kinks; it must converge, agree with itself at rtol 1e-12, and its limit must pass
    the Thm 8.1 certificate (δ ≥ 0 here), which the mirror structure keeps through crossings and
    slides. Measured: 50 sign changes, 619 steps (1535 before the root finder's per-sample
    secant), KKT 1.7e-12, 2.8e-12 from rtol 1e-12."""
    D = ib.sparse_regression(num_samples=100, dim=1000, seed=4)
    X, y = np.asarray(D["X"]), np.asarray(D["y"])
    rng = np.random.default_rng(12)
    w0, a0 = rng.standard_normal(1000) * 0.01, rng.choice([-1, 1]) * 0.8
    net = ib.LeakyReLUNeuron(jnp.asarray(w0), jnp.asarray(a0), 0.2)
    sol = ib.gradient_flow(net, X, y)
    assert np.sum(np.sign(X @ w0) != np.sign(X @ np.asarray(sol.network.w))) > 10
    assert ib.certify(sol, X, y, initial=net).passed
    tight = ib.gradient_flow(net, X, y, rtol=1e-12, atol=1e-14)
    assert rel(sol.predictor, tight.predictor) < 1e-9


def _large_scale_net(kind, dtype):
    """A fully connected neuron or a convolutional net with outputs ~30× the labels of
    `sparse_regression(20, 60, seed=3)`, from NumPy draws (the same in float32 and float64)."""
    import jax.numpy as jnp
    import numpy as np

    import ibflow as ib

    rng = np.random.default_rng(1)
    if kind == "fc":
        u = rng.standard_normal((60, 1))
        return ib.fully_connected_init(dtype(30.0), dtype(0.3), 60, directions=(u / np.linalg.norm(u)).astype(dtype))
    K = rng.standard_normal((2, 60))
    return ib.ConvNet(jnp.asarray(5.5 * K / np.linalg.norm(K, axis=1, keepdims=True), dtype))


_FLOAT32_SCRIPT = """
import json, sys
import numpy as np, jax
import ibflow as ib
""" + inspect.getsource(_large_scale_net).replace("def _large_scale_net", "def large_scale_net") + """
D = ib.sparse_regression(num_samples=20, dim=60, seed=3)
X, y = D["X"].astype(np.float32), D["y"].astype(np.float32)
out = []
for a, s in [(0.3, 0.0), (1e-3, 0.9)]:
    net = ib.diagonal_init(np.float32(a), np.float32(s), 60)
    net = jax.tree_util.tree_map(lambda x: x.astype(np.float32) if x.dtype == np.float64 else x, net)
    sol = ib.gradient_flow(net, X, y, max_steps=150, throw=False)  # float32 default tolerances
    cert = ib.certify(sol, X, y, initial=net)
    other = jax.tree_util.tree_map(lambda x: 10 * x, net)  # negative control: another initialisation's potential
    out.append(dict(alpha=a, shape=s, status=sol.status, dtype=str(sol.predictor.dtype),
                    w=np.asarray(sol.predictor, np.float64).tolist(), passed=cert.passed, reason=cert.reason,
                    tolerances=cert.tolerances, other_passed=ib.certify(sol, X, y, initial=other).passed))
pure = []
for kind in ("fc", "conv"):  # the parameter ODE at a large scale: stalled in float32 before its noise floor
    net = large_scale_net(kind, np.float32)
    sol = ib.gradient_flow(net, X, y, max_steps=500, throw=False)
    pure.append(dict(kind=kind, status=sol.status, dtype=str(sol.predictor.dtype), w=np.asarray(sol.predictor, np.float64).tolist()))
print("RESULT " + json.dumps(dict(rows=out, pure=pure, precision=jax.config.jax_default_matmul_precision)))
"""


def test_float32_default_solver_converges():
    """Without x64 (`IBFLOW_NO_X64=1`) the flow runs in float32. Order 8's extrapolation noise
    (gain 21529 × ε₃₂ ≈ 3e-3) swamps its error estimate and stalls it (measured: every step
    rejected); `default_solver(float32)` picks order 5, which converges to the float64 dual-Newton
    limit within float32's rounding, so this test fails if the default went back to order 8 (or
    the float32 default tolerances to float64's rtol 1e-10, out of the order-5 solver's reach).
    `import ibflow` also asks for full-precision float32 products (TF32 stalls it on GPUs), and the
    certificates use float32 thresholds (math.md §1.6: 1e-4 for the reference distance). A fully
    connected and a convolutional net at a large scale (pure mode) must converge too and match
    the same flows in float64 to 1e-4 (measured 1.9e-5 and 1.4e-5); both ran into max_steps
    before the pure mode's noise floor (`GradientFlowProblem.stop_level`)."""
    import json
    import os
    import subprocess
    import sys

    assert ib.default_solver(jnp.float32).order_k == 5 and ib.default_solver(jnp.float64).order_k == 8
    env = dict(os.environ, IBFLOW_NO_X64="1")
    env.pop("JAX_DEFAULT_MATMUL_PRECISION", None)
    p = subprocess.run([sys.executable, "-c", _FLOAT32_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, p.stderr[-2000:]
    D = ib.sparse_regression(num_samples=20, dim=60, seed=3)
    result = json.loads(lines[0][7:])
    assert result["precision"] == "highest"  # no TF32 products on GPUs (see `ibflow/__init__.py`)
    for r in result["rows"]:
        assert r["dtype"] == "float32"
        assert r["status"] == "converged", r
        assert r["tolerances"] == ib._certify.FLOAT32_TOLERANCES and r["passed"], r["reason"]
        assert not r["other_passed"]
        ref = ib.dual_newton(ib.implicit_potential(ib.diagonal_init(r["alpha"], r["shape"], 60)), D["X"], D["y"]).w
        assert rel(np.array(r["w"]), ref) < 2e-5, (r["alpha"], r["shape"], rel(np.array(r["w"]), ref))
    # fc and conv nets at α = 30 (pure mode): against the same flows in float64
    for r in result["pure"]:
        ref = ib.gradient_flow(_large_scale_net(r["kind"], np.float64), D["X"], D["y"]).predictor
        assert r["dtype"] == "float32" and r["status"] == "converged", r["kind"]
        assert rel(np.array(r["w"]), ref) < 1e-4, (r["kind"], rel(np.array(r["w"]), ref))
