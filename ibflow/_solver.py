"""A stiff diffrax solver for gradient flow: linearly implicit Euler extrapolation
with Gauss–Newton W-matrices solved through the N×N tangent kernel.

Why: after interpolation the gradient flow `θ̇ = −∇L(θ)` is stiff. The Hessian of
the loss is `JᵀCJ + Σ_n r_n ∇²f_n` (J: output Jacobian, C: loss curvature); its
stiff part is the rank-N Gauss–Newton term, whose eigenvalues range from the
largest to the smallest tangent-kernel eigenvalue (the latter ~α for small-scale
diagonal nets). Explicit solvers then need ~λ_max/λ_min steps.

Method (Deuflhard 1985; Hairer & Wanner, *Solving ODEs II*, §IV.9, "SEULEX"):
for a macro step H and the step-number sequence n_j = 1, …, k, take n_j
linearly implicit Euler sub-steps `(I − hA)Δ = h f(y)` with `h = H/n_j` and one
fixed matrix `A = −GᵀG` (`G = C^{1/2}J` at the start of the step), then
extrapolate the results with the Aitken–Neville scheme in powers of h. The
linearly implicit Euler method has an asymptotic h-expansion for *any* fixed A,
so extrapolation keeps order k with the approximate (Gauss–Newton) Jacobian
(a W-method). `(I + hGᵀG)⁻¹` is applied with the Woodbury identity through the
eigendecomposition of the N×N kernel `GGᵀ` (one per step, shared by all sub-step
sizes): no P×P matrix is ever formed.

The returned solution is `T_{k,k}` (order k); the error estimate is
`T_{k,k} − T_{k,k−1}`, used by any diffrax adaptive step-size controller.
"""

import functools
import math
from collections.abc import Callable
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._linalg import cho_solve


@eqx.filter_jit
def _flat_vector_field(terms, t0, flat, args, like):
    """The vector field on flattened coordinates. Jitted so that its trace is made once and
    reused by all 1 + k(k−1)/2 evaluations of a step (tracing them one by one was ~2 s of
    the compile time of a vmapped sweep chunk); XLA inlines it, so runtime is unchanged."""
    _, unravel = ravel_pytree(like)
    return ravel_pytree(terms.vf(t0, unravel(flat), args))[0]


class LinearlyImplicitExtrapolation(dfx.AbstractAdaptiveSolver):
    """Extrapolated linearly implicit Euler with Gauss–Newton W-matrices.

    Requires `args` of `diffeqsolve` to provide either `stiff_matrix(y, product_dtype) -> M`,
    a symmetric positive semi-definite matrix on the flattened state with `A = −M` (for
    low-dimensional states such as `ReducedFlowProblem`'s; `product_dtype` is `w_matrix_dtype`,
    to be used only where it is lower than the state's precision), or
    `gauss_newton(y) -> (K, apply, apply_T)` with `K = GGᵀ` (N×N), `apply(b) = Gb`,
    `apply_T(z) = Gᵀz`, where `GᵀG` is the Gauss–Newton Hessian in flattened coordinates (see
    `GradientFlowProblem`). An optional
    fourth element `(D, C)` adds stiff coordinates outside G's range (zero columns of G,
    e.g. the flow-time variable of `MarginFlowProblem`): their rows of A are
    `−D_i e_i + C_i`, with `D` a vector (zero elsewhere) and `C(x)` the linear map giving
    those rows' coupling to the other coordinates (zero elsewhere).

    **Arguments:**

    - `order_k`: number k of extrapolation stages (sequence 1, 2, …, k; default 8); the method
      has order k and its error estimate order k−1.
    - `w_matrix_dtype`: precision of the product that forms the W-matrix on the
      `stiff_matrix` path (`stiff_matrix(y, product_dtype)`), when it is lower than the state's
      (default float32; None: the state's precision). The vector field, the error estimate and
      everything after the integration stay in the working precision; only the matrix A of
      the linear solves is rounded, and any fixed A keeps the method's order (module
      docstring). Forming `M = X diag(k) Xᵀ/N` (2N²d flops) is most of a reduced step's work:
      Azulay Fig. 7.1 grid (d = 1000, N = 100, rtol 1e-4, order 5; 2 data sets, 4 in-process
      calls each, 2 cores) 1.7-2.3 s against 2.1-2.6 s, with the same steps (1381, 1385) and
      the same largest error against the dual-Newton limit (4.0e-13). Wider grids (α 1e-6 … 10,
      s −0.9 … 0.995; (d, N) = (100, 100), (2000, 100), (300, 100), (500, 50)): every point
      converged and certified either way, steps 4253 / 615 / 848 / 744 against
      4263 / 665 / 848 / 744, largest errors within 2× of each other (≤ 6.2e-11).
    """

    order_k: int = 8
    w_matrix_dtype: str | None = eqx.field(static=True, default="float32")

    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar[Callable] = dfx.LocalLinearInterpolation

    def __check_init__(self):
        if not 2 <= self.order_k <= 12:
            raise ValueError(f"order_k must lie in [2, 12], got {self.order_k}")
        if self.w_matrix_dtype is not None:
            try:
                floating = jnp.issubdtype(self.w_matrix_dtype, jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ValueError(f"w_matrix_dtype must be a floating dtype or None, got {self.w_matrix_dtype!r}")

    def order(self, terms):
        return self.order_k

    @property
    def noise_gain(self) -> float:
        """`Σ_j |c_j| n_j` over the weights of `T_{k,k} = Σ c_j T_{j,1}`: a bound on the factor by
        which the extrapolation amplifies rounding, chain j accumulating the errors of its
        `n_j = j` sub-steps (21529 at order 8; `Σ_j |c_j|` alone, 3392, counts one error per
        chain and was measured 1.3-3.6x short in loss on a data set of the Azulay §9 kind)."""
        n = range(1, self.order_k + 1)
        return float(sum(j * abs(math.prod(j / (j - i) for i in n if i != j)) for j in n))

    @property
    def vector_field_evaluations_per_step(self) -> int:
        return 1 + self.order_k * (self.order_k - 1) // 2

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        # Jitted, so that the step is traced once: diffrax's loop traces its body four times.
        return _jitted_step(self, terms, t0, t1, y0, args)

    def _step(self, terms, t0, t1, y0, args):
        H = t1 - t0
        flat0, unravel = ravel_pytree(y0)

        def f(flat):
            return _flat_vector_field(terms, t0, flat, args, y0)

        if hasattr(args, "stiff_matrix"):
            return self._step_small(f, flat0, H, args.stiff_matrix(y0, self.w_matrix_dtype), unravel, y0)
        gn = args.gauss_newton(y0)
        K, apply, apply_T = gn[:3]
        decoupled, coupling = gn[3] if len(gn) > 3 else (None, None)
        # One eigendecomposition of the N×N kernel serves every sub-step size h: one LAPACK call
        # per step. (Cholesky factors of I + hK per h deadlocked XLA:CPU, concurrent batched
        # LAPACK calls, see `_linalg`; batching the k chains' products in rounds was measured
        # slower: vmapped data products with two batch axes run below XLA:CPU's GEMM speed.)
        lam, Q = jnp.linalg.eigh(K)
        lam = jnp.maximum(lam, 0.0)

        def solver_for(h):
            # (I + h GᵀG)⁻¹ b = b − Gᵀ Q diag(h/(1 + hλ)) Qᵀ G b   (Woodbury)
            c = h / (1 + h * lam)
            if decoupled is None:
                return lambda b: b - apply_T(Q @ (c * (Q.T @ apply(b))))
            # Coordinates with a zero column of G, their own stiff rate D_i and a coupling row
            # C_i to the others (a block lower-triangular W): x_i = (b_i + h C_i·x)/(1 + hD_i).
            def solve(b):
                x = b - apply_T(Q @ (c * (Q.T @ apply(b))))
                return (x + h * coupling(x)) / (1 + h * decoupled)

            return solve

        return self._extrapolate(f, flat0, [(H / n, solver_for(H / n)) for n in range(1, self.order_k + 1)],
                                 unravel, y0)

    def _step_small(self, f, flat0, H, M, unravel, y0):
        """A step for a small state with `A = −M` given (M symmetric PSD, e.g. `ReducedFlowProblem`).

        Cholesky factors of `I + hM` for all k sub-step sizes come from one batched call, and
        every sub-step solve goes through `_linalg.cho_solve`, whose triangular solves run
        inline at any vmap batch: a step never has two LAPACK calls that wait on XLA:CPU's
        thread pool at once (concurrent ones deadlock it, see `_linalg`). Measured on the
        Fig. 7.1 grid (2 cores, N = 100): 0.3 ms per member-step for the k factors against eigh's
        0.9 ms; CLI 12.2 s with this against 20.0 s with eigh (rtol 1e-8). Separate factor calls
        per h, or independent chains' plain `cho_solve` at 25 points, deadlocked.
        """
        k = self.order_k
        hs = H / jnp.arange(1, k + 1, dtype=M.dtype)
        factors = jax.lax.linalg.cholesky(jnp.eye(M.shape[0], dtype=M.dtype) + hs[:, None, None] * M)
        return self._extrapolate(f, flat0, [(hs[j], functools.partial(cho_solve, factors[j])) for j in range(k)],
                                 unravel, y0)

    def _extrapolate(self, f, flat0, stages, unravel, y0):
        """The k linearly implicit Euler chains and their Aitken–Neville extrapolation.
        `stages[j] = (h, solve)`: chain j takes j + 1 sub-steps of size h = H/(j + 1) with
        `solve(b) = (I − hA)⁻¹ b`."""
        f0 = f(flat0)
        seq = tuple(range(1, self.order_k + 1))
        rows = []
        for n, (h, solve) in zip(seq, stages):
            y = flat0 + solve(h * f0)
            # Unrolled on purpose: rolled `lax.fori_loop` sub-steps made the vmapped Fig. 7.1
            # sweep 24 % slower (24.0 vs 19.3 s; compilation only 0.4 s faster).
            for _ in range(n - 1):
                y = y + solve(h * f(y))
            rows.append([y])
        for j in range(1, len(seq)):
            for l in range(j):
                prev, cur = rows[j - 1][l], rows[j][l]
                rows[j].append(cur + (cur - prev) / (seq[j] / seq[j - l - 1] - 1))
        y1 = rows[-1][-1]
        # A non-finite sub-step (e.g. overflow on a far too long step) rejects the step: an
        # infinite error makes the controller shrink it, where NaN would poison the step size.
        err = jnp.where(jnp.all(jnp.isfinite(y1)), y1 - rows[-1][-2], jnp.inf)
        y1_tree = unravel(y1)
        dense_info = dict(y0=y0, y1=y1_tree)
        return y1_tree, unravel(err), dense_info, None, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


@eqx.filter_jit
def _jitted_step(solver, terms, t0, t1, y0, args):
    return solver._step(terms, t0, t1, y0, args)
