"""The exact gradient flow `dθ/dt = −∇_θ L(θ)`, solved with diffrax to certified convergence.

Time is the flow's own time t for the loss as given (square loss: 1/(2N)
normalisation, Azulay et al. 2021 §2). The solve stops when the loss has fallen
to `max(loss_rtol·L(θ(0)), loss floor)` (default `loss_rtol = 1e-24`); diffrax's
vector-field steady-state event alone is not used because it fires on the long
plateaus of small-initialisation flows. For the square loss the integration stops at the
latest where rounding noise alone moves the loss (`stop_level`), an end-game jumps to the
limit of the linearised flow (`kernel_jump`, a Gauss–Newton step whose error is second order
in the residual), and a target below the rounding floor of the limit (`evaluation_floor`) is
replaced by that floor: `ReducedFlowProblem` in reduced mode, `GradientFlowProblem` in pure mode.
The leaky-ReLU neuron, whose vector field jumps on its kinks, is integrated piece by piece as a
Filippov solution (`_kinks.flow_across_kinks`), with the same solver, events and end-game.
"""

from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from ._checks import checks_enabled, value_check
from ._kinks import PiecewiseNeuron, finish, flow_across_kinks
from ._losses import AbstractLoss, SquareLoss
from ._networks import AbstractNetwork, LeakyReLUNeuron
from ._results import RESULTS, status_word
from ._solver import LinearlyImplicitExtrapolation


class _KernelEndGame(eqx.Module):
    """The end-game shared by the flows of the square loss, whose limit has zero residual:
    `end_game` iterates the problem's `kernel_jump` (the limit of the flow linearised at the
    state), and needs `loss_value`, `evaluation_floor`, `kernel_jump`, `target` and (for
    `noise_stop_level`) `noise_gain`."""

    def noise_stop_level(self, noise):
        """`max(target, ½ mean((_FLOOR_FACTOR · noise_gain · ε · noise)²))`: the loss level at
        which rounding noise of size `ε·noise` (N,) in the outputs, amplified by the solver's
        `noise_gain`, is all the integration still moves (each problem's `stop_level` gives
        its own `noise`)."""
        eps = jnp.finfo(noise.dtype).eps
        return jnp.maximum(self.target, 0.5 * jnp.mean((_FLOOR_FACTOR * self.noise_gain * eps * noise) ** 2))

    def end_game(self, state, jump):
        """The end-game once the integration has stopped at `state` (`jump`: the stopping
        event fired): `kernel_jump`s while the loss is above `max(target, evaluation_floor)`
        and each lowers it, at most `_MAX_JUMPS` in all. Returns the final state and that loss
        level (the floor evaluated once, at the stopped state: the jumps move the state by
        1e-9 … 1e-5 relative, and the floor is an estimate to a factor of 100 anyway; inside the
        loop it added 0.3-0.4 s of compilation). The first jump is taken whatever its loss
        where the flow is the gradient ascent of a strictly concave function (reduced mode,
        `first_jump_trusted`), else only when it lowers the loss.

        Reduced mode: one jump is enough on the Azulay §9 problem (d = 1000, N = 100); with a
        square X (d = N = 100, cond 530, α ≤ 1e-3) the integration stops at a loss set by its
        noise floor, and the first jump left the loss ~1e-18 at the sweep's rtol 1e-4 and ~1e-14
        at the default 1e-10: limits 1e-9 and 2e-7 off `X⁻¹y`, the exact one."""
        target = jnp.maximum(self.target, self.evaluation_floor(state))
        first = self.first_jump_trusted

        def cond(carry):
            return carry[3]

        def body(carry):
            state, loss, it, _ = carry
            new = self.kernel_jump(state)
            loss_new = self.loss_value(new)
            accept = ((it == 0) & first) | (loss_new < loss)
            state = jax.tree_util.tree_map(lambda n, o: jnp.where(accept, n, o), new, state)
            loss = jnp.where(accept, loss_new, loss)
            return state, loss, it + 1, accept & (loss > target) & (it + 1 < _MAX_JUMPS)

        loss0 = jnp.asarray(jnp.inf, target.dtype) if first else self.loss_value(state)
        return jax.lax.while_loop(cond, body, (state, loss0, 0, jump))[0], target


_NOISE_PROBES = 4  # random-sign probes of `GradientFlowProblem.output_noise`


def _psd_pinv_apply(M, b):
    """`M⁺b` for a symmetric PSD `M` (n×n) through its eigendecomposition; eigen-directions below
    `ε·n·λ_max` (rounding, not curvature) are left out. The end-games' Newton steps
    (`kernel_jump`)."""
    lam, Q = jnp.linalg.eigh(M)
    keep = lam > jnp.finfo(lam.dtype).eps * lam.shape[0] * lam[-1]
    return Q @ (jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0) * (Q.T @ b))


class GradientFlowProblem(_KernelEndGame):
    """A network's trainable parameters, its frozen part, the data and the loss.

    Passed as `args` to diffrax; provides the vector field `−∇L` and the
    Gauss–Newton factor used by `LinearlyImplicitExtrapolation`. For the square loss it also
    provides the rounding-noise floor of the integration (`stop_level`) and the end-game
    (`kernel_jump`, `end_game`), as `ReducedFlowProblem` does for the reduced flow.
    """

    frozen: AbstractNetwork
    X: Float[Array, "N d"]
    y: Float[Array, " N"]
    loss: AbstractLoss
    target: Float[Array, ""]
    warp: object = eqx.field(static=True, default=None)
    noise_gain: float = eqx.field(static=True, default=10.0)
    first_jump_trusted: ClassVar[bool] = False

    def network(self, params) -> AbstractNetwork:
        return eqx.combine(params, self.frozen)

    def loss_value(self, params):
        return self.loss(self.network(params).outputs(self.X), self.y)

    def gradient(self, params):
        return jax.grad(self.loss_value)(params)

    def stopped(self, t, params):
        """The stopping event: the loss has reached `stop_level`."""
        return self.loss_value(params) <= self.stop_level(params)

    def output_noise(self, params):
        """`(N,)`: how far a relative error of every parameter moves the outputs,
        `(Σ_i J_ni² θ_i²)^{1/2}` (J: the outputs' Jacobian), estimated as the root mean square
        of `J(θ∘z)` over `_NOISE_PROBES` fixed random-sign vectors z (one linearisation, one
        jvp per probe; no Jacobian is formed). Used for the square loss only (`stop_level`,
        `evaluation_floor`)."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(0), (_NOISE_PROBES, len(leaves)))
        tangents = treedef.unflatten([
            x * jax.vmap(lambda k: jax.random.rademacher(k, x.shape, x.dtype))(keys[:, i]) for i, x in enumerate(leaves)
        ])
        _, jvp = jax.linearize(lambda p: self.network(p).outputs(self.X), params)
        return jnp.sqrt(jnp.mean(jax.vmap(jvp)(tangents) ** 2, axis=0))

    def stop_level(self, params):
        """The loss level at which the integration stops: `max(target, floor(θ))`.

        Square loss only (other losses: the target). The floor is the square loss of the
        output noise that rounding puts into the state: every parameter errs by about `ε|θ_i|`
        at each sub-step, which moves the outputs by about `ε·output_noise(θ)`, and an
        extrapolation solver amplifies sub-step errors by up to its `noise_gain` (21529 at
        order 8). Found on an H200 (fifteenth session): a fully connected net with hidden
        width 1 at α = 100 (d = 12, N = 5, outputs ~100) stalled at a loss of 1.8e-22 against
        the target 8e-25 and ran into max_steps, while t grew to 1e15; on the CPU the same
        flow converged, and other initialisations (α = 100…1000) stalled there too."""
        if not isinstance(self.loss, SquareLoss):
            return self.target
        return self.noise_stop_level(self.output_noise(params) + jnp.abs(self.y))

    def evaluation_floor(self, params):
        """The loss that rounding the parameters and the labels alone leaves:
        `½ (4ε)² mean(output_noise² + y²)`; `gradient_flow` counts a pure-mode flow of the
        square loss as converged when its loss reaches `max(target, evaluation_floor)` after
        the end-game, and reports that level as `loss_target`."""
        eps = jnp.finfo(self.y.dtype).eps
        return 0.5 * _FLOOR_FACTOR**2 * eps**2 * jnp.mean(self.output_noise(params) ** 2 + self.y**2)

    def kernel_jump(self, params):
        """The limit of the flow linearised at θ: `θ − J⁺r` (r: the residual, J: the outputs'
        Jacobian; a time warp g(θ) > 0 only rescales time, so the same limit), one
        Gauss–Newton step. Its distance to the exact limit is second order in the residual;
        it removes the rounding noise that the integration leaves (`stop_level`). Square loss
        only. Eigen-directions of `JJᵀ` below `ε·N·λ_max` are left alone."""
        K, _, apply_T = gauss_newton_factor(self.network, params, self.X, lambda A: A)
        r = self.network(params).outputs(self.X) - self.y
        flat, unravel = ravel_pytree(params)
        return unravel(flat - apply_T(_psd_pinv_apply(K, r)))

    def warp_factor(self, params):
        """g(θ) > 0 of a time-warped flow `θ̇ = −g(θ)∇L(θ)` (Azulay §5); 1 by default."""
        if self.warp is None:
            return jnp.ones((), self.y.dtype)
        return self.warp(self.network(params))

    def gauss_newton(self, params):
        """The Gauss–Newton factor `G = C^{1/2} J` (J: `(N, P)` Jacobian of the outputs
        w.r.t. the flattened parameters, C: loss curvature), as
        `(K, apply, apply_T)` (see `gauss_newton_factor`).
        """
        net = self.network(params)
        c = jnp.sqrt(self.loss.curvature(net.outputs(self.X), self.y))
        c = c * jnp.sqrt(self.warp_factor(params))
        return gauss_newton_factor(self.network, params, self.X, lambda A: c[:, None] * A)


_FLOOR_FACTOR = 4.0  # safety factor on the rounding-noise floors (`noise_stop_level`, `evaluation_floor`)
_RESOLVED_TIME = 1e30  # t·tr(M) past which `ReducedFlowProblem.resolved` ends the integration


class ReducedFlowProblem(_KernelEndGame):
    """The same gradient flow in N coordinates, for networks with a closed-form flow map.

    With a diagonal predictor kernel, θ moves only through `z(t) = ∫₀ᵗ ∇_w̃ L = Xᵀa(t)`
    (`AbstractNetwork.flow_map`: `θ(t) = Φ(θ(0), z(t))` exactly), so the flow is the
    N-dimensional ODE `ȧ = ∂ℓ/∂f (X w̃(Φ(θ(0), Xᵀa)))`, `a(0) = 0` (ℓ: the loss as a
    function of the outputs f = Xw̃). Its Jacobian is `−C X diag(k) Xᵀ` (C = 1/N for the
    square loss, k the predictor kernel), the same stiff spectrum as the parameter flow's
    Gauss–Newton term, given here whole as `stiff_matrix` (N×N, symmetric PSD).

    This is an exact change of variables, not an approximation: the trajectory θ(Φ(z(t)))
    is the parameter flow's. Used for `SquareLoss` without a time warp.
    """

    net0: AbstractNetwork
    X: Float[Array, "N d"]
    y: Float[Array, " N"]
    loss: AbstractLoss
    target: Float[Array, ""]
    noise_gain: float = eqx.field(static=True, default=10.0)
    first_jump_trusted: ClassVar[bool] = True

    def network(self, a) -> AbstractNetwork:
        return self.net0.flow_map()(a @ self.X)

    def loss_value(self, a):
        return self.loss(self.network(a).outputs(self.X), self.y)

    def vector_field(self, a):
        return jax.grad(self.loss)(self.network(a).outputs(self.X), self.y)

    def stiff_matrix(self, a, product_dtype=None):
        """`M = X diag(k) Xᵀ / N` at a, in the working precision. With `product_dtype` lower
        than the working precision (e.g. float32 under x64) the N×N×d product runs in it, at
        the highest matmul precision the device offers (no TF32), and M is returned in the
        working precision: the W-matrix of `LinearlyImplicitExtrapolation` (`w_matrix_dtype`).
        None, or a precision no lower than the working one, forms M in the working precision."""
        k = self.network(a).predictor_kernel_diagonal()
        if product_dtype is None or jnp.finfo(product_dtype).bits >= jnp.finfo(self.X.dtype).bits:
            return (self.X * k) @ self.X.T / self.X.shape[0]
        X = self.X.astype(product_dtype)
        M = jnp.matmul(X * k.astype(product_dtype), X.T, precision=jax.lax.Precision.HIGHEST)
        return M.astype(self.X.dtype) / self.X.shape[0]

    def stop_level(self, a):
        """The loss level at which the integration stops: `max(target, floor(a))`.

        The floor is the square loss of the output noise that rounding puts into the state:
        each evaluation of the outputs `X w̃(Φ(Xᵀa))` errs by about
        `ε(|X| diag(k) |X|ᵀ|a| + |X||w̃| + |y|)`, and an extrapolation solver amplifies
        sub-step errors by up to its `noise_gain` (Σ|c_j|n_j of its tableau: 21529 at order 8).
        On the Azulay §9 problem the state then stalls at a loss ~1e-23…1e-20, above the default
        target; `gradient_flow` finishes from there with `kernel_jump`."""
        net = self.network(a)
        k = net.predictor_kernel_diagonal()
        absX = jnp.abs(self.X)
        noise = absX @ (k * (jnp.abs(a) @ absX)) + absX @ jnp.abs(net.predictor()) + jnp.abs(self.y)
        return self.noise_stop_level(noise)

    def evaluation_floor(self, a):
        """The loss that rounding alone leaves at a: the floor under the limit's loss.

        Two errors of float64 arithmetic move the outputs `X w̃(Φ(Xᵀa))` at random: w̃_j errs
        by about ε times the size `m_j` of the terms whose signed sum it is
        (`predictor_rounding_scale`: for a diagonal net at a large scale α the two branches are
        ~α² and cancel to a small w̃), and `z = Xᵀa` by about `ε(Σ_n X_nj² a_n²)^{1/2}`, which
        moves w̃_j by k_j times that (k: the predictor kernel). The loss cannot be told from
        `½ ε² mean(X²(m² + k²·(a²X²)) + y²)`; returned times `_FLOOR_FACTOR²` = 16.
        Measured (Azulay §9 data with d = 1000 and d = N = 100, Gaussian data d = 200, N = 40;
        α from 1e-6 to 10, s up to 0.995): repeated `kernel_jump`s stall at 0.005-0.9 times
        the returned value, and at up to 3e-23 where the relative target 1e-24·L(0) is 4.5e-25.
        `gradient_flow` counts a reduced flow as converged when its loss reaches
        `max(target, evaluation_floor)`, the floor taken where the integration stopped
        (`end_game`), and reports that level as `loss_target`."""
        net = self.network(a)
        m, k = net.predictor_rounding_scale(), net.predictor_kernel_diagonal()
        eps = jnp.finfo(a.dtype).eps
        X2 = self.X**2
        return 0.5 * _FLOOR_FACTOR**2 * eps**2 * jnp.mean(X2 @ (m**2 + k**2 * (a**2 @ X2)) + self.y**2)

    def resolved(self, t, a):
        """Whether the flow has run for so long that float64 cannot resolve any further motion:
        `t · tr(M(a)) ≥ 1e30`. Then `t·λ ≥ 1e30 ε / N ≫ 1` for every eigenvalue λ of the stiff
        matrix above its rounding level `ε λ_max`, so every mode the arithmetic represents has
        decayed; integrating on only moves the state within its rounding noise while t grows
        geometrically (a state stalled just above `stop_level` reached t ~ 1e308 and stopped at
        max_steps). The stopping event fires here too, and `kernel_jump` finishes."""
        trace = jnp.sum(self.network(a).predictor_kernel_diagonal() * jnp.sum(self.X**2, axis=0)) / self.X.shape[0]
        return t * trace >= _RESOLVED_TIME

    def stopped(self, t, a):
        """The stopping event: the loss has reached `stop_level`, or the flow is `resolved`."""
        return (self.loss_value(a) <= self.stop_level(a)) | self.resolved(t, a)

    def kernel_jump(self, a):
        """The limit of the flow linearised at a (the kernel-regime end-game of issue 6):
        `a + M⁺ȧ`, i.e. one Newton step on `ȧ = 0`. Its distance to the exact limit is second
        order in the residual (the flow in a is the gradient ascent of the strictly concave
        `(Ω(Xᵀa) − yᵀa)/N`, `Ω' = w̃∘Φ`, whose maximiser is the flow's limit), and it removes
        the rounding noise the integration leaves."""
        return a + _psd_pinv_apply(self.stiff_matrix(a), self.vector_field(a))


_MAX_JUMPS = 4  # kernel_jump steps of `_KernelEndGame.end_game`


def reducible(net: AbstractNetwork, loss: AbstractLoss, warp=None) -> bool:
    """Whether `gradient_flow(mode="auto")` solves this flow in the reduced N coordinates
    (`ReducedFlowProblem`): a closed-form flow map, the square loss and no time warp."""
    return isinstance(loss, SquareLoss) and warp is None and net.flow_map() is not None


def gauss_newton_factor(network, params, X, left):
    """`G = left(J)` with J the `(N, P)` Jacobian of the outputs `network(params).outputs(X)`
    w.r.t. the flattened parameters and `left` a linear map on its rows (loss curvature
    factor), as `(K, apply, apply_T)`: `K = GGᵀ` (N×N), `apply(b) = Gb`, `apply_T(z) = Gᵀz`.

    For linear networks with a diagonal predictor kernel (diagonal, tied, linear)
    K costs O(N²d) and G is applied by one jvp/vjp of w̃; otherwise J is formed
    by N reverse-mode passes. A P×P matrix is never formed.
    """
    flat, unravel = ravel_pytree(params)
    net = network(params)
    kdiag = net.predictor_kernel_diagonal() if net.is_linear else None
    if kdiag is not None:
        Xc = left(X)
        K = (Xc * kdiag) @ Xc.T
        w_fn = lambda v: network(unravel(v)).predictor()
        _, jvp = jax.linearize(w_fn, flat)
        vjp = jax.linear_transpose(jvp, flat)
        return K, lambda b: Xc @ jvp(b), lambda z: vjp(Xc.T @ z)[0]
    F = lambda v: network(unravel(v)).outputs(X)
    G = left(jax.jacrev(F)(flat))
    return G @ G.T, lambda b: G @ b, lambda z: G.T @ z


def check_data(net: AbstractNetwork, X, y, checks: bool = True):
    """Trace-time shape checks of (X, y) against `net` and a value check that X is finite
    (`checks=False`: a caller that checked it on the host, see `_checks`); returns `(net, X, y)`
    with every floating array of the three in the working precision `jnp.result_type(float)`
    (float64 unless x64 is off), so mixed float32/float64 inputs are promoted rather than
    meeting in the solver (`margin_flow` and `train` had failed on a float32 network with
    float64 data: "carry input and carry output must have equal types"). Callers check y
    (finite, or ±1 for classification)."""
    dtype = jnp.result_type(float)
    X = jnp.asarray(X, dtype)
    y = jnp.asarray(y, dtype)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X must be (N, d) and y (N,) with the same N; got {X.shape} and {y.shape}")
    if X.shape[1] != net.dim:
        raise ValueError(f"X has d = {X.shape[1]} columns but the network has input dimension {net.dim}")
    net = jax.tree_util.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, net)
    return net, value_check(X, ~jnp.all(jnp.isfinite(X)), "X contains NaN or inf", checks), y


def invariant_drift(net0: AbstractNetwork, net1: AbstractNetwork, scale=None):
    """max |I(θ₁) − I(θ₀)| over the conserved quantities, relative to
    `max(1, scale)` (default scale: max |I(θ₀)|); 0 when the network has none."""
    inv0, inv1 = net0.invariants(), net1.invariants()
    if not inv0.size:
        return jnp.zeros((), inv0.dtype)
    scale = jnp.max(jnp.abs(inv0)) if scale is None else scale
    return jnp.max(jnp.abs(inv1 - inv0)) / jnp.maximum(1.0, scale)


def _vector_field(t, params, problem: GradientFlowProblem):
    g = problem.warp_factor(params)
    return jax.tree_util.tree_map(lambda x: -g * x, problem.gradient(params))


def _reduced_vector_field(t, a, problem: ReducedFlowProblem):
    return problem.vector_field(a)


def _converged(t, state, problem, **kwargs):
    return problem.stopped(t, state)


class FlowSolution(eqx.Module):
    """Result of `gradient_flow`.

    **Fields:**

    - `network`: the network at the final time (parameters θ(t_end)).
    - `predictor`: w̃(θ(t_end)).
    - `loss`, `loss0`, `loss_target`: final, initial and target loss (the level `loss` had
      to reach for `converged`: `max(loss_rtol·L(θ(0)), loss.floor(y))`, for the square loss
      at least the rounding floor at the limit, `ReducedFlowProblem.evaluation_floor` or
      `GradientFlowProblem.evaluation_floor`; for `dead_samples`, the level the other samples'
      loss reached, `loss` including the held samples' constant part).
    - `t_end`: final flow time.
    - `num_steps`, `num_accepted_steps`, `num_rejected_steps`, `num_fevals`.
    - `invariant_drift`: max |I(θ(t_end)) − I(θ(0))| / max(1, max |I(θ(0))|) over
      the network's conserved quantities (balancedness).
    - `end_jump`: ‖Δw̃‖/‖w̃‖ of the square loss's end-game (`ReducedFlowProblem.kernel_jump`,
      `GradientFlowProblem.kernel_jump`, which remove the integration's rounding noise: ~1e-13
      on the Azulay §9 grid); 0 for other losses and where the integration did not converge.
    - `result`: a `RESULTS` item; `status` gives its one-word name.
    - `ts`, `trajectory_loss`, `trajectory_predictor`: the trajectory at the
      requested `save_ts` (inf where the flow stopped before that time), or None.
    """

    network: AbstractNetwork
    predictor: Float[Array, "... d"]
    loss: Float[Array, "..."]
    loss0: Float[Array, "..."]
    loss_target: Float[Array, "..."]
    t_end: Float[Array, "..."]
    num_steps: Array
    num_accepted_steps: Array
    num_rejected_steps: Array
    num_fevals: Array
    invariant_drift: Float[Array, "..."]
    end_jump: Float[Array, "..."]
    result: RESULTS
    ts: Array | None = None
    trajectory_loss: Array | None = None
    trajectory_predictor: Array | None = None

    @property
    def status(self) -> str:
        """One-word status (`"converged"`, `"max_steps"`, …) of an unbatched solution."""
        return status_word(self.result)

    @property
    def converged(self):
        return self.result == RESULTS.successful


def default_solver(dtype=jnp.float64, net: AbstractNetwork | None = None):
    """The default stiff solver for states of `dtype` (and, if given, the flow of `net`):
    `LinearlyImplicitExtrapolation(order_k=8)` in float64, a lower order in lower precision,
    and at most order 6 for a `LeakyReLUNeuron`.

    Order 8 measured best on the Azulay §9 grid (20 α × 5 s, d = 1000, N = 100, rtol 1e-10):
    3868 steps in all against 5671 at order 7 (and 3-4× fewer than order 5), with the largest
    error against the dual-Newton limit 1.3e-10 (order 7: 2.1e-10); 16 % less wall time.
    Order 9 became unstable for α ≤ 1e-4 (steps shrink until max_steps).

    The extrapolation amplifies rounding by up to its `noise_gain` (21529 at order 8), and the
    error estimate it feeds the step-size controller carries that noise: in float32
    (ε = 1.2e-7) order 8's estimate is ~3e-3 of the state, every step is rejected and the flow
    stalls where it started. So the order is the largest k ≤ 8 with `noise_gain(k)·ε ≤ 1e-4`:
    8 in float64, 5 in float32 (noise gain 367). Measured in float32 on the §9 problem
    (4 points, rtol 1e-5): order 5 takes 17–37 steps, order 4 25–57, order 3 73–167, order 8
    never converges; every converged limit is 1e-6…2e-6 (float32's rounding) from the float64
    dual-Newton limit. Float32 needs `rtol ≥ 1e-5` or so (order 5 at 1e-6: 36–678 steps).

    A leaky-ReLU neuron's flow is solved piece by piece between kink events (`_kinks`), and
    each event is located by trial steps, so it takes many short steps, where a high order buys
    little, and its program holds the solver's unrolled step inside the event loop. Order 6
    against 8 (float64, default tolerances, 2 cores, random neurons; twentieth session):
    compilation 16.2 against 24.4 s (d = 50, N = 20), 12.2–12.6 against 16.3–16.9 s (d = 300,
    N = 60) and 12.0 against 15.1 s (d = 1000, N = 100); the solves 0.07–0.10 against
    0.06–0.12 s, 1.1–2.7 against 1.3–2.8 s and 10.1–12.2 against 9.4–14.6 s there (1.2–1.9 ×
    the steps, each with 16 vector-field evaluations instead of 29); limits within 3.4e-12 of
    order 8's for ρ = 0.3 and 9e-12 for ρ = 0.05 (both at rtol 1e-10). Order 5 compiles faster
    still (13.4 s at d = 50) but solves twice as slowly there."""
    eps = float(jnp.finfo(dtype).eps)
    top = 6 if isinstance(net, LeakyReLUNeuron) else 8
    order = max(k for k in range(2, top + 1) if LinearlyImplicitExtrapolation(order_k=k).noise_gain * eps <= 1e-4)
    return LinearlyImplicitExtrapolation(order_k=order)


def gradient_flow(
    net: AbstractNetwork,
    X,
    y,
    *,
    loss: AbstractLoss = SquareLoss(),
    solver: dfx.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    loss_rtol: float = 1e-24,
    t_max: float = jnp.inf,
    dt0: float | None = None,
    max_steps: int = 20_000,
    save_ts: Array | None = None,
    warp=None,
    mode: str = "auto",
    throw: bool = True,
) -> FlowSolution:
    """Solve the exact gradient flow `dθ/dt = −∇L(θ)` from `net` to certified convergence.

    **Arguments:**

    - `net`: the initial network θ(0) (any `AbstractNetwork`).
    - `X`: data, shape `(N, d)`, rows are samples. `y`: labels, shape `(N,)`.
    - `loss`: the training loss (default `SquareLoss()`, 1/(2N) normalisation).
    - `solver`: any diffrax solver; default `default_solver` of the working precision
      (`LinearlyImplicitExtrapolation(8)` in float64, 6 for a `LeakyReLUNeuron`, order 5 with
      `IBFLOW_NO_X64=1`; stiff, Woodbury linear algebra). `diffrax.Kvaerno5()` (dense Jacobian) and
      explicit solvers such as `diffrax.Tsit5()` give a "pure" reference mode.
    - `rtol`, `atol`: tolerances of diffrax's `PIDController`; default
      `default_solver_tolerances`: 1e-10 and 1e-12 in float64, 1e-11 and 1e-13 for networks
      of degree ≥ 3 (depth ≥ 3), 1e-5 and 1e-9 in float32 (`IBFLOW_NO_X64=1`).
    - `loss_rtol`: stop when `L(θ) ≤ max(loss_rtol·L(θ(0)), loss.floor(y))` (square loss:
      or the float64 floor at the limit, whichever is higher; see `FlowSolution.loss_target`).
    - `t_max`: time horizon (default ∞); reaching it unconverged is `not_converged`.
    - `max_steps`: step budget; exhausting it is `max_steps` (or `stalled` when most
      steps were rejected).
    - `save_ts`: optional increasing times at which loss and predictor are recorded
      (the solver steps onto them, so the trajectory is step-exact).
    - `warp`: optional `g(net) -> scalar > 0`; solves the time-warped flow
      `θ̇ = −g(θ)∇L(θ)`, which visits the same points (Azulay §5). A hashable function.
    - `mode`: `"pure"` integrates the parameter ODE `dθ/dt = −∇L(θ)` itself; `"reduced"`
      integrates the same flow in the N coordinates `a` of `z = ∫∇_w̃L = Xᵀa`, where the
      network gives θ in closed form (`AbstractNetwork.flow_map`: two-layer diagonal, tied
      depth-2 and linear nets, square loss, no warp; `ReducedFlowProblem`): an exact change
      of variables with an N-dimensional state, so no conserved quantity can drift
      (`invariant_drift` then measures only rounding). `"auto"` (default) takes `"reduced"`
      where it applies, else `"pure"`. The two agree to the tolerances (tested).
    - `throw`: raise on any outcome but convergence (default). With `throw=False`
      the outcome is in `solution.result` / `solution.status`.

    A `LeakyReLUNeuron` is solved across its kinks (`wᵀx_n = 0`) as a Filippov solution: it
    crosses them, or slides along them where the exact flow does (`_kinks`); `num_steps` then
    counts the steps of every piece and of locating each piece's end. With slope ρ = 0 and the
    square loss, a flow that converges while holding samples with nonzero labels at output 0
    (dead, or on their kink) ends with `RESULTS.dead_samples` (`_kinks.held_samples`).

    **Returns:** a `FlowSolution`.

    Works under `jax.jit`, `jax.vmap` and `jit(vmap)` over the network's arrays (e.g. an
    α × s grid of initialisations); new values of the arrays or of the tolerances do not
    recompile. A vmapped adaptive solve steps all members together until the slowest one
    has converged.
    """
    dtype = jnp.result_type(float)
    default_rtol, default_atol = default_solver_tolerances(net, dtype)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    return _gradient_flow(
        net, X, y, loss, solver, jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype),
        jnp.asarray(loss_rtol, dtype), jnp.asarray(t_max, dtype), None if dt0 is None else jnp.asarray(dt0, dtype),
        max_steps, save_ts, warp, _check_mode(mode, net, loss, warp), throw, checks_enabled(),
    )


def default_solver_tolerances(net: AbstractNetwork, dtype=None) -> tuple[float, float]:
    """`gradient_flow`'s default `(rtol, atol)` for `net` in `dtype` (default: JAX's float type).

    - float64: `(1e-10, 1e-12)`; `(1e-11, 1e-13)` for networks of homogeneity degree ≥ 3
      (`AbstractNetwork.degree`: depth-≥3 diagonal, fully connected, convolutional and tensor
      nets). From small initialisations the deeper nets learn incrementally, passing near
      saddles where the flow's own instability magnifies the solver's local errors, so their
      limits move with rtol by far more than two-layer ones. Measured on the parameter ODE
      (seventeenth session, 2 cores):
      - 24 random depth-3 and depth-4 diagonal nets (d 10-60, N 3-30, uniform and random-sign
        initialisations of scale 1e-3 … 0.3), against the same flow at rtol 1e-13: up to
        2.5e-9 off at rtol 1e-10, up to 4.2e-10 at 1e-11, for 1.4-1.9 times the steps;
      - a depth-3 net (d = 25, N = 9, random signs, scale 0.015) against SciPy LSODA at
        rtol 1e-12: 8.3e-9 off at rtol 1e-10, 5.3e-10 at 1e-11 (LSODA 3.4e-10 from ibflow at
        rtol 1e-13; on another depth-3 net Radau at rtol 1e-13 matched rtol 1e-13 to 3.5e-11);
      - random two-layer fully connected, leaky-ReLU and convolutional flows, and depth-3
        fully connected and convolutional ones, up to 1.5e-10 at rtol 1e-10.
      Two-layer diagonal, tied and linear nets are solved in reduced coordinates, whose limits
      do not depend on path errors.
    - float32 (`IBFLOW_NO_X64=1`): `(1e-5, 1e-9)`, where rtol 1e-10 is out of the order-5
      solver's reach (`default_solver`: every step rejected, the flow ends in `max_steps`)."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    if dtype != jnp.float64:
        return 1e-5, 1e-9
    if net.degree >= 3:
        return 1e-11, 1e-13
    return 1e-10, 1e-12


def save_at(save_ts, solver_state: bool = False) -> dfx.SaveAt:
    """The `SaveAt` of a flow's `diffeqsolve`: the final state, and where `save_ts` is given,
    `(loss, predictor)` at those times as a second `SubSaveAt` (read back by `solve_end`)."""
    if save_ts is None:
        return dfx.SaveAt(t1=True, solver_state=solver_state)
    fn = lambda t, p, prob: (prob.loss_value(p), prob.network(p).predictor())
    return dfx.SaveAt(subs=[dfx.SubSaveAt(t1=True), dfx.SubSaveAt(ts=save_ts, fn=fn)], solver_state=solver_state)


def solve_end(sol, save_ts):
    """`(state, t)` where a solve saved with `save_at(save_ts)` ended."""
    ys, ts = (sol.ys, sol.ts) if save_ts is None else (sol.ys[0], sol.ts[0])
    return jax.tree_util.tree_map(lambda a: a[-1], ys), ts[-1]


def _integrate(net, X, y, loss, solver, rtol, atol, t_max, dt0, max_steps, save_ts, warp, reduced, target, noise_gain):
    """One diffrax solve of a smooth flow (the parameter ODE, or the reduced one), until the
    stopping event; returns `(problem, state, t_end, result, stats, stopped, ts, trajectory)` as
    `_kinks.flow_across_kinks` does."""
    params, frozen = eqx.partition(net, net.trainable())
    if reduced:
        problem = ReducedFlowProblem(net, X, y, loss, target, noise_gain)
        state0, vector_field = jnp.zeros_like(y), _reduced_vector_field
    else:
        problem = GradientFlowProblem(frozen, X, y, loss, target, warp, noise_gain)
        state0, vector_field = params, _vector_field

    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        solver,
        t0=0.0,
        t1=t_max,
        dt0=dt0,
        y0=state0,
        args=problem,
        # Steps land on the save times, so the trajectory is step-exact (no interpolation).
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol, step_ts=save_ts),
        event=dfx.Event(_converged),
        saveat=save_at(save_ts),
        max_steps=max_steps,
        throw=False,
    )
    final_state, t_end = solve_end(sol, save_ts)
    ts, traj = (None, None) if save_ts is None else (sol.ts[1], sol.ys[1])
    stopped = sol.result == dfx.RESULTS.event_occurred
    return problem, final_state, t_end, RESULTS.promote(sol.result), sol.stats, stopped, ts, traj


def _check_mode(mode, net, loss, warp) -> bool:
    """True for the reduced coordinates (trace-time checks of `mode`)."""
    if mode not in ("auto", "pure", "reduced"):
        raise ValueError(f"mode must be 'auto', 'pure' or 'reduced', got {mode!r}")
    ok = reducible(net, loss, warp)
    if mode == "reduced" and not ok:
        raise ValueError(
            f"mode='reduced' needs a network with a closed-form flow map (two-layer diagonal, tied depth-2 or "
            f"linear), the square loss and no warp; got {type(net).__name__} with {type(loss).__name__}"
        )
    return ok and mode != "pure"


@eqx.filter_jit
def _gradient_flow(net, X, y, loss, solver, rtol, atol, loss_rtol, t_max, dt0, max_steps, save_ts, warp, reduced,
                   throw, checks):
    """The jitted body of `gradient_flow` (tolerances arrive as arrays; `checks`: static, False
    when traced inside `_checks.host_validated()`)."""
    net, X, y = check_data(net, X, y, checks)
    if solver is None:
        # The working precision, as for the tolerances: with x64 on, float32 inputs are
        # promoted and the flow runs in float64, where order 8 is the right choice (measured on
        # float32 data under x64: 37 steps at order 8 against 216 at order 5, same limit; 6 for
        # a leaky-ReLU neuron, `default_solver`).
        solver = default_solver(jnp.result_type(float), net)
    y = value_check(y, ~jnp.all(jnp.isfinite(y)), "y contains NaN or inf", checks)

    params, frozen = eqx.partition(net, net.trainable())
    probe = GradientFlowProblem(frozen, X, y, loss, jnp.zeros((), X.dtype), warp)
    loss0 = probe.loss_value(params)
    target = jnp.maximum(loss_rtol * loss0, loss.floor(y))
    noise_gain = getattr(solver, "noise_gain", 10.0)
    if isinstance(net, LeakyReLUNeuron):
        # Non-smooth on its kinks: integrated piece by piece, sliding where the flow slides.
        problem, final_state, t_end, result, stats, jump, ts, traj = flow_across_kinks(
            net, X, y, loss, solver, rtol, atol, t_max, dt0, max_steps, save_ts, warp, target, noise_gain)
    else:
        problem, final_state, t_end, result, stats, jump, ts, traj = _integrate(
            net, X, y, loss, solver, rtol, atol, t_max, dt0, max_steps, save_ts, warp, reduced, target, noise_gain)

    if isinstance(loss, SquareLoss):  # every reduced flow's too (`reducible`)
        # End-game: once integration has reached the stop level (the event fired), finish with
        # the linearised flow's limit; status then requires the target (or the rounding floor) below.
        w_before = problem.network(final_state).predictor()
        # A target below what float64 can resolve at the limit is replaced by that floor.
        final_state, target = problem.end_game(final_state, jump)
        final = problem.network(final_state)
        end_jump = jnp.linalg.norm(final.predictor() - w_before) / jnp.maximum(jnp.linalg.norm(w_before), 1e-300)
    else:
        final = problem.network(final_state)
        end_jump = jnp.zeros((), X.dtype)
    loss_end = problem.loss_value(final_state)
    result = RESULTS.where(result == RESULTS.event_occurred, RESULTS.successful, result)
    # Reaching t_max without the stopping event is not convergence, nor (square loss) an
    # end-game jump that left the loss above the target.
    result = RESULTS.where((result == RESULTS.successful) & (loss_end > target), RESULTS.not_converged, result)
    if isinstance(final, PiecewiseNeuron):
        # A plain ReLU's last piece may have left samples dead, its loss theirs excepted.
        result, loss_end = finish(final, X, y, loss, result, loss_end)
        final = final.neuron()
    final_params = eqx.filter(final, net.trainable())
    rejected = stats["num_rejected_steps"]
    result = RESULTS.where(
        (result == RESULTS.max_steps_reached) & (2 * rejected > stats["num_steps"]), RESULTS.stalled, result
    )
    flat_end, _ = ravel_pytree(final_params)
    finite = jnp.all(jnp.isfinite(flat_end)) & jnp.isfinite(loss_end)
    result = RESULTS.where(finite, result, RESULTS.nonfinite_flow)

    drift = invariant_drift(net, final)

    evals_per_step = getattr(solver, "vector_field_evaluations_per_step", jnp.nan)
    out = FlowSolution(
        network=final,
        predictor=final.predictor(),
        loss=loss_end,
        loss0=loss0,
        loss_target=target,
        t_end=t_end,
        num_steps=stats["num_steps"],
        num_accepted_steps=stats["num_accepted_steps"],
        num_rejected_steps=stats["num_rejected_steps"],
        num_fevals=stats["num_steps"] * evals_per_step,
        invariant_drift=drift,
        end_jump=end_jump,
        result=result,
        ts=ts,
        trajectory_loss=None if traj is None else traj[0],
        trajectory_predictor=None if traj is None else traj[1],
    )
    if throw:
        out = result.error_if(out, result != RESULTS.successful)
    return out
