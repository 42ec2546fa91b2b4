"""Max-margin problems in the network's transformed space, their reference solutions,
and KKT certificates for classification flows.

Theory (math.md §3.4, §4): on linearly separable data with an exponentially tailed
loss, gradient flow of an L-layer linear tensor network converges in direction to a
first-order stationary point of

    min_ρ Φ(ρ) = Σ_j c_j ‖ρ_{G_j}‖^q   s.t.   y_n ⟨T x_n, ρ⟩ ≥ 1,   q = 2/L,

with ρ = Tβ the end-to-end predictor in the transformed coordinates (T orthogonal,
G_j coordinate groups):

- linear model and fully connected nets of any depth and width: q = 2, the ℓ2
  hard-margin SVM (Soudry et al. 2018; Gunasekar et al. 2018b; Ji & Telgarsky 2019);
- diagonal nets (untied or tied) of depth L: T = I, ℓ_{2/L} (ℓ1 for L = 2)
  (Gunasekar et al. 2018b; Yun et al. 2021; Moroshko et al. 2020);
- full-width circular convolutional nets of depth L: ℓ_{2/L} of the DFT `Fβ`
  (Gunasekar et al. 2018b; Yun et al. 2021). In a real orthonormal Fourier basis a
  frequency pair (k, −k) is a group of two coordinates with `|Fβ_k| = √(d/2)‖ρ_G‖`.

The parameter-space conditions of Lyu & Li (2020) hold for every homogeneous network:
θ̃ = θ/γ^{1/K} satisfies `θ̃ = Σ_n λ_n y_n ∇_θ f(θ̃; x_n)`, λ ≥ 0, λ_n (y_n f_n(θ̃) − 1) = 0.

Directions converge only like 1/log t ≈ 1/log(1/L) (math.md §4, §7), and for the
rich (q < 2) problems the flow sits at the minimiser of Moroshko's potential `Q_μ`,
μ = α/γ, whose distance to Φ's stationary point decays like 1/log(1/μ) (math.md §4.5).
Certificate tolerances therefore scale with `ε_L = 1/log(1/L)` and
`ε = ε_L` (q = 2) or `ε = max(ε_L, 1/log(1/μ))` (q < 2), and say so:

- `1 − cos` with the reference ≤ `C·ε` (q = 2) or `C·ε²` (q < 2: Q_μ's minimiser is
  O(ε_μ) from Φ's in norm, so O(ε²) in 1 − cos);
- stationarity residuals (relative norms, i.e. angles) ≤ `C·√ε`: measured, the
  direction error of deep (K ≥ 2) networks behaves like `1 − cos ∝ ε`, so the angle,
  which the residual measures, like `√ε` (the linear model does better, angle ∝ ε);
- the active set (margins within `C·ε_L` of the minimum) and complementary slackness
  ≤ `C·ε_L`: support-vector weights are `∝ exp(−γ(m_n − 1))`, γ ≈ log(1/L).
"""

import dataclasses

import clarabel
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.sparse as sp
from jax.flatten_util import ravel_pytree

from ._certify import certificate_dict
from ._networks import (
    AbstractNetwork,
    ConvNet,
    DiagonalNet,
    FullyConnectedNet,
    Linear,
    TiedDiagonalNet,
)


class NotSeparableError(ValueError):
    """The classification data admit no linear separator through the origin."""


def separating_margin(X, y) -> float:
    """Whether `y_n x_nᵀ w > 0` for all n has a solution: returns the ℓ∞-bounded
    max-margin `max_{‖w‖∞ ≤ 1} min_n y_n x_nᵀ w` of an LP (HiGHS), > 0 iff separable.

    Separability in x is the precondition of every margin theorem here: full-width
    linear tensor networks (and the leaky-ReLU neuron, whose activation keeps signs)
    realise every linear predictor direction."""
    X = np.asarray(X, float)
    y = np.asarray(y, float)
    N, d = X.shape
    Z = y[:, None] * X
    # variables (w, s): maximise s s.t. Z w ≥ s, −1 ≤ w ≤ 1.
    res = scipy.optimize.linprog(
        np.r_[np.zeros(d), -1.0], A_ub=np.c_[-Z, np.ones(N)], b_ub=np.zeros(N),
        bounds=[(-1, 1)] * d + [(None, None)], method="highs",
    )
    if res.status != 0:
        raise RuntimeError(f"separability LP failed: {res.message}")
    return float(-res.fun)


def check_separable(X, y, *, rtol: float = 1e-9) -> float:
    """Raise `NotSeparableError` unless the data are linearly separable through the
    origin, with labels ±1; returns the LP margin (see `separating_margin`)."""
    y = np.asarray(y, float)
    if not np.all(np.abs(y) == 1):
        raise ValueError("classification labels must be +1 or -1")
    X = np.asarray(X, float)
    gamma = separating_margin(X, y)
    if not gamma > rtol * max(np.max(np.abs(X)), 1e-300):
        raise NotSeparableError(
            "data are not linearly separable through the origin (LP margin "
            f"{gamma:.3g}): no max-margin limit exists and the loss cannot reach 0"
        )
    return gamma


# ---------------------------------------------------------------------------------------
# Transformed-space geometry
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MarginGeometry:
    """`Φ(ρ) = Σ_j c_j ‖ρ_{G_j}‖^q` with `ρ = Tβ` (see the module docstring)."""

    name: str
    source: str
    q: float
    T: np.ndarray
    groups: tuple
    weights: np.ndarray

    def objective(self, rho):
        return float(sum(c * np.linalg.norm(rho[g]) ** self.q for c, g in zip(self.weights, self.groups)))

    def group_norms(self, rho):
        return np.array([np.linalg.norm(rho[g]) for g in self.groups])


def real_fourier_basis(d: int):
    """Orthonormal real DFT basis T (rows) and its frequency groups: k = 0, the pairs
    (cos k, sin k) and, for even d, the Nyquist frequency. With `|(Fβ)_k| = √(d/2)‖(Tβ)_G‖`
    on a pair and `√d |(Tβ)_G|` on a singleton (F: unnormalised DFT), `margin_geometry`
    sets the weights c_j so that `Σ_k |(Fβ)_k|^q = Σ_j c_j ‖(Tβ)_{G_j}‖^q`."""
    i = np.arange(d)
    rows, groups = [np.full(d, 1 / np.sqrt(d))], [[0]]
    for k in range(1, (d - 1) // 2 + 1):
        rows += [np.sqrt(2 / d) * np.cos(2 * np.pi * i * k / d), np.sqrt(2 / d) * np.sin(2 * np.pi * i * k / d)]
        groups.append([len(rows) - 2, len(rows) - 1])
    if d % 2 == 0:
        rows.append((-1.0) ** i / np.sqrt(d))
        groups.append([len(rows) - 1])
    return np.array(rows), tuple(np.array(g) for g in groups)


def margin_geometry(net: AbstractNetwork):
    """The max-margin problem the theory assigns to `net`'s architecture, or None when no
    transformed-space theorem covers it (then only the Lyu–Li conditions apply)."""
    if isinstance(net, (Linear, FullyConnectedNet)):
        d = net.dim
        src = ("l2 hard-margin SVM: Soudry et al. 2018 (linear); Gunasekar et al. 2018b and "
               "Ji & Telgarsky 2019 (fully connected, any depth); math.md §4.1-4.3")
        return MarginGeometry("l2-margin", src, 2.0, np.eye(d), tuple(np.array([j]) for j in range(d)), np.ones(d))
    if isinstance(net, (DiagonalNet, TiedDiagonalNet)):
        L, d = net.depth, net.dim
        name = "l1-margin" if L == 2 else "l2/L-margin"
        src = (f"l_(2/{L}) max margin of beta: Gunasekar et al. 2018b (diagonal), Yun et al. 2021 "
               "(orthogonally decomposable tensor networks), Moroshko et al. 2020; math.md §3.4, §4.2")
        return MarginGeometry(name, src, 2.0 / L, np.eye(d), tuple(np.array([j]) for j in range(d)), np.ones(d))
    if isinstance(net, ConvNet):
        L, d = net.depth, net.dim
        T, groups = real_fourier_basis(d)
        q = 2.0 / L
        weights = np.array([(2 * (d / 2) ** (q / 2)) if len(g) == 2 else d ** (q / 2) for g in groups])
        src = (f"l_(2/{L}) max margin of the DFT F beta: Gunasekar et al. 2018b (full-width circular "
               "convolutional nets), Yun et al. 2021; math.md §3.2-3.4")
        return MarginGeometry("l2/L-margin-dft", src, q, T, groups, weights)
    return None


MARGIN_PROBLEMS = ("l2-margin", "l1-margin", "l2/L-margin", "l2/L-margin-dft", "lyu-li-kkt")


def margin_geometry_by_name(name: str, d: int, depth: int = 2):
    """The named max-margin problem in dimension d (depth L sets q = 2/L where relevant)."""
    if name == "l2-margin":
        return margin_geometry(Linear(jnp.zeros(d)))
    if name == "l1-margin":
        return margin_geometry(DiagonalNet(jnp.ones((2, d)), jnp.ones((2, d))))
    if name == "l2/L-margin":
        return margin_geometry(DiagonalNet(jnp.ones((depth, d)), jnp.ones((depth, d))))
    if name == "l2/L-margin-dft":
        return margin_geometry(ConvNet(jnp.ones((depth, d))))
    if name == "lyu-li-kkt":
        return None
    raise ValueError(f"unknown margin problem {name!r}; choose from {', '.join(MARGIN_PROBLEMS)}")


def initial_scale(net: AbstractNetwork) -> float:
    """The initialisation scale α entering Moroshko's μ = α/γ: the largest per-coordinate
    product of layer magnitudes for diagonal nets, `Π_l ‖w_l‖` for convolutional nets,
    `(‖θ‖²/K)^{K/2}` otherwise."""
    if isinstance(net, DiagonalNet):
        p = jnp.prod(jnp.abs(net.plus), axis=0)
        m = jnp.prod(jnp.abs(net.minus), axis=0)
        return float(jnp.max(jnp.maximum(p, m)))
    if isinstance(net, TiedDiagonalNet):
        return float(jnp.max(jnp.maximum(jnp.abs(net.plus), jnp.abs(net.minus)) ** net.depth))
    if isinstance(net, ConvNet):
        return float(jnp.prod(jnp.linalg.norm(net.kernels, axis=1)))
    flat, _ = ravel_pytree(eqx.filter(net, net.trainable()))
    return float((jnp.sum(flat**2) / net.degree) ** (net.degree / 2))


# ---------------------------------------------------------------------------------------
# Reference solvers
# ---------------------------------------------------------------------------------------


def _clarabel_settings():
    s = clarabel.DefaultSettings()
    s.verbose = False
    s.tol_gap_abs = s.tol_gap_rel = 1e-12
    s.tol_feas = s.tol_ktratio = 1e-12
    s.max_iter = 500
    return s


def svm_l2(M):
    """Hard-margin SVM `argmin ½‖u‖² s.t. M u ≥ 1` (rows of M: label-signed inputs).

    Solved by Clarabel (interior point), then polished on its active set A to
    `u = M_Aᵀ(M_A M_Aᵀ)⁻¹1` when that is primal and dual feasible. Returns `(u, λ, ok)`."""
    M = np.asarray(M, float)
    N, n = M.shape
    P = sp.identity(n, format="csc")
    A = sp.csc_matrix(-M)
    sol = clarabel.DefaultSolver(P, np.zeros(n), A, -np.ones(N), [clarabel.NonnegativeConeT(N)],
                                 _clarabel_settings()).solve()
    u, lam = np.array(sol.x), np.array(sol.z)
    ok = str(sol.status) in ("Solved", "AlmostSolved")
    act = lam > 1e-7 * max(np.max(lam), 1e-300)
    if act.any():
        MA = M[act]
        mu, *_ = np.linalg.lstsq(MA @ MA.T, np.ones(act.sum()), rcond=None)
        u2 = MA.T @ mu
        if np.all(mu >= -1e-12) and np.min(M @ u2) >= 1 - 1e-10:
            u = u2
            lam = np.zeros(N)
            lam[act] = np.maximum(mu, 0)
    return u, lam, ok


def _max_margin_l1_lp(M):
    N, n = M.shape
    res = scipy.optimize.linprog(np.ones(2 * n), A_ub=-np.c_[M, -M], b_ub=-np.ones(N), bounds=(0, None),
                                 method="highs")
    if res.status != 0:
        return np.full(n, np.nan), np.full(N, np.nan), False
    return res.x[:n] - res.x[n:], -np.asarray(res.ineqlin.marginals), True


def _max_margin_group_l1(M, groups, weights):
    """min Σ c_j ‖ρ_G‖ s.t. Mρ ≥ 1 as an SOCP (Clarabel): variables (ρ, t)."""
    N, n = M.shape
    J = len(groups)
    rows, b, cones = [sp.csc_matrix(np.c_[-M, np.zeros((N, J))])], [-np.ones(N)], [clarabel.NonnegativeConeT(N)]
    for j, g in enumerate(groups):
        blk = np.zeros((1 + len(g), n + J))
        blk[0, n + j] = -1.0
        for r, idx in enumerate(g):
            blk[1 + r, idx] = -1.0
        rows.append(sp.csc_matrix(blk))
        b.append(np.zeros(1 + len(g)))
        cones.append(clarabel.SecondOrderConeT(1 + len(g)))
    A = sp.vstack(rows, format="csc")
    c = np.r_[np.zeros(n), np.asarray(weights, float)]
    sol = clarabel.DefaultSolver(sp.csc_matrix((n + J, n + J)), c, A, np.concatenate(b), cones,
                                 _clarabel_settings()).solve()
    return np.array(sol.x)[:n], np.array(sol.z)[:N], str(sol.status) in ("Solved", "AlmostSolved")


def max_margin(geometry: MarginGeometry, X, y, *, start=None, max_iter: int = 2000, tol: float = 1e-12):
    """Reference solution β of `geometry`'s max-margin problem on (X, y).

    - q = 2: the hard-margin SVM (Clarabel, polished on the active set);
    - q = 1: the LP (HiGHS) for singleton groups, the SOCP (Clarabel) for grouped
      (DFT) coordinates;
    - q < 1 (non-convex): a first-order stationary point by majorise–minimise
      reweighting (each step a weighted SVM, monotone in Φ), started from `start`
      (the flow's predictor: its support selects the stationary point) or from the
      ℓ1 solution.

    Returns `(beta, multipliers, ok)` with β in the original coordinates.
    """
    if not isinstance(geometry, MarginGeometry):
        raise TypeError(f"max_margin takes a MarginGeometry first (see margin_geometry(net)), got "
                        f"{type(geometry).__name__}")
    X = np.asarray(X, float)
    y = np.asarray(y, float)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be (N, d) and y (N,), got {X.shape} and {y.shape}")
    if X.shape[1] != geometry.T.shape[1]:
        raise ValueError(f"X has d = {X.shape[1]} columns but the geometry is for d = {geometry.T.shape[1]}")
    T = geometry.T
    M = (y[:, None] * X) @ T.T  # constraints in ρ: M ρ ≥ 1
    q = geometry.q
    singleton = all(len(g) == 1 for g in geometry.groups)
    if q == 2.0:
        rho, lam, ok = svm_l2(M)
        return T.T @ rho, lam, ok
    if q == 1.0:
        rho, lam, ok = (_max_margin_l1_lp(M) if singleton else
                        _max_margin_group_l1(M, geometry.groups, geometry.weights))
        return T.T @ rho, lam, ok
    if start is None:
        rho, _, _ = (_max_margin_l1_lp(M) if singleton else _max_margin_group_l1(M, geometry.groups,
                                                                              np.ones(len(geometry.groups))))
    else:
        rho = T @ np.asarray(start, float)
        rho = rho / np.min(M @ rho)
    obj = geometry.objective(rho)
    lam = np.zeros(len(y))
    ok = False
    for _ in range(max_iter):
        gn = geometry.group_norms(rho)
        s = np.zeros_like(rho)
        for c, g, r in zip(geometry.weights, geometry.groups, gn):
            s[g] = r ** (1 - q / 2) / np.sqrt(c)
        u, lam, ok_i = svm_l2(M * s[None, :])
        new = s * u
        new_obj = geometry.objective(new)
        change = np.linalg.norm(new - rho) / np.linalg.norm(rho)
        rho = new
        if not ok_i:
            return T.T @ rho, lam, False
        if change < tol or abs(obj - new_obj) <= tol * obj:
            ok = True
            break
        obj = new_obj
    return T.T @ rho, lam, ok


# ---------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class MarginCertificate:
    """Whether, and how precisely, a classification flow's direction is a KKT point of
    the max-margin problem in the network's transformed space.

    - `potential`, `source`: problem name (`l2-margin`, `l1-margin`, `l2/L-margin`,
      `l2/L-margin-dft`, or `lyu-li-kkt` when only the parameter-space theorem applies).
    - `log_loss`: the loss level reached (natural log); `epsilon_loss = 1/log(1/L)`;
      `mu`: Moroshko's effective scale α/γ (q < 2); `epsilon`: ε (module docstring).
    - `alignment`: `1 − cos(β̃, β_ref)` (tolerance C·ε, q = 2, or C·ε², q < 2) with the reference solution (convex problems:
      the unique optimum; q < 1: the stationary point found by reweighting from the flow).
    - `kkt_residual`: `‖∇Φ_S(ρ̃) − (M_Aᵀλ)_S‖ / ‖∇Φ_S(ρ̃)‖`, λ ≥ 0 by NNLS on the active
      set A (margins within `active` of the minimum), S the support of ρ̃.
    - `dual_violation`: for q = 1, `max_j (‖(M_Aᵀλ)_{G_j}‖ − c_j)₊ / c_j` off the support.
    - `complementary_slackness`: `Σ λ_n (m_n − 1) / Σ λ_n` (m: normalised margins).
    - `lyu_li_residual`, `lyu_li_slackness`: the same in parameter space for θ/γ^{1/K}.
    - `multipliers`: λ over all samples (0 off the active set).
    """

    potential: str
    source: str
    applicable: bool
    reason: str
    flow_status: str
    log_loss: float = float("nan")
    epsilon: float = float("nan")
    epsilon_loss: float = float("nan")
    mu: float = float("nan")
    margin: float = float("nan")
    normalized_margin: float = float("nan")
    alignment: float = float("nan")
    kkt_residual: float = float("nan")
    dual_violation: float = 0.0
    complementary_slackness: float = float("nan")
    lyu_li_residual: float = float("nan")
    lyu_li_slackness: float = float("nan")
    support_size: int = 0
    active_set: list | None = None
    multipliers: list | None = None
    reference: list | None = None
    reference_converged: bool = False
    invariant_drift: float = float("nan")
    tolerances: dict = dataclasses.field(default_factory=dict)
    passed: bool = False

    def to_dict(self, include_vectors: bool = False) -> dict:
        return certificate_dict(self, include_vectors)


#: Constants C of the tolerances: alignment C·ε (q = 2) or C·ε² (q < 2), kkt and lyu_li C·√ε, active and
#: slackness C·ε_L (see the module docstring); support: relative group-norm threshold.
#: `max_epsilon`: certificates need ε ≤ 0.25 and ε_L ≤ 0.05 (L ≤ e^{-20}); above, the
#: asymptotic theory says nothing yet (or, for μ ≳ 1, the flow is in the kernel regime).
DEFAULT_MARGIN_TOLERANCES = dict(alignment=3.0, kkt=3.0, lyu_li=3.0, slackness=3.0, active=10.0,
                                 support=1e-3, drift=1e-7, max_epsilon=0.25, max_epsilon_loss=0.05)


def _nnls_residual(A, b):
    """min_{λ ≥ 0} ‖Aλ − b‖ / ‖b‖ and λ."""
    if A.shape[1] == 0:
        return 1.0, np.zeros(0)
    lam, res = scipy.optimize.nnls(A, b, maxiter=50 * A.shape[1])
    return float(res / max(np.linalg.norm(b), 1e-300)), lam


def certify_margin(solution, X, y, *, initial: AbstractNetwork, potential: str | None = None,
                   tolerances: dict | None = None, reference: bool = True) -> MarginCertificate:
    """Certify that a classification flow (`MarginFlowSolution`) points at a KKT point of
    the max-margin problem of its architecture (`margin_geometry`) and satisfies the
    Lyu–Li conditions in parameter space. Refuses non-separable data (NotSeparableError).
    `potential` forces a named problem (`l2-margin`, `l1-margin`, `l2/L-margin`,
    `l2/L-margin-dft`, `lyu-li-kkt`), e.g. for negative controls.

    Tolerances (constants C, see the module docstring; all reported): alignment 3·ε (q = 2)
    or 3·ε² (q < 2),
    kkt and lyu_li 3·√ε, slackness 3·ε_L, active-set width 10·ε_L; support threshold
    1e-3 of the largest group norm; drift 1e-7 (relative to ‖θ‖²).
    """
    tol = dict(DEFAULT_MARGIN_TOLERANCES, **(tolerances or {}))
    X = np.asarray(X, float)
    y = np.asarray(y, float)
    check_separable(X, y)
    status = solution.status
    native = margin_geometry(initial)
    geom = native if potential in (None, "implicit") else margin_geometry_by_name(
        potential, initial.dim, getattr(initial, "depth", 2))
    net = solution.network
    log_loss = float(solution.log_loss)
    drift = float(solution.invariant_drift)
    Z = y[:, None] * X
    if not (status == "converged" and log_loss < 0):
        name = geom.name if geom else "lyu-li-kkt"
        return MarginCertificate(name, geom.source if geom else "", True,
                                 f"flow did not reach its loss level (status: {status})", status,
                                 log_loss=log_loss, invariant_drift=drift, tolerances=tol)
    eps_L = eps = 1.0 / (-log_loss)
    F = np.asarray(net.outputs(jnp.asarray(X)))
    m = y * F
    gamma = float(np.min(m))
    margins = m / gamma
    mu = float("nan")
    if geom is not None and geom.q < 2 and native is not None and native.name == geom.name:
        # μ is Moroshko's effective scale of the architecture's own rich problem; a
        # forced problem on another architecture (a negative control) gets ε = ε_L.
        mu = initial_scale(initial) / gamma
        eps = max(eps, 1.0 / np.log(1.0 / mu)) if 0 < mu < 1 else max(eps, 1.0)
    active = margins <= 1.0 + tol["active"] * eps_L
    regime_ok = [eps_L <= tol["max_epsilon_loss"], eps <= tol["max_epsilon"]]
    regime_labels = [f"loss level too high for the asymptotic theory (log(1/L) = {1 / eps_L:.3g} < "
                     f"{1 / tol['max_epsilon_loss']:.3g})",
                     f"effective scale mu = alpha/gamma = {mu:.3g} too large for the rich limit at this loss "
                     "level (kernel regime, Moroshko et al. 2020)"]
    flat, unravel = ravel_pytree(eqx.filter(net, net.trainable()))
    frozen = eqx.filter(net, net.trainable(), inverse=True)
    K = net.degree
    checks, labels = [], []

    # Lyu–Li parameter-space KKT for θ̃ = θ/γ^{1/K}.
    theta = np.asarray(flat) / gamma ** (1.0 / K)
    jac = np.asarray(jax.jacrev(lambda v: eqx.combine(unravel(v), frozen).outputs(jnp.asarray(X)))(
        jnp.asarray(theta)))
    H = (y[:, None] * jac)[active].T
    ll_res, ll_lam = _nnls_residual(H, theta)
    lam_full = np.zeros(len(y))
    lam_full[active] = ll_lam
    ll_cs = float(np.sum(lam_full * (margins - 1)) / max(np.sum(lam_full), 1e-300))
    checks += [ll_res <= tol["lyu_li"] * np.sqrt(eps), ll_cs <= tol["slackness"] * eps_L]
    labels += ["Lyu-Li stationarity residual above tolerance", "Lyu-Li complementary slackness above tolerance"]

    cert = dict(log_loss=log_loss, epsilon=eps, epsilon_loss=eps_L, mu=mu, margin=gamma, normalized_margin=float(solution.normalized_margin),
                lyu_li_residual=ll_res, lyu_li_slackness=ll_cs, invariant_drift=drift)
    if geom is None:
        multipliers = lam_full
        name, source = "lyu-li-kkt", ("KKT point of min ½‖θ‖² s.t. y_n f(x_n; θ) ≥ 1 (Lyu & Li 2020; "
                                      "Ji & Telgarsky 2020); math.md §4.4")
    else:
        name, source = geom.name, geom.source
        beta = np.asarray(solution.predictor, float) / gamma
        rho = geom.T @ beta
        M = Z @ geom.T.T
        q = geom.q
        gn = geom.group_norms(rho)
        supp = gn >= tol["support"] * np.max(gn) if q < 2 else np.ones(len(gn), bool)
        grad = np.zeros_like(rho)
        for c, g, r, s in zip(geom.weights, geom.groups, gn, supp):
            if s:
                grad[g] = c * q * r ** (q - 2) * rho[g]
        sidx = np.concatenate([g for g, s in zip(geom.groups, supp) if s])
        kkt, lam = _nnls_residual(M[active][:, sidx].T, grad[sidx])
        multipliers = np.zeros(len(y))
        multipliers[active] = lam
        dual_viol = 0.0
        if q == 1.0 and not supp.all():
            v = M.T @ multipliers
            dual_viol = max(max(np.linalg.norm(v[g]) - c * q, 0) / (c * q)
                            for c, g, s in zip(geom.weights, geom.groups, supp) if not s)
        cs = float(np.sum(multipliers * (margins - 1)) / max(np.sum(multipliers), 1e-300))
        cert.update(kkt_residual=kkt, dual_violation=dual_viol, complementary_slackness=cs,
                    support_size=int(supp.sum()))
        checks += [kkt <= tol["kkt"] * np.sqrt(eps), dual_viol <= tol["kkt"] * np.sqrt(eps),
                   cs <= tol["slackness"] * eps_L]
        labels += ["transformed-space stationarity residual above tolerance",
                   "dual feasibility (off-support) violated beyond tolerance",
                   "complementary slackness above tolerance"]
        if reference:
            ref, _, ref_ok = max_margin(geom, X, y, start=beta if q < 1 else None)
            cos = float(beta @ ref / (np.linalg.norm(beta) * np.linalg.norm(ref)))
            cert.update(alignment=1.0 - cos, reference=[float(v) for v in ref], reference_converged=bool(ref_ok))
            align_tol = tol["alignment"] * (eps if q == 2 else eps**2)
            checks += [ref_ok and (1.0 - cos) <= align_tol]
            labels += ["direction not aligned with the reference max-margin solution (or reference failed)"]
    checks.append(np.isfinite(drift) and drift <= tol["drift"])
    labels.append("invariant drift above tolerance")
    checks = [bool(c) for c in regime_ok + checks]
    labels = regime_labels + labels
    return MarginCertificate(
        potential=name, source=source, applicable=True,
        reason="; ".join(lab for lab, ok in zip(labels, checks) if not ok), flow_status=status,
        active_set=[int(i) for i in np.flatnonzero(active)], multipliers=[float(v) for v in multipliers],
        tolerances=dict(tol, scale="alignment <= C*eps (q = 2) or C*eps^2 (q < 2); kkt, lyu_li <= C*sqrt(eps); active width, slackness "
                        "<= C*eps_L; eps_L = 1/log(1/L); eps = eps_L (q = 2) or max(eps_L, 1/log(1/mu)) "
                        "(q < 2), mu = alpha/gamma"),
        passed=all(checks), **cert,
    )
