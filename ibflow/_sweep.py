"""Scale-vs-shape sweeps: a grid over α × s (× seed), solved as compiled vmapped chunks.

- Points are ordered by the scale of their initial tangent kernel, `α(1+s²)/(1−s²)`
  (`_kernel_scale`: a proxy for the number of steps, small scales mean long plateaus and
  stiff tails), and cut into chunks of `chunk_size`; each chunk is one
  `jit(vmap(gradient_flow))` call whose batch is sharded over all JAX devices
  (`jax.sharding`, a 1-D mesh named "points"). A vmapped adaptive solve steps all
  members until the slowest has converged, so grouping similar scales keeps lock-step cheap.
- Each finished chunk is certified and written to `DIR/chunks/chunk-XXXXX.nc` (classic
  netCDF, `_write_chunk`) by a background thread while the next chunk solves, together with
  the point indices it holds; re-running the same sweep skips every finished point, and an
  interrupted sweep loses nothing already written.
  `DIR/config.json` pins the sweep's definition: a different sweep in the same DIR is
  refused rather than mixed in.
- The result is an `xarray.Dataset` with coordinates `alpha`, `shape`, `seed` (and
  `step_size` for optimiser sweeps) and
  variables `predictor (alpha, shape, seed, dim)`, `train_loss`, `status`,
  `num_steps`, `seconds` (the time from the previous chunk's result to this chunk's, compile
  included for the first, shared equally among its points; certificates and files are made
  meanwhile, beside the next chunk's solve),
  `t_end`, `invariant_drift`, and when available `test_error`, `population_error`
  and, with `certify=True`, the certificate fields. Failed points are kept and marked.
"""

import functools
import hashlib
import inspect
import json
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _program_cache
from ._checks import host_validated
from ._flow import gradient_flow, reducible
from ._solver import LinearlyImplicitExtrapolation
from ._losses import SquareLoss
from ._init import init_by_name
from ._results import status_words

#: Default solver tolerances and extrapolation order of a sweep solved in reduced coordinates
#: (see `sweep`).
REDUCED_RTOL, REDUCED_ATOL = 1e-4, 1e-6
REDUCED_ORDER = 5
CERT_FIELDS = ("kkt_residual", "reference_distance", "primal_residual", "passed", "potential", "applicable")
TRAIN_FIELDS = ("max_sharpness", "final_sharpness", "stability_bound", "flow_distance", "flow_sharpness",
                "loss_increases")


def _solver_fn(kind, d, depth, width, slope, flow_kwargs, optimizer=None, train_kwargs=None):
    def one(alpha, shape, seed, eta, X, y):
        net = init_by_name(kind, d, alpha, shape, depth=depth, width=width, slope=slope,
                           key=jax.random.PRNGKey(seed))
        sol = gradient_flow(net, X, y, throw=False, **flow_kwargs)
        if optimizer is None:
            return (sol.predictor, sol.loss, sol.num_steps, sol.t_end, sol.invariant_drift, sol.result, sol.network,
                    net, {})
        from ._train import sharpness, train

        flow_sharp = jnp.where(sol.converged, sharpness(sol.network, X, y), jnp.nan)
        tr = train(net, X, y, optimizer=optimizer, step_size=eta, reference_sharpness=flow_sharp,
                   key=jax.random.PRNGKey(seed), throw=False, **(train_kwargs or {}))
        dist = jnp.linalg.norm(tr.predictor - sol.predictor) / jnp.linalg.norm(sol.predictor)
        extra = dict(max_sharpness=tr.max_sharpness, final_sharpness=tr.final_sharpness,
                     stability_bound=tr.stability_bound, flow_distance=jnp.where(sol.converged, dist, jnp.nan),
                     flow_sharpness=flow_sharp, loss_increases=tr.loss_increases.astype(float))
        return tr.predictor, tr.loss, tr.steps, tr.steps * eta, tr.invariant_drift, tr.result, tr.network, net, extra

    return one


def _chunk_solver(one, config=None):
    """`solve(alphas, shapes, seeds, etas, X, y, on_lowered=None)`: `one` vmapped over the points
    of a chunk, compiled once per argument signature (`jax.jit`, lowered and compiled ahead of
    time; X and y are arguments, not constants, so the executable does not depend on the data's
    values and JAX's persistent compilation cache can reuse it). `on_lowered()` is called
    between tracing and XLA compilation, which releases the GIL: the sweep starts the
    certificates' own compilation there.

    Traced in `host_validated()` mode (the sweep checks every value on the host first), so
    the executable holds no host callback, and called as a compiled executable rather than
    through `eqx.filter_jit`, which waits for every result: dispatch returns at once and the
    next chunk solves while the host certifies and writes the current one. The outputs'
    non-array parts (network classes and static fields) are recorded at trace time and put
    back.

    `config`: a text naming everything `one` depends on; with it, and the command line's
    program directory set (`_program_cache`), the traced program is exported to disk and a
    later process with the same configuration and argument signature deserialises it instead
    of tracing and lowering it again."""
    def chunk(alphas, shapes, seeds, etas, X, y):
        with host_validated():
            return eqx.filter_vmap(one, in_axes=(0, 0, 0, 0, None, None))(alphas, shapes, seeds, etas, X, y)

    executables = {}  # argument signature (shape, dtype, sharding) -> function of the arguments

    def solve(*args, on_lowered=None):
        key = tuple((a.shape, a.dtype, a.sharding) for a in args)
        if key not in executables:
            executables[key] = _program_cache.compile_program(chunk, args, config, "chunk", on_lowered)
        return executables[key](*args)

    # the compiled program, for inspection (tests: no host callback)
    solve.lower = jax.jit(lambda *a: eqx.filter(chunk(*a), eqx.is_array)).lower
    solve.cache_size = lambda: len(executables)  # compiled versions (tests: no recompilation)
    return solve


_SOLVERS: dict = {}  # compiled chunk solvers of recent sweep configurations (`_cached_chunk_solver`)
_SOLVERS_KEPT = 8


def _without_defaults(flow_kwargs: dict) -> dict:
    """`flow_kwargs` less the entries that spell out `gradient_flow`'s own default (a plain
    number, string or None of the default's type and value): the same flow, so the same
    program key. The command line passes `loss_rtol`, `mode` and `max_steps` explicitly, a
    library call or `ibflow demo` usually none: without this their kept and cached programs
    had different keys, and a command-line sweep after `ibflow demo` at the same sizes traced
    and compiled everything again."""
    defaults = {k: p.default for k, p in inspect.signature(gradient_flow).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    plain = (type(None), bool, int, float, str)
    return {k: v for k, v in flow_kwargs.items()
            if not (k in defaults and type(v) in plain and type(v) is type(defaults[k]) and v == defaults[k])}


def _cached_chunk_solver(net, d, depth, width, slope, flow_kwargs, optimizer, train_kwargs):
    """`_chunk_solver` for this configuration, shared by later sweeps in the process: a second
    sweep of the same network and options (new α, s, data values, or data of the same shapes)
    reuses the compiled program instead of tracing and compiling it again (~2.5 s on the
    Fig. 7.1 grid). Options that cannot be hashed (e.g. array-valued) get a fresh solver.
    Options equal to `gradient_flow`'s defaults are dropped first (`_without_defaults`)."""
    flow_kwargs = _without_defaults(flow_kwargs)
    key = (net, d, depth, width, slope, tuple(sorted(flow_kwargs.items())), optimizer,
           tuple(sorted((train_kwargs or {}).items())))
    build = lambda config=None: _chunk_solver(
        _solver_fn(net, d, depth, width, slope, flow_kwargs, optimizer, train_kwargs), config)
    try:
        hash(key)
    except TypeError:
        return build()
    if key not in _SOLVERS:
        if len(_SOLVERS) >= _SOLVERS_KEPT:
            _SOLVERS.pop(next(iter(_SOLVERS)))  # the oldest configuration
        _SOLVERS[key] = build(repr(key) if _keepable(flow_kwargs, train_kwargs) else None)
    return _SOLVERS[key]


def _keepable(*option_dicts) -> bool:
    """Whether a configuration's text names its trace (`_program_cache`): every option a plain
    number, string or None, or an object of ibflow's or diffrax's own classes (whose code the
    program key's fingerprint covers). A user's own class or function could change its code
    under the same text."""
    for options in option_dicts:
        for v in (options or {}).values():
            if v is None or isinstance(v, (bool, int, float, str)):
                continue
            if type(v).__module__.split(".")[0] not in ("ibflow", "diffrax"):
                return False
    return True


def _kernel_scale(alpha, shape):
    """`α(1+s²)/(1−s²)`: half the initial tangent kernel `u² + v²` of a two-layer factor pair with
    scale α and shape s (Azulay et al. 2021 §7.1 magnitudes), the sweep's proxy for how many steps
    a point needs. Only the chunking uses it, never a result. Fig. 7.1 grid (3 data sets): the
    lock-step cost, Σ over chunks of the slowest member's steps, 211-216 ordered by α alone and
    183-189 by this scale."""
    return alpha * (1 + shape**2) / (1 - shape**2)


def _config_hash(config):
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _one_blas_thread(fn):
    """Run `fn` with NumPy/SciPy's BLAS (OpenBLAS) on one thread, restored afterwards
    (`threadpoolctl`). A sweep's host-side linear algebra is small (multipliers and residuals
    of a few points at a time), and idle OpenBLAS workers spin-wait for ~ms after each call,
    taking a core from the XLA solve running beside them: the Fig. 7.1 command line used
    1-2 s less CPU and ~0.5 s less wall time on 2 cores with one BLAS thread."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


@_one_blas_thread
def sweep(
    X,
    y,
    *,
    alphas,
    shapes,
    net: str = "diagonal",
    seeds=(0,),
    depth: int = 2,
    width: int = 1,
    slope: float = 0.2,
    X_test=None,
    y_test=None,
    w_star=None,
    certify: bool = False,
    out: str | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    flow_kwargs: dict | None = None,
    optimizer: str | None = None,
    step_sizes=None,
    train_kwargs: dict | None = None,
    _on_dispatch=None,
):
    """Solve and (optionally) certify the gradient flow at every (α, s, seed) point.

    **Arguments:**

    - `X`, `y`: training data (rows are samples). `X_test`, `y_test`, `w_star`: optional,
      for `test_error` (mean square) and `population_error` (`‖w̃ − w*‖²`, Azulay Fig. 7.1).
    - `alphas`, `shapes`, `seeds`: the grid axes. `net`, `depth`, `width`, `slope`: the network.
    - `certify`: attach the implicit-bias certificate of every point.
    - `out`: a directory for incremental, resumable storage (None: in memory only).
    - `chunk_size`: points per compiled vmapped call (default: 8 per device, at most the grid).
    - `flow_kwargs`: extra keyword arguments for `gradient_flow` (tolerances, `max_steps`, `mode`).
      Without tolerances, a flow solved in reduced coordinates (`mode="auto"` on a two-layer
      diagonal, tied or linear net) uses `rtol = 1e-4`, `atol = 1e-6` and, unless a `solver` is
      given, `LinearlyImplicitExtrapolation(order_k=5)`: its limit does not depend on path
      errors (see the comments in the code); otherwise `gradient_flow`'s 1e-10/1e-12 and solver.
    - `optimizer`, `step_sizes`: train every point with a discrete optimiser (`ibflow.train`)
      at each step size instead: the dataset gains a `step_size` axis and the fields
      `max_sharpness`, `final_sharpness`, `stability_bound`, `flow_distance` (relative
      distance to the gradient-flow limit from the same initialisation), `flow_sharpness`
      and `loss_increases`; `t_end` is `steps·η`. `train_kwargs` go to `train`.
    - `_on_dispatch`: internal (the command line's background imports), called after each
      chunk is dispatched.

    **Returns:** an `xarray.Dataset` (module docstring).

    While it runs, NumPy/SciPy's BLAS is limited to one thread (`_one_blas_thread`).
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    # Every value the solves would check at run time is checked here, on the host (`_chunk_solver`).
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
        raise ValueError("X and y must be finite (no NaN or inf)")
    alphas = np.asarray(alphas, dtype=float).ravel()
    shapes = np.asarray(shapes, dtype=float).ravel()
    seeds = np.asarray(seeds, dtype=np.int64).ravel()
    for axis, values in (("alphas", alphas), ("shapes", shapes), ("seeds", seeds)):
        if values.size == 0:
            raise ValueError(f"{axis} is empty: a sweep needs at least one value on every axis")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if np.any(~np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError("every alpha must be finite and > 0")
    if np.any(~np.isfinite(shapes)) or np.any(np.abs(shapes) >= 1):
        raise ValueError("every shape must be finite with |s| < 1")
    if net == "diagonal-tied" and np.any(shapes != 0):
        raise ValueError("diagonal-tied has no shape: use shapes = [0]")
    flow_kwargs = dict(flow_kwargs or {})
    if optimizer is None:
        if step_sizes is not None:
            raise ValueError("step_sizes need an optimizer")
        etas = np.array([np.nan])
    else:
        etas = np.asarray(step_sizes, dtype=float).ravel()
        if etas.size == 0 or np.any(~np.isfinite(etas)) or np.any(etas <= 0):
            raise ValueError("every step size must be finite and > 0")
    d = X.shape[1]
    if optimizer is None and "rtol" not in flow_kwargs and "atol" not in flow_kwargs:
        loss = flow_kwargs.get("loss", SquareLoss())
        found = []  # traced abstractly: building a concrete probe net compiled ~25 eager ops (~0.8 s)
        jax.eval_shape(lambda: found.append(reducible(
            init_by_name(net, d, float(alphas[0]), float(shapes[0]), depth=depth, width=width, slope=slope,
                         key=jax.random.PRNGKey(0)), loss, flow_kwargs.get("warp"))))
        if flow_kwargs.get("mode", "auto") != "pure" and found[0]:
            # A sweep keeps only limits. In reduced coordinates the flow is the gradient ascent of a
            # strictly concave function (`ReducedFlowProblem.kernel_jump`), so every path converges
            # to the same limit and path errors are forgotten: the limit's accuracy is set by the
            # stopping rule, not by rtol. Fig. 7.1 grid, largest error against the dual-Newton
            # reference: 4.0e-13 at rtol 1e-10, 1e-8, 1e-6, 1e-4 and 1e-3 alike (data seed 0;
            # 4139 / 2086 / 1345 / 986 / 897 steps); seeds 1, 1000, 2001 and (d, N) = (500, 50),
            # (2000, 100), (300, 100): every point converged at 1e-6, 1e-5, 1e-4 and 1e-3 with the
            # same largest error at each rtol (1.2e-13 ... 7.6e-13), 26-28 % fewer steps at 1e-4
            # than at 1e-6. Wider grids (α 1e-6 ... 10, s -0.9 ... 0.995, 7 data sets, 3 nets):
            # 44 points not converged at 1e-4 against 59 at 1e-6, each a strict loss target below
            # the float64 floor, the same kind at both; none since the floor-aware target and the
            # repeated end-game jumps (`ReducedFlowProblem.end_game`). `t_end`, the time the stopping event was
            # detected in the last, geometrically growing steps, is not a path quantity at any of
            # these rtol (it moved by 3x between 1e-8 and 1e-6).
            flow_kwargs.update(rtol=REDUCED_RTOL, atol=REDUCED_ATOL)
            # At rtol 1e-4 a high extrapolation order buys little: order 5 takes ~40 % more steps
            # than order 8 but each has 11 vector-field evaluations instead of 29, and the chunk
            # program is smaller. Fig. 7.1 grid, data seed 0, in process (3 interleaved runs):
            # first call (compile included) 7.1-7.9 s against 8.3-10.3 s, second 2.8-3.0 against
            # 3.0-3.8 s, largest error 4.1e-13 against 4.0e-13. 11 more data sets (d 100-2000,
            # N 50-100, α up to 10 on two of them): all 1100 points converged at both orders,
            # the same largest errors (to 1.3e-11 on a square X against 5.1e-12), 22.7 s in all
            # against 26.0 s.
            flow_kwargs.setdefault("solver", LinearlyImplicitExtrapolation(order_k=REDUCED_ORDER))
    # Ordered by step size, then kernel scale: a vmapped chunk runs until its slowest member is done.
    pairs = sorted(((i, j) for i in range(len(alphas)) for j in range(len(shapes))),
                   key=lambda ij: (_kernel_scale(alphas[ij[0]], shapes[ij[1]]), alphas[ij[0]], ij[1]))
    grid = [(i, j, k, m) for m in np.argsort(-etas) for i, j in pairs for k in range(len(seeds))]
    n_dev = len(jax.devices())
    if chunk_size is None:
        # 8 per device on every platform. On 2 CPU cores (Fig. 7.1 grid, in process, calls after
        # the compiling one): 1.55-1.79 s at 8, 1.84-1.97 s at 4, 2.08-2.2 s at 16. On an H200 the
        # whole grid in one chunk made the command line no faster warm and 5-6 s slower cold, and
        # the demo's chunks then no longer served a later sweep (`benchmarks/results/gpu_h200.md`).
        chunk_size = min(len(grid), 8 * n_dev)
    chunk_size = max(n_dev, -(-chunk_size // n_dev) * n_dev)

    config = dict(net=net, depth=depth, width=width, slope=slope, alphas=alphas.tolist(), shapes=shapes.tolist(),
                  seeds=seeds.tolist(), certify=certify, chunk_size=chunk_size,
                  flow_kwargs={k: repr(v) for k, v in flow_kwargs.items()}, optimizer=optimizer,
                  step_sizes=None if optimizer is None else etas.tolist(),
                  train_kwargs={k: repr(v) for k, v in (train_kwargs or {}).items()},
                  data=hashlib.sha256(X.tobytes() + y.tobytes()).hexdigest()[:16])
    done = {}
    next_chunk = 0  # new chunk files are numbered on from the highest one already there
    if out is not None:
        os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
        cfg_path = os.path.join(out, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                old = json.load(f)
            if _config_hash(old) != _config_hash(config):
                raise ValueError(f"{out} holds a different sweep (config.json differs); use another --out")
        else:
            with open(cfg_path, "w") as f:
                json.dump(config, f, indent=1)
        for name in sorted(os.listdir(os.path.join(out, "chunks"))):
            if name.endswith(".nc"):
                import xarray as xr  # imported where needed: ~0.4 s off a fresh sweep's start

                with xr.open_dataset(os.path.join(out, "chunks", name)) as ds:  # classic netCDF (or netCDF4)
                    ds = ds.load()
                for p, row in zip(ds["point"].values, _rows_from_chunk(ds)):
                    done[tuple(int(v) for v in p)] = row
                if name.startswith("chunk-") and name[6:-3].isdigit():
                    next_chunk = max(next_chunk, int(name[6:-3]) + 1)
    todo = [g for g in grid if g not in done]

    solve_chunk = _cached_chunk_solver(net, d, depth, width, slope, flow_kwargs, optimizer, train_kwargs)
    X_dev, y_dev = jnp.asarray(X), jnp.asarray(y)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("points",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("points"))

    # Certificates and chunk files are made by one background thread, chunk by chunk in order,
    # while the next chunk solves. Its dual-Newton references then run beside the solve:
    # XLA:CPU executes calls made from this thread in order behind the dispatched chunk, but a
    # call from another thread at once (measured: 8 references finished in 0.12 s during a
    # 0.35 s chunk, against 0.38 s when called here); the flows use about one core of two.
    from concurrent.futures import ThreadPoolExecutor

    worker = ThreadPoolExecutor(max_workers=1)
    finished = []  # the worker's futures, one a chunk
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), unit="pt", desc=f"sweep {net}")
    def dispatch(c0):
        pts = todo[c0:c0 + chunk_size]
        pad = pts + [pts[-1]] * (chunk_size - len(pts))
        a = jax.device_put(jnp.asarray([alphas[p[0]] for p in pad]), sharding)
        s = jax.device_put(jnp.asarray([shapes[p[1]] for p in pad]), sharding)
        k = jax.device_put(jnp.asarray([seeds[p[2]] for p in pad]), sharding)
        e = jax.device_put(jnp.asarray([etas[p[3]] for p in pad]), sharding)
        launched = pts, solve_chunk(a, s, k, e, X_dev, y_dev, on_lowered=warm if c0 == starts[0] else None)
        if c0 == starts[0]:
            # Once the first chunk is compiled and running, the worker imports what the chunk
            # files and the dataset need (xarray, h5netcdf: ~0.5 s) while this thread waits on XLA.
            worker.submit(_import_writer_modules)
        if _on_dispatch is not None:
            _on_dispatch()
        return launched

    starts = list(range(0, len(todo), chunk_size))
    t_prev = time.perf_counter()  # a chunk's time runs from the previous chunk's result (compile included)
    projector = None
    if certify:
        from ._certify import stationarity_projector

        projector = stationarity_projector(X)  # one SVD of X for every chunk's KKT multipliers

    def warm():
        # The first chunk is traced; while XLA compiles it (~2 s, about one core of two busy, the
        # GIL released), the worker compiles the certificates' programs.
        if certify:
            p0 = todo[0]
            worker.submit(_compile_certificates, min(chunk_size, len(todo)), net, d, alphas[p0[0]], shapes[p0[1]],
                          seeds[p0[2]], dict(depth=depth, width=width, slope=slope), X, y)

    pending = dispatch(starts[0]) if starts else None
    for i in range(len(starts)):
        pts, (pred, loss, steps, t_end, drift, result, nets, nets0, extra) = pending
        # One host transfer per array (indexing device arrays point by point cost ~0.3 s a grid).
        pred, loss, steps, t_end, drift = (np.asarray(v) for v in (pred, loss, steps, t_end, drift))
        extra = {f: np.asarray(v) for f, v in extra.items()}
        words = status_words(result)
        nets0 = _on_host(nets0)
        if X_test is not None:
            nets = _on_host(nets)
        now = time.perf_counter()
        elapsed, t_prev = now - t_prev, now
        # The next chunk is dispatched (asynchronously) before this one is certified and
        # written, so its solve runs while the worker does the host work.
        if i + 1 < len(starts):
            pending = dispatch(starts[i + 1])
        for f in finished:
            if f.done():
                f.result()  # a failed certificate or chunk write stops the sweep here
        rows = []
        for b, p in enumerate(pts):
            rows.append(dict(predictor=pred[b], train_loss=float(loss[b]), num_steps=int(steps[b]),
                             t_end=float(t_end[b]), invariant_drift=float(drift[b]), status=str(words[b]),
                             seconds=elapsed / len(pts), **{f: float(v[b]) for f, v in extra.items()}))
        if X_test is not None or w_star is not None:
            for b, row in enumerate(rows):
                if X_test is not None:
                    netb = _member(nets, b)
                    row["test_error"] = float(np.mean((np.asarray(netb.outputs(jnp.asarray(X_test))) - y_test) ** 2))
                if w_star is not None:
                    row["population_error"] = float(np.sum((row["predictor"] - np.asarray(w_star)) ** 2))
        initials = [_member(nets0, b) for b in range(len(pts))] if certify else None
        path = None
        if out is not None:
            path = os.path.join(out, "chunks", f"chunk-{next_chunk:05d}.nc")
            next_chunk += 1
        finished.append(worker.submit(_finish_chunk, pts, rows, initials, X, y, projector, path))
        for p, row in zip(pts, rows):
            done[p] = row  # completed in place by the worker (certificate fields)
        if bar is not None:
            bar.update(len(pts))
    worker.shutdown(wait=True)
    for f in finished:
        f.result()  # a failed certificate or chunk write is an error, not a silently missing point
    if bar is not None:
        bar.close()
    ds = _assemble(done, alphas, shapes, seeds, etas, d, net, certify)
    if optimizer is None:
        ds = ds.isel(step_size=0, drop=True)
    else:
        ds.attrs["optimizer"] = optimizer
    ds.attrs["config"] = json.dumps(config)
    if out is not None:
        tmp = os.path.join(out, "sweep.nc.tmp")
        ds.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, os.path.join(out, "sweep.nc"))
    return ds


_SCALARS = ("train_loss", "num_steps", "t_end", "invariant_drift", "seconds", "test_error", "population_error",
            "kkt_residual", "reference_distance", "primal_residual") + TRAIN_FIELDS
_FLAGS = ("passed", "applicable")


def _on_host(tree):
    """`tree` with its arrays as NumPy arrays (networks taken apart point by point on the host)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x) if eqx.is_array(x) else x, tree)


def _member(tree, b):
    """Point b of a chunk's batched `tree` (every array indexed along its first axis)."""
    return jax.tree_util.tree_map(lambda x: x[b] if eqx.is_array(x) else x, tree)


def _import_writer_modules():
    try:
        import h5netcdf  # noqa: F401
        import scipy.io  # noqa: F401
        import xarray  # noqa: F401
    except ImportError:
        pass  # reported by the first chunk write


def _compile_certificates(n, net, d, alpha, shape, seed, net_kwargs, X, y):
    """Compile the certificates' programs for the shapes the chunks will bring (dual Newton and
    the batched mirror map: ~0.6 s of XLA compilation alone, ~1.3 s when it ran beside the
    solves) while the first chunk itself compiles: `warm_up_batch` on n copies of one of the
    sweep's initialisations."""
    from ._certify import warm_up_batch

    init = jax.jit(lambda: init_by_name(net, d, float(alpha), float(shape), key=jax.random.PRNGKey(int(seed)),
                                        **net_kwargs))()
    init = _on_host(init)
    try:
        warm_up_batch([init] * n, X, y)
    except Exception:  # noqa: BLE001 - a warm-up only: the chunks' own certificates raise it where it counts
        pass


def _finish_chunk(pts, rows, initials, X, y, projector, path):
    """The worker thread's part of a chunk: its certificates (`initials` given) added to `rows`
    in place, then its file `path` (if any) written."""
    if initials is not None:
        from ._certify import certify_batch

        certs = certify_batch(np.stack([r["predictor"] for r in rows]), [r["status"] for r in rows],
                              [r["invariant_drift"] for r in rows], initials, X, y, projector=projector)
        for row, cert in zip(rows, certs):
            row.update({f: getattr(cert, f) for f in CERT_FIELDS})
    if path is not None:
        _write_chunk(path, pts, rows)


def _write_chunk(path, pts, rows):
    """One chunk file: `predictor (n, dim)`, the per-point numbers as one `scalars (n, field)`
    array named by its `field` coordinate (flags as 0/1), `status`, `potential` and
    `point (n, axis)`, as classic netCDF (SciPy's writer): 2.5 ms a file against 90 ms for
    netCDF4 through h5netcdf with a variable per field, which took ~1 s of a 2-core
    machine's time during a 100-point sweep. `sweep.nc` stays netCDF4."""
    import xarray as xr

    fields = [k for k in _SCALARS + _FLAGS if k in rows[0]]
    scalars = np.array([[np.nan if r[k] is None else float(r[k]) for k in fields] for r in rows], dtype=float)
    data = {"predictor": (("n", "dim"), np.stack([r["predictor"] for r in rows])),
            "scalars": (("n", "field"), scalars),
            "status": (("n",), np.array([r["status"] for r in rows], dtype=object)),
            "point": (("n", "axis"), np.array(pts, dtype=np.int32))}  # classic netCDF has no int64
    if "potential" in rows[0]:
        data["potential"] = (("n",), np.array([r["potential"] for r in rows], dtype=object))
    tmp = path + ".tmp"
    xr.Dataset(data, coords={"field": np.array(fields, dtype=object)}).to_netcdf(tmp, engine="scipy")
    os.replace(tmp, path)  # a chunk is either fully written or absent


def _rows_from_chunk(ds):
    if "scalars" not in ds:  # a chunk file of earlier versions: a netCDF4 variable per field
        fields = [k for k in _SCALARS + _FLAGS if k in ds]
        ds = ds.assign(scalars=(("n", "field"), np.stack([ds[k].values.astype(float) for k in fields], axis=1)),
                       field=np.array(fields, dtype=object))
    fields = [str(f) for f in ds["field"].values]
    scalars = ds["scalars"].values
    rows = []
    for n in range(ds.sizes["n"]):
        row = {"predictor": ds["predictor"].values[n], "status": str(ds["status"].values[n])}
        for k, key in enumerate(fields):
            v = float(scalars[n, k])
            row[key] = bool(v) if key in _FLAGS else v
        if "potential" in ds:
            row["potential"] = str(ds["potential"].values[n])
        rows.append(row)
    return rows


def _assemble(done, alphas, shapes, seeds, etas, d, net, certify):
    import xarray as xr

    shp = (len(alphas), len(shapes), len(seeds), len(etas))
    pred = np.full(shp + (d,), np.nan)
    status = np.full(shp, "missing", dtype=object)
    scal = {}
    for (i, j, k, m), row in done.items():
        pred[i, j, k, m] = row["predictor"]
        status[i, j, k, m] = row["status"]
        for key, v in row.items():
            if key in ("predictor", "status"):
                continue
            if key not in scal:
                dtype = object if key == "potential" else (bool if key in ("passed", "applicable") else float)
                scal[key] = np.full(shp, "" if dtype is object else (False if dtype is bool else np.nan), dtype=dtype)
            scal[key][i, j, k, m] = v
    dims = ("alpha", "shape", "seed", "step_size")
    data = {"predictor": (dims + ("dim",), pred), "status": (dims, status.astype(str))}
    for key, arr in scal.items():
        data[key] = (dims, arr.astype(str) if arr.dtype == object else arr)
    ds = xr.Dataset(data, coords=dict(alpha=alphas, shape=shapes, seed=seeds, step_size=etas, dim=np.arange(d)))
    ds.attrs["net"] = net
    ds.attrs["certified"] = int(certify)
    ds["seconds"].attrs["note"] = "wall time of the point's vmapped chunk divided by its number of points"
    return ds
