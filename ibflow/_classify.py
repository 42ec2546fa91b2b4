"""Gradient flow on separable classification data, integrated in warped time to
extreme loss levels (1e-100, 1e-300 and far below).

**Loss and time.** `L(θ) = (1/N) Σ_n ℓ(y_n f(x_n; θ))` with ℓ exponential or
logistic (`ExponentialLoss`, `LogisticLoss`), always handled through `log L`.
The flow is the exact gradient flow `dθ/dt = −∇L(θ)`; on separable data L → 0 only
as t → ∞ and directions converge like 1/log t (math.md §4), so t must reach 1e100
and beyond. We integrate the same trajectory in the warped time τ of

    dθ/dτ = −g(θ) ∇ log L(θ),   g(θ) = (1 + ‖θ‖²)^{(2−K)/2},
    du/dτ = g(θ) (e^{−u} − ‖∇ log L(θ)‖²),   u = log((1 + t) L(θ)),

where K is the network's homogeneity degree. Since `−∇L = −L ∇log L`, this is the
gradient flow re-timed by `dt/dτ = g/L > 0`, which visits the same points
(Azulay et al. 2021 §5, math.md §5.3); the flow time is carried along through
`log(1 + t) = u − log L`, so `t ≈ 1e300` and beyond is representable. (u relaxes at the
stiff rate `g e^{−u}` towards the slowly varying `−2 log‖∇ log L‖`; `log(1+t)` itself
would chase the fast-growing `log(1/L)` and cost steps ∝ log(1/L).) The factor g makes `‖θ‖` grow
exponentially in τ for every K (without it, K ≥ 3 blows up in finite τ), so
`log(1/L)` grows doubly exponentially in τ and a requested loss level is reached in
a few hundred steps of the stiff solver (`LinearlyImplicitExtrapolation`, whose
Gauss–Newton factor is built from the curvature of log L).

**The leaky-ReLU neuron** (`σ(z) = max(z, ρz)`) has a vector field that jumps on each kink
`wᵀx_n = 0`, where the exact flow crosses or slides (`_kinks`); stepping through them, the
warped flow ended `stalled` in 4 of 8 random cases (d = 20, N = 12). Its flow is therefore
solved in two phases: in plain time across its kinks as a Filippov solution
(`_kinks.flow_across_kinks`, the square loss's machinery) until `L ≤ ℓ(0)/(2N)`, then in
warped time from there. Once `L < ℓ(0)/N` every margin `y_n f(x_n)` is positive (each term
`ℓ(y_n f_n)/N ≤ L`), and since L never increases along the flow it stays so: `f_n ≠ 0`, so
no `z_n` reaches its kink again and the second phase is smooth (the condition of Lyu & Li
2020, assumption (A4)/(B4), under which their margin theorems hold).
"""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from ._checks import checks_enabled, value_check
from ._flow import check_data, gauss_newton_factor, invariant_drift
from ._kinks import flow_across_kinks
from ._losses import AbstractMarginLoss, ExponentialLoss
from ._networks import AbstractNetwork, FullyConnectedNet, LeakyReLUNeuron
from ._results import RESULTS, status_word
from ._solver import LinearlyImplicitExtrapolation


def _sq_norm(tree):
    return sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(tree))


class MarginFlowProblem(eqx.Module):
    """The warped-time classification flow (see the module docstring), as diffrax `args`.

    State: `(params, u)`, `u = log((1+t)L)`. Provides the vector field and the Gauss–Newton factor
    of `g·∇² log L` used by `LinearlyImplicitExtrapolation`.
    """

    frozen: AbstractNetwork
    X: Float[Array, "N d"]
    y: Float[Array, " N"]
    loss: AbstractMarginLoss
    degree: int = eqx.field(static=True)
    log_target: Float[Array, ""]
    log1p_t_max: Float[Array, ""]

    def network(self, params) -> AbstractNetwork:
        return eqx.combine(params, self.frozen)

    def log_loss(self, params):
        return self.loss.log_value(self.network(params).outputs(self.X), self.y)

    def warp(self, params):
        return (1.0 + _sq_norm(params)) ** (0.5 * (2 - self.degree))

    def vector_field(self, tau, state, _):
        params, u = state
        grad = jax.grad(self.log_loss)(params)
        g = self.warp(params)
        dparams = jax.tree_util.tree_map(lambda x: -g * x, grad)
        return dparams, g * (jnp.exp(-u) - _sq_norm(grad))

    def log1p_t(self, state):
        params, u = state
        return u - self.log_loss(params)

    def gauss_newton(self, state):
        """`G = √g · R · diag(y) · J` with `RᵀR = diag(p) − ppᵀ(2 − Σp)` ⪰ 0, the
        curvature of log L in the margins (exact for the exponential loss, where
        Σp = 1), J the output Jacobian; the time coordinate u gets a zero column
        and its own stiff rate `D` and coupling row. Returned as
        `(K = GGᵀ, apply, apply_T, (D, coupling))` (see `LinearlyImplicitExtrapolation`)."""
        params, u = state
        flat, unravel = ravel_pytree(params)
        net = self.network(params)
        F = net.outputs(self.X)
        p = self.loss.weights(F, self.y)
        # u relaxes at the rate g e^{−u} (~‖θ‖^K late on) and is driven by θ through
        # −g‖∇ log L‖², whose θ-derivative is as large: both go into W (block triangular).
        D = jnp.append(jnp.zeros_like(flat), self.warp(params) * jnp.exp(-u))
        u_rate = lambda v: self.vector_field(None, (unravel(v), u), None)[1]
        row = jax.grad(u_rate)(flat)
        coupling = lambda x: jnp.append(jnp.zeros_like(flat), jnp.dot(row, x[:-1]))
        R = jnp.sqrt(p)[:, None] * (jnp.eye(p.shape[0]) - p[None, :])
        R = jnp.sqrt(self.warp(params)) * R * self.y[None, :]
        K, apply, apply_T = gauss_newton_factor(self.network, params, self.X, lambda A: R @ A)
        return K, lambda b: apply(b[:-1]), lambda z: jnp.append(apply_T(z), 0.0), (D, coupling)


def _across_kinks(net: LeakyReLUNeuron, X, y, loss: AbstractMarginLoss, solver, rtol, atol, log1p_t_max,
                  max_steps):
    """The first phase of a leaky-ReLU neuron's margin flow (module docstring): its Filippov
    solution in plain time (`_kinks.flow_across_kinks`, with `solver`, `rtol`, `atol` and
    `max_steps`) until `L ≤ ℓ(0)/(2N)`, where every sample's term `ℓ(y_n f_n) ≤ ℓ(0)/2`, so
    every margin is positive and no sample can reach its kink again; or until the time
    horizon. Returns `(network, log(1 + t), steps, rejected steps, result)`."""
    log_handover = loss.log_terms(jnp.zeros((1,), X.dtype))[0] - jnp.log(2.0 * X.shape[0])
    noise_gain = getattr(solver, "noise_gain", 10.0)
    problem, params, t_end, result, stats, _, _, _ = flow_across_kinks(
        net, X, y, loss, solver, rtol, atol, jnp.expm1(log1p_t_max), None, max_steps, None, None,
        jnp.exp(log_handover), noise_gain)
    result = RESULTS.where(result == RESULTS.event_occurred, RESULTS.successful, result)
    steps = stats["num_steps"].astype(jnp.int32)
    return (problem.network(params).neuron(), jnp.log1p(t_end), steps,
            stats["num_rejected_steps"].astype(jnp.int32), result)


def _stop_gaps(problem: MarginFlowProblem, state):
    """`(gap, secant_gap)` of `state` to the stopping rule, from one evaluation of log L.

    `gap`: positive before the rule holds, ≤ `_stop_tolerance` once it does; the smaller of
    `log L − log_target` and `log(1+t_max) − log(1+t)`.
    `secant_gap`: the same in coordinates where it runs about linearly in warped time late in
    the flow: `log(1/L)` and `log(1+t)` grow about exponentially in τ (‖θ‖ does, module
    docstring), so the distance of their logarithms to the level's; +inf where undefined
    (L ≥ 1 or t = 0)."""
    log_loss = problem.log_loss(state[0])
    log1p_t = state[1] - log_loss  # `MarginFlowProblem.log1p_t`
    t_max = problem.log1p_t_max
    gap = jnp.minimum(log_loss - problem.log_target, t_max - log1p_t)
    below_1 = log_loss < 0
    log_l = lambda v: jnp.log(jnp.where(below_1, -v, 1.0))
    by_loss = jnp.where(below_1, log_l(problem.log_target) - log_l(log_loss), jnp.inf)
    timed = jnp.isfinite(t_max) & (log1p_t > 0)
    log_t = lambda v: jnp.log(jnp.where(timed, v, 1.0))
    by_time = jnp.where(timed, log_t(t_max) - log_t(log1p_t), jnp.inf)
    return gap, jnp.minimum(by_loss, by_time)


def _stop_tolerance(problem: MarginFlowProblem):
    """`1000 ε (1 + |level|)`, the level the larger of `|log_target|` and a finite `log(1+t_max)`:
    how closely a solve lands on its stopping rule (`_LandingController`), in log L or log(1+t)."""
    level = jnp.abs(problem.log_target)
    t_max = problem.log1p_t_max
    level = jnp.where(jnp.isfinite(t_max), jnp.maximum(level, jnp.abs(t_max)), level)
    return 1000 * jnp.finfo(jnp.result_type(level)).eps * (1 + level)


#: Landing steps `_LandingController` takes for one crossing before it accepts an overshooting
#: step as it is (each is one solver step; landing takes ~2-6).
LANDING_STEPS = 30


class _LandingController(dfx.AbstractAdaptiveStepSizeController):
    """`controller` (adaptive: it judges every step's error), landing a warped-time solve on
    its stopping rule (`_stop`, `_stop_gaps` of the `MarginFlowProblem` in `args`) instead of at
    the end of the step that crosses it: late steps span several per cent of log L, and
    `until_loss = 1e-100` had stopped at L = 1e-104 (a record level's segment likewise).

    A step the controller accepts but which crosses the rule by more than
    `1000 ε (1 + |level|)` in the gap is rejected, and the crossing is bracketed between the
    current state (gap > 0) and that step's end (gap < 0). Further steps go where the gap's
    secant through the bracket vanishes (regula falsi, with the Anderson–Björck scaling of an end
    kept twice): one that falls short is accepted as an ordinary, shorter step and becomes the
    bracket's lower end, one that crosses again is rejected and becomes its upper end, one
    within the tolerance is accepted and ends the solve (diffrax's event). Every step taken is
    one the controller accepted, no longer than one it accepted before: landing costs a few
    solver steps and no accuracy. After `LANDING_STEPS` the crossing step is accepted as it is."""

    controller: dfx.AbstractAdaptiveStepSizeController

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):  # pyright: ignore[reportIncompatibleMethodOverride]
        return self.controller.norm

    def wrap(self, direction):
        return eqx.tree_at(lambda c: c.controller, self, self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t1, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        nan = jnp.full_like(jnp.asarray(t1, jnp.result_type(t1)), jnp.nan)
        zero = jnp.zeros((), jnp.int32)
        # (the controller's state, the bracket's upper end (time, secant gap), the end replaced last
        # (+1 upper, -1 lower, 0 none), landing steps taken)
        return t1, (inner, nan, nan, zero, zero)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        inner, t_hi, s_hi, side, count = controller_state
        keep, next_t0, next_t1, made_jump, new_inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner)
        tol = _stop_tolerance(args)
        (g0, s0), (g1, s1) = _stop_gaps(args, y0), _stop_gaps(args, y1_candidate)
        # The secant's coordinate: the secant gap where defined at both ends, else the gap itself.
        plain = ~(jnp.isfinite(s0) & jnp.isfinite(s1))
        s0, s1 = jnp.where(plain, g0, s0), jnp.where(plain, g1, s1)
        landing = (t0 < t_hi) & (count < LANDING_STEPS)  # a crossing is bracketed ahead of t0
        crossed = keep & (g0 > tol) & (g1 < -tol) & (count < LANDING_STEPS)
        short = keep & landing & (g1 > tol)
        # Anderson–Björck: an end kept twice in a row has its gap scaled by 1 − (new/old gap at
        # the other end), or halved where that is not positive (Illinois).
        scale = lambda new, old: jnp.where(1 - new / old > 0, 1 - new / old, 0.5)
        s0 = jnp.where(crossed & (side == 1), scale(s1, s_hi) * s0, s0)
        s_hi = jnp.where(short & (side == -1), scale(s1, s0) * s_hi, s_hi)

        def secant(ta, ga, tb, gb):
            h = (tb - ta) * ga / (ga - gb)
            return ta + jnp.clip(h, 1e-9 * (tb - ta), (1 - 1e-9) * (tb - ta))

        keep = keep & ~crossed
        next_t0 = jnp.where(crossed, t0, next_t0)
        next_t1 = jnp.where(short, secant(t1, s1, t_hi, s_hi), next_t1)
        next_t1 = jnp.where(crossed, secant(t0, s0, t1, s1), next_t1)
        new_inner = jax.tree_util.tree_map(lambda a, b: jnp.where(crossed, a, b), inner, new_inner)
        # Landed (accepted within the tolerance, or at the last landing step), or no crossing:
        # the bracket is cleared; else it follows the replaced end.
        active = crossed | short | (landing & ~keep)
        t_hi = jnp.where(crossed, t1, jnp.where(active, t_hi, jnp.nan))
        s_hi = jnp.where(crossed, s1, jnp.where(active, s_hi, jnp.nan))
        side = jnp.where(crossed, 1, jnp.where(short, -1, jnp.where(active, side, 0)))
        count = jnp.where(crossed | short, count + 1, jnp.where(active, count, 0))
        return keep, next_t0, next_t1, made_jump, (new_inner, t_hi, s_hi, side, count), result


def _stop(tau, state, problem: MarginFlowProblem, **kwargs):
    return _stop_gaps(problem, state)[0] <= _stop_tolerance(problem)


def _layer_alignment(net: AbstractNetwork):
    """Ji & Telgarsky (2019) diagnostics of a deep linear fully connected net: for each
    hidden matrix the top-σ² fraction `σ₁²/‖W_l‖_F²` (→ 1: rank-1), and for each pair of
    adjacent layers `|⟨v_{l+1}, u_l⟩|` (→ 1: aligned), where layer l maps by `W_lᵀ`
    with top singular pair (u_l, v_l) and the output layer is `aᵀ`. NaN arrays for
    other networks."""
    if not isinstance(net, FullyConnectedNet):
        return jnp.full((0,), jnp.nan), jnp.full((0,), jnp.nan)
    ratios, us, vs = [], [], []
    for W in net.weights:
        U, S, Vt = jnp.linalg.svd(W.T, full_matrices=False)
        ratios.append(S[0] ** 2 / jnp.sum(S**2))
        us.append(U[:, 0])
        vs.append(Vt[0])
    vs.append(net.a / jnp.linalg.norm(net.a))
    align = [jnp.abs(jnp.dot(vs[l + 1], us[l])) for l in range(len(us))]
    return jnp.stack(ratios), jnp.stack(align)


class MarginRecord(eqx.Module):
    """Diagnostics recorded when the loss first falls below each requested level
    (leading axis: the levels, last one the stopping level).

    - `log_loss`: log L (natural log). `log1p_t`: log(1 + t), t the gradient-flow time.
    - `margin`: minimum margin γ = min_n y_n f(x_n). `normalized_margin`: γ/‖θ‖^K.
    - `direction`: w̃/‖w̃‖ (end-to-end predictor direction).
    - `layer_rank1`, `layer_alignment`: Ji–Telgarsky diagnostics (fully connected only).
    - `num_steps`: cumulative solver steps.
    """

    log_loss: Array
    log1p_t: Array
    margin: Array
    normalized_margin: Array
    direction: Array
    layer_rank1: Array
    layer_alignment: Array
    num_steps: Array


def _diagnostics(problem: MarginFlowProblem, params, log1p_t, steps) -> MarginRecord:
    net = problem.network(params)
    z = problem.y * net.outputs(problem.X)
    gamma = jnp.min(z)
    sq = _sq_norm(params)
    w = net.predictor()
    r1, al = _layer_alignment(net)
    return MarginRecord(
        log_loss=problem.log_loss(params),
        log1p_t=log1p_t,
        margin=gamma,
        normalized_margin=gamma / sq ** (0.5 * problem.degree),
        direction=w / jnp.linalg.norm(w),
        layer_rank1=r1,
        layer_alignment=al,
        num_steps=steps,
    )


class MarginFlowSolution(eqx.Module):
    """Result of `margin_flow`.

    - `network`, `predictor`: θ and w̃ at the stopping time.
    - `log_loss`, `log_loss0`: natural log of the final and initial loss (the loss itself
      underflows float64 below ~1e-308; `loss` gives it where representable).
    - `margin`, `normalized_margin`: min_n y_n f(x_n) and that divided by ‖θ‖^K.
    - `log1p_t`: log(1 + t) at the end (t: gradient-flow time); `tau`: warped time.
    - `num_steps`, `num_rejected_steps`; `invariant_drift` (balancedness, relative).
    - `record`: a `MarginRecord` at each requested loss level.
    - `result`: `RESULTS`; `status` its word.
    """

    network: AbstractNetwork
    predictor: Array
    log_loss: Array
    log_loss0: Array
    margin: Array
    normalized_margin: Array
    log1p_t: Array
    tau: Array
    num_steps: Array
    num_rejected_steps: Array
    invariant_drift: Array
    record: MarginRecord
    result: RESULTS

    @property
    def loss(self):
        return jnp.exp(self.log_loss)

    @property
    def status(self) -> str:
        return status_word(self.result)

    @property
    def converged(self):
        return self.result == RESULTS.successful


_RELU_ONE_SIGN = ("a ReLU neuron (slope 0) outputs a·max(wᵀx, 0), all of one sign, so it cannot separate "
                  "labels of both signs and has no max-margin limit (use a slope > 0)")


def relu_cannot_separate(net: AbstractNetwork, y) -> bool:
    """Whether `net` is a plain ReLU neuron (slope 0) and the concrete labels `y` have both signs:
    a·max(wᵀx, 0) has one sign on every sample, so some margin stays ≤ 0 and L ≥ ℓ(0)/N for all
    t, and no flow reaches a max-margin limit (`margin_flow` and the command line refuse it)."""
    if not (isinstance(net, LeakyReLUNeuron) and net.slope == 0):
        return False
    y = np.asarray(y)
    return bool(np.any(y > 0) and np.any(y < 0))


#: `margin_flow`'s stopping loss level unless one is given (also `ibflow run --until-loss`'s).
DEFAULT_UNTIL_LOSS = 1e-100


def default_record_exponents(stop_exponent: float) -> list[float]:
    """Exponents k = 1, 2, 5, 10, 20, 50, … below `stop_exponent` (levels L = 10^{-k})."""
    out, base = [], 1.0
    while True:
        for m in (1.0, 2.0, 5.0):
            if m * base >= stop_exponent:
                return out
            out.append(m * base)
        base *= 10.0


def margin_flow(
    net: AbstractNetwork,
    X,
    y,
    *,
    loss: AbstractMarginLoss = ExponentialLoss(),
    until_loss: float = DEFAULT_UNTIL_LOSS,
    until_time: float = jnp.inf,
    record_losses=None,
    log_until_loss: float | None = None,
    log_record_losses=None,
    solver: dfx.AbstractSolver | None = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    max_steps: int = 4096,
    throw: bool = True,
) -> MarginFlowSolution:
    """Solve the gradient flow of a margin loss on ±1 labels until `L = until_loss` or
    `t = until_time`, whichever comes first, recording diagnostics at intermediate loss
    levels. The solve lands on each level and on the time to `1000 ε (1 + |level|)` in log L or
    log(1 + t) (`_LandingController`), rather than at the end of the step that crosses it.

    **Arguments:**

    - `net`: initial network (any `AbstractNetwork`; its `degree` K sets the time warp).
    - `X` `(N, d)`, `y` `(N,)` with entries ±1.
    - `loss`: `ExponentialLoss()` (default) or `LogisticLoss()` (mean over samples).
    - `until_loss`: stopping loss level; or `log_until_loss` (natural log) for levels
      below float64's range, e.g. `log_until_loss = -1e4` for L = e^{-10000}.
    - `until_time`: stop at this gradient-flow time instead, if reached first.
    - `record_losses`: decreasing loss levels (above the stopping level) at which a
      `MarginRecord` is taken; default 10^{-k} for k = 1, 2, 5, 10, 20, 50, … above
      the stopping level. `log_record_losses`: the same as natural logs (for levels
      below float64's range).
    - `rtol`, `atol`: tolerances of the PID controller in warped time.
    - `max_steps`: step budget *per recorded segment*.
    - `throw`: raise unless the stopping level or time was reached.

    A `LeakyReLUNeuron` is first solved in plain time across its kinks as a Filippov solution
    (crossing or sliding, as `gradient_flow` does) until `L ≤ ℓ(0)/(2N)`, after which every
    margin stays positive and the flow is smooth, then in warped time (module docstring);
    `num_steps` counts both phases, and a record level above `ℓ(0)/(2N)` is taken at the
    hand-over state (its `log_loss` says where). A plain ReLU neuron (slope 0) has one output
    sign, so labels of both signs raise an error (no max-margin limit exists).

    Vmappable over the network's arrays; new levels or tolerances do not recompile when
    the number of recorded levels is unchanged.
    """
    dtype = jnp.result_type(float)
    # Host arithmetic (`math`), not `jnp`: under `jax.jit` a jnp result is a tracer, and the
    # levels are static (they set the number of recorded segments).
    if log_until_loss is None:
        if not 0 < float(until_loss) < 1:
            raise ValueError(f"the stopping loss level must be below 1 and positive, got until_loss = {until_loss}")
        log_stop = math.log(float(until_loss))
    else:
        log_stop = float(log_until_loss)
    if not log_stop < 0:
        raise ValueError(f"the stopping loss level must be below 1, got log L = {log_stop}")
    if log_record_losses is None and record_losses is not None:
        if not all(float(v) > 0 for v in record_losses):
            raise ValueError("record levels must be > 0")
        log_record_losses = [math.log(float(v)) for v in record_losses]
    if log_record_losses is None:
        levels = [-e * math.log(10.0) for e in default_record_exponents(-log_stop / math.log(10.0))]
    else:
        levels = sorted((float(v) for v in log_record_losses), reverse=True)
        if any(v <= log_stop for v in levels):
            raise ValueError("record levels must all lie above the stopping level")
    # Concrete labels are refused before compiling (traced ones: in `_margin_flow`).
    if not isinstance(y, jax.core.Tracer) and relu_cannot_separate(net, y):
        raise ValueError(f"margin_flow: {_RELU_ONE_SIGN}")
    log_levels = jnp.asarray(levels + [log_stop], dtype)
    return _margin_flow(net, X, y, loss, solver, jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype), log_levels,
                        jnp.asarray(jnp.log1p(until_time), dtype), max_steps, throw, checks_enabled())


@eqx.filter_jit
def _margin_flow(net, X, y, loss, solver, rtol, atol, log_levels, log1p_t_max, max_steps, throw, checks):
    """The jitted body of `margin_flow` (`checks`: static, False when traced inside
    `_checks.host_validated()`: the caller checked X finite and y in {-1, +1} on the host)."""
    net, X, y = check_data(net, X, y, checks)
    if not isinstance(loss, AbstractMarginLoss):
        raise TypeError(f"margin_flow needs a margin loss (exp or logistic), got {type(loss).__name__}")
    y = value_check(y, ~jnp.all(jnp.abs(y) == 1), "classification labels y must be +1 or -1", checks)
    if isinstance(net, LeakyReLUNeuron) and net.slope == 0:
        y = value_check(y, jnp.any(y > 0) & jnp.any(y < 0), f"margin_flow: {_RELU_ONE_SIGN}", checks)
    if solver is None:
        solver = LinearlyImplicitExtrapolation(order_k=5)
    params, frozen = eqx.partition(net, net.trainable())
    problem = MarginFlowProblem(frozen, X, y, loss, net.degree, log_levels[-1], log1p_t_max)
    log_loss0 = problem.log_loss(params)
    zero = jnp.zeros((), jnp.int32)
    if isinstance(net, LeakyReLUNeuron):
        start, log1p_t0, steps0, rejected0, result0 = _across_kinks(net, X, y, loss, solver, rtol, atol,
                                                                    log1p_t_max, max_steps)
        params, _ = eqx.partition(start, start.trainable())
        log_loss_start = problem.log_loss(params)
    else:
        log1p_t0, steps0, rejected0, result0 = jnp.zeros((), X.dtype), zero, zero, RESULTS.successful
        log_loss_start = log_loss0
    state0 = (params, log1p_t0 + log_loss_start)  # u = log((1 + t) L)

    def segment(carry, log_level):
        state, tau, steps, rejected, result = carry
        prob = eqx.tree_at(lambda p: p.log_target, problem, log_level)
        done = _stop(tau, state, prob) | (result != RESULTS.successful)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(prob.vector_field),
            solver,
            t0=tau,
            t1=jnp.where(done, tau, jnp.inf),
            dt0=None,
            y0=state,
            args=prob,
            stepsize_controller=_LandingController(dfx.PIDController(rtol=rtol, atol=atol)),
            event=dfx.Event(_stop),
            saveat=dfx.SaveAt(t1=True),
            max_steps=max_steps,
            throw=False,
        )
        new_state = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
        seg_result = RESULTS.promote(sol.result)
        seg_result = RESULTS.where(seg_result == RESULTS.event_occurred, RESULTS.successful, seg_result)
        seg_result = RESULTS.where(
            (seg_result == RESULTS.max_steps_reached) & (2 * sol.stats["num_rejected_steps"] > sol.stats["num_steps"]),
            RESULTS.stalled, seg_result)
        new_result = RESULTS.where(result == RESULTS.successful, seg_result, result)
        new_steps = steps + sol.stats["num_steps"]
        new_rej = rejected + sol.stats["num_rejected_steps"]
        new_tau = jnp.where(done, tau, sol.ts[-1])
        new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), state, new_state)
        rec = _diagnostics(prob, new_state[0], prob.log1p_t(new_state), new_steps)
        return (new_state, new_tau, new_steps, new_rej, new_result), rec

    carry0 = (state0, jnp.zeros((), X.dtype), steps0, rejected0, result0)
    (state, tau, steps, rejected, result), record = jax.lax.scan(segment, carry0, log_levels)
    params_end, _ = state
    log1p_t = problem.log1p_t(state)
    final = eqx.combine(params_end, frozen)
    log_loss = problem.log_loss(params_end)
    reached = _stop(tau, state, problem)  # within `_stop_tolerance` of the level or horizon
    result = RESULTS.where((result == RESULTS.successful) & ~reached, RESULTS.not_converged, result)
    flat, _ = ravel_pytree(params_end)
    finite = jnp.all(jnp.isfinite(flat)) & jnp.isfinite(log_loss)
    result = RESULTS.where(finite, result, RESULTS.nonfinite_flow)
    # Balancedness is an exact invariant, but the parameters grow like log t, so the
    # drift is measured relative to the current squared parameter scale.
    drift = invariant_drift(net, final, scale=jnp.sum(flat**2))
    last = jax.tree_util.tree_map(lambda a: a[-1], record)
    out = MarginFlowSolution(
        network=final,
        predictor=final.predictor(),
        log_loss=log_loss,
        log_loss0=log_loss0,
        margin=last.margin,
        normalized_margin=last.normalized_margin,
        log1p_t=log1p_t,
        tau=tau,
        num_steps=steps,
        num_rejected_steps=rejected,
        invariant_drift=drift,
        record=record,
        result=result,
    )
    if throw:
        out = result.error_if(out, result != RESULTS.successful)
    return out
