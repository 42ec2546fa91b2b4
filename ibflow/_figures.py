"""Figures: the default sweep figure and the papers' figures, reproduced from sweeps.

- `fig7_1`: Azulay et al. 2021, Fig. 7.1: population error of two-layer diagonal nets
  vs α for several shapes s on the §9 problem, with the min-ℓ1 and min-ℓ2 interpolators'
  errors as asymptotes; second panel against k̂ = α/(1 − s²) (Thm 4.1: the limit
  depends on (α, s) only through √k = 4α(1+s²)/(1−s²), so curves nearly collapse).
- `fig7_2`: Azulay Fig. 7.2: contours of q_{δ,w̃(0)} (Thm 6.1) for d = 2,
  w̃(0) = α·(0.6, 0.8); top row α = 2, s ∈ {0, 0.2, 0.8}; bottom row s = 0.1,
  α ∈ {0.01, 1, 2.5}; the red dot marks w̃(0).
- `woodworth`: Woodworth et al. 2020: the ℓ1 → ℓ2 transition of the limit with α, and
  test error vs sample size N at small and large α.
- `step_size_bias`: GD against the flow: the O(η) step-size bias of the limit and the
  sharpness along training at several η (edge of stability).
- `moroshko`: Moroshko et al. 2020: kernel → rich transition of diagonal nets in
  classification as a function of α and of the loss level reached.
Each writes PNG and PDF plus the netCDF dataset behind the figure.
"""

import math
import os

import jax.numpy as jnp
import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out, name):
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{name}.png"), os.path.join(out, f"{name}.pdf")]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _plt().close(fig)
    return paths


def plot_sweep(ds, path):
    """Default sweep figure (`sweep_figure`), written to `path` (PNG). Returns `path`."""
    if "step_size" in ds.dims:
        return _plot_step_size_sweep(ds, path)
    fig = sweep_figure(ds)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    _plt().close(fig)
    return path


def sweep_figure(ds):
    """The default sweep figure: population (or test) error vs α, one line per shape, or without
    test data the ℓ1 norm of the limit;
    points whose certificate failed are circled in red. Returns the matplotlib figure.

    It is drawn at the end of every `ibflow sweep` and `ibflow demo`, after the last chunk, so
    its text avoids mathtext (`decade_label`; the α in the label is a Unicode character)."""
    from matplotlib.ticker import FuncFormatter

    plt = _plt()
    var = next((v for v in ("population_error", "test_error") if v in ds), None)
    if var is not None:
        values, ylabel = ds[var], var.replace("_", " ")
    elif "predictor" in ds:
        # Without test data: the limit's ℓ1 norm, whose rise with α is the rich → kernel
        # transition (Woodworth et al. 2020). The train loss at the limit is only the stopping level.
        values, ylabel = abs(ds["predictor"]).sum("dim"), "ℓ1 norm of the limit ‖w̃∞‖₁"
    else:
        values, ylabel = ds["train_loss"], "train loss"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for j, s in enumerate(ds["shape"].values):
        vals = values.isel(shape=j, seed=0).values
        ax.plot(ds["alpha"].values, vals, "o-", ms=3, label=f"s = {s:g}")
        if "passed" in ds:
            bad = ~ds["passed"].isel(shape=j, seed=0).values.astype(bool)
            # A colour of its own: without one, each overlay took the next shape's colour.
            ax.plot(ds["alpha"].values[bad], vals[bad], "o", color="red", mfc="none", ms=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(decade_label))
    ax.set_xlabel("initialisation scale α")
    ax.set_ylabel(ylabel)
    ax.set_title(f"gradient-flow limit, {ds.attrs.get('net', '')} net")
    ax.legend(fontsize=8)
    return fig


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def decade_label(x, pos=None):
    """A log axis's tick label in plain text: `10⁻⁵` at a power of ten, else `x` as `%g`.

    matplotlib's default log-axis labels (`LogFormatterSciNotation`) are mathtext, each one
    parsed and typeset: measured in a fresh process (2 cores, 5 interleaved pairs), the sweep
    figure took 0.38-0.57 s with them and 0.26-0.29 s with these."""
    del pos
    if x > 0:
        e = round(math.log10(x))
        if math.isclose(x, 10.0**e, rel_tol=1e-9):
            return f"10{str(e).translate(_SUPERSCRIPT)}"
    return f"{x:g}"


def _plot_step_size_sweep(ds, path):
    """Optimiser sweeps: distance of the limit to the gradient-flow limit vs η (one line per
    α, first shape and seed), with the fitted log-log slope; unstable points in red."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    etas = ds["step_size"].values
    for i, a in enumerate(ds["alpha"].values):
        dist = ds["flow_distance"].isel(alpha=i, shape=0, seed=0).values
        ok = ds["status"].isel(alpha=i, shape=0, seed=0).values == "converged"
        fit = step_size_slope(etas[ok], dist[ok])
        ax.plot(etas[ok], dist[ok], "o-", ms=3, label=rf"$\alpha$ = {a:g} (slope {fit:.2f})")
        ax.plot(etas[~ok], np.where(np.isfinite(dist[~ok]), dist[~ok], np.nan), "x", color="red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"step size $\eta$")
    ax.set_ylabel(r"$\|\tilde w_{GD} - \tilde w_{GF}\| / \|\tilde w_{GF}\|$")
    ax.set_title(f"step-size bias, {ds.attrs.get('optimizer', '')} on a {ds.attrs.get('net', '')} net")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def step_size_slope(etas, dist):
    """Least-squares slope of log(dist) against log(η) (NaN with fewer than 2 points)."""
    etas, dist = np.asarray(etas, float), np.asarray(dist, float)
    ok = np.isfinite(dist) & (dist > 0) & (etas > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(etas[ok]), np.log(dist[ok]), 1)[0])


def fig7_1(out, *, dim=1000, samples=100, n_alpha=20, alpha_range=(1e-5, 0.25), shapes=(0, 0.5, 0.7, 0.9, 0.99),
           seed=0, progress=True):
    """Azulay et al. 2021 Fig. 7.1 (module docstring). Returns the dataset."""
    from ._data import sparse_regression
    from ._reference import min_l1, min_l2
    from ._sweep import sweep

    D = sparse_regression(num_samples=samples, dim=dim, seed=seed)
    alphas = np.logspace(np.log10(alpha_range[0]), np.log10(alpha_range[1]), n_alpha)
    ds = sweep(D["X"], D["y"], alphas=alphas, shapes=shapes, w_star=D["w_star"], certify=True,
               out=os.path.join(out, "fig7.1-data"), progress=progress)
    w1, _ = min_l1(D["X"], D["y"])
    e1 = float(np.sum((w1 - D["w_star"]) ** 2))
    e2 = float(np.sum((min_l2(D["X"], D["y"]) - D["w_star"]) ** 2))
    ds.attrs.update(l1_population_error=e1, l2_population_error=e2)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for j, s in enumerate(ds["shape"].values):
        err = ds["population_error"].isel(shape=j, seed=0).values
        axes[0].plot(alphas, err, "o-", ms=3, label=f"s = {s:g}")
        axes[1].plot(alphas / (1 - s**2), err, "o-", ms=3, label=f"s = {s:g}")
    for ax, xl in zip(axes, [r"$\alpha$", r"$\hat k = \alpha/(1-s^2)$"]):
        ax.axhline(e1, color="k", ls="--", lw=1, label=r"min-$\ell_1$")
        ax.axhline(e2, color="gray", ls=":", lw=1, label=r"min-$\ell_2$")
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(r"population error $\|\tilde w - \beta^*\|^2$")
        ax.legend(fontsize=8)
    npass = int(ds["passed"].values.sum())
    fig.suptitle(f"Azulay et al. Fig. 7.1: diagonal net, d = {dim}, N = {samples}, r* = 5 "
                 f"({npass}/{ds['passed'].size} points certified)")
    paths = _save(fig, out, "fig7.1")
    ds.to_netcdf(os.path.join(out, "fig7.1.nc"), engine="h5netcdf")
    return ds, paths


def fig7_2(out, *, grid=201):
    """Azulay et al. 2021 Fig. 7.2 (module docstring). Returns the dataset."""
    import xarray as xr

    from ._potentials import FullyConnectedNeuron

    plt = _plt()
    u = np.array([0.6, 0.8])
    panels = [(2.0, 0.0), (2.0, 0.2), (2.0, 0.8), (0.01, 0.1), (1.0, 0.1), (2.5, 0.1)]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    data = {}
    for ax, (alpha, s) in zip(axes.ravel(), panels):
        w0 = alpha * u
        delta = 4 * alpha * s / (1 - s**2)
        pot = FullyConnectedNeuron(jnp.asarray(delta), jnp.asarray(w0))
        r = 2.5 * max(alpha, 1.0)
        xs = np.linspace(-r, r, grid)
        Xg, Yg = np.meshgrid(xs, xs)
        import jax

        Z = np.asarray(jax.vmap(jax.vmap(lambda a, b: pot.value(jnp.stack([a, b]))))(jnp.asarray(Xg), jnp.asarray(Yg)))
        ax.contour(Xg, Yg, Z, levels=25, cmap="viridis")
        ax.plot(*w0, "o", color="red")
        ax.set_title(rf"$\alpha$ = {alpha:g}, s = {s:g}  ($\delta$ = {delta:.3g})")
        ax.set_aspect("equal")
        data[f"q_alpha{alpha:g}_s{s:g}"] = xr.DataArray(Z, dims=("y", "x"), coords=dict(x=xs, y=xs),
                                                        attrs=dict(alpha=alpha, shape=s, delta=delta))
    fig.suptitle(r"Azulay et al. Fig. 7.2: contours of $q_{\delta,\tilde w(0)}$ (Thm 6.1), "
                 r"$\tilde w(0) = \alpha\,(0.6, 0.8)$")
    paths = _save(fig, out, "fig7.2")
    ds = xr.Dataset({k: v.rename({"x": f"x_{i}", "y": f"y_{i}"}) for i, (k, v) in enumerate(data.items())})
    ds.to_netcdf(os.path.join(out, "fig7.2.nc"), engine="h5netcdf")
    return ds, paths


def woodworth(out, *, dim=100, samples=(10, 20, 30, 40, 60, 80), alphas=(1e-6, 10.0), n_alpha=12, seed=0,
              progress=True):
    """Woodworth et al. 2020: ℓ1 → ℓ2 transition with α, and test error vs N (module docstring)."""
    import xarray as xr

    from ._data import sparse_regression
    from ._reference import min_l1, min_l2
    from ._sweep import sweep

    plt = _plt()
    D = sparse_regression(num_samples=max(samples) // 2, dim=dim, seed=seed)
    grid = np.logspace(-6, 1, n_alpha)
    ds = sweep(D["X"], D["y"], alphas=grid, shapes=[0.0], net="diagonal-tied", certify=True, progress=progress,
               out=os.path.join(out, "woodworth-data"))
    W = ds["predictor"].isel(shape=0, seed=0).values
    w1, _ = min_l1(D["X"], D["y"])
    w2 = min_l2(D["X"], D["y"])
    r1 = np.abs(W).sum(1) / np.abs(w1).sum()
    r2 = np.linalg.norm(W, axis=1) / np.linalg.norm(w2)
    errs = {a: [] for a in alphas}
    for n in samples:
        Dn = sparse_regression(num_samples=n, dim=dim, seed=seed + 1)
        dn = sweep(Dn["X"], Dn["y"], alphas=list(alphas), shapes=[0.0], net="diagonal-tied", w_star=Dn["w_star"],
                   progress=False)
        for a in alphas:
            errs[a].append(float(dn["population_error"].sel(alpha=a, shape=0.0, seed=0)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(grid, r1, "o-", label=r"$\|w_\alpha\|_1 / \|w_{\ell_1}\|_1$")
    axes[0].plot(grid, r2, "s-", label=r"$\|w_\alpha\|_2 / \|w_{\ell_2}\|_2$")
    axes[0].axhline(1, color="k", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel(r"$\alpha$ (product scale; Woodworth's $\alpha_W = \alpha^{1/2}$)")
    axes[0].set_title(r"rich ($\ell_1$) to kernel ($\ell_2$) transition, tied net")
    axes[0].legend()
    for a in alphas:
        axes[1].plot(samples, errs[a], "o-", label=rf"$\alpha$ = {a:g}")
    axes[1].set_xlabel("N (samples)")
    axes[1].set_ylabel(r"population error $\|w - \beta^*\|^2$")
    axes[1].set_title(f"sample complexity, d = {dim}, r* = 5")
    axes[1].legend()
    paths = _save(fig, out, "woodworth")
    xr.Dataset(dict(l1_ratio=("alpha", r1), l2_ratio=("alpha", r2),
                    **{f"error_alpha{a:g}": ("N", np.array(errs[a])) for a in alphas}),
               coords=dict(alpha=grid, N=list(samples))).to_netcdf(os.path.join(out, "woodworth.nc"), engine="h5netcdf")
    return ds, paths


def moroshko(out, *, samples=20, dim=40, n_alpha=14, alpha_range=(1e-12, 10.0),
             log10_levels=(-2, -5, -10, -20, -50, -100, -200, -500, -1000), seed=0):
    """Moroshko et al. 2020: the kernel → rich transition of two-layer diagonal nets
    (exponential loss, separable sparse data) as a function of the scale α and of the
    loss level reached. Panels: 1 − cos with the ℓ1 and with the ℓ2 max-margin
    predictors against α, one line per loss level; and the ℓ1 gap against the
    effective scale μ = α/γ (math.md §4.5). Returns the dataset."""
    from ._moroshko import scale_vs_accuracy, sparse_classification

    D = sparse_classification(samples, dim, seed=seed)
    alphas = np.logspace(np.log10(alpha_range[0]), np.log10(alpha_range[1]), n_alpha)
    ds = scale_vs_accuracy(D["X"], D["y"], alphas, log10_levels=log10_levels)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    cmap = plt.get_cmap("viridis")
    levels = ds["level"].values
    for k, lev in enumerate(levels):
        c = cmap(k / max(len(levels) - 1, 1))
        lab = rf"$L = 10^{{{lev:g}}}$"  # margin_flow lands on each level
        axes[0].plot(alphas, ds["l1_gap"].isel(level=k), "o-", ms=3, color=c, label=lab)
        axes[1].plot(alphas, ds["l2_gap"].isel(level=k), "o-", ms=3, color=c, label=lab)
        axes[2].plot(ds["mu"].isel(level=k), ds["l1_gap"].isel(level=k), "o", ms=3, color=c, label=lab)
    for ax, yl in zip(axes, [r"$1-\cos(\beta, \beta_{\ell_1})$", r"$1-\cos(\beta, \beta_{\ell_2})$",
                             r"$1-\cos(\beta, \beta_{\ell_1})$"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel(yl)
    axes[0].set_xlabel(r"$\alpha$ (product of layer scales)")
    axes[1].set_xlabel(r"$\alpha$")
    axes[2].set_xlabel(r"$\mu = \alpha/\gamma$")
    axes[0].set_title(r"distance to the $\ell_1$ (rich) max margin")
    axes[1].set_title(r"distance to the $\ell_2$ (kernel) max margin")
    axes[2].set_title(r"against the effective scale $\mu$")
    axes[1].legend(fontsize=7, ncol=2)
    nconv = int((ds["status"].values == "converged").sum())
    fig.suptitle(f"Moroshko et al. 2020: scale vs training accuracy, two-layer diagonal net, exp loss, "
                 f"N = {samples}, d = {dim}, 3-sparse separator ({nconv}/{len(alphas)} flows reached their level)")
    paths = _save(fig, out, "moroshko")
    ds.to_netcdf(os.path.join(out, "moroshko.nc"), engine="h5netcdf")
    return ds, paths


def step_size_bias(out, *, dim=200, samples=40, alpha=0.1, shape=0.0, n_eta=6, eta_fraction=(3e-3, 0.5),
                   eos_alpha=1e-3, eos_fractions=(0.5, 0.9, 1.2, 2.0), sharpness_every=10, eos_steps=4000, seed=0):
    """The step-size bias of GD and the edge of stability on the Azulay §9 problem
    (two-layer diagonal net, scale α, shape s), math.md §7; Nacson et al. 2022; Cohen et
    al. 2021. Left: `‖w̃_GD(η) − w̃_GF‖/‖w̃_GF‖` against η over `eta_fraction` × 2/S (S: the
    sharpness of the flow's limit), with the fitted log-log slope (expected 1: O(η)).
    Right: from the smaller scale `eos_alpha` (whose sharpness starts low), sharpness
    against flow time t = kη for step sizes `eos_fractions` × 2/S', S' that flow's limit
    sharpness, with the 2/η ceilings (dashed): progressive sharpening, then the edge of
    stability where 2/η < S'. Writes PNG, PDF and a netCDF dataset; returns the dataset."""
    import jax
    import xarray as xr

    from ._data import sparse_regression
    from ._flow import gradient_flow
    from ._init import diagonal_init
    from ._train import sharpness, train

    D = sparse_regression(num_samples=samples, dim=dim, seed=seed)
    X, y = jnp.asarray(D["X"]), jnp.asarray(D["y"])
    net = diagonal_init(alpha, shape, dim)
    flow = gradient_flow(net, X, y)
    S = float(sharpness(flow.network, X, y))
    etas = (2.0 / S) * np.logspace(np.log10(eta_fraction[0]), np.log10(eta_fraction[1]), n_eta)
    run = jax.jit(jax.vmap(lambda e: train(net, X, y, step_size=e, reference_sharpness=S, throw=False,
                                           sharpness_every=50)))
    sols = run(jnp.asarray(etas))
    dist = np.linalg.norm(np.asarray(sols.predictor) - np.asarray(flow.predictor), axis=1) / np.linalg.norm(
        np.asarray(flow.predictor))
    from ._results import status_words

    status = status_words(sols.result)
    slope = step_size_slope(etas[status == "converged"], dist[status == "converged"])
    net_eos = diagonal_init(eos_alpha, shape, dim)
    S_eos = float(sharpness(gradient_flow(net_eos, X, y).network, X, y))
    eos_etas = (2.0 / S_eos) * np.asarray(eos_fractions)
    eos = [train(net_eos, X, y, step_size=float(e), reference_sharpness=S_eos, throw=False,
                 sharpness_every=sharpness_every, history=eos_steps // sharpness_every + 1, max_steps=eos_steps)
           for e in eos_etas]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    ok = status == "converged"
    axes[0].plot(etas[ok], dist[ok], "o-", label=f"GD limit (fitted slope {slope:.3f})")
    axes[0].plot(etas, dist[ok][0] * etas / etas[ok][0], "k--", lw=0.8, label=r"$\propto \eta$")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel(r"step size $\eta$")
    axes[0].set_ylabel(r"$\|\tilde w_{GD} - \tilde w_{GF}\| / \|\tilde w_{GF}\|$")
    axes[0].set_title(rf"step-size bias, $\alpha$ = {alpha:g}, s = {shape:g}")
    axes[0].legend(fontsize=8)
    cmap = plt.get_cmap("plasma")
    hist = {}
    for q, (e, sol) in enumerate(zip(eos_etas, eos)):
        k = np.asarray(sol.history_steps)
        m = k >= 0
        c = cmap(q / max(len(eos_etas), 1))
        axes[1].plot(k[m] * e, np.asarray(sol.history_sharpness)[m], "-", color=c,
                     label=rf"$\eta$ = {e:.3g} ({sol.status})")
        axes[1].axhline(2 / e, color=c, ls="--", lw=0.8)
        hist[f"eta{q}"] = (k[m] * e, np.asarray(sol.history_sharpness)[m], np.asarray(sol.history_loss)[m])
    axes[1].axhline(S_eos, color="k", lw=0.8, label="flow limit sharpness")
    axes[1].set_xscale("log")
    axes[1].set_xlabel(r"flow time $t = k\eta$")
    axes[1].set_ylabel(r"sharpness $\lambda_{max}(\nabla^2 L)$ (Lanczos)")
    axes[1].set_title(rf"$\alpha$ = {eos_alpha:g}: progressive sharpening, $2/\eta$ ceilings (dashed)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"GD against the exact flow: Azulay §9 problem, d = {dim}, N = {samples}")
    paths = _save(fig, out, "step-size")
    data = dict(flow_distance=("step_size", dist), status=("step_size", status.astype(str)))
    for name, (t, sh, lo) in hist.items():
        data[f"{name}_time"] = (f"{name}_k", t)
        data[f"{name}_sharpness"] = (f"{name}_k", sh)
        data[f"{name}_loss"] = (f"{name}_k", lo)
    ds = xr.Dataset(data, coords=dict(step_size=etas),
                    attrs=dict(slope=slope, flow_sharpness=S, eos_step_sizes=eos_etas.tolist(), alpha=alpha,
                               shape=shape, eos_alpha=eos_alpha, eos_flow_sharpness=S_eos))
    ds.to_netcdf(os.path.join(out, "step-size.nc"), engine="h5netcdf")
    return ds, paths
