"""Run-time value checks in traced code, and the host-validated mode that leaves them out.

`value_check(x, pred, msg)` is `eqx.error_if`: it raises at run time, under `jit` and `vmap`
too. A caller that has already checked the same values on the host (the sweep checks α, s,
step sizes and the data with NumPy before it compiles anything; `ibflow run` its data file,
labels and step size) traces inside `host_validated()`, and the checks are left out of the
program. That matters for speed, not for correctness: an executable with an `error_if` holds a
host callback, and JAX runs such an executable synchronously (the sweep's next chunk could not
solve while the current one is certified) and never stores it in its persistent compilation
cache.

The mode is read when a function is traced. A function that holds checks and is jitted with
a trace cache of its own (`gradient_flow`, `margin_flow`, `train`) receives it as a static
argument, so a trace without checks is never reused for a call that needs them.
"""

import contextlib
import contextvars

import equinox as eqx

_HOST_VALIDATED = contextvars.ContextVar("ibflow_host_validated", default=False)


@contextlib.contextmanager
def host_validated():
    """Trace without `value_check`s: the caller has checked every value they would check."""
    token = _HOST_VALIDATED.set(True)
    try:
        yield
    finally:
        _HOST_VALIDATED.reset(token)


def checks_enabled() -> bool:
    """False inside `host_validated()`, else True."""
    return not _HOST_VALIDATED.get()


def value_check(x, pred, msg: str, enabled: bool | None = None):
    """`eqx.error_if(x, pred, msg)`, or `x` unchanged when `enabled` is False (default:
    `checks_enabled()`, read now, at trace time)."""
    if enabled is None:
        enabled = checks_enabled()
    return eqx.error_if(x, pred, msg) if enabled else x
