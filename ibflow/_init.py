"""Initialisations by scale α and shape s (Azulay et al., ICML 2021, §7.1–§7.2).

All functions are pure JAX (jit/vmap-safe in `alpha`, `shape` and `key`). Value
preconditions (α > 0, |s| < 1, finite) are checked with `eqx.error_if`, so they
raise at run time inside `jit` too (left out when traced inside `_checks.host_validated()`,
by a caller that checked them on the host).

**Definitions (exact, Azulay §7.1 / §7.2; math.md §2.4–§2.5).** For a product of
two factors u (first layer) and v (last layer):

- scale `α = |u|·|v|`, shape `s = (|v|/|u| − 1)/(|v|/|u| + 1) ∈ (−1, 1)`;
- inversely `|u| = √(α(1−s)/(1+s))`, `|v| = √(α(1+s)/(1−s))`.

**Generalisation to depth L (ours, documented).** Layers 1…L−1 share the
magnitude `a` and the last layer has `b`, with `b/a = (1+s)/(1−s)` and
`a^{L−1}·b = α`: α is the product of the layer magnitudes and s compares the
last layer with the others. For L = 2 this is exactly the definition above.

**Width m (fully connected).** Every hidden neuron j gets its own (α, s) pair in
this sense: `‖w_j‖`-type first-layer factor and `|a_j|` last-layer factor with
`|a_j|·‖w_j‖ = α` when L = 2. Directions come from `key` (or are given).
"""

import jax
import jax.numpy as jnp

from ._checks import value_check
from ._networks import (
    ConvNet,
    DiagonalNet,
    FullyConnectedNet,
    LeakyReLUNeuron,
    Linear,
    TiedDiagonalNet,
)


def _check_scale_shape(alpha, shape):
    alpha = jnp.asarray(alpha, dtype=float)
    shape = jnp.asarray(shape, dtype=float)
    alpha = value_check(alpha, ~jnp.all(jnp.isfinite(alpha)), "alpha must be finite")
    alpha = value_check(alpha, jnp.any(alpha <= 0), "alpha must be > 0")
    shape = value_check(shape, ~jnp.all(jnp.isfinite(shape)), "shape must be finite")
    shape = value_check(shape, jnp.any(jnp.abs(shape) >= 1), "shape s must satisfy |s| < 1")
    return alpha, shape


def layer_magnitudes(alpha, shape, depth: int = 2):
    """Magnitudes `(a, b)` of the first L−1 layers and of the last layer.

    `a^{L−1} b = α` and `b/a = (1+s)/(1−s)` (module docstring). For L = 2,
    `a = √(α(1−s)/(1+s))`, `b = √(α(1+s)/(1−s))` (Azulay §7.1).
    """
    alpha, shape = _check_scale_shape(alpha, shape)
    ratio = (1 + shape) / (1 - shape)
    a = (alpha / ratio) ** (1.0 / depth)
    return a, a * ratio


def scale_shape(first, last):
    """Inverse map: (α, s) from first- and last-layer magnitudes (Azulay §7.1)."""
    first, last = jnp.abs(first), jnp.abs(last)
    r = last / first
    return first * last, (r - 1) / (r + 1)


def diagonal_init(alpha, shape=0.0, dim: int | None = None, *, depth: int = 2,
                  minus_alpha=None, minus_shape=None) -> DiagonalNet:
    """Untied two-branch diagonal net from per-coordinate scale and shape.

    Unbiased by default (`u⁺ = u⁻`, `v⁺ = v⁻`, so `w̃(0) = 0`; Azulay §4, §7.1).
    Passing `minus_alpha`/`minus_shape` gives the negative branch its own scale
    and shape: a *biased* initialisation (`w̃(0) ≠ 0`, Azulay App. B; math.md §2.3).

    **Arguments:**

    - `alpha`, `shape`: scalars or arrays of shape `(d,)` (per coordinate).
    - `dim`: d, needed when `alpha` and `shape` are scalars.
    - `depth`: L ≥ 2.
    """
    a, b = layer_magnitudes(alpha, shape, depth)
    if minus_alpha is None and minus_shape is None:
        am, bm = a, b
    else:
        am, bm = layer_magnitudes(
            alpha if minus_alpha is None else minus_alpha,
            shape if minus_shape is None else minus_shape,
            depth,
        )
    d = _infer_dim(dim, a, am)
    plus = jnp.concatenate([jnp.broadcast_to(a, (depth - 1, d)), jnp.broadcast_to(b, (1, d))])
    minus = jnp.concatenate([jnp.broadcast_to(am, (depth - 1, d)), jnp.broadcast_to(bm, (1, d))])
    return DiagonalNet(plus, minus)


def tied_diagonal_init(alpha, dim: int | None = None, *, depth: int = 2, w0=None) -> TiedDiagonalNet:
    """Woodworth et al. (2020) tied net `(w⁺)^L − (w⁻)^L`, unbiased, from scale α.

    α is the product of layer magnitudes, as for the untied net, so each weight
    starts at `α^{1/L}·w0` (Woodworth's own scale parameter is `α_W = α^{1/L}`).
    Tied layers are equal, so there is no shape parameter.
    """
    alpha, _ = _check_scale_shape(alpha, 0.0)
    base = alpha ** (1.0 / depth)
    if w0 is not None:
        base = base * jnp.asarray(w0, dtype=float)
    d = _infer_dim(dim, base)
    w = jnp.broadcast_to(base, (d,))
    return TiedDiagonalNet(w, w, depth)


def _unit(key, d, direction):
    if direction is None:
        if key is None:
            raise ValueError("need a PRNG `key` or an explicit `direction`")
        direction = jax.random.normal(key, (d,))
    direction = jnp.asarray(direction, dtype=float)
    return direction / jnp.linalg.norm(direction)


def fully_connected_init(alpha, shape, dim: int, *, width: int = 1, depth: int = 2,
                         key=None, directions=None) -> FullyConnectedNet:
    """Fully connected net `xᵀW_1⋯W_{L−1}a` from scale α and shape s.

    For L = 2, neuron j has `w_j = ‖w‖ u_j` (unit `u_j` from `key` or the columns
    of `directions`, shape `(d, m)`) and `a_j = |a| > 0`, with `α = |a|‖w‖` and
    `s = (|a|/‖w‖ − 1)/(|a|/‖w‖ + 1)` (Azulay §7.2; then `δ = a² − ‖w‖² = 4αs/(1−s²)`).
    For L ≥ 3 the middle layers are `a·O_l` with random orthogonal `O_l` (Haar, from
    `key`), so every path through the net has the product scale α.
    """
    a_mag, b_mag = layer_magnitudes(alpha, shape, depth)
    if directions is None:
        if key is None:
            raise ValueError("fully_connected_init: need a PRNG `key` or explicit `directions`")
        key, sub = jax.random.split(key)
        U = jax.random.normal(sub, (dim, width))
    else:
        U = jnp.asarray(directions, dtype=float).reshape(dim, width)
    U = U / jnp.linalg.norm(U, axis=0, keepdims=True)
    weights = [a_mag * U]
    for _ in range(depth - 2):
        key, sub = jax.random.split(key)
        Q, R = jnp.linalg.qr(jax.random.normal(sub, (width, width)))
        weights.append(a_mag * Q * jnp.sign(jnp.diag(R))[None, :])
    a = jnp.broadcast_to(b_mag, (width,))
    return FullyConnectedNet(tuple(weights), a)


def leaky_relu_init(alpha, shape, dim: int, *, slope: float = 0.2, key=None,
                    direction=None) -> LeakyReLUNeuron:
    """Leaky-ReLU neuron `a·σ(wᵀx)` with `α = |a|‖w‖`, shape s as for the FC neuron
    (Azulay §7.2, §8); `a > 0`, `w` along a unit direction from `key` or given."""
    w_mag, a_mag = layer_magnitudes(alpha, shape, 2)
    u = _unit(key, dim, direction)
    return LeakyReLUNeuron(w_mag * u, jnp.asarray(a_mag, dtype=float), slope)


def conv_init(alpha, shape, dim: int, *, depth: int = 2, key=None) -> ConvNet:
    """Circular convolutional net with kernel norms `(a, …, a, b)` from (α, s) and
    random unit kernel directions from `key` (module docstring)."""
    a, b = layer_magnitudes(alpha, shape, depth)
    if key is None:
        raise ValueError("conv_init: need a PRNG `key`")
    K = jax.random.normal(key, (depth, dim))
    K = K / jnp.linalg.norm(K, axis=1, keepdims=True)
    mags = jnp.concatenate([jnp.broadcast_to(a, (depth - 1,)), jnp.reshape(b, (1,))])
    return ConvNet(K * mags[:, None])


def linear_init(alpha, dim: int, *, key=None, direction=None) -> Linear:
    """Linear model with `‖w(0)‖ = α` along a unit direction from `key` or given."""
    alpha, _ = _check_scale_shape(alpha, 0.0)
    return Linear(alpha * _unit(key, dim, direction))


def _infer_dim(dim, *arrays):
    shapes = [jnp.shape(x) for x in arrays if jnp.ndim(x) > 0]
    if shapes:
        d = shapes[0][-1]
        if dim is not None and dim != d:
            raise ValueError(f"dim={dim} does not match per-coordinate arrays of length {d}")
        return d
    if dim is None:
        raise ValueError("pass `dim` when alpha and shape are scalars")
    return dim


def init_by_name(kind: str, dim: int, alpha, shape, *, depth: int = 2, width: int = 1, slope: float = 0.2,
                 key=None):
    """The initial network of the CLI kind `kind` (`diagonal`, `diagonal-tied`, `fc`, `conv`,
    `leaky-relu`, `linear`) from (α, s); traceable in `alpha`, `shape` and `key`."""
    if kind == "diagonal":
        return diagonal_init(alpha, shape, dim, depth=depth)
    if kind == "diagonal-tied":
        return tied_diagonal_init(alpha, dim, depth=depth)
    if kind == "fc":
        return fully_connected_init(alpha, shape, dim, width=width, depth=depth, key=key)
    if kind == "conv":
        return conv_init(alpha, shape, dim, depth=depth, key=key)
    if kind == "leaky-relu":
        return leaky_relu_init(alpha, shape, dim, slope=slope, key=key)
    if kind == "linear":
        return linear_init(alpha, dim, key=key)
    raise ValueError(f"unknown net {kind!r}")
