"""Batched Cholesky solves that cannot deadlock XLA:CPU.

jaxlib's CPU LAPACK kernels (jax 0.10.2, `jaxlib/cpu/lapack_kernels.cc`) split a batch over
XLA's intra-op thread pool when `batch × cost per matrix ≥ 2·10⁵` flops (`ParallelBatchMap`)
and block the calling pool thread until the pieces are done. When XLA runs such calls
concurrently (independent triangular solves of the extrapolation chains, vmapped over a
sweep's points), every pool thread can end up waiting for work queued behind itself: the
process hangs at 0 % CPU (gdb: `lapack_dtrsm_ffi` → `ParallelBatchMap` → `BlockingCounter::Wait`
on both threads of a 2-core machine; 25 points at N = 100). Calls below the threshold run
inline on the calling thread and never wait.

`cho_solve(L, b)` solves `L Lᵀ x = b` with triangular solves whose batches stay below the
threshold at any vmap nesting: its batching rule flattens the batch and, past the inline
limit, walks it in sequential pieces (`lax.map`).
"""

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

_INLINE_FLOPS = 200_000  # jaxlib's kMinWorkPerTask: smaller batches run on the calling thread


def _inline_batch(n: int) -> int:
    """Largest batch of n×n triangular solves with one right-hand side that runs inline."""
    return max(1, (_INLINE_FLOPS - 1) // (n * n))


def _solve_batch(L, b):
    """L: (B, n, n) lower Cholesky factors, b: (B, n); B at most `_inline_batch(n)`."""
    z = jax.lax.linalg.triangular_solve(L, b[..., None], left_side=True, lower=True)
    return jax.lax.linalg.triangular_solve(L, z, left_side=True, lower=True, transpose_a=True)[..., 0]


@custom_vmap
def _solve_piece(L, b):
    """A batch small enough to run inline; vmapping it again goes back through `cho_solve`."""
    return _solve_batch(L, b)


@_solve_piece.def_vmap
def _solve_piece_vmap(axis_size, in_batched, L, b):
    L, b = _broadcast(axis_size, in_batched, L, b)  # (A, B, n, n), (A, B, n)
    A, B, n = b.shape
    out = jax.vmap(cho_solve)(L.reshape(A * B, n, n), b.reshape(A * B, n))
    return out.reshape(A, B, n), True


@custom_vmap
def cho_solve(L, b):
    """`(L Lᵀ)⁻¹ b` for a lower-triangular Cholesky factor L (n×n) and b (n,)."""
    return _solve_batch(L[None], b[None])[0]


@cho_solve.def_vmap
def _cho_solve_vmap(axis_size, in_batched, L, b):
    L, b = _broadcast(axis_size, in_batched, L, b)
    n = b.shape[-1]
    piece = _inline_batch(n)
    if axis_size <= piece:
        return _solve_piece(L, b), True
    # Sequential pieces of at most `piece` solves (lax.map vmaps `cho_solve` over each, which
    # comes back here with a batch small enough for `_solve_piece`; it handles the remainder).
    return jax.lax.map(lambda Lb: cho_solve(*Lb), (L, b), batch_size=piece), True


def _broadcast(axis_size, in_batched, L, b):
    L_b, b_b = in_batched
    L = L if L_b else jnp.broadcast_to(L, (axis_size,) + L.shape)
    b = b if b_b else jnp.broadcast_to(b, (axis_size,) + b.shape)
    return L, b
