"""The leaky-ReLU neuron's gradient flow across its kinks: a Filippov solution, event by event.

`σ(z) = max(z, ρz)` has a kink at z = 0, so on each hyperplane `z_n = wᵀx_n = 0` of the
training data the flow `θ̇ = −∇L(θ)` is the differential inclusion `θ̇ ∈ −∂L(θ)` (Clarke's
subdifferential, σ'(0) any value in [ρ, 1]), whose solution is Filippov's (Filippov 1988,
*Differential Equations with Discontinuous Righthand Sides*; gradient flows of homogeneous
ReLU-type networks are defined in this sense by Lyu & Li, ICLR 2020). Where the flow
meets a kink from one side and the vector field on the other side points back, it neither
crosses nor stops: it *slides* along the kink, with the sample's output held at 0 and σ'(0)
replaced by the equivalent control λ_n ∈ [ρ, 1] that keeps `ż_n = 0` (Utkin 1992). An
integrator that steps through the kink sees a vector field that flips at every step (ibflow
used to end such flows `stalled` on the kink).

Method (event-driven; each piece smooth):

- Between events every sample has a *side* `s_n`: +1 (slope 1), −1 (slope ρ), or 0 (sliding,
  output 0). The flow is then the smooth gradient flow of the loss with those slopes, with w
  confined to the subspace `{w : x_nᵀw = 0 for every sliding n}`: the network's outputs use
  `Pw` (P the orthogonal projection onto it), so the flow moves w by `−P∇L`, which is
  exactly the sliding motion (the sliding samples' own terms `λ_n c_n x_n` are what P removes,
  whatever λ_n). That flow is solved by the same diffrax solver as any other network's.
- The piece ends at the first zero of `φ = min_n φ_n`: `φ_n = s_n z_n/‖x_n‖` for a sample on a
  side (it reaches its kink), `min(λ_n − ρ, 1 − λ_n)` for a sliding one (its equivalent
  control, `λ_n = v_n/(a ∂L/∂f_n)` with `X_Sᵀv = −(I − P)∇L_rest`, leaves [ρ, 1]). diffrax
  stops on the step where φ changes sign; the zero is then located by a bracketing root
  finder (Illinois, its secant on the sample lowest at the bracket's far end) on
  `τ ↦ φ(y(t_a + τ))`, each trial state solved afresh from that step's
  start `(t_a, y_a)` (kept in the solver state) by the same solver and tolerances: the state at
  the event is on the integrated flow, not an interpolation. The trials run through the same
  compiled `diffeqsolve` as the pieces (a separate root finder holding its own solver step
  compiled in 12-15 s against 9-12 s, 2 cores).
- At the event, for a sample reaching its kink, `ż_n` is computed with its slope-1 and its
  slope-ρ term: if the field on the far side carries it on, it crosses; if the field on its own
  side turns it back, it stays (a touch); if both fields point at the kink (ż_n < 0 with slope 1,
  > 0 with slope ρ), it starts sliding. A sliding sample whose λ_n reaches 1 (or ρ) leaves
  to the slope-1 (slope-ρ) side. Several events at one time are
  taken one after the other (a zero-length piece).

Plain ReLU (ρ = 0), square loss: a sample on the flat side (output 0, no gradient) stays unfit
while it is there, and one sliding on its kink is held at output 0 too (its equivalent control
tends to ρ = 0 as the other samples fit), so the flow may converge to a point that does not fit
them. A piece then solves with those samples' labels set to 0 (`piece_labels`; the same vector
field), so that its stopping rule sees the loss the flow can still reduce, and the flow ends
`RESULTS.dead_samples` at that limit (`finish`).

Conserved: `a² − ‖w‖²` (the neuron's balancedness, Du et al. 2018) holds along every piece,
sliding ones included (`wᵀP∇_wL = a ∂L/∂a` by homogeneity), and is reported as
`FlowSolution.invariant_drift`. Time is the flow's own, as in `gradient_flow`.
"""

from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._losses import SquareLoss
from ._networks import AbstractNetwork, LeakyReLUNeuron
from ._results import RESULTS


class PiecewiseNeuron(AbstractNetwork):
    """The leaky-ReLU neuron on one smooth piece of its flow: every sample's side of its kink
    fixed (`side`: +1 slope 1, −1 slope ρ, 0 sliding), the outputs those of `Pw`, P the
    orthogonal projection off `span{x_n : side_n = 0}` (`basis`: an orthonormal basis of that
    span, zero columns elsewhere; `coef`: C with `basis = X_Sᵀ C`). Only `w` and `a` are
    trained. Its `outputs` hold only for the training data the pattern was built on."""

    is_linear: ClassVar[bool] = False

    w: Float[Array, " d"]
    a: Float[Array, ""]
    side: Float[Array, " N"]
    basis: Float[Array, "d N"]
    coef: Float[Array, "N N"]
    slope: float = eqx.field(static=True)

    @property
    def dim(self) -> int:
        return self.w.shape[0]

    @property
    def degree(self) -> int:
        return 2

    def trainable(self):
        spec = jax.tree_util.tree_map(lambda _: False, self)
        return eqx.tree_at(lambda m: (m.w, m.a), spec, (True, True))

    def projected(self):
        return self.w - self.basis @ (self.basis.T @ self.w)

    def slopes(self):
        return jnp.where(self.side > 0, 1.0, jnp.where(self.side < 0, self.slope, 0.0))

    def outputs(self, X):
        return self.a * self.slopes() * (X @ self.projected())

    def predictor(self):
        return self.a * self.projected()

    def invariants(self):
        return jnp.reshape(self.a**2 - jnp.sum(self.projected() ** 2), (1,))

    def neuron(self) -> LeakyReLUNeuron:
        return LeakyReLUNeuron(self.projected(), self.a, self.slope)


def sliding_basis(X, sliding):
    """`(U, C)`: an orthonormal basis `U = X_Sᵀ C` (d, N) of `span{x_n : sliding_n}` (zero
    columns for the others, and for directions of the Gram matrix below `ε·N·λ_max`)."""
    Xs = X * sliding[:, None]
    lam, Q = jnp.linalg.eigh(Xs @ Xs.T)
    keep = lam > jnp.finfo(lam.dtype).eps * X.shape[0] * lam[-1]
    C = Q * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    return Xs.T @ C, C


def piecewise_neuron(w, a, side, X, slope) -> PiecewiseNeuron:
    U, C = sliding_basis(X, side == 0)
    return PiecewiseNeuron(w, a, side, U, C, slope)


def initial_sides(net: LeakyReLUNeuron, X):
    """Each sample's side at θ(0): +1 where `wᵀx_n > 0`, else −1 (a sample exactly on its kink
    starts on the slope-ρ side; if the flow moves it up, the first step's event says so)."""
    return jnp.where(X @ net.w > 0, 1.0, -1.0)


def equivalent_control(net: PiecewiseNeuron, X, y, loss):
    """`λ_n` (N,) of the sliding samples (meaningless elsewhere): the σ'(0) ∈ [ρ, 1] of each
    sliding sample for which `x_nᵀ∇_wL = 0` (the sliding condition, Filippov 1988 §4)."""
    q = jax.grad(loss)(net.outputs(X), y)  # ∂L/∂f; the sliding samples' outputs are 0
    g_rest = X.T @ (q * net.a * net.slopes())
    v = -(net.coef @ (net.basis.T @ g_rest))  # X_Sᵀ v = −(I − P) g_rest: v_n = λ_n a q_n
    c = net.a * q
    return v / jnp.where(c == 0, 1.0, c)


def event_values(net: PiecewiseNeuron, X, y, loss):
    """`φ_n` (N,): positive while sample n keeps its side (`s_n z_n/‖x_n‖`) or keeps sliding
    (`min(λ_n − ρ, 1 − λ_n)`)."""
    z = (X @ net.projected()) / jnp.linalg.norm(X, axis=1)
    lam = equivalent_control(net, X, y, loss)
    return jnp.where(net.side == 0, jnp.minimum(lam - net.slope, 1.0 - lam), net.side * z)


def event_tolerances(net: PiecewiseNeuron, X):
    """`δ_n` (N,): how far below 0 a `φ_n` may lie from rounding alone (`64 ε √d ‖w‖` for a
    sample on its kink, as a d-term dot product errs by up to ~√d ε‖x‖‖w‖; 1e-11 for an
    equivalent control). The pieces end where `min(φ_n + 2δ_n)` reaches 0,
    and an event is taken for every `φ_n < −δ_n`."""
    eps = jnp.finfo(X.dtype).eps
    return jnp.where(net.side == 0, 1e-11, 64 * eps * jnp.sqrt(X.shape[1]) * jnp.linalg.norm(net.projected()))


def held_samples(side, y, slope: float, loss):
    """`(N,)` bool: the samples whose output a plain ReLU (ρ = 0) holds at 0 on a piece, dead
    (`side` −1: no gradient reaches them) or sliding on their kink (`side` 0), with a nonzero
    label, under the square loss; all False otherwise. Their residual `−y_n` stays for as long
    as they are there; at a limit where the others fit, a sliding one's equivalent control λ_n
    tends to ρ = 0 (`x_nᵀ∇L = 0` with the other samples' gradient vanishing), so it ends
    there too."""
    if slope != 0 or not isinstance(loss, SquareLoss):
        return jnp.zeros(side.shape, bool)
    return (side <= 0) & (y != 0)


def piece_labels(side, y, slope: float, loss):
    """The labels a piece's problem is solved with: `y`, with a held sample's label set to its
    output, 0 (`held_samples`). The vector field is the same (a dead sample's slope is 0, a
    sliding one's term is projected out), but the piece's loss is then the part the flow can
    still reduce, so that its stopping rule, rounding floors and end-game apply to the other
    samples (with the held ones' constant loss counted, a ReLU flow that leaves samples dead
    never reaches its target: it ran into `max_steps`). Events use the true labels."""
    return jnp.where(held_samples(side, y, slope, loss), 0.0, y)


def held_loss(side, y, slope: float, loss):
    """The loss the held samples add to a piece's own (`piece_labels`): `Σ_held y_n² / (2N)`."""
    return 0.5 * jnp.mean(jnp.where(held_samples(side, y, slope, loss), y, 0.0) ** 2)


def finish(piece: PiecewiseNeuron, X, y, loss, result, piece_loss):
    """The outcome of a converged kink flow: `(result, loss)`. A plain ReLU flow whose last piece
    holds samples at output 0 (`held_samples`) converged on the others only:
    `RESULTS.dead_samples` (or `not_converged` if the end-game moved a dead sample past its
    kink, where the flow would have revived it); `loss` adds their constant part to the piece's."""
    held = held_samples(piece.side, y, piece.slope, loss)
    pending = event_values(piece, X, y, loss) < -event_tolerances(piece, X)  # as `take_pending`
    revived = jnp.any(held & (piece.side < 0) & pending)
    converged = result == RESULTS.successful
    result = RESULTS.where(converged & jnp.any(held), RESULTS.dead_samples, result)
    result = RESULTS.where(converged & revived, RESULTS.not_converged, result)
    return result, piece_loss + held_loss(piece.side, y, piece.slope, loss)


#: The event budget of one kink flow, `EVENTS_PER_SAMPLE·N + EXTRA_EVENTS` (read when the flow
#: is traced): past it the flow ends `RESULTS.stalled` (a Zeno-like cascade of events, or a
#: pattern decision that keeps being undone, would otherwise loop without end). The flows
#: measured so far took up to ~50 events at N = 100 (Azulay size) and 15 at N ≤ 24.
EVENTS_PER_SAMPLE, EXTRA_EVENTS = 8, 64


def _time(t):
    return jnp.asarray(t, jnp.result_type(float))


class _KeepStepStart(dfx.AbstractAdaptiveSolver):
    """Wraps a diffrax solver so that its state also holds the start `(t, y)` of the last
    accepted step (diffrax keeps a solver state only from accepted steps): where a piece's event
    fired, the event is located by re-taking that step."""

    solver: dfx.AbstractSolver

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    def order(self, terms):
        return self.solver.order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args), _time(t0), y0

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner, _, _ = solver_state
        y1, err, dense, inner, result = self.solver.step(terms, t0, t1, y0, args, inner, made_jump)
        return y1, err, dense, (inner, _time(t0), y0), result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)


_ROOT_ITERATIONS = 100  # Illinois iterations at most per event (bisection would need ~60)


class _Bracket(eqx.Module):
    """The root finder's state while a piece's end is located: the end lies in `(t_a + lo,
    t_a + hi]`, `φ(y(t_a + lo)) > 0 ≥ φ(y(t_a + hi))` for `φ = min_n φ_n`; `v_lo`, `v_hi` the
    vectors `φ_n + 2δ_n` (N,) there (`values` in `flow_across_kinks`), `g_lo`, `g_hi` the
    Illinois factors on them, `y_hi` the state at hi, `kept` which end stayed last (−1 lo,
    +1 hi), `it` the iterations taken, `tol` how close below 0 φ at hi must be (the smallest
    event tolerance δ_n: the sample that ends the piece is then past its threshold by at most
    δ_n, `event_tolerances`)."""

    t_a: Array
    y_a: object
    lo: Array
    hi: Array
    v_lo: Array
    v_hi: Array
    g_lo: Array
    g_hi: Array
    y_hi: object
    kept: Array
    it: Array
    tol: Array

    def trial(self):
        """The next trial size: the secant point of the bracket, or its middle. The secant is
        taken on one sample's `φ_n`, the one lowest at hi (smooth in time within a piece), not
        on their minimum, which bends where the lowest sample changes: right after an event the
        sample that caused it sits at `φ_n ≈ 2δ_n` at lo while another one ends the piece, and
        the minimum's secant crept up from lo by a factor ~3 a trial. Measured (d = 200, N = 40,
        3 random neurons, 70 events): 4-29 trials an event, mean 12.5, on the minimum; 4-9,
        mean 5.6, now; the same events, 37-44 % fewer steps in all."""
        n = jnp.argmin(self.v_hi)
        f_lo, f_hi = self.g_lo * self.v_lo[n], self.g_hi * self.v_hi[n]
        m = self.hi - f_hi * (self.hi - self.lo) / (f_hi - f_lo)
        return jnp.where((m > self.lo) & (m < self.hi), m, 0.5 * (self.lo + self.hi))

    @property
    def phi_hi(self):
        return jnp.min(self.v_hi)

    def update(self, m, v_m, y_m):
        """Illinois (modified regula falsi, Dowell & Jarratt 1971): the bracket after the trial at
        `t_a + m` gave `v_m`, halving the factor on the end that is kept for the second time in
        a row."""
        right = jnp.min(v_m) <= 0  # the zero lies in (lo, m]
        one = jnp.ones_like(self.g_lo)
        g_lo = jnp.where(right, jnp.where(self.kept == -1, 0.5 * self.g_lo, self.g_lo), one)
        g_hi = jnp.where(right, one, jnp.where(self.kept == 1, 0.5 * self.g_hi, self.g_hi))
        pick = lambda u, v: jax.tree_util.tree_map(lambda p, q: jnp.where(right, p, q), u, v)
        return _Bracket(self.t_a, self.y_a, jnp.where(right, self.lo, m), jnp.where(right, m, self.hi),
                        pick(self.v_lo, v_m), pick(v_m, self.v_hi), g_lo, g_hi, pick(y_m, self.y_hi),
                        jnp.where(right, -1, 1).astype(self.kept.dtype), self.it + 1, self.tol)

    def located(self):
        """Whether φ at hi lies within `tol` below 0, or the bracket is as narrow as the time's
        rounding, or the iterations are spent."""
        eps = jnp.finfo(self.hi.dtype).eps
        return ((self.phi_hi >= -self.tol) | (self.hi - self.lo <= 4 * eps * (self.t_a + self.hi))
                | (self.it >= _ROOT_ITERATIONS))


class _NeuronWarp(eqx.Module):
    """A time warp `g(net)` of the leaky-ReLU neuron, applied to a piece's `PiecewiseNeuron`."""

    warp: object = eqx.field(static=True)

    def __call__(self, net: PiecewiseNeuron):
        return self.warp(net.neuron())


def _take_event(w, a, side, X, y, loss, slope):
    """The one pending event (`φ_n < −δ_n`) with the lowest `φ_n + 2δ_n`, taken at (w, a):
    the sample's new side (crossing, touching, starting or ending a slide); w projected onto the
    new pattern's subspace (and onto the kink of a sample that reached it: a move of a few δ_n)."""
    net = piecewise_neuron(w, a, side, X, slope)
    vals, tol = event_values(net, X, y, loss), event_tolerances(net, X)
    n = jnp.argmin(jnp.where(vals < -tol, vals + 2 * tol, jnp.inf))
    x = X[n]

    def zdot(s):  # ż_n with sample n on side s (its gradient term with slope 1 or ρ)
        net_s = eqx.tree_at(lambda m: m.side, net, side.at[n].set(s))
        g = jax.grad(lambda v: loss(eqx.tree_at(lambda m: m.w, net_s, v).outputs(X), y))(w)
        return -(x @ g)

    into_plus, into_minus = zdot(1.0) > 0, zdot(-1.0) < 0
    reached = jnp.where(into_plus & into_minus, -side[n],  # repelled by the kink: carry on
                        jnp.where(into_plus, 1.0, jnp.where(into_minus, -1.0, 0.0)))
    lam = equivalent_control(net, X, y, loss)[n]
    new = jnp.where(side[n] == 0, jnp.where(lam > 1.0, 1.0, -1.0), reached)
    side = side.at[n].set(new)
    after = piecewise_neuron(w, a, side, X, slope)
    w = after.projected()
    # A sample that reached its kink and keeps a side is put on it within the new pattern's
    # subspace (along P x_n), so that the projection of the outputs does not move it off again
    # (a separate projection onto the kink, then onto the subspace, left z_n at -2δ_n where the
    # integration's rounding had put w slightly off the subspace: the same event again, without end).
    px = x - after.basis @ (after.basis.T @ x)
    on_kink = (new != 0) & (side[n] != 0) & (x @ px > jnp.finfo(x.dtype).eps * (x @ x))
    w = jnp.where(on_kink, w - px * (x @ w) / jnp.where(on_kink, x @ px, 1.0), w)
    return w, side


def flow_across_kinks(net: LeakyReLUNeuron, X, y, loss, solver, rtol, atol, t_max, dt0, max_steps: int, save_ts,
                      warp, target, noise_gain):
    """The gradient flow of a leaky-ReLU neuron as a Filippov solution (module docstring): smooth
    pieces solved by `solver` under diffrax's `PIDController(rtol, atol)`, joined at located
    events. Called by `gradient_flow` for every `LeakyReLUNeuron` (any loss, warp or save times);
    jit- and vmap-safe (a vmapped batch runs its pieces in lock-step).

    Returns `(problem, params, t_end, result, stats, stopped, ts, trajectory)`: the last
    piece's `GradientFlowProblem` (a `PiecewiseNeuron`'s) and its parameters, the final time, an
    ibflow `RESULTS` item (`stalled` past the event budget, `EVENTS_PER_SAMPLE·N +
    EXTRA_EVENTS`), the step counts summed over the pieces, whether the convergence event
    fired, and the trajectory at `save_ts` (or Nones).

    `max_steps` bounds the steps of all pieces together (the last piece may overrun it by up to
    `max_steps`), and reaching it is `max_steps`."""
    # Imported here: _flow calls this module.
    from ._flow import GradientFlowProblem, _converged, _vector_field, save_at, solve_end

    slope = net.slope
    max_events = EVENTS_PER_SAMPLE * X.shape[0] + EXTRA_EVENTS
    warp = None if warp is None else _NeuronWarp(warp)
    terms = dfx.ODETerm(_vector_field)
    wrapped = _KeepStepStart(solver)

    def values(params, problem):
        """`φ_n + 2δ_n` (N,), with the true labels (a piece's own may differ, `piece_labels`)."""
        net = problem.network(params)
        return event_values(net, X, y, loss) + 2 * event_tolerances(net, X)

    def piece_ends(t, params, problem, **kwargs):
        """diffrax event: `min_n(φ_n + 2δ_n)`, which falls through 0 where a piece ends."""
        return jnp.min(values(params, problem))

    event = dfx.Event([_converged, piece_ends], direction=[None, False])
    int_dtype = jnp.asarray(0).dtype

    def problem_for(w, a, side):
        pnet = piecewise_neuron(w, a, side, X, slope)
        params, frozen = eqx.partition(pnet, pnet.trainable())
        labels = piece_labels(side, y, slope, loss)
        return GradientFlowProblem(frozen, X, labels, loss, target, warp, noise_gain), params

    def take_pending(w, a, side, events, locating):
        def pending(c):
            w, a, side, events = c
            pnet = piecewise_neuron(w, a, side, X, slope)
            due = jnp.any(event_values(pnet, X, y, loss) < -event_tolerances(pnet, X))
            return ~locating & due & (events < max_events)

        def take(c):
            w, a, side, events = c
            w, side = _take_event(w, a, side, X, y, loss, slope)
            return w, a, side, events + 1

        return jax.lax.while_loop(pending, take, (w, a, side, events))

    if save_ts is None:
        traj0 = None
    else:
        traj0 = (jnp.full(save_ts.shape, jnp.inf, X.dtype), jnp.full(save_ts.shape + (X.shape[1],), jnp.inf, X.dtype))

    def body(c):
        w, a, side, t, steps, accepted, rejected, events, _, _, _, traj, locating, br, h_next = c
        w, a, side, events = take_pending(w, a, side, events, locating)
        problem, params = problem_for(w, a, side)
        # One diffeqsolve serves both: a piece from (t, θ) on to t_max, starting with the step size
        # the last piece ended with, or, while a piece's end is located, one trial step from the
        # start (t_a, θ_a) of the step in which φ fell through 0, to t_a + m (shorter than that
        # accepted step, so accepted too; one compiled solver step where a separate root finder
        # needs two).
        m = br.trial()
        t0 = jnp.where(locating, br.t_a, t)
        y0 = jax.tree_util.tree_map(lambda u, v: jnp.where(locating, u, v), br.y_a, params)
        t1 = jnp.where(locating, br.t_a + m, t_max)
        dt0_ = jnp.where(locating, m, h_next)
        ts_piece = None if save_ts is None else jnp.clip(save_ts, t0, t1)
        sol = dfx.diffeqsolve(terms, wrapped, t0=t0, t1=t1, dt0=dt0_, y0=y0, args=problem,
                              stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol, step_ts=ts_piece),
                              event=event, saveat=save_at(ts_piece, solver_state=True), max_steps=max_steps,
                              throw=False)
        end, t_stop = solve_end(sol, save_ts)
        stat = lambda k: sol.stats[k].astype(int_dtype)
        steps = steps + stat("num_steps")
        accepted, rejected = accepted + stat("num_accepted_steps"), rejected + stat("num_rejected_steps")
        event_fired = sol.result == dfx.RESULTS.event_occurred
        stopped = ~locating & event_fired & sol.event_mask[0]
        piece_ended = ~locating & event_fired & ~sol.event_mask[0] & sol.event_mask[1]

        # A piece that ended opens a bracket; a trial step narrows it.
        _, t_a, y_a = sol.solver_state
        v_end, one = values(end, problem), jnp.ones_like(t)
        opened = _Bracket(t_a, y_a, jnp.zeros_like(t), t_stop - t_a, values(y_a, problem), v_end, one, one, end,
                          jnp.asarray(0), jnp.asarray(0), jnp.min(event_tolerances(problem.network(params), X)))
        narrowed = br.update(t_stop - br.t_a, v_end, end)
        br = jax.tree_util.tree_map(lambda u, v: jnp.where(locating, u, v), narrowed, opened)
        bracketing = locating | piece_ended
        found = bracketing & br.located()
        # Where the end is found, the flow goes on from it (taking its event first).
        t_new = jnp.where(found, br.t_a + br.hi, jnp.where(bracketing, t, t_stop))
        params_new = jax.tree_util.tree_map(lambda u, v, p: jnp.where(found, u, jnp.where(bracketing, p, v)),
                                            br.y_hi, end, params)
        if traj is not None:
            # Steps land on the save times, so none lies inside the step that crossed: the piece's
            # saves hold up to that step's start.
            valid = ~locating & (save_ts >= t) & (save_ts <= jnp.where(piece_ended, t_a, t_stop))
            saved = (sol.ys[1][0] + held_loss(side, y, slope, loss), sol.ys[1][1])  # the whole loss
            traj = jax.tree_util.tree_map(
                lambda old, new: jnp.where(valid.reshape(valid.shape + (1,) * (new.ndim - 1)), new, old), traj,
                saved)
        result = RESULTS.where(bracketing, RESULTS.successful, RESULTS.promote(sol.result))
        result = RESULTS.where(stopped, RESULTS.event_occurred, result)
        result = RESULTS.where(bracketing & (steps >= max_steps), RESULTS.max_steps_reached, result)
        # Past the event budget, pending events are no longer taken and the pattern may be wrong:
        # whatever the piece did, the flow is not followed any more.
        result = RESULTS.where(events >= max_events, RESULTS.stalled, result)
        done = ~bracketing | (steps >= max_steps) | (events >= max_events)
        h_next = jnp.where(piece_ended, t_stop - t_a, h_next)
        return (params_new.w, params_new.a, side, t_new, steps, accepted, rejected, events, done, stopped, result,
                traj, bracketing & ~found, br, h_next)

    zero = jnp.zeros((), int_dtype)
    side0 = initial_sides(net, X)
    _, params0 = problem_for(net.w, net.a, side0)
    t_0, one = jnp.zeros((), X.dtype), jnp.ones((), X.dtype)
    ones = jnp.ones(X.shape[0], X.dtype)
    bracket0 = _Bracket(t_0, params0, t_0, one, ones, -ones, one, one, params0, zero, zero, one)
    if dt0 is None:  # diffrax's initial step-size heuristic (Hairer, Nørsett & Wanner I §II.4)
        problem0, _ = problem_for(net.w, net.a, side0)
        controller = dfx.PIDController(rtol=rtol, atol=atol)
        t_next, _ = controller.init(terms, t_0, t_max, params0, None, problem0, solver.func, solver.error_order(terms))
        dt0 = t_next - t_0
    carry = (net.w, net.a, side0, t_0, zero, zero, zero, zero, jnp.asarray(False), jnp.asarray(False),
             RESULTS.successful, traj0, jnp.asarray(False), bracket0, jnp.asarray(dt0, X.dtype))
    carry = jax.lax.while_loop(lambda c: ~c[8], body, carry)
    w, a, side, t_end, steps, accepted, rejected, events, _, stopped, result, traj, _, _, _ = carry
    problem, params = problem_for(w, a, side)
    stats = dict(num_steps=steps, num_accepted_steps=accepted, num_rejected_steps=rejected, num_events=events)
    ts = None if save_ts is None else jnp.where(jnp.isfinite(traj[0]), save_ts, jnp.inf)
    return problem, params, t_end, result, stats, stopped, ts, traj
