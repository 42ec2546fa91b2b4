"""Implicit-bias potentials Q: mirror maps φ = ∇Q and inverse mirror maps φ⁻¹.

For a linear network trained by gradient flow on the square loss from θ(0), the
theory says `w̃(∞) = argmin Q(w) s.t. X w = y'` where Q depends on the network
and its initialisation (y' = y except for the leaky-ReLU neuron). The KKT
conditions are `∇Q(w̃(∞)) = Xᵀν` for some ν ∈ R^N, with `Xw̃(∞) = y'`.

Normalisation: the separable diagonal potentials below are normalised so that
`φ(w̃(t)) = G(t) := Xᵀ ∫_0^t r` exactly along the flow (r = −∂L/∂F, any loss
normalisation), which makes ν = ∫_0^∞ r; a constant positive factor never
changes the minimiser. Every class names its source and preconditions.
"""

import abc
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._networks import DiagonalNet


class AbstractPotential(eqx.Module):
    """An implicit-bias potential Q with mirror map `φ = ∇Q` and inverse `φ⁻¹`."""

    name: eqx.AbstractClassVar[str]
    source: eqx.AbstractClassVar[str]
    #: φ⁻¹ acts coordinate-wise (its Jacobian is diagonal).
    separable: ClassVar[bool] = True

    @abc.abstractmethod
    def mirror(self, w: Float[Array, " d"]) -> Float[Array, " d"]:
        """φ(w) = ∇Q(w)."""

    @abc.abstractmethod
    def inverse_mirror(self, v: Float[Array, " d"]) -> Float[Array, " d"]:
        """φ⁻¹(v); non-finite outside the range of φ."""

    def value(self, w: Float[Array, " d"]) -> Float[Array, ""]:
        """Q(w), where a closed form is known (else NotImplementedError)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form value")

    def transform_labels(self, y):
        """Labels y' of the constraint `X w = y'` (identity except leaky-ReLU)."""
        return y

    def inverse_mirror_jvp(self, v, dv):
        """Directional derivative of φ⁻¹ (used by the dual Newton solver)."""
        return jax.jvp(self.inverse_mirror, (v,), (dv,))[1]

    def inverse_mirror_and_slope(self, v):
        """`(φ⁻¹(v), diag Dφ⁻¹(v))` of a separable potential, from one evaluation where the
        potential can share it (`DeepDiagonal`: one layer solve); the dual Newton solver
        carries both from one iterate to the next."""
        if not self.separable:
            raise TypeError(f"{type(self).__name__} is not separable: Dφ⁻¹ has no diagonal form")
        return jax.jvp(self.inverse_mirror, (v,), (jnp.ones_like(v),))


def _bisect(fn, target, lo, hi, iters=200):
    """Vectorised bisection for increasing `fn` (elementwise), `fn(lo) ≤ target ≤ fn(hi)`.
    Non-finite values of `fn` count as "too large" above the midpoint's sign."""

    def body(_, lh):
        lo, hi = lh
        mid = 0.5 * (lo + hi)
        f = fn(mid)
        go_up = jnp.where(jnp.isfinite(f), f < target, mid < 0)
        return jnp.where(go_up, mid, lo), jnp.where(go_up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------
# Linear model
# ---------------------------------------------------------------------------------------


class LinearL2(AbstractPotential):
    """`Q(w) = ½‖w − w(0)‖²` for the linear model (GF/GD on least squares converges
    to `argmin ‖w − w(0)‖` s.t. `Xw = y`; Vardi 2023; math.md §5.5). Also the
    "ℓ2 about the initialisation" regime limit (Azulay §7.2, s → 1)."""

    name = "l2-init"
    source = "Vardi (CACM 2023), linear regression; math.md §5.5"
    w0: Float[Array, " d"]

    def value(self, w):
        return 0.5 * jnp.sum((w - self.w0) ** 2)

    def mirror(self, w):
        return w - self.w0

    def inverse_mirror(self, v):
        return self.w0 + v


class L2(AbstractPotential):
    """Minimum ℓ2 norm `½‖w‖²` (kernel/anti-NTK limits: Woodworth α → ∞ with w0 = 1;
    Azulay Thm 6.3 for α → 0 in fully connected nets)."""

    name = "l2"
    source = "Woodworth et al. 2020 (α → ∞); Azulay et al. 2021 Thm 6.3"

    def value(self, w):
        return 0.5 * jnp.sum(w**2)

    def mirror(self, w):
        return w

    def inverse_mirror(self, v):
        return v


class WeightedL2(AbstractPotential):
    """`½ Σ_i w_i² / k_i`: the RKHS norm of the tangent kernel at initialisation for
    diagonal nets (NTK regime, Azulay §4 "k → ∞" and §7.1; Woodworth §1.4).
    `k_i` is the per-coordinate tangent kernel at θ(0) (its scale is irrelevant)."""

    name = "ntk"
    source = "Azulay et al. 2021 §4 (NTK limit of Thm 4.1); math.md §1.4, §2.4"
    k: Float[Array, " d"]
    w0: Float[Array, " d"]

    def value(self, w):
        return 0.5 * jnp.sum((w - self.w0) ** 2 / self.k)

    def mirror(self, w):
        return (w - self.w0) / self.k

    def inverse_mirror(self, v):
        return self.w0 + self.k * v


class NTKMatrix(AbstractPotential):
    """`½ (w − w̃0)ᵀ B (w − w̃0)` with `B ∝ (a0² I + w0 w0ᵀ)⁻¹` (Azulay et al. 2021, §7.2 and
    App. G: the NTK limit of Thm 6.1 for α → ∞, `B = I − (1−s)²/(2(1+s²)) u uᵀ` up to a
    factor). Tangent kernel `K(x, x') = xᵀB⁻¹x'`."""

    name = "ntk"
    source = "Azulay et al. 2021 §7.2, Appendix G"
    separable: ClassVar[bool] = False
    Binv: Float[Array, "d d"]
    w0: Float[Array, " d"]

    def value(self, w):
        return 0.5 * (w - self.w0) @ jnp.linalg.solve(self.Binv, w - self.w0)

    def mirror(self, w):
        return jnp.linalg.solve(self.Binv, w - self.w0)

    def inverse_mirror(self, v):
        return self.w0 + self.Binv @ v


# ---------------------------------------------------------------------------------------
# Diagonal networks
# ---------------------------------------------------------------------------------------


class UntiedDiagonal(AbstractPotential):
    """Two-layer untied diagonal net, general (biased) initialisation.

    Azulay et al. 2021 Thm 4.1 (unbiased, `w̃(0) = 0`) and its biased extension
    (Azulay App. B, rederived and checked in math.md §2.3). With, per coordinate,
    `N = u₊² + v₊² + u₋² + v₋²`, `w̃0 = u₊v₊ − u₋v₋` at t = 0,
    `κ = ½√(N² − 4w̃0²)` and `c = artanh(2w̃0/N)`:

    `φ(w) = ½[arcsinh(w/κ) − c]`,  `φ⁻¹(v) = κ sinh(2v + c)`.

    Unbiased: `κ = u² + v² = √k/2` (Thm 4.1's `q_k`). Precondition `κ > 0`.
    """

    name = "azulay-diagonal"
    source = "Azulay et al. ICML 2021, Thm 4.1 and App. B; math.md §2.2-§2.3, §6"
    kappa: Float[Array, " d"]
    c: Float[Array, " d"]

    def value(self, w):
        # Q_i(w) = ½[w arcsinh(w/κ) − √(w² + κ²) + κ] − (w/2) c   (math.md §2.3)
        k = self.kappa
        return jnp.sum(0.5 * (w * jnp.arcsinh(w / k) - jnp.sqrt(w**2 + k**2) + k) - 0.5 * w * self.c)

    def mirror(self, w):
        return 0.5 * (jnp.arcsinh(w / self.kappa) - self.c)

    def inverse_mirror(self, v):
        return self.kappa * jnp.sinh(2 * v + self.c)


class TiedDiagonal(AbstractPotential):
    """Woodworth et al. (COLT 2020) tied net `w̃ = w₊^D − w₋^D`, any init `w₊(0) = p`,
    `w₋(0) = m` (p, m > 0), any depth D ≥ 2.

    Along GF `ẇ± = ±D w±^{D−1} g`, so (math.md §1.2, §1.5, rederived per coordinate):
    D = 2: `φ⁻¹(v) = p² e^{4v} − m² e^{−4v}` (Thm 1: `2α²w0² sinh(4v)` for p = m = αw0);
    D ≥ 3: `φ⁻¹(v) = (p^{2−D} − D(D−2)v)^{−D/(D−2)} − (m^{2−D} + D(D−2)v)^{−D/(D−2)}`
    on `−m^{2−D} < D(D−2)v < p^{2−D}` (Thm 3: `α^D h_D(…)`). φ by bisection
    (closed form `¼ arcsinh(w/(2p²))` when D = 2 and p = m).
    """

    name = "woodworth-tied"
    source = "Woodworth et al. COLT 2020, Thms 1 and 3; math.md §1.2-§1.5"
    p: Float[Array, " d"]
    m: Float[Array, " d"]
    depth: int = eqx.field(static=True)

    def _range(self):
        D = self.depth
        if D == 2:
            return -jnp.full_like(self.p, 200.0), jnp.full_like(self.p, 200.0)
        k = D * (D - 2)
        return -(self.m ** (2 - D)) / k, self.p ** (2 - D) / k

    def inverse_mirror(self, v):
        D = self.depth
        if D == 2:
            return self.p**2 * jnp.exp(4 * v) - self.m**2 * jnp.exp(-4 * v)
        k, e = D * (D - 2), -D / (D - 2)
        bp = self.p ** (2 - D) - k * v
        bm = self.m ** (2 - D) + k * v
        ok = (bp > 0) & (bm > 0)
        out = jnp.where(ok, jnp.where(ok, bp, 1.0) ** e - jnp.where(ok, bm, 1.0) ** e, jnp.nan)
        return jnp.where(ok, out, jnp.where(bp <= 0, jnp.inf, -jnp.inf))

    @eqx.filter_jit  # an eager call compiles the bisection loop once, not on every call
    def mirror(self, w):
        lo, hi = self._range()
        return _bisect(self.inverse_mirror, w, lo, hi)


_LAYER_BLOWUP = 1e8  # `_layer_flow` stops a coordinate once its layers pass this × (1 + max|a(0)|)


def _blown_up(t, a, args, **kwargs):
    """diffrax event of `_layer_flow`: the layers have passed every scale that a root of φ⁻¹ at
    a regression limit can have (a branch product |w̃| ≳ 1e8^L, 1e24 at L = 3): the coordinate
    is on its way into the pole."""
    return jnp.max(jnp.abs(a)) > args[1]


def _layer_vf(t, a, args):
    v = args[0]
    L = a.shape[0]
    return v * jnp.stack([jnp.prod(jnp.delete(a, l, assume_unique_indices=True)) for l in range(L)])


@jax.jit
def _layer_flow(a0, v):
    """Per-coordinate layer dynamics `da_l/dG = Π_{m≠l} a_m` from `a0` (shape (L, d)) up to
    `G = v` (shape (d,)), integrated with diffrax (Dopri8, rtol 1e-13) in the rescaled
    time τ = G/v ∈ [0, 1], one coordinate at a time (vmapped). Returns `a(v)`, shape
    (L, d); NaN in a coordinate whose layers blow up before G = v (pass `_LAYER_BLOWUP`·(1 +
    max|a0|), far beyond any layer of a regression root: `_blown_up`).

    Jitted, with the vector field at module level, so that eager calls (a potential used
    outside `jit`) reuse one compiled solve per shape instead of tracing and compiling a
    fresh closure each time (2.2 s a call at L = 3, d = 12)."""

    def one(a0i, vi):
        # Integrating into a pole took up to 2048 steps at rtol 1e-13 (1.5-3.6 s a call at
        # d = 1000, the coordinates vmapped in lock-step); the event ends such a coordinate
        # once its layers pass `_LAYER_BLOWUP`, with the same outcome: not successful, NaN.
        # (`DeepDiagonal.mirror` at depth 3, d = 1000: 2.1 -> 0.9 s at α = 0.01, 11 -> 3.0 s
        # at α = 1e-3, the same roots; 1e30 instead of 1e8 saved little, 9.5 s at α = 1e-3.)
        big = _LAYER_BLOWUP * (1.0 + jnp.max(jnp.abs(a0i)))
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_layer_vf), dfx.Dopri8(), 0.0, 1.0, 0.05, a0i, args=(vi, big),
            stepsize_controller=dfx.PIDController(rtol=1e-13, atol=1e-15),
            event=dfx.Event(_blown_up), max_steps=2048, throw=False,
        )
        ok = (sol.result == dfx.RESULTS.successful) & jnp.all(jnp.isfinite(sol.ys[-1]))
        return jnp.where(ok, sol.ys[-1], jnp.nan)

    return jax.vmap(one, in_axes=(1, 0), out_axes=1)(a0, v)


_MIRROR_ITERATIONS = 60  # cap of `DeepDiagonal.mirror`'s safeguarded Newton iteration
_MIRROR_RTOL = 1e-13  # its stopping rule: max |Δv| ≤ _MIRROR_RTOL · max |v| (float64)


class DeepDiagonal(AbstractPotential):
    """L-layer diagonal net `w̃ = Π_l u⁺_l − Π_l u⁻_l`, general initialisation, any L ≥ 2.

    Per coordinate, GF gives `du_l^±/dt = ±(Π_{m≠l} u_m^±) g` with `g = (Xᵀr)_i`, so in
    terms of `G = ∫ g dt` each branch product `ρ^±(G)` is a fixed monotone function and
    `φ⁻¹(v) = ρ⁺(v) − ρ⁻(−v)`: the inverse mirror map is the difference of the two
    branches' maps (Yun et al. 2021 §"regression"; math.md §3.5 for the one-branch
    formula `Φ_j`, §2.3 for L = 2 in closed form). Here `ρ^±` is computed by integrating
    the decoupled per-coordinate layer ODE in G (an independent route to the flow's own
    integration); φ by bisection. Conserved: `(u_l)² − (u_m)²` per coordinate and branch.
    Weighted-ℓ1 (α → 0, L ≥ 3) and weighted-ℓ2 (α → ∞) limits: math.md §3.5.
    Preconditions: no coordinate with two zero layers in one branch (frozen branch is fine
    but excluded from the theorem's range).
    """

    name = "deep-diagonal"
    source = "Yun, Krishnan & Mobahi ICLR 2021 (regression, orthogonally decomposable); math.md §3.5"
    plus: Float[Array, "L d"]
    minus: Float[Array, "L d"]

    def _branches(self, v):
        """Both branches' layers evolved to `G = v` (plus) and `G = −v` (minus). Two solves of
        the one compiled program: merged into one vmapped solve over 2d coordinates, the
        branches would step in lock-step, each as long as the slower one (the warm dual Newton
        of the depth-3 Azulay §9 problem took 4.1 s merged against 2.3 s apart)."""
        return _layer_flow(self.plus, v), _layer_flow(self.minus, -v)

    def inverse_mirror_and_slope(self, v):
        """`φ⁻¹(v)` and its per-coordinate derivative `dρ⁺/dG + dρ⁻/dG = Σ_l Π_{m≠l} a_m²` (the
        tangent kernel of the evolved layers), from one layer solve per branch."""
        evolved = DiagonalNet(*self._branches(v))
        return evolved.predictor(), evolved.predictor_kernel_diagonal()

    def inverse_mirror(self, v):
        return self.inverse_mirror_and_slope(v)[0]

    def inverse_mirror_jvp(self, v, dv):
        return self.inverse_mirror_and_slope(v)[1] * dv

    @eqx.filter_jit
    def mirror(self, w):
        # Safeguarded Newton on v ↦ φ⁻¹(v) − w (increasing; derivative = tangent kernel),
        # falling back to bisection whenever a Newton step leaves the bracket, until the update
        # is below `_MIRROR_RTOL` of max|v| (φ⁻¹ itself comes from layer ODEs solved at rtol
        # 1e-13; at the root, rounding makes v alternate between neighbours ~1e-15 apart), at
        # most `_MIRROR_ITERATIONS` times. The bracket test is inclusive: at a root the Newton
        # point is the bracket end just set to v, and a strict test bisected converged
        # coordinates away again, so the loop converged only linearly (depth 3, d = 1000,
        # α = 0.01: still moving by 2e-6 after 30 of a fixed 60 iterations, 6.1 s a call).
        # Jitted, so an eager call does not compile its loop again.
        lo, hi = self._range()
        E = self._blowup_scale()
        tol = max(_MIRROR_RTOL, 64 * float(jnp.finfo(jnp.result_type(w)).eps))

        def cond(state):
            return (state[3] < _MIRROR_ITERATIONS) & ~state[4]

        def body(state):
            v, lo, hi, it, _ = state
            value, df = self.inverse_mirror_and_slope(v)
            f = value - w
            up = jnp.where(jnp.isfinite(f), f < 0, v < 0)
            lo, hi = jnp.where(up, v, lo), jnp.where(up, hi, v)
            vn = v - f / df
            ok = jnp.isfinite(vn) & (vn >= lo) & (vn <= hi)
            # Bisection in u = asinh(v/E), E the scale at which the layers blow up: the bracket
            # starts ~1000 E wide, and a plain midpoint lands far past the blow-up, where each
            # evaluation integrates the layer ODE into it (1.5-3.6 s a call at d = 1000).
            mid = E * jnp.sinh(0.5 * (jnp.arcsinh(lo / E) + jnp.arcsinh(hi / E)))
            v_new = jnp.where(ok, vn, jnp.clip(mid, lo, hi))
            return v_new, lo, hi, it + 1, jnp.max(jnp.abs(v_new - v)) <= tol * jnp.max(jnp.abs(v_new))

        v0 = jnp.zeros_like(w)
        return jax.lax.while_loop(cond, body, (v0, lo, hi, 0, jnp.asarray(False)))[0]

    def _pole_power(self):
        # Per coordinate, μ^{L−2} (floored at 1e-300), μ the smallest layer magnitude of either
        # branch: a balanced branch with layers μ blows up at G = 1/((L − 2) μ^{L−2}).
        mu = jnp.min(jnp.abs(jnp.concatenate([self.plus, self.minus])), axis=0)
        return jnp.maximum(mu ** (self.plus.shape[0] - 2), 1e-300)

    def _blowup_scale(self):
        # Per coordinate, that blow-up point 1 / ((L − 2) μ^{L−2}); 1 for L = 2 (no blow-up).
        L = self.plus.shape[0]
        if L == 2:
            return jnp.ones(self.plus.shape[1:], self.plus.dtype)
        return jnp.clip(1.0 / ((L - 2) * self._pole_power()), 1e-6, 1e6)

    def _range(self):
        # For L ≥ 3 the layers blow up at a finite G; bisection treats non-finite values
        # by sign, so a generous bracket is safe.
        big = jnp.minimum(1e3 / self._pole_power(), 1e6)
        return -big, big


# ---------------------------------------------------------------------------------------
# Fully connected single neuron and leaky-ReLU neuron
# ---------------------------------------------------------------------------------------


class FullyConnectedNeuron(AbstractPotential):
    """Azulay et al. 2021, Theorem 6.1 (m = 1, δ = a² − ‖w‖² ≥ 0, w̃(0) ≠ 0) and
    Proposition 6.2 (m > 1 neurons with Δ = aaᵀ − WᵀW = 0, i.e. δ = 0):

    `q(w) = q̂_δ(‖w‖) + zᵀw`, `q̂_δ'(x) = (3/2)√(√(x² + δ²/4) − δ/2)`,
    `z = −q̂_δ'(‖w̃0‖) w̃0/‖w̃0‖` (so ∇q(w̃(0)) = 0), hence
    `φ(w) = q̂'(‖w‖) w/‖w‖ + z` and `φ⁻¹(v) = (v − z)/‖v − z‖ · m√(m² + δ)`,
    `m = (2/3)‖v − z‖` (math.md §2.5, §6).
    """

    name = "azulay-fc-neuron"
    source = "Azulay et al. ICML 2021, Thm 6.1 / Prop 6.2; math.md §2.5-§2.6"
    separable: ClassVar[bool] = False
    delta: Float[Array, ""]
    w0: Float[Array, " d"]

    def _qhat_prime(self, x):
        d = self.delta
        return 1.5 * jnp.sqrt(jnp.sqrt(x**2 + d**2 / 4) - d / 2)

    def value(self, w):
        # q̂_δ(x) = (x² − (δ/2)(δ/2 + √(x² + δ²/4)))·√(√(x² + δ²/4) − δ/2)/x  (Thm 6.1)
        d, x = self.delta, jnp.linalg.norm(w)
        r = jnp.sqrt(x**2 + d**2 / 4)
        return (x**2 - (d / 2) * (d / 2 + r)) * jnp.sqrt(r - d / 2) / x + self.z @ w

    @property
    def z(self):
        n0 = jnp.linalg.norm(self.w0)
        return -self._qhat_prime(n0) * self.w0 / n0

    def mirror(self, w):
        n = jnp.linalg.norm(w)
        return self._qhat_prime(n) * w / n + self.z

    def inverse_mirror(self, v):
        u = v - self.z
        n = jnp.linalg.norm(u)
        m = (2.0 / 3.0) * n
        return u / n * m * jnp.sqrt(m**2 + self.delta)


class LeakyReLUNeuronPotential(FullyConnectedNeuron):
    """Azulay et al. 2021, Theorem 8.1: the leaky-ReLU neuron `a σ(wᵀx)` (ρ > 0, δ ≥ 0,
    a(0)w(0) ≠ 0) has the Thm 6.1 potential for `w̃ = a·w`, with transformed labels
    `y' = σ⁻¹(y)` if `a(0) > 0` and `y' = −σ⁻¹(−y)` if `a(0) < 0` (a keeps its sign)."""

    name = "azulay-leaky-relu"
    source = "Azulay et al. ICML 2021, Thm 8.1; math.md §2.8"
    slope: float = eqx.field(static=True)
    sign_a: float = eqx.field(static=True)

    def transform_labels(self, y):
        inv = lambda z: jnp.where(z >= 0, z, z / self.slope)
        return inv(y) if self.sign_a > 0 else -inv(-y)
