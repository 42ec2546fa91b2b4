"""Loading and validating data and parameter files (the `ibflow` file contract).

`D.npz`: `X` (N×d, rows are samples), `y` (N,); optional `X_test`, `y_test`, `w_star`.
`P.npz` (initial parameters), by network:

- `diagonal`: `plus`, `minus`, each (L, d); `diagonal-tied`: `plus`, `minus`, each (d,);
- `fc`: `W` (d, m) and `a` (m,) for depth 2, or `W1` … `W{L-1}` and `a`;
- `leaky-relu`: `w` (d,), `a` (scalar); `conv`: `kernels` (L, d); `linear`: `w` (d,).

Every problem raises `InputError` with a one-line message naming it.
"""

import os

import jax.numpy as jnp
import numpy as np

from ._checks import host_validated
from ._init import init_by_name
from ._networks import (
    ConvNet,
    DiagonalNet,
    FullyConnectedNet,
    LeakyReLUNeuron,
    Linear,
    TiedDiagonalNet,
)

NETS = ("diagonal", "diagonal-tied", "fc", "conv", "leaky-relu", "linear")


class InputError(ValueError):
    """Bad user input (file, key, shape, value); the message is one line."""


def _load_npz(path, what):
    if not os.path.exists(path):
        raise InputError(f"{what} file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is an input error
        raise InputError(f"cannot read {what} file {path}: {type(e).__name__}: {e}") from None


def _finite(name, a):
    if not np.issubdtype(a.dtype, np.number):
        raise InputError(f"{name} must be numeric, got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains NaN or inf")
    return a.astype(np.float64)


def load_data(path):
    """Load and validate `D.npz`; returns a dict of float64 arrays."""
    raw = _load_npz(path, "data")
    for key in ("X", "y"):
        if key not in raw:
            raise InputError(f"data file {path} has no array '{key}' (found: {sorted(raw)})")
    X, y = _finite("X", raw["X"]), _finite("y", raw["y"])
    if X.ndim != 2:
        raise InputError(f"X must be 2-D (N, d) with rows as samples, got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise InputError(f"y must have shape ({X.shape[0]},) to match X {X.shape}, got {y.shape}")
    out = dict(X=X, y=y)
    d = X.shape[1]
    if "w_star" in raw:
        out["w_star"] = _finite("w_star", raw["w_star"])
        if out["w_star"].shape != (d,):
            raise InputError(f"w_star must have shape ({d},), got {out['w_star'].shape}")
    if ("X_test" in raw) != ("y_test" in raw):
        raise InputError("X_test and y_test must be given together")
    if "X_test" in raw:
        Xt, yt = _finite("X_test", raw["X_test"]), _finite("y_test", raw["y_test"])
        if Xt.ndim != 2 or Xt.shape[1] != d or yt.shape != (Xt.shape[0],):
            raise InputError(f"X_test must be (M, {d}) and y_test (M,); got {Xt.shape} and {yt.shape}")
        out.update(X_test=Xt, y_test=yt)
    return out


def check_scale_shape(alpha, shape):
    if alpha is None or not np.isfinite(alpha) or alpha <= 0:
        raise InputError(f"--alpha must be a finite number > 0, got {alpha}")
    if shape is None or not np.isfinite(shape) or abs(shape) >= 1:
        raise InputError(f"--shape must be a finite number with |s| < 1, got {shape}")


def network_from_scale_shape(kind, d, alpha, shape, *, depth=2, width=1, slope=0.2, seed=0):
    """The initial network of kind `kind` from (α, s) (see `ibflow._init`)."""
    import jax

    check_scale_shape(alpha, shape)
    if kind not in NETS:
        raise InputError(f"unknown --net {kind!r}; choose from {', '.join(NETS)}")
    if kind == "diagonal-tied" and shape != 0:
        raise InputError("--net diagonal-tied has tied layers and no shape: use --shape 0")

    # One compiled program instead of ~20 eager operations, each compiled on first use in the
    # process (~0.8 s of a command): α and s are checked above, on the host, so the init's own
    # value checks (`eqx.error_if`, compiled eagerly too) are left out.
    @jax.jit
    def build(alpha, shape, seed):
        return init_by_name(kind, d, alpha, shape, depth=depth, width=width, slope=slope,
                            key=jax.random.PRNGKey(seed))

    with host_validated():
        return build(float(alpha), float(shape), int(seed))


def _need(raw, path, *keys):
    for k in keys:
        if k not in raw:
            raise InputError(f"init file {path} has no array '{k}' (found: {sorted(raw)})")
    return [_finite(k, raw[k]) for k in keys]


def _shape_is(name, a, shape):
    if a.shape != shape:
        raise InputError(f"init array '{name}' must have shape {shape}, got {a.shape}")


def network_from_file(kind, path, d, *, depth=None, slope=0.2):
    """The initial network of kind `kind` from a `P.npz` parameter file."""
    raw = _load_npz(path, "init")
    if kind == "diagonal":
        plus, minus = _need(raw, path, "plus", "minus")
        if plus.ndim != 2 or plus.shape[1] != d or plus.shape[0] < 2:
            raise InputError(f"init array 'plus' must have shape (L, {d}) with L >= 2, got {plus.shape}")
        _shape_is("minus", minus, plus.shape)
        if depth is not None and depth != plus.shape[0]:
            raise InputError(f"--depth {depth} does not match init depth {plus.shape[0]}")
        return DiagonalNet(jnp.asarray(plus), jnp.asarray(minus))
    if kind == "diagonal-tied":
        plus, minus = _need(raw, path, "plus", "minus")
        _shape_is("plus", plus, (d,))
        _shape_is("minus", minus, (d,))
        return TiedDiagonalNet(jnp.asarray(plus), jnp.asarray(minus), depth or 2)
    if kind == "fc":
        if "W" in raw:
            mats = _need(raw, path, "W")
        else:
            names = sorted((k for k in raw if k.startswith("W") and k[1:].isdigit()), key=lambda k: int(k[1:]))
            if not names:
                raise InputError(f"init file {path} needs 'W' (depth 2) or 'W1'...'W{{L-1}}', and 'a'")
            if names != [f"W{i}" for i in range(1, len(names) + 1)]:
                raise InputError(f"init file {path}: weight arrays must be W1..W{len(names)}, found {names}")
            mats = _need(raw, path, *names)
        (a,) = _need(raw, path, "a")
        a = np.atleast_1d(a)
        prev = d
        for i, W in enumerate(mats):
            if W.ndim != 2 or W.shape[0] != prev:
                raise InputError(f"init weight W{i + 1} must have {prev} rows (2-D), got shape {W.shape}")
            prev = W.shape[1]
        _shape_is("a", a, (prev,))
        if depth is not None and depth != len(mats) + 1:
            raise InputError(f"--depth {depth} does not match init depth {len(mats) + 1}")
        return FullyConnectedNet(tuple(jnp.asarray(W) for W in mats), jnp.asarray(a))
    if kind == "leaky-relu":
        w, a = _need(raw, path, "w", "a")
        _shape_is("w", w, (d,))
        if a.size != 1:
            raise InputError(f"init array 'a' must be a scalar, got shape {a.shape}")
        return LeakyReLUNeuron(jnp.asarray(w), jnp.asarray(a.reshape(())), slope)
    if kind == "conv":
        (k,) = _need(raw, path, "kernels")
        if k.ndim != 2 or k.shape[1] != d or k.shape[0] < 2:
            raise InputError(f"init array 'kernels' must have shape (L, {d}) with L >= 2, got {k.shape}")
        return ConvNet(jnp.asarray(k))
    if kind == "linear":
        (w,) = _need(raw, path, "w")
        _shape_is("w", w, (d,))
        return Linear(jnp.asarray(w))
    raise InputError(f"unknown --net {kind!r}; choose from {', '.join(NETS)}")
