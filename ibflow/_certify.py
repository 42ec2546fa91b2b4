"""Which potential the theory assigns to a network, and certificates that a flow's
limit is its constrained minimiser.

A certificate is *earned*: it is computed from the solution (KKT stationarity
residual of the potential at w̃∞, primal residual, distance to an independent
reference minimiser, invariant drift), compared with stated tolerances, and it
fails when the flow did not converge or no theorem covers the network.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._networks import (
    AbstractNetwork,
    ConvNet,
    DiagonalNet,
    FullyConnectedNet,
    LeakyReLUNeuron,
    Linear,
    TensorNet,
    TiedDiagonalNet,
)
from ._potentials import (
    L2,
    AbstractPotential,
    DeepDiagonal,
    FullyConnectedNeuron,
    LeakyReLUNeuronPotential,
    LinearL2,
    NTKMatrix,
    TiedDiagonal,
    UntiedDiagonal,
    WeightedL2,
)
from ._reference import dual_newton, min_l1


class NotCovered(eqx.Module):
    """No theorem covers this network and initialisation; `reason` says why."""

    reason: str = eqx.field(static=True)


def implicit_potential(net: AbstractNetwork) -> AbstractPotential | NotCovered:
    """The potential that the theory assigns to `net` (its initialisation θ(0)),
    or `NotCovered(reason)` when no theorem applies.

    Linear: ½‖w − w(0)‖² (§5.5). Two-layer diagonal: Azulay Thm 4.1 / App. B.
    Deep diagonal: Yun et al. (per-coordinate mirror map). Tied diagonal: Woodworth
    Thms 1, 3. Fully connected, m = 1, δ ≥ 0: Azulay Thm 6.1; m > 1 with Δ = 0:
    Prop 6.2. Leaky-ReLU neuron with ρ > 0, δ ≥ 0: Thm 8.1.
    """
    tiny = 1e-12
    if isinstance(net, Linear):
        return LinearL2(net.w)
    if isinstance(net, DiagonalNet):
        if net.depth == 2:
            # In NumPy on the concrete initial values: eager jnp ops here compiled ~10 tiny XLA
            # programs (~0.6 s) on the first certificate of every process.
            (up, vp), (um, vm) = np.asarray(net.plus), np.asarray(net.minus)
            Nn = up**2 + vp**2 + um**2 + vm**2
            w0 = up * vp - um * vm
            kappa = 0.5 * np.sqrt(np.maximum(Nn**2 - 4 * w0**2, 0.0))
            if np.any(kappa <= tiny * np.maximum(Nn, 1e-300)):
                i = int(np.argmin(kappa / np.maximum(Nn, 1e-300)))
                return NotCovered(
                    f"kappa_{i} = 0 (one exponential branch absent): the potential is entropy-like "
                    "and w_i cannot change sign (math.md §2.3); not covered"
                )
            return UntiedDiagonal(jnp.asarray(kappa), jnp.asarray(np.arctanh(2 * w0 / Nn)))
        return DeepDiagonal(net.plus, net.minus)
    if isinstance(net, TiedDiagonalNet):
        if net.depth >= 3 and bool(jnp.any((net.plus <= 0) | (net.minus <= 0))):
            return NotCovered("tied depth >= 3 needs positive initial weights w+(0), w-(0) (Woodworth Thm 3)")
        return TiedDiagonal(net.plus, net.minus, net.depth)
    if isinstance(net, FullyConnectedNet):
        if net.depth > 2:
            return NotCovered(
                "deep fully connected regression: no finite-scale potential is implemented "
                "(Yun et al. Thm 7 needs special initial directions)"
            )
        W, a = net.weights[0], net.a
        w0 = W @ a
        if float(jnp.linalg.norm(w0)) == 0.0:
            return NotCovered("w~(0) = 0: Azulay Thm 6.1 / Prop 6.2 need a(0)w(0) != 0")
        if net.width == 1:
            delta = a[0] ** 2 - jnp.sum(W**2)
            if float(delta) < -tiny * float(a[0] ** 2 + jnp.sum(W**2)):
                return NotCovered(f"delta = a^2 - |w|^2 = {float(delta):.3g} < 0: Azulay Thm 6.1 needs delta >= 0")
            return FullyConnectedNeuron(jnp.maximum(delta, 0.0), w0)
        Delta = jnp.outer(a, a) - W.T @ W
        if float(jnp.linalg.norm(Delta)) <= 1e-10 * float(jnp.sum(a**2) + jnp.sum(W**2)):
            return FullyConnectedNeuron(jnp.zeros(()), w0)
        return NotCovered(
            f"fully connected with m = {net.width} > 1 and Delta != 0 at finite scale: no theorem "
            "(Azulay §6); Thm 6.3 gives min-l2 only as the scale -> 0 (force --potential l2)"
        )
    if isinstance(net, LeakyReLUNeuron):
        if net.slope <= 0:
            return NotCovered("ReLU (slope 0): no implicit regulariser exists (Vardi & Shamir 2021); Thm 8.1 needs rho > 0")
        delta = net.a**2 - jnp.sum(net.w**2)
        if float(delta) < -tiny * float(net.a**2 + jnp.sum(net.w**2)):
            return NotCovered(f"delta = a^2 - |w|^2 = {float(delta):.3g} < 0: Azulay Thm 8.1 needs delta >= 0")
        w0 = net.a * net.w
        if float(jnp.linalg.norm(w0)) == 0.0:
            return NotCovered("a(0)w(0) = 0: Azulay Thm 8.1 needs a non-zero initial predictor")
        return LeakyReLUNeuronPotential(jnp.maximum(delta, 0.0), w0, float(net.slope), float(jnp.sign(net.a)))
    if isinstance(net, TensorNet) and net.factors is not None:
        # Yun et al. §3.3: GF on the v_l moves ã_l = U_lᵀv_l as a one-branch diagonal net on
        # inputs Sx, so the potential is the diagonal one in ρ = ⊙ã_l (certified with data XSᵀ).
        plus = jnp.stack([U.T @ v for U, v in zip(net.factors, net.vectors)])
        pot = implicit_potential(DiagonalNet(plus, jnp.zeros_like(plus)))
        if isinstance(pot, NotCovered):
            return NotCovered(f"orthogonally decomposable TensorNet (one-branch diagonal net in rho-space): {pot.reason}")
        return pot
    if isinstance(net, ConvNet):
        return NotCovered(
            "ConvNet regression: no potential exists for real kernels (d >= 3): each conjugate frequency "
            "pair moves with the isotropic metric (|a_k|^2 + |b_k|^2) I_2, which is not a Hessian map"
        )
    if isinstance(net, TensorNet):
        return NotCovered("TensorNet without a real orthogonal decomposition (build it with "
                          "orthogonal_tensor_net): no potential known")
    return NotCovered(f"no theorem known for {type(net).__name__}")


def named_potential(name: str, net: AbstractNetwork) -> AbstractPotential | NotCovered | str:
    """A potential by name, for negative controls: `implicit` (the theory's), `l2`,
    `l2-init` (about w̃(0)), `ntk` (tangent-kernel norm at init), `l1` (returned as the
    string "l1": certified through its linear program)."""
    if name in (None, "implicit"):
        return implicit_potential(net)
    if name == "l1":
        return "l1"
    if name == "l2":
        return L2()
    if name == "l2-init":
        return LinearL2(net.predictor())
    if name == "ntk":
        k = net.predictor_kernel_diagonal() if net.is_linear else None
        if k is not None:
            return WeightedL2(k, net.predictor())
        if isinstance(net, FullyConnectedNet) and net.depth == 2 and net.width == 1:
            w, a = net.weights[0][:, 0], net.a[0]
            return NTKMatrix(a**2 * jnp.eye(w.shape[0]) + jnp.outer(w, w), a * w)
        if isinstance(net, LeakyReLUNeuron):
            return NTKMatrix(net.a**2 * jnp.eye(net.dim) + jnp.outer(net.w, net.w), net.a * net.w)
        return NotCovered(f"no NTK potential implemented for {type(net).__name__}")
    raise ValueError(f"unknown potential {name!r}; choose from implicit, l1, l2, l2-init, ntk")


@dataclasses.dataclass
class Certificate:
    """Whether, and how precisely, a flow's limit minimises the potential.

    - `potential`, `source`: the potential's name and provenance.
    - `applicable`, `reason`: whether a theorem covers the network (and why not).
    - `flow_status`: the solve's status; anything but `converged` fails.
    - `primal_residual`: `‖Xw∞ − y'‖/‖y'‖`.
    - `kkt_residual`: `‖(I − P_X)∇Q(w∞)‖/‖∇Q(w∞)‖` (P_X: projection on the row space of X),
      with `nu` the least-squares multiplier of `∇Q(w∞) = Xᵀν`.
    - `reference_distance`: `‖w∞ − w_ref‖/‖w_ref‖`, w_ref from the dual Newton solve
      (or the LP for ℓ1), `reference_converged` its own convergence flag.
    - `invariant_drift`: relative drift of the conserved quantities (balancedness).
    - `tolerances`: the thresholds used; `passed`: all of the above within them.
    """

    potential: str
    source: str
    applicable: bool
    reason: str
    flow_status: str
    primal_residual: float = float("nan")
    kkt_residual: float = float("nan")
    reference_distance: float = float("nan")
    reference_converged: bool = False
    invariant_drift: float = float("nan")
    nu: list | None = None
    reference: list | None = None
    tolerances: dict = dataclasses.field(default_factory=dict)
    passed: bool = False

    def to_dict(self, include_vectors: bool = False) -> dict:
        return certificate_dict(self, include_vectors)


def certificate_dict(cert, include_vectors: bool = False) -> dict:
    """A certificate dataclass as a JSON-ready dict: non-finite floats become None and the
    `reference` vector is dropped unless `include_vectors`."""
    d = dataclasses.asdict(cert)
    if not include_vectors:
        d.pop("reference")
    for k, v in d.items():
        if isinstance(v, float) and not np.isfinite(v):
            d[k] = None
    return d


#: Certificate thresholds in float64 (math.md §7: agreement 1e-12 to 1e-8, asserts at 1e-7).
DEFAULT_TOLERANCES = dict(kkt=1e-7, reference=1e-7, primal=1e-8, drift=1e-7)
#: In float32 (`IBFLOW_NO_X64=1`): math.md §1.6 (T1.1) passes the distance to the dual solution
#: at 1e-4 in float32 against 1e-8 in float64; the reference threshold is loosened by 1e3
#: (1e-7 → 1e-4) to meet it, the KKT and drift thresholds by the same factor. The primal
#: residual gets 1e-4 too, not 1e-5: a float32 flow stops at its rounding floor, where the
#: order-5 solver's outputs carry a relative noise up to noise_gain·ε ≈ 367 × 1.2e-7 ≈ 4.4e-5
#: (`ReducedFlowProblem.stop_level`); measured 2e-7 to 1.2e-5 on a 6-point float32 sweep.
FLOAT32_TOLERANCES = dict(kkt=1e-4, reference=1e-4, primal=1e-4, drift=1e-4)


def default_tolerances() -> dict:
    """The certificate thresholds of the working precision: `DEFAULT_TOLERANCES` with x64 on
    (every ibflow array is float64 then, float32 inputs included), `FLOAT32_TOLERANCES` when
    `IBFLOW_NO_X64=1` made it float32."""
    return dict(DEFAULT_TOLERANCES if jnp.result_type(float) == jnp.float64 else FLOAT32_TOLERANCES)


def certify(solution, X, y, *, initial: AbstractNetwork, potential=None, tolerances: dict | None = None
            ) -> Certificate:
    """Certify that `solution` (a converged `FlowSolution`) minimises the implicit-bias
    potential of `initial` (or the potential named / given by `potential`).

    Default tolerances (math.md §7: float64 agreement 1e-12 to 1e-8; asserts at 1e-7):
    `kkt ≤ 1e-7`, `reference ≤ 1e-7`, `primal ≤ 1e-8`, `drift ≤ 1e-7`; in float32
    (`IBFLOW_NO_X64=1`) `FLOAT32_TOLERANCES`, 1e3 looser (`default_tolerances`).
    """
    tol = dict(default_tolerances(), **(tolerances or {}))
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    pot = potential if isinstance(potential, AbstractPotential) else named_potential(potential, initial)
    status = solution.status
    drift = float(solution.invariant_drift)
    if isinstance(pot, NotCovered):
        return Certificate("none", "", False, pot.reason, status, invariant_drift=drift, tolerances=tol)
    w = np.asarray(solution.predictor, dtype=float)
    if isinstance(initial, TensorNet) and initial.factors is not None:
        # The potential lives in the transformed space: ρ∞ = ⊙ U_lᵀv_l(∞), data X Sᵀ.
        X = X @ np.asarray(initial.S, dtype=float).T
        w = np.asarray(solution.network.transformed(), dtype=float)
    if pot == "l1":
        name, source = "l1", "min l1 interpolator (rich limit; Woodworth et al. 2020, Azulay §7.1)"
        ref, nu_lp = min_l1(X, y)
        s = X.T @ nu_lp
        if np.dot(s, np.sign(ref)) < 0:
            s = -s
        supp = np.abs(w) > 1e-6 * np.max(np.abs(w))
        viol = np.concatenate([s[supp] - np.sign(w[supp]), np.maximum(np.abs(s[~supp]) - 1, 0)])
        kkt = float(np.linalg.norm(viol) / np.sqrt(w.size))
        return _verdict(name, source, status, w, X, y, kkt, nu_lp, ref, True, drift, tol)
    yt = np.asarray(pot.transform_labels(jnp.asarray(y)))
    nus, kkts = _stationarity(np.asarray(pot.mirror(jnp.asarray(w)))[None], X)
    refsol = dual_newton(pot, X, yt)
    return _verdict(pot.name, pot.source, status, w, X, yt, float(kkts[0]), nus[0], np.asarray(refsol.w),
                    bool(refsol.converged), drift, tol)


def stationarity_projector(X):
    """`pinv(Xᵀ)` (N×d) with lstsq's rank cut-off: `ν = pinv(Xᵀ) g` is the least-squares
    multiplier of `g = Xᵀν` at any rank of X. One SVD, reusable for every chunk of a sweep."""
    X = np.asarray(X, dtype=float)
    return np.linalg.pinv(X.T, rcond=np.finfo(float).eps * max(X.shape))


def _stationarity(grads, X, projector=None):
    """For each row g of `grads` (B, d): the least-squares multiplier ν of `g = Xᵀν` and the
    relative residual `‖g − Xᵀν‖/‖g‖` (0 where g = 0), all rows at once (exact projection on
    range(Xᵀ) at any rank of X), through `projector = stationarity_projector(X)` if given."""
    if projector is None:
        nus = np.linalg.lstsq(X.T, grads.T, rcond=None)[0].T
    else:
        nus = grads @ projector.T
    gnorm = np.linalg.norm(grads, axis=1)
    resid = np.linalg.norm(grads - nus @ X, axis=1)
    return nus, np.where(gnorm > 0, resid / np.where(gnorm > 0, gnorm, 1.0), 0.0)


def _verdict(name, source, status, w, X, yt, kkt, nu, ref, ref_ok, drift, tol) -> Certificate:
    """The primal residual and reference distance of `w`, every check against `tol`, and the
    `Certificate` (shared by `certify` and `certify_batch`)."""
    primal = float(np.linalg.norm(X @ w - yt) / max(np.linalg.norm(yt), 1e-300))
    dist = float(np.linalg.norm(w - ref) / max(np.linalg.norm(ref), 1e-300))
    checks = [
        status == "converged",
        np.isfinite(kkt) and kkt <= tol["kkt"],
        np.isfinite(dist) and dist <= tol["reference"] and ref_ok,
        np.isfinite(primal) and primal <= tol["primal"],
        np.isfinite(drift) and drift <= tol["drift"],
    ]
    labels = ["flow did not converge (status: %s)" % status, "KKT residual above tolerance",
              "reference distance above tolerance (or reference not converged)",
              "primal residual above tolerance", "invariant drift above tolerance"]
    return Certificate(
        potential=name,
        source=source,
        applicable=True,
        reason="; ".join(lab for lab, ok in zip(labels, checks) if not ok),
        flow_status=status,
        primal_residual=primal,
        kkt_residual=kkt,
        reference_distance=dist,
        reference_converged=ref_ok,
        invariant_drift=drift,
        nu=[float(v) for v in np.ravel(nu)],
        reference=[float(v) for v in ref],
        tolerances=tol,
        passed=bool(all(checks)),
    )


@eqx.filter_jit
def _mirror_batch(pots, W, y):
    """∇Q(w) and the transformed labels for a stacked batch of potentials of one kind."""
    return jax.vmap(lambda p, w: (p.mirror(w), p.transform_labels(y)))(pots, W)


def certify_batch(predictors, statuses, drifts, initials, X, y, *, tolerances: dict | None = None,
                  projector=None) -> list[Certificate]:
    """`certify` for many flows on the same data at once (what `sweep` uses): the same
    certificate, field for field, as `certify(solution_b, X, y, initial=initials[b])`.

    `predictors`: `(B, d)` limits w̃∞; `statuses`: their solve statuses; `drifts`: their
    invariant drifts; `initials`: the B initial networks (unbatched). Points whose
    potentials are of one kind are certified together: one vmapped evaluation of the
    mirror map ∇Q, the least-squares multipliers ν of `∇Q(w∞) = Xᵀν` in one lstsq call
    (`_stationarity`, shared with `certify`), and the dual-Newton reference of each point; anything else
    (no theorem; potentials with non-array fields) goes through `certify` one by one.
    Orthogonally decomposable TensorNets, certified in their transformed space from the
    final network, need `certify`. `projector`: `stationarity_projector(X)`, when the caller
    certifies many batches on the same X (a sweep), saves one SVD per batch.
    """
    tol = dict(default_tolerances(), **(tolerances or {}))
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    W = np.asarray(predictors, dtype=float)
    pots = [implicit_potential(net) for net in initials]
    groups, others = _kinds(pots, initials)
    certs: list[Certificate | None] = [None] * len(pots)
    for b, pot in others:  # no theorem (the certificate says why), or a potential with non-array fields
        certs[b] = certify(_Row(statuses[b], drifts[b], W[b]), X, y, initial=initials[b], potential=pot,
                           tolerances=tolerances)
    for idx in groups:
        grads, yts = (np.asarray(a) for a in _mirror_batch(_stack([pots[b] for b in idx]), jnp.asarray(W[idx]),
                                                            jnp.asarray(y)))
        nus, kkts = _stationarity(grads, X, projector)
        for i, b in enumerate(idx):
            refsol = dual_newton(pots[b], X, yts[i])
            certs[b] = _verdict(pots[b].name, pots[b].source, statuses[b], W[b], X, yts[i], float(kkts[i]), nus[i],
                                np.asarray(refsol.w), bool(refsol.converged), float(drifts[b]), tol)
    return certs


def warm_up_batch(initials, X, y) -> None:
    """Compile, for a batch of these initialisations, the programs `certify_batch` runs: the
    batched mirror map at this batch size and the dual-Newton reference of each kind of
    potential, lowered and compiled ahead of time (nothing is run; a later call with
    arguments of the same shapes reuses them), and one `certify` on the dummy limit w = 0 for
    points certified one by one. `sweep` calls it while its first chunk compiles.

    Running `certify_batch` on dummies did the same, but it also ran the mirror map and one
    reference a point. At depth 3 (`DeepDiagonal`: layer ODEs in every Newton iteration) that
    took 3.1 s for the mirror map and 1.7 s for 8 references at d = 12, beside the solves; at
    d = 1000 one reference alone takes ~2 s. (The multipliers are NumPy: nothing to compile.)"""
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    pots = [implicit_potential(net) for net in initials]
    groups, others = _kinds(pots, initials)
    w0 = np.zeros(X.shape[1])
    if others:
        b, pot = others[0]
        certify(_Row("converged", 0.0, w0), X, y, initial=initials[b], potential=pot)
    for idx in groups:
        # The same argument types as certify_batch's calls (NumPy or JAX, shapes, dtypes).
        _mirror_batch.lower(_stack([pots[b] for b in idx]), jnp.zeros((len(idx), X.shape[1])),
                            jnp.asarray(y)).compile()
        dual_newton.lower(pots[idx[0]], X, y).compile()


def reference_arguments(initial, X, y, potential=None):
    """`(potential, X, y')`, the arguments of the dual-Newton reference that `certify(solution,
    X, y, initial=initial, potential=potential)` solves for any flow from `initial` on this
    data, or None where it solves none this way (no theorem, ℓ1, transformed TensorNet spaces).
    Host work and eager elementwise operations only."""
    pot = potential if isinstance(potential, AbstractPotential) else named_potential(potential, initial)
    if not isinstance(pot, AbstractPotential) or (isinstance(initial, TensorNet) and initial.factors is not None):
        return None
    return pot, np.asarray(X, dtype=float), np.asarray(pot.transform_labels(jnp.asarray(np.asarray(y, dtype=float))))


def warm_up(arguments) -> None:
    """Compile the dual-Newton reference for `arguments` (`reference_arguments`; None: nothing),
    lowered and compiled ahead of time and not run: a later `certify` with arguments of the same
    types and shapes reuses it. `ibflow run --certify` calls it on a background thread while
    XLA compiles the flow (in process at d = 1000, a first `certify` took 1.70 s, 0.38 s after
    a warm-up); compiling only, it never runs LAPACK beside the flow (see `_linalg`)."""
    if arguments is not None:
        dual_newton.lower(*arguments).compile()


def _kinds(pots, initials):
    """`(groups, others)`: the indices of potentials of one kind (array leaves of equal
    shapes: certified together), and `(index, potential or None)` of those certified one by
    one (no theorem, or a potential with non-array fields)."""
    groups: dict = {}
    others = []
    for b, (pot, net) in enumerate(zip(pots, initials)):
        if isinstance(net, TensorNet) and net.factors is not None:
            raise ValueError("certify_batch takes predictors only: certify an orthogonally decomposable TensorNet "
                             "with certify(solution, ...), whose final network gives the transformed limit")
        if isinstance(pot, AbstractPotential) and all(eqx.is_array(a) for a in jax.tree_util.tree_leaves(pot)):
            leaves, treedef = jax.tree_util.tree_flatten(pot)
            groups.setdefault((treedef, tuple((a.shape, a.dtype) for a in leaves)), []).append(b)
        else:
            others.append((b, pot if isinstance(pot, AbstractPotential) else None))
    return list(groups.values()), others


def _stack(pots):
    # Stacked on the host: an eager jnp.stack compiles once per leaf shape (~0.25 s a sweep).
    return jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(v) for v in a]), *pots)


class _Row:
    """The few `FlowSolution` attributes `certify` reads."""

    def __init__(self, status, drift, predictor):
        self.status = status
        self.invariant_drift = drift
        self.predictor = predictor
