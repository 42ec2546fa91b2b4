"""The `ibflow` command line.

`ibflow run --data D.npz --net {diagonal,diagonal-tied,fc,conv,leaky-relu,linear}
[--depth L] [--width M] [--slope RHO] (--alpha A --shape S [--seed K] | --init P.npz)
[--loss square|exp|logistic [--until-loss EPS] [--until-time T]] [--certify [--potential NAME]]
--out R.json`

Bad input exits with status 2 and a one-line message; a flow that does not
converge writes R.json with its status and exits with status 1. Classification
(`--loss exp|logistic`) needs ±1 labels and linearly separable data (and, for a ReLU neuron
with slope 0, labels of one sign): otherwise R.json gets `status: "not separable"` and the
exit status is 2.

Compiled programs are kept in JAX's persistent compilation cache, so a later command on
problems of the same shapes (any values) skips XLA compilation: `$IBFLOW_CACHE_DIR`, default
`$XDG_CACHE_HOME/ibflow/jax` (`~/.cache/ibflow/jax`); `IBFLOW_CACHE_DIR=off` turns it off.

The command-line process compiles with XLA:CPU's classic LLVM emitters where this jaxlib
offers the choice (`cpu_xla_flags`): the same programs, compiled faster.
"""

import argparse
import json
import re
import sys
import time

import numpy as np

from ._io import NETS, InputError, load_data, network_from_file, network_from_scale_shape
from ._program_cache import enable_compilation_cache


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(f"ibflow: error: {message}\n")
        sys.exit(2)


def _fail(msg, code=2):
    sys.stderr.write(f"ibflow: error: {msg}\n")
    return code


def _add_flow_options(p, sweep=False):
    if sweep:
        p.add_argument("--rtol", type=float, default=None,
                       help="solver relative tolerance (default 1e-10, 1e-11 at depth >= 3; 1e-4 in reduced mode, "
                            "whose limits do not depend on path errors)")
        p.add_argument("--atol", type=float, default=None, help="solver absolute tolerance (default 1e-12, 1e-13 at "
                                                                 "depth >= 3; 1e-6 in reduced mode)")
    else:
        p.add_argument("--rtol", type=float, default=None,
                       help="solver relative tolerance (default 1e-10, 1e-11 at depth >= 3: "
                            "ibflow.default_solver_tolerances)")
        p.add_argument("--atol", type=float, default=None, help="solver absolute tolerance (default 1e-12, 1e-13 at "
                                                                 "depth >= 3)")
    p.add_argument("--mode", choices=("auto", "pure", "reduced"), default="auto",
                   help="pure: integrate the parameter ODE; reduced: the same flow in N coordinates where the network "
                        "has a closed-form flow map (two-layer diagonal, tied depth 2, linear); auto (default): "
                        "reduced where it applies")
    p.add_argument("--loss-rtol", type=float, default=1e-24,
                   help="stop when loss <= loss_rtol * initial loss (default 1e-24)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="step budget (default 20000 for the flow, 2000000 for --optimizer)")


def _add_net_options(p):
    p.add_argument("--net", required=True, choices=NETS)
    p.add_argument("--depth", type=int, default=None, help="depth L >= 2 (default 2)")
    p.add_argument("--width", type=int, default=1, help="hidden width m (fc)")
    p.add_argument("--slope", type=float, default=0.2, help="leaky-ReLU slope rho")


def build_parser():
    parser = _Parser(prog="ibflow", description="Exact gradient flow of linear networks, certified.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="solve one gradient flow and write R.json")
    run.add_argument("--data", required=True)
    _add_net_options(run)
    run.add_argument("--alpha", type=float)
    run.add_argument("--shape", type=float, default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--init", default=None, help="P.npz of initial parameters")
    run.add_argument("--loss", default="square", choices=["square", "exp", "logistic"])
    run.add_argument("--until-loss", default=None,
                     help="classification: stop at this loss level (default 1e-100; any decimal, e.g. 1e-5000)")
    run.add_argument("--until-time", type=float, default=None,
                     help="classification: or at this gradient-flow time, if reached first")
    run.add_argument("--optimizer", default=None, choices=["gd", "sgd", "momentum", "adam"],
                     help="train with a discrete optimiser instead of solving the flow")
    run.add_argument("--step-size", type=float, default=None, help="optimiser step size eta")
    run.add_argument("--batch-size", type=int, default=None, help="mini-batch size (sgd, momentum, adam)")
    run.add_argument("--momentum", type=float, default=0.9, help="heavy-ball momentum beta")
    run.add_argument("--label-noise", type=float, default=0.0, help="std of label noise per step")
    run.add_argument("--sharpness-every", type=int, default=100, help="steps between Lanczos sharpness checks")
    run.add_argument("--certify", action="store_true")
    run.add_argument("--potential", default=None, help="force a named potential (negative controls)")
    run.add_argument("--out", required=True)
    _add_flow_options(run)

    sw = sub.add_parser("sweep", help="certified alpha x shape grid, resumable, with a figure")
    sw.add_argument("--data", required=True)
    _add_net_options(sw)
    sw.add_argument("--alpha", required=True, help="LO:HI:COUNT, log-spaced (or A1,A2,...)")
    sw.add_argument("--shape", default="0", help="comma-separated shapes S1,S2,...")
    sw.add_argument("--seed", default="0", help="comma-separated seeds")
    sw.add_argument("--certify", action="store_true")
    sw.add_argument("--optimizer", default=None, choices=["gd", "sgd", "momentum", "adam"],
                    help="train with a discrete optimiser at each --step-size instead of the flow")
    sw.add_argument("--step-size", default=None, help="comma-separated step sizes ETA1,ETA2,...")
    sw.add_argument("--batch-size", type=int, default=None)
    sw.add_argument("--chunk-size", type=int, default=None)
    sw.add_argument("--out", required=True, help="output directory")
    sw.add_argument("--no-progress", action="store_true")
    _add_flow_options(sw, sweep=True)

    fig = sub.add_parser("figure", help="reproduce a paper figure (PNG + PDF + dataset)")
    fig.add_argument("name", choices=["fig7.1", "fig7.2", "woodworth", "moroshko", "step-size"])
    fig.add_argument("--out", required=True)
    fig.add_argument("--quick", action="store_true", help="reduced size (d = 200, N = 40, 8 alphas)")

    demo = sub.add_parser("demo", help="small certified scale-vs-shape sweep with a table and a figure")
    demo.add_argument("--out", default="ibflow-demo")
    demo.add_argument("--dim", type=int, default=1000)
    demo.add_argument("--samples", type=int, default=100)

    return parser


def _initial_network(args, d):
    depth = args.depth
    if depth is not None and depth < 2:
        raise InputError(f"--depth must be >= 2, got {depth}")
    if args.width is not None and args.width < 1:
        raise InputError(f"--width must be >= 1, got {args.width}")
    if not (0 <= args.slope < 1):
        raise InputError(f"--slope must lie in [0, 1), got {args.slope}")
    if args.init is not None:
        if args.alpha is not None:
            raise InputError("give either --init or --alpha/--shape, not both")
        return network_from_file(args.net, args.init, d, depth=depth, slope=args.slope)
    if args.alpha is None:
        raise InputError("give --alpha (and --shape) or --init")
    shape = args.shape if args.shape is not None else 0.0
    return network_from_scale_shape(args.net, d, args.alpha, shape, depth=depth or 2,
                                    width=args.width, slope=args.slope, seed=args.seed)


def _jsonable(x):
    a = np.asarray(x)
    if a.ndim == 0:
        v = a.item()
        return v if not isinstance(v, float) or np.isfinite(v) else str(v)
    return [_jsonable(v) for v in a]


def _write_json(path, out):
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def _add_init_fields(out, args):
    """The (α, s, seed) of a scale/shape initialisation (absent for --init files)."""
    if args.init is None:
        out.update(alpha=args.alpha, shape=args.shape if args.shape is not None else 0.0, seed=args.seed)


def _add_regression_fields(out, args, data, net, w):
    """Initialisation fields, and test / population errors where the data file has them."""
    _add_init_fields(out, args)
    if "X_test" in data:
        pred = np.asarray(net.outputs(data["X_test"]))
        out["test_error"] = float(np.mean((pred - data["y_test"]) ** 2))
    if "w_star" in data:
        out["population_error"] = float(np.sum((w - data["w_star"]) ** 2))


def cmd_run(args) -> int:
    import jax

    from ._flow import _check_mode
    from ._losses import SquareLoss

    data = load_data(args.data)
    X, y = data["X"], data["y"]
    net0 = _initial_network(args, X.shape[1])
    if args.potential is not None and not args.certify:
        raise InputError("--potential needs --certify")
    if args.loss == "square" and (args.until_loss is not None or args.until_time is not None):
        raise InputError("--until-loss/--until-time need --loss exp|logistic (the square loss stops at --loss-rtol)")
    if args.optimizer is not None:
        return _run_optimizer(args, data, net0)
    if args.step_size is not None or args.batch_size is not None:
        raise InputError("--step-size/--batch-size need --optimizer")
    if args.loss != "square":
        return _run_margin(args, data, net0)
    try:
        reduced = _check_mode(args.mode, net0, SquareLoss(), None)  # gradient_flow's own mode rule
    except ValueError as e:
        raise InputError(f"--net {args.net}: {e}") from None
    on_lowered, warmed_up = _certificate_warm_up(args, net0, X, y)
    t0 = time.perf_counter()
    sol = _run_flow(net0, X, y, args, args.max_steps, on_lowered)
    jax.block_until_ready(sol.predictor)
    wall = time.perf_counter() - t0
    warmed_up()
    w = np.asarray(sol.predictor)
    out = dict(
        net=args.net,
        predictor=_jsonable(w),
        loss=float(sol.loss),
        loss0=float(sol.loss0),
        loss_target=float(sol.loss_target),
        t_end=_jsonable(sol.t_end),
        num_steps=int(sol.num_steps),
        num_rejected_steps=int(sol.num_rejected_steps),
        num_fevals=int(sol.num_fevals) if np.isfinite(sol.num_fevals) else None,
        invariant_drift=float(sol.invariant_drift),
        mode="reduced" if reduced else "pure",
        end_jump=float(sol.end_jump),
        status=sol.status,
        wall_seconds=wall,
    )
    _add_regression_fields(out, args, data, sol.network, w)
    if args.certify:
        from ._certify import certify

        cert = certify(sol, X, y, initial=net0, potential=args.potential)
        out["certificate"] = cert.to_dict()
        if not cert.applicable:
            sys.stderr.write(f"ibflow: certificate not applicable: {cert.reason}\n")
    _write_json(args.out, out)
    if sol.status == "dead_samples":
        return _fail(f"gradient flow converged to a point that does not fit every sample: the ReLU holds some at "
                     f"output 0 (status: dead_samples); see {args.out}", code=1)
    if sol.status != "converged":
        return _fail(f"gradient flow did not converge (status: {sol.status}); see {args.out}", code=1)
    return 0


def _kept_flow(name, solve, options, net0, X, y, on_lowered=None):
    """`solve(net0, X, y)` (a flow of `ibflow run`) as a program of the network's arrays and the
    data (`_program_cache.compile_program`): a later command with the same network structure,
    `options` (everything else `solve` depends on) and shapes takes it from the program
    directory instead of tracing it again (~1 s at d = 1000), and its compilation from JAX's
    compilation cache. `on_lowered()` is called while XLA compiles it (the GIL released).

    The caller checked X and y on the host (`load_data`: finite, shapes; labels for the margin
    flow), so the flow is traced without value checks: a program with `eqx.error_if` holds a
    host callback, and JAX never keeps such a program in its persistent compilation cache
    (`_checks`)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from . import _program_cache
    from ._checks import host_validated

    arrays, static = eqx.partition(net0, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(arrays)

    def flow(*a):
        net = eqx.combine(jax.tree_util.tree_unflatten(treedef, a[:-2]), static)
        with host_validated():
            return solve(net, a[-2], a[-1])

    operands = (*leaves, jnp.asarray(X), jnp.asarray(y))
    config = repr((name, static, treedef, options))
    return _program_cache.compile_program(flow, operands, config, name, on_lowered)(*operands)


def _run_flow(net0, X, y, args, max_steps=None, on_lowered=None):
    """`ibflow run`'s gradient flow (square loss) from `net0`, kept as a program (`_kept_flow`).
    `max_steps` None: `gradient_flow`'s default (an optimiser run's reference flow, whose
    `--max-steps` is the optimiser's)."""
    from ._flow import gradient_flow

    kwargs = dict(rtol=args.rtol, atol=args.atol, loss_rtol=args.loss_rtol, mode=args.mode)
    if max_steps is not None:
        kwargs["max_steps"] = max_steps

    def solve(net, X, y):
        return gradient_flow(net, X, y, throw=False, **kwargs)

    return _kept_flow("run_flow", solve, tuple(sorted(kwargs.items())), net0, X, y, on_lowered)


def _certificate_warm_up(args, net0, X, y):
    """`(on_lowered, wait)` for `_run_flow`: with `--certify`, `on_lowered` starts compiling the
    certificate's dual-Newton program on a background thread while XLA compiles the flow
    (`_certify.warm_up`: compilation only; its arguments are prepared here, on this thread),
    and `wait()` joins it before `certify`. A failed warm-up only costs the speed-up: `certify`
    compiles and reports for itself."""
    if not args.certify:
        return None, lambda: None
    import threading

    from ._certify import reference_arguments, warm_up

    try:
        arguments = reference_arguments(net0, X, y, args.potential)
    except Exception:  # noqa: BLE001 - certify reports it
        return None, lambda: None
    threads = []

    def run():
        try:
            warm_up(arguments)
        except Exception:  # noqa: BLE001 - certify reports it
            pass

    def on_lowered():
        threads.append(threading.Thread(target=run, name="ibflow-certificate-warm-up", daemon=True))
        threads[-1].start()

    return on_lowered, lambda: [t.join() for t in threads]


def _run_optimizer(args, data, net0) -> int:
    import jax

    from ._checks import host_validated
    from ._train import sharpness, train

    X, y = data["X"], data["y"]
    if args.loss != "square":
        raise InputError("--optimizer runs support the square loss only")
    if args.step_size is None or not (np.isfinite(args.step_size) and args.step_size > 0):
        raise InputError("--optimizer needs --step-size ETA > 0")
    if args.optimizer == "sgd" and args.batch_size is None:
        raise InputError("--optimizer sgd needs --batch-size B")
    if args.batch_size is not None and not 1 <= args.batch_size <= X.shape[0]:
        raise InputError(f"--batch-size must lie in [1, N = {X.shape[0]}], got {args.batch_size}")
    if args.optimizer == "gd" and args.batch_size is not None:
        raise InputError("--optimizer gd is full-batch; use sgd for mini-batches")
    if args.sharpness_every < 1:
        raise InputError("--sharpness-every must be >= 1")
    # The gradient-flow limit from the same initialisation: the reference for the
    # step-size bias and for the stability check (is its sharpness above 2/eta?).
    # X and y (`load_data`) and the step size (above) are checked on the host: both programs are
    # traced without value checks, so JAX's persistent compilation cache can keep them (`_checks`);
    # the flow's traced program is kept too (`_run_flow`).
    flow = _run_flow(net0, X, y, args)
    flow_ok = flow.status == "converged"
    flow_sharp, flow_sharp_residual = ((float(v) for v in sharpness(flow.network, X, y, with_residual=True))
                                       if flow_ok else (None, None))
    t0 = time.perf_counter()
    with host_validated():
        sol = train(net0, X, y, optimizer=args.optimizer, step_size=args.step_size, batch_size=args.batch_size,
                    momentum=args.momentum, label_noise=args.label_noise, loss_rtol=args.loss_rtol,
                    max_steps=args.max_steps if args.max_steps_given else 2_000_000,
                    sharpness_every=args.sharpness_every, key=jax.random.PRNGKey(args.seed),
                    reference_sharpness=flow_sharp, throw=False)
    jax.block_until_ready(sol.predictor)
    wall = time.perf_counter() - t0
    w = np.asarray(sol.predictor)
    bound = float(sol.stability_bound)
    out = dict(
        net=args.net,
        optimizer=args.optimizer,
        step_size=args.step_size,
        batch_size=args.batch_size,
        predictor=_jsonable(w),
        loss=float(sol.loss),
        loss0=float(sol.loss0),
        loss_target=float(sol.loss_target),
        steps=int(sol.steps),
        num_steps=int(sol.steps),
        t_end=float(sol.steps) * args.step_size,
        max_sharpness=_jsonable(sol.max_sharpness),
        final_sharpness=_jsonable(sol.final_sharpness),
        stability_bound=_jsonable(bound),
        edge_of_stability=bool(sol.edge_of_stability),
        loss_increases=int(sol.loss_increases),
        invariant_drift=float(sol.invariant_drift),
        flow_status=flow.status,
        flow_sharpness=flow_sharp,
        flow_sharpness_residual=flow_sharp_residual,
        flow_distance=(float(np.linalg.norm(w - np.asarray(flow.predictor)) / np.linalg.norm(np.asarray(flow.predictor)))
                       if flow_ok else None),
        status=sol.status,
        wall_seconds=wall,
        history=[dict(step=int(st), loss=float(lo), sharpness=_jsonable(sh)) for st, lo, sh in
                 zip(np.asarray(sol.history_steps), np.asarray(sol.history_loss), np.asarray(sol.history_sharpness))
                 if st >= 0],
    )
    if sol.status == "unstable":
        if flow_sharp is not None and flow_sharp > bound:
            out["reason"] = (f"the flow's minimum has sharpness {flow_sharp:.6g} > stability bound {bound:.6g}: "
                             "this optimiser cannot converge to it")
        else:
            out["reason"] = "the loss diverged or the sharpness stayed above the stability bound"
    _add_regression_fields(out, args, data, sol.network, w)
    if args.certify:
        from ._certify import certify

        cert = certify(sol, X, y, initial=net0, potential=args.potential)
        out["certificate"] = cert.to_dict()
    _write_json(args.out, out)
    if sol.status != "converged":
        return _fail(f"optimiser did not converge to a stable minimum (status: {sol.status}); see {args.out}",
                     code=1)
    return 0


def _log_level(text):
    """Natural log of a decimal loss level, exact beyond float64's range (1e-5000)."""
    import decimal

    try:
        v = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise InputError(f"--until-loss must be a number, got {text!r}") from None
    if not (v.is_finite() and 0 < v < 1):
        raise InputError(f"--until-loss must lie in (0, 1), got {text}")
    return float(v.ln())


def _run_margin(args, data, net0) -> int:
    import jax

    from ._classify import _RELU_ONE_SIGN, DEFAULT_UNTIL_LOSS, margin_flow, relu_cannot_separate
    from ._losses import loss_by_name
    from ._margin import NotSeparableError, check_separable

    X, y = data["X"], data["y"]
    if not np.all(np.abs(y) == 1):
        raise InputError("classification (--loss exp|logistic) needs labels y in {-1, +1}")
    from ._margin import MARGIN_PROBLEMS

    if args.potential not in (None, "implicit") + MARGIN_PROBLEMS:
        raise InputError(f"--potential for classification must be one of {', '.join(MARGIN_PROBLEMS)}, "
                         f"got {args.potential!r}")
    log_stop = _log_level(str(DEFAULT_UNTIL_LOSS) if args.until_loss is None else args.until_loss)
    until_time = float("inf") if args.until_time is None else args.until_time
    if not until_time > 0:
        raise InputError(f"--until-time must be positive, got {until_time}")
    try:
        check_separable(X, y)
    except NotSeparableError as e:
        _write_json(args.out, dict(net=args.net, loss_name=args.loss, status="not separable", reason=str(e)))
        return _fail(str(e), code=2)
    if relu_cannot_separate(net0, y):
        _write_json(args.out, dict(net=args.net, loss_name=args.loss, status="not separable", reason=_RELU_ONE_SIGN))
        return _fail(_RELU_ONE_SIGN, code=2)
    t0 = time.perf_counter()

    def solve(net, X, y):  # X finite (`load_data`) and y in {-1, +1} (above), checked on the host
        return margin_flow(net, X, y, loss=loss_by_name(args.loss), log_until_loss=log_stop,
                           until_time=until_time, max_steps=args.max_steps, throw=False)

    sol = _kept_flow("margin_flow", solve, (args.loss, log_stop, until_time, args.max_steps), net0, X, y)
    jax.block_until_ready(sol.predictor)
    wall = time.perf_counter() - t0
    w = np.asarray(sol.predictor)
    log_loss = float(sol.log_loss)
    rec = sol.record
    # Which rule ended a converged flow: the one it is nearer (as `_classify._stop_gaps`), the loss
    # level or `--until-time` reached first.
    loss_gap, time_gap = log_loss - log_stop, np.log1p(until_time) - float(sol.log1p_t)
    out = dict(
        net=args.net,
        loss_name=args.loss,
        predictor=_jsonable(w),
        direction=_jsonable(w / np.linalg.norm(w)),
        loss=float(np.exp(log_loss)),
        log_loss=log_loss,
        log10_loss=log_loss / np.log(10),
        loss0=float(np.exp(float(sol.log_loss0))),
        loss_target=float(np.exp(log_stop)),
        log_loss_target=log_stop,
        margin=float(sol.margin),
        normalized_margin=float(sol.normalized_margin),
        t_end=_jsonable(np.expm1(float(sol.log1p_t))) if float(sol.log1p_t) < 700 else "inf",
        log1p_t_end=float(sol.log1p_t),
        num_steps=int(sol.num_steps),
        num_rejected_steps=int(sol.num_rejected_steps),
        invariant_drift=float(sol.invariant_drift),
        status=sol.status,
        stopped_at=None if sol.status != "converged" else "loss" if loss_gap <= time_gap else "time",
        wall_seconds=wall,
    )
    _add_init_fields(out, args)
    if "X_test" in data:
        pred = np.asarray(sol.network.outputs(data["X_test"]))
        out["test_error"] = float(np.mean(np.sign(pred) != data["y_test"]))
    records = [dict(log10_loss=float(rec.log_loss[i]) / np.log(10), log1p_t=float(rec.log1p_t[i]),
                    margin=float(rec.margin[i]), normalized_margin=float(rec.normalized_margin[i]),
                    num_steps=int(rec.num_steps[i]),
                    layer_rank1=_jsonable(rec.layer_rank1[i]), layer_alignment=_jsonable(rec.layer_alignment[i]))
               for i in range(rec.log_loss.shape[0])]
    if args.certify:
        from ._margin import certify_margin

        cert = certify_margin(sol, X, y, initial=net0, potential=args.potential)
        out["certificate"] = cert.to_dict()
        if cert.reference is not None:
            ref = np.asarray(cert.reference)
            ref = ref / np.linalg.norm(ref)
            for r, dvec in zip(records, np.asarray(rec.direction)):
                r["alignment"] = float(1.0 - dvec @ ref)
    out["record"] = records
    _write_json(args.out, out)
    if sol.status != "converged":
        return _fail(f"flow did not reach the loss level (status: {sol.status}); see {args.out}", code=1)
    return 0


def _parse_alpha(text):
    """`LO:HI:COUNT` (COUNT values log-spaced from LO to HI, the documented form), or an explicit
    comma-separated list `A1,A2,...` (a single `A` included; sorted, repeats dropped)."""
    if ":" in text:
        try:
            lo, hi, n = text.split(":")
            lo, hi, n = float(lo), float(hi), int(n)
        except ValueError:
            raise InputError(f"--alpha must be LO:HI:COUNT (log-spaced) or A1,A2,..., got {text!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi) and lo > 0 and hi > 0 and n >= 1):
            raise InputError(f"--alpha needs 0 < LO, HI finite and COUNT >= 1, got {text!r}")
        return np.logspace(np.log10(lo), np.log10(hi), n)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--alpha must be LO:HI:COUNT (log-spaced) or A1,A2,..., got {text!r}") from None
    # A grid axis: sorted, each value once. `sweep` refuses an empty list and values that are not
    # finite and > 0.
    return np.unique(values)


def _parse_list(text, name, conv=float):
    try:
        return [conv(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--{name} must be a comma-separated list, got {text!r}") from None


def _preload_figure_modules():
    """Import matplotlib (~0.7 s) on a background thread. Started once the sweep's first chunk
    is compiled and dispatched: from then on the main thread mostly waits on XLA with the GIL
    released, so the figure's import is ready for free (during tracing it would compete for
    the GIL). A failure is ignored here; `plot_sweep` imports again and reports it."""
    import threading

    def run():
        try:
            from ._figures import _plt

            _plt()
        except Exception:  # noqa: BLE001
            pass

    thread = threading.Thread(target=run, name="ibflow-preload", daemon=True)
    thread.start()
    return thread


def cmd_sweep(args) -> int:
    import os

    from ._figures import plot_sweep
    from ._sweep import sweep

    data = load_data(args.data)
    alphas = _parse_alpha(args.alpha)
    shapes = _parse_list(args.shape, "shape")
    seeds = _parse_list(args.seed, "seed", int)
    if args.depth is not None and args.depth < 2:
        raise InputError(f"--depth must be >= 2, got {args.depth}")
    step_sizes = None
    train_kwargs = None
    if args.optimizer is not None:
        if args.step_size is None:
            raise InputError("--optimizer needs --step-size ETA1,ETA2,...")
        step_sizes = _parse_list(args.step_size, "step-size")
        train_kwargs = dict(batch_size=args.batch_size)
        if args.max_steps_given:
            train_kwargs["max_steps"] = args.max_steps
    elif args.step_size is not None:
        raise InputError("--step-size needs --optimizer")
    preload = []  # the figure's imports, started once the first chunk is running

    def on_dispatch():
        if not preload:
            preload.append(_preload_figure_modules())

    try:
        ds = sweep(data["X"], data["y"], alphas=alphas, shapes=shapes, seeds=seeds, net=args.net,
                   depth=args.depth or 2, width=args.width, slope=args.slope, X_test=data.get("X_test"),
                   y_test=data.get("y_test"), w_star=data.get("w_star"), certify=args.certify, out=args.out,
                   chunk_size=args.chunk_size, progress=not args.no_progress,
                   flow_kwargs=dict(loss_rtol=args.loss_rtol, mode=args.mode,
                                    **{k: v for k, v in (("rtol", args.rtol), ("atol", args.atol)) if v is not None},
                                    max_steps=args.max_steps if args.optimizer is None or args.max_steps_given
                                    else 20_000),
                   optimizer=args.optimizer, step_sizes=step_sizes, train_kwargs=train_kwargs,
                   _on_dispatch=on_dispatch)
    except ValueError as e:
        raise InputError(str(e)) from None
    for thread in preload:
        thread.join()
    fig = plot_sweep(ds, os.path.join(args.out, "sweep.png"))
    status = ds["status"].values.ravel()
    msg = f"{int((status == 'converged').sum())}/{status.size} points converged"
    if args.certify:
        msg += f", {int(ds['passed'].values.sum())} certified"
    print(f"{msg}; dataset {os.path.join(args.out, 'sweep.nc')}, figure {fig}")
    return 0


def cmd_figure(args) -> int:
    from . import _figures as F

    if args.name == "fig7.1":
        kw = dict(dim=200, samples=40, n_alpha=8) if args.quick else {}
        _, paths = F.fig7_1(args.out, **kw)
    elif args.name == "fig7.2":
        _, paths = F.fig7_2(args.out, grid=81 if args.quick else 201)
    elif args.name == "step-size":
        kw = dict(dim=60, samples=15, n_eta=5) if args.quick else {}
        _, paths = F.step_size_bias(args.out, **kw)
    elif args.name == "moroshko":
        kw = dict(n_alpha=6, log10_levels=(-2, -10, -100, -300)) if args.quick else {}
        _, paths = F.moroshko(args.out, **kw)
    else:
        kw = dict(dim=50, samples=(10, 20, 30), n_alpha=6) if args.quick else {}
        _, paths = F.woodworth(args.out, **kw)
    print("wrote " + ", ".join(paths))
    return 0


def cmd_demo(args) -> int:
    from ._demo import demo

    demo(out=args.out, dim=args.dim, samples=args.samples)
    return 0


def _attach_negative_values(argv):
    """`--opt -0.5,0,0.5` → `--opt=-0.5,0,0.5`: argparse reads a lone negative number as a
    value, but a list starting with one (a sweep's `--shape`) as an unknown option."""
    out = []
    for token in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1]
                and re.match(r"-(\d|\.\d)", token)):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    enable_compilation_cache()
    if hasattr(args, "max_steps"):
        args.max_steps_given = args.max_steps is not None
        if args.max_steps is None:
            args.max_steps = 20_000
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "figure":
            return cmd_figure(args)
    except InputError as e:
        return _fail(str(e))
    except Exception as e:  # noqa: BLE001 - the CLI never shows a bare traceback
        msg = str(e).strip().splitlines()
        return _fail(f"{type(e).__name__}: {msg[0] if msg else ''}", code=1)
    return _fail(f"unknown command {args.command}")


#: XLA_FLAGS entry of the command-line process (`cpu_xla_flags`) and the jaxlib versions whose
#: XLA defines it: 0.7 to 0.10 (the flag's name is in their libraries; 0.5 lacks it, and
#: jaxlib 0.11.2's XLA aborts on it as an unknown flag, as any XLA does on an unknown XLA_FLAGS entry).
CPU_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
CPU_EMITTER_JAXLIB = ((0, 7), (0, 11))


def cpu_xla_flags(xla_flags: str, jaxlib_version: str) -> str:
    """The XLA_FLAGS the command line runs with: `xla_flags` (the environment's) plus
    `CPU_EMITTER_FLAG`, when `jaxlib_version` lies in `CPU_EMITTER_JAXLIB` and `xla_flags`
    does not set `xla_cpu_use_fusion_emitters` itself (the user's choice stands).

    Why: XLA:CPU compiles the sweep's programs faster with its classic LLVM emitters than
    with its newer fusion emitters, and they run as fast. Azulay Fig. 7.1 grid (d = 1000,
    N = 100, 100 points, `ibflow sweep --certify`, fresh process, empty compilation cache,
    jaxlib 0.10.2, 2 cores), 5 interleaved runs each: median 8.4 s with the flag against
    10.2 s without (CPU time 13.3 against 15.9 s); in process, the compiled chunk's second
    call and the pure-mode and d = 1e4 sweeps run equally fast either way. An XLA_FLAGS entry
    is read once, when the backend starts (after `import ibflow`, before the first
    computation), and XLA aborts the process on a flag it does not define: hence the
    version range, outside which nothing is added. The flag only concerns the CPU backend;
    the library (`import ibflow`) leaves XLA_FLAGS alone. The command line's whole set of
    flags, GPU included, is `cli_xla_flags`."""
    try:
        version = tuple(int(v) for v in jaxlib_version.split(".")[:2])
    except ValueError:
        return xla_flags
    lo, hi = CPU_EMITTER_JAXLIB
    if not lo <= version < hi:
        return xla_flags
    return _unless_set(xla_flags, CPU_EMITTER_FLAG)


def _unless_set(xla_flags: str, flag: str) -> str:
    """`xla_flags` plus `flag` (`--name=value`), unless `xla_flags` names that option already:
    the user's own setting stands."""
    name = flag.lstrip("-").split("=")[0]
    return xla_flags if name in xla_flags else f"{xla_flags} {flag}".strip()


#: XLA_FLAGS entry of the command-line process for GPUs (`cli_xla_flags`): no autotuning of
#: XLA:GPU's kernels (cuBLAS algorithms, Triton tilings) at compilation. XLA has defined the
#: flag since long before jaxlib 0.4.30 (ibflow's oldest); its XLA:CPU parses and ignores it.
GPU_AUTOTUNE_FLAG = "--xla_gpu_autotune_level=0"


def cli_xla_flags(xla_flags: str, jaxlib_version: str) -> str:
    """The XLA_FLAGS the command line runs with: `cpu_xla_flags`, plus `GPU_AUTOTUNE_FLAG`
    unless `xla_flags` sets `xla_gpu_autotune_level` itself (the user's choice stands).

    Why: on a GPU, autotuning is most of what compiling the sweep's programs costs, and a
    command compiles them for one grid. One NVIDIA H200 (jax 0.11.2; 22nd session,
    `benchmarks/results/gpu_h200.md`), `ibflow sweep --certify` of the Azulay Fig. 7.1 grid
    (d = 1000, N = 100, 100 points), fresh process, empty compilation cache, interleaved:
    16.7 and 18.2 s by default, 11.6 and 11.7 s with the flag (the chunk program compiled in
    2.9–3.1 s against 7.6–8.6 s, the dual-Newton reference in 0.45 s against 2.7–3.5 s); the
    same 100/100 points certified; through this function, on a freshly started machine, 15.2 s
    (its first GPU process) and 12.8 s. What it costs: kernels XLA did not tune. In process
    (`benchmarks/gpu.py`), a second call of the 100-point grid took 0.49 s against 0.46 s at
    d = 1000 and 1.48 s against 1.00 s at d = 1e5, against first calls of 9.3 s / 8.5 s instead
    of 24.2 s / 17.5–19.9 s. A command whose solve runs far longer than its compilation (many
    thousands of points at d ≳ 1e5) does better with `XLA_FLAGS=--xla_gpu_autotune_level=4`
    (XLA's default)."""
    return _unless_set(cpu_xla_flags(xla_flags, jaxlib_version), GPU_AUTOTUNE_FLAG)


def entry() -> None:
    """The `ibflow` console script and `python -m ibflow`: `main`, then a fast exit.

    A sweep leaves JAX/XLA, SciPy, matplotlib, xarray and h5py loaded, and the interpreter's
    orderly teardown of them took ~0.75 s after the last output was written (8 % of a Fig. 7.1
    sweep; with JAX's own clean-up run first). When `main` returns every file is closed and
    every worker thread joined, so the process flushes its streams, runs the atexit handlers
    and leaves with `os._exit`. (`main` itself, called in process, returns normally.)

    Before `main`, the process's XLA_FLAGS get `cli_xla_flags` (JAX's backend has not
    started yet: `import ibflow` computes nothing)."""
    import atexit
    import os

    from jaxlib.version import __version__ as jaxlib_version

    flags = os.environ.get("XLA_FLAGS", "")
    wanted = cli_xla_flags(flags, jaxlib_version)
    if wanted != flags:
        os.environ["XLA_FLAGS"] = wanted
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(rc)


if __name__ == "__main__":
    entry()
