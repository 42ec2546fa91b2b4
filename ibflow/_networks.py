"""Linear tensor networks (and the leaky-ReLU neuron) as Equinox modules.

Every network holds its trainable parameters as array fields (the PyTree leaves
that gradient flow moves) and its configuration as static fields. Networks that
are linear in the input expose the end-to-end linear predictor
`w̃(θ) ∈ R^d` with `f(x; θ) = xᵀ w̃(θ)`.

Conventions: rows of `X` are samples, `X ∈ R^{N×d}`.
"""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from ._custom_types import Data


class AbstractNetwork(eqx.Module):
    """Base class of every ibflow network.

    Subclasses are final Equinox modules whose array fields are the parameters θ
    moved by gradient flow and whose static fields are configuration.
    """

    #: `True` when `f(x; θ) = xᵀ w̃(θ)` for all x.
    is_linear: ClassVar[bool] = True

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Input dimension d."""

    @abc.abstractmethod
    def predictor(self) -> Float[Array, " d"]:
        """End-to-end predictor w̃(θ) (for the leaky-ReLU neuron: `a·w`)."""

    def outputs(self, X: Data) -> Float[Array, " N"]:
        """Network outputs `f(x_n; θ)` for every row `x_n` of `X`."""
        return X @ self.predictor()

    def predictor_kernel_diagonal(self) -> Float[Array, " d"] | None:
        """Diagonal of `J_w̃ J_w̃ᵀ` (J_w̃ = ∂w̃/∂θ) when that matrix is diagonal, else None.

        Lets the stiff solver build the N×N tangent kernel `X diag(k) Xᵀ` in
        O(N²d) instead of through the N×P output Jacobian."""
        return None

    def predictor_rounding_scale(self) -> Float[Array, " d"]:
        """Per coordinate, the size of the terms whose signed sum is w̃: evaluating w̃ in
        floating point errs by about ε times it (ε: machine epsilon). Default `|w̃|`;
        networks whose predictor is a difference of two branches override it, since at a
        large initialisation scale the branches are large and nearly cancel. Used for the
        rounding floor of a reduced-mode flow's limit (`ReducedFlowProblem.evaluation_floor`)."""
        return jnp.abs(self.predictor())

    def flow_map(self) -> Callable[[Float[Array, " d"]], "AbstractNetwork"] | None:
        """The gradient flow in closed form given its driving signal, when one exists, else None.

        For the networks with a diagonal predictor kernel the square-loss flow moves θ only
        through `g(t) = ∇_w̃ L(θ(t))`, coordinate by coordinate; writing `z(t) = ∫₀ᵗ g`, the flow
        is `θ(t) = Φ(θ(0), z(t))` with Φ explicit (the conservation laws integrate each
        coordinate's ODE, Azulay et al. 2021 §4, proof of Thm 4.1; Woodworth et al. 2020 §4).
        Returns `z ↦ Φ(self, z)`, with `dw̃/dz = −k(Φ(z))` (k: `predictor_kernel_diagonal`).
        Used by `gradient_flow(mode="reduced")`, which integrates the flow in the N coordinates
        `a` of `z = Xᵀa`."""
        return None

    @property
    def degree(self) -> int:
        """Degree K of positive homogeneity in the trainable parameters:
        `f(x; cθ) = c^K f(x; θ)` for c > 0 (Lyu & Li 2020). Equal to the depth for the
        linear tensor networks, 2 for the leaky-ReLU neuron, 1 for `Linear`."""
        return self.depth  # pyright: ignore

    def trainable(self):
        """Filter spec (a PyTree of bools like `self`) of the leaves gradient flow moves.

        Default: every inexact array. Networks holding fixed data override it."""
        return jtu.tree_map(eqx.is_inexact_array, self)

    @abc.abstractmethod
    def invariants(self) -> Float[Array, " k"]:
        """Quantities conserved by gradient flow (balancedness, Du et al. 2018;
        math.md §5.1), flattened into one vector. Empty when there are none."""


class Linear(AbstractNetwork):
    """The linear model `f(x) = wᵀx` (sanity baseline).

    Gradient flow on the square loss from `w(0)` converges to
    `argmin ‖w − w(0)‖₂ s.t. Xw = y` (Vardi 2023, §"Linear regression";
    math.md §5.5), with the closed form `w(0) + Xᵀ(XXᵀ)⁻¹(y − Xw(0))`.
    """

    w: Float[Array, " d"]

    def __check_init__(self):
        if jnp.ndim(self.w) != 1:
            raise ValueError(f"Linear: `w` must be a vector, got shape {jnp.shape(self.w)}")

    @property
    def dim(self) -> int:
        return self.w.shape[0]

    @property
    def degree(self) -> int:
        return 1

    def predictor(self):
        return self.w

    def predictor_kernel_diagonal(self):
        return jnp.ones_like(self.w)

    def flow_map(self):
        # ẇ = −g, so w(t) = w(0) − z(t).
        return lambda z: Linear(self.w - z)

    def invariants(self):
        return jnp.zeros((0,), self.w.dtype)


class DiagonalNet(AbstractNetwork):
    """Depth-L diagonal linear network with two branches and untied layers.

    `w̃ = u⁺_1 ⊙ ⋯ ⊙ u⁺_L − u⁻_1 ⊙ ⋯ ⊙ u⁻_L` (Azulay et al. 2021, eq. 9 for L = 2,
    where `plus = (u₊, v₊)`; Yun et al. 2021, §3 "diagonal networks" for any L).

    **Arguments:**

    - `plus`: array of shape `(L, d)`, layer l of the positive branch in row l.
    - `minus`: array of shape `(L, d)`, likewise for the negative branch.
    """

    plus: Float[Array, "L d"]
    minus: Float[Array, "L d"]

    def __check_init__(self):
        ps, ms = jnp.shape(self.plus), jnp.shape(self.minus)
        if len(ps) != 2 or ps != ms:
            raise ValueError(
                f"DiagonalNet: `plus` and `minus` must both have shape (L, d); got {ps} and {ms}"
            )
        if ps[0] < 2:
            raise ValueError(f"DiagonalNet: depth L must be >= 2, got {ps[0]}")

    @property
    def depth(self) -> int:
        return self.plus.shape[0]

    @property
    def dim(self) -> int:
        return self.plus.shape[1]

    def predictor(self):
        return jnp.prod(self.plus, axis=0) - jnp.prod(self.minus, axis=0)

    def predictor_kernel_diagonal(self):
        # Σ_l Π_{m≠l} a_m² over both branches: the per-coordinate tangent kernel (math.md §3.5).
        def branch(A):
            L = A.shape[0]
            return sum(jnp.prod(jnp.delete(A, l, axis=0, assume_unique_indices=True) ** 2, axis=0)
                       for l in range(L))
        return branch(self.plus) + branch(self.minus)

    def predictor_rounding_scale(self):
        # Per branch Π_l |a_l| ≤ (Σ_l a_l² / L)^{L/2} (AM-GM). For L = 2 this is (u² + v²)/2, which
        # also bounds the rounding of uv when u and v come from the depth-2 flow map as differences
        # of exponentials: |δ(uv)| ≲ ε(u² + v²) (an error εmax(|u|, |v|)·√2 in each factor).
        L = self.depth
        return sum((jnp.sum(A**2, axis=0) / L) ** (L / 2) for A in (self.plus, self.minus))

    def flow_map(self):
        """Depth 2 only. Positive branch `(u, v)`: `u̇ = −g v`, `v̇ = −g u`, so
        `u ± v = (u₀ ± v₀) e^{∓z}`; negative branch `(p, q)` (w̃ ∋ −pq): `p ± q = (p₀ ± q₀) e^{±z}`
        (Azulay et al. 2021, proof of Thm 4.1). Each factor is a sum of two exponentials of
        fixed sign, evaluated without the cancellation of `u₀ cosh z − v₀ sinh z`."""
        if self.depth != 2:
            return None
        (u, v), (p, q) = self.plus, self.minus
        su, du, sm, dm = u + v, u - v, p + q, p - q

        def at(z):
            e, ei = jnp.exp(z), jnp.exp(-z)
            plus = jnp.stack([su * ei + du * e, su * ei - du * e]) / 2
            minus = jnp.stack([sm * e + dm * ei, sm * e - dm * ei]) / 2
            return DiagonalNet(plus, minus)

        return at

    def invariants(self):
        # a_l² − a_L² per coordinate and branch (math.md §3.5, §5.1).
        p = self.plus[:-1] ** 2 - self.plus[-1] ** 2
        m = self.minus[:-1] ** 2 - self.minus[-1] ** 2
        return jnp.concatenate([p.ravel(), m.ravel()])


class TiedDiagonalNet(AbstractNetwork):
    """Woodworth et al. (COLT 2020) tied ("shared-weight") diagonal network.

    `w̃ = (w⁺)^L − (w⁻)^L` elementwise (math.md §1.1, §1.5).

    **Arguments:**

    - `plus`, `minus`: arrays of shape `(d,)`.
    - `depth`: the power L ≥ 2 (static).
    """

    plus: Float[Array, " d"]
    minus: Float[Array, " d"]
    depth: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        ps, ms = jnp.shape(self.plus), jnp.shape(self.minus)
        if len(ps) != 1 or ps != ms:
            raise ValueError(
                f"TiedDiagonalNet: `plus` and `minus` must both have shape (d,); got {ps} and {ms}"
            )
        if int(self.depth) < 2:
            raise ValueError(f"TiedDiagonalNet: depth must be >= 2, got {self.depth}")

    @property
    def dim(self) -> int:
        return self.plus.shape[0]

    def predictor(self):
        return self.plus**self.depth - self.minus**self.depth

    def predictor_kernel_diagonal(self):
        L = self.depth
        return (L * self.plus ** (L - 1)) ** 2 + (L * self.minus ** (L - 1)) ** 2

    def predictor_rounding_scale(self):
        return jnp.abs(self.plus) ** self.depth + jnp.abs(self.minus) ** self.depth

    def flow_map(self):
        """Depth 2 only: `ẇ₊ = −2g w₊`, `ẇ₋ = 2g w₋`, so `w₊ = w₊(0) e^{−2z}`, `w₋ = w₋(0) e^{2z}`
        (Woodworth et al. 2020, §4)."""
        if self.depth != 2:
            return None
        return lambda z: TiedDiagonalNet(self.plus * jnp.exp(-2 * z), self.minus * jnp.exp(2 * z), 2)

    def invariants(self):
        # w₊w₋ (D = 2) and w₊^{2−D} + w₋^{2−D} (D ≥ 3) are conserved (math.md §1.2, §1.5).
        if self.depth == 2:
            return self.plus * self.minus
        e = 2 - self.depth
        return self.plus**e + self.minus**e


class FullyConnectedNet(AbstractNetwork):
    """Depth-L fully connected linear network with scalar output.

    `f(x) = xᵀ W_1 W_2 ⋯ W_{L−1} a`, so `w̃ = W_1 ⋯ W_{L−1} a` (Azulay et al. 2021,
    §6 for L = 2 with `W = (w_1, …, w_m)`; Yun et al. 2021 for any L).

    **Arguments:**

    - `weights`: tuple `(W_1, …, W_{L−1})`, `W_1 ∈ R^{d×m_1}`, `W_l ∈ R^{m_{l−1}×m_l}`.
    - `a`: output layer, shape `(m_{L−1},)`.
    """

    weights: tuple[Float[Array, "m n"], ...]
    a: Float[Array, " m"]

    def __check_init__(self):
        if len(self.weights) < 1:
            raise ValueError("FullyConnectedNet: need at least one hidden weight matrix (L >= 2)")
        prev = None
        for i, W in enumerate(self.weights):
            if jnp.ndim(W) != 2:
                raise ValueError(f"FullyConnectedNet: W{i + 1} must be a matrix, got shape {jnp.shape(W)}")
            if prev is not None and W.shape[0] != prev:
                raise ValueError(
                    f"FullyConnectedNet: W{i + 1} has {W.shape[0]} rows but W{i} has {prev} columns"
                )
            prev = W.shape[1]
        if jnp.shape(self.a) != (prev,):
            raise ValueError(f"FullyConnectedNet: `a` must have shape ({prev},), got {jnp.shape(self.a)}")

    @property
    def depth(self) -> int:
        return len(self.weights) + 1

    @property
    def width(self) -> int:
        return self.a.shape[0]

    @property
    def dim(self) -> int:
        return self.weights[0].shape[0]

    def predictor(self):
        out = self.a
        for W in reversed(self.weights):
            out = W @ out
        return out

    def invariants(self):
        # W_lᵀW_l − W_{l+1}W_{l+1}ᵀ, with a as the last (column) layer (Du et al. 2018 Thm 2.2).
        mats = list(self.weights) + [self.a[:, None]]
        out = [(mats[i].T @ mats[i] - mats[i + 1] @ mats[i + 1].T).ravel() for i in range(len(mats) - 1)]
        return jnp.concatenate(out)


class ConvNet(AbstractNetwork):
    """Depth-L linear network of full-length circular convolutions.

    `f(x) = (x ⋆ w_1 ⋆ ⋯ ⋆ w_{L−1})ᵀ w_L` with the circular *correlation*
    `[x ⋆ w]_i = Σ_j x_{(i+j) mod d} w_j` (0-based). With the unnormalised DFT
    `(Fa)_k = Σ_i a_i e^{−2πi·ik/d}` (`jnp.fft.fft`), the end-to-end predictor satisfies
    `F w̃ = ⊙_l F w_l` (Gunasekar et al. 2018b; Yun et al. 2021 §3; math.md §3.2).

    **Arguments:**

    - `kernels`: array of shape `(L, d)`, the kernel of layer l in row l.
    """

    kernels: Float[Array, "L d"]

    def __check_init__(self):
        s = jnp.shape(self.kernels)
        if len(s) != 2 or s[0] < 2:
            raise ValueError(f"ConvNet: `kernels` must have shape (L, d) with L >= 2, got {s}")

    @property
    def depth(self) -> int:
        return self.kernels.shape[0]

    @property
    def dim(self) -> int:
        return self.kernels.shape[1]

    def predictor(self):
        spec = jnp.prod(jnp.fft.fft(self.kernels, axis=-1), axis=0)
        return jnp.real(jnp.fft.ifft(spec))

    def invariants(self):
        # Per-frequency balancedness |Fw_l|_k² − |Fw_L|_k² (the DFT turns the net into a
        # diagonal one; math.md §3.3, §5.1).
        p = jnp.abs(jnp.fft.fft(self.kernels, axis=-1)) ** 2
        return (p[:-1] - p[-1]).ravel()


class TensorNet(AbstractNetwork):
    """General linear tensor network (Yun, Krishnan & Mobahi, ICLR 2021, §3).

    `f(x) = M(x)·(v_1, …, v_L) = Σ M(x)_{i_1…i_L} Π_l [v_l]_{i_l}` with the data
    tensor `M(x) = Σ_c x_c M_c` linear in x, so `w̃_c = M_c·(v_1, …, v_L)`.

    **Arguments:**

    - `tensor`: the stacked data tensor `(M_c)_c`, shape `(d, k_1, …, k_L)` (static data).
    - `vectors`: tuple of parameter vectors `v_l ∈ R^{k_l}`.
    """

    tensor: Float[Array, "d ..."]
    vectors: tuple[Float[Array, " k"], ...]
    #: Optional real orthogonal decomposition `M(x) = Σ_j [Sx]_j U_1[:, j] ⊗ ⋯ ⊗ U_L[:, j]`
    #: (Yun et al. §3.3), set by `orthogonal_tensor_net`; frozen, like the tensor.
    S: Float[Array, "m d"] | None = None
    factors: tuple[Float[Array, "k m"], ...] | None = None

    def transformed(self):
        """`ρ = ⊙_l U_lᵀ v_l` (requires the decomposition): the predictor in the transformed
        space, with `w̃ = Sᵀρ`."""
        if self.factors is None:
            raise ValueError("TensorNet: no orthogonal decomposition attached (use orthogonal_tensor_net)")
        rho = self.factors[0].T @ self.vectors[0]
        for U, v in zip(self.factors[1:], self.vectors[1:]):
            rho = rho * (U.T @ v)
        return rho

    def __check_init__(self):
        ks = tuple(jnp.shape(v) for v in self.vectors)
        if len(ks) < 2 or any(len(k) != 1 for k in ks):
            raise ValueError(f"TensorNet: need >= 2 parameter vectors, got shapes {ks}")
        if tuple(jnp.shape(self.tensor)[1:]) != tuple(k[0] for k in ks):
            raise ValueError(
                f"TensorNet: tensor shape {jnp.shape(self.tensor)} does not match (d, "
                f"{', '.join(str(k[0]) for k in ks)})"
            )

    @property
    def depth(self) -> int:
        return len(self.vectors)

    def trainable(self):
        spec = super().trainable()
        spec = eqx.tree_at(lambda n: n.tensor, spec, False)
        if self.factors is not None:
            spec = eqx.tree_at(lambda n: (n.S, n.factors), spec, (False, tuple(False for _ in self.factors)))
        return spec

    @property
    def dim(self) -> int:
        return self.tensor.shape[0]

    def predictor(self):
        T = self.tensor
        for v in reversed(self.vectors):
            T = T @ v
        return T

    def invariants(self):
        # ‖v_l‖² − ‖v_L‖²: f is linear in each v_l, so d‖v_l‖²/dt = −2 f·∂L/∂f for all l.
        n = jnp.stack([jnp.sum(v**2) for v in self.vectors])
        return n[:-1] - n[-1]


class LeakyReLUNeuron(AbstractNetwork):
    """Single leaky-ReLU neuron `f(x) = a·σ(wᵀx)`, `σ(z) = max(z, ρz)`.

    Azulay et al. 2021, §8 (Theorem 8.1 needs ρ > 0; ρ = 0 is plain ReLU, allowed
    for experiments, covered by no implicit-bias theorem: Vardi & Shamir 2021).
    Its "predictor" is `w̃ = a·w`, which is *not* a linear model of x.
    """

    is_linear: ClassVar[bool] = False

    w: Float[Array, " d"]
    a: Float[Array, ""]
    slope: float = eqx.field(static=True, default=0.2)

    def __check_init__(self):
        if jnp.ndim(self.w) != 1 or jnp.ndim(self.a) != 0:
            raise ValueError(
                f"LeakyReLUNeuron: `w` must be a vector and `a` a scalar; got shapes "
                f"{jnp.shape(self.w)} and {jnp.shape(self.a)}"
            )
        if not (0.0 <= float(self.slope) < 1.0):
            raise ValueError(f"LeakyReLUNeuron: slope must lie in [0, 1), got {self.slope}")

    @property
    def dim(self) -> int:
        return self.w.shape[0]

    @property
    def degree(self) -> int:
        return 2

    def predictor(self):
        return self.a * self.w

    def outputs(self, X):
        z = X @ self.w
        return self.a * jnp.maximum(z, self.slope * z)

    def invariants(self):
        # a² − ‖w‖² (Du et al. 2018 Thm 2.1 holds for leaky-ReLU activations).
        return jnp.reshape(self.a**2 - jnp.sum(self.w**2), (1,))


# ---------------------------------------------------------------------------------------
# Tensor formulations of the structured networks (Yun et al. 2021, §3; math.md §3.2)
# ---------------------------------------------------------------------------------------


def orthogonal_tensor_net(S, factors, vectors, *, atol: float = 1e-10) -> TensorNet:
    """A `TensorNet` with the real orthogonally decomposable data tensor
    `M(x) = Σ_j [Sx]_j U_1[:, j] ⊗ ⋯ ⊗ U_L[:, j]` (Yun et al. 2021 §3.3; math.md §3.3).

    Gradient flow on the `v_l` then moves `ã_l = U_lᵀ v_l` exactly as a one-branch depth-L
    diagonal net on the inputs `Sx` (components of v_l outside range(U_l) are frozen), so
    the implicit-bias potential is the diagonal one in the transformed space ρ = ⊙ ã_l.

    - `S`: `(m, d)` real with full column rank. `factors`: `U_l`, `(k_l, m)` with
      orthonormal columns (checked to `atol`). `vectors`: initial `v_l ∈ R^{k_l}`.
    """
    S = np.asarray(S, dtype=float)
    Us = [np.asarray(U, dtype=float) for U in factors]
    if S.ndim != 2 or any(U.ndim != 2 or U.shape[1] != S.shape[0] for U in Us):
        raise ValueError("orthogonal_tensor_net: S must be (m, d) and every U_l (k_l, m)")
    if len(Us) != len(vectors) or len(Us) < 2:
        raise ValueError("orthogonal_tensor_net: need one factor per parameter vector, L >= 2")
    for l, U in enumerate(Us):
        if not np.allclose(U.T @ U, np.eye(U.shape[1]), atol=atol):
            raise ValueError(f"orthogonal_tensor_net: U_{l + 1} does not have orthonormal columns")
    if np.linalg.matrix_rank(S) < S.shape[1]:
        raise ValueError("orthogonal_tensor_net: S must have full column rank")
    T = np.zeros((S.shape[1],) + tuple(U.shape[0] for U in Us))
    for j in range(S.shape[0]):
        outer = Us[0][:, j]
        for U in Us[1:]:
            outer = np.multiply.outer(outer, U[:, j])
        T += np.multiply.outer(S[j], outer)
    return TensorNet(jnp.asarray(T), tuple(jnp.asarray(v, dtype=float) for v in vectors), jnp.asarray(S),
                     tuple(jnp.asarray(U) for U in Us))


def as_tensor_net(net: AbstractNetwork) -> TensorNet:
    """The same network written as a `TensorNet` with a dense data tensor.

    Supports `DiagonalNet`, `FullyConnectedNet` and `ConvNet`. Dense tensors grow
    like `d·Π k_l`: meant for small d (tests, teaching), not for production sweeps.
    """
    if isinstance(net, DiagonalNet):
        L, d = net.depth, net.dim
        T = np.zeros((d,) + (2 * d,) * L)
        for i in range(d):
            T[(i,) + (i,) * L] = 1.0
            T[(i,) + (d + i,) * L] = -1.0  # −Π_l u⁻_l: one −1 on the minus diagonal
        vecs = tuple(jnp.concatenate([net.plus[l], net.minus[l]]) for l in range(L))
        return TensorNet(jnp.asarray(T), vecs)
    if isinstance(net, FullyConnectedNet):
        d = net.dim
        mats = list(net.weights)
        sizes = [d] + [W.shape[1] for W in mats]  # d, m_1, ..., m_{L-1}
        L = net.depth
        # β_c = Σ W1[c,k1] W2[k1,k2] ⋯ a[k_{L-1}]: v_l = vec(W_l) (row-major), v_L = a.
        shape = (d,) + tuple(W.size for W in mats) + (net.a.shape[0],)
        T = np.zeros(shape)
        for idx in np.ndindex(*sizes):
            c, ks = idx[0], idx[1:]
            pos = [c * sizes[1] + ks[0]]
            for l in range(1, L - 1):
                pos.append(ks[l - 1] * sizes[l + 1] + ks[l])
            pos.append(ks[-1])
            T[(c,) + tuple(pos)] = 1.0
        vecs = tuple(W.ravel() for W in mats) + (net.a,)
        return TensorNet(jnp.asarray(T), vecs)
    if isinstance(net, ConvNet):
        L, d = net.depth, net.dim
        T = np.zeros((d,) + (d,) * L)
        for js in np.ndindex(*((d,) * L)):
            T[(sum(js) % d,) + js] = 1.0
        return TensorNet(jnp.asarray(T), tuple(net.kernels[l] for l in range(L)))
    raise TypeError(f"as_tensor_net: no tensor form implemented for {type(net).__name__}")
