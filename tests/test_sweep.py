import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

import ibflow as ib
from helpers import problem
from ibflow._cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("sweep")
    D = ib.sparse_regression(num_samples=8, dim=20, num_test=30, seed=4)
    np.savez(p / "d.npz", **D)
    return p, D


def test_sweep_matches_independent_reference(data):
    p, D = data
    alphas, shapes = [1e-3, 0.05, 1.0], [0.0, 0.6]
    ds = ib.sweep(D["X"], D["y"], alphas=alphas, shapes=shapes, X_test=D["X_test"], y_test=D["y_test"],
                  w_star=D["w_star"], certify=True, progress=False, chunk_size=4)
    assert set(ds["status"].values.ravel()) == {"converged"}
    assert ds["passed"].values.all()
    for i, a in enumerate(alphas):
        for j, s in enumerate(shapes):
            ref = ib.dual_newton(ib.implicit_potential(ib.diagonal_init(a, s, 20)), D["X"], D["y"]).w
            w = ds["predictor"].isel(alpha=i, shape=j, seed=0).values
            assert np.linalg.norm(w - ref) / np.linalg.norm(ref) < 1e-8
            assert np.isclose(ds["population_error"].values[i, j, 0], np.sum((w - D["w_star"]) ** 2))
    for v in ("kkt_residual", "reference_distance", "primal_residual", "passed", "seconds", "num_steps",
              "train_loss", "test_error"):
        assert v in ds


def test_failed_points_are_kept(data):
    p, D = data
    ds = ib.sweep(D["X"], D["y"], alphas=[0.1, 1.0], shapes=[0.0], progress=False,
                  flow_kwargs=dict(max_steps=3))
    assert list(ds["status"].values.ravel()) == ["max_steps", "max_steps"]
    assert np.all(np.isfinite(ds["predictor"].values))


def _sweep_cmd(p, out, extra=()):
    return [sys.executable, "-m", "ibflow", "sweep", "--data", str(p / "d.npz"), "--net", "diagonal",
            "--alpha", "1e-3:1:6", "--shape", "0,0.5", "--chunk-size", "2", "--out", str(out), "--no-progress",
            *extra]


def test_interrupted_sweep_resumes_without_recomputing(data, tmp_path):
    p, D = data
    out = tmp_path / "run"
    proc = subprocess.Popen(_sweep_cmd(p, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = out / "chunks"
    # Kill it once the first chunk is on disk (or let it finish, however long that takes:
    # no wall-clock bound here, a slow machine only means all chunks are there).
    while proc.poll() is None and not (chunks.exists() and any(f.endswith(".nc") for f in os.listdir(chunks))):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    first = sorted(f for f in os.listdir(chunks) if f.endswith(".nc"))
    assert first and not (out / "sweep.nc").exists() or len(first) == 6
    stamps = {f: os.path.getmtime(chunks / f) for f in first}
    assert main(_sweep_cmd(p, out)[3:]) == 0
    after = sorted(f for f in os.listdir(chunks) if f.endswith(".nc"))
    assert all(os.path.getmtime(chunks / f) == t for f, t in stamps.items())  # finished chunks untouched
    ds = xr.open_dataset(out / "sweep.nc", engine="h5netcdf")
    assert (ds["status"].values == "converged").all() and ds["predictor"].shape == (6, 2, 1, 20)
    assert os.path.exists(out / "sweep.png")
    # a third run computes nothing new
    assert main(_sweep_cmd(p, out)[3:]) == 0
    assert sorted(f for f in os.listdir(chunks) if f.endswith(".nc")) == after


@pytest.mark.parametrize("old_format", [False, True])
def test_resumed_sweep_reads_back_every_field(data, tmp_path, old_format):
    """A sweep resumed from its chunk files alone returns the same dataset, certificate fields,
    flags and strings included; `old_format`: the netCDF4 chunk files of earlier versions
    (a variable per field) are read too."""
    p, D = data
    out = tmp_path / "r"
    kw = dict(alphas=[1e-3, 0.1, 1.0], shapes=[0.0, 0.5], w_star=D["w_star"], certify=True, progress=False,
              chunk_size=4, out=str(out))
    first = ib.sweep(D["X"], D["y"], **kw)
    os.remove(out / "sweep.nc")
    if old_format:
        for name in os.listdir(out / "chunks"):
            with xr.open_dataset(out / "chunks" / name) as ds:
                ds = ds.load()
            old = {k: (("n",), ds["scalars"].values[:, i].astype(bool if k in ("passed", "applicable") else float))
                   for i, k in enumerate(str(f) for f in ds["field"].values)}
            old.update({k: ds[k] for k in ("predictor", "status", "potential", "point")})
            xr.Dataset(old).to_netcdf(out / "chunks" / name, engine="h5netcdf")
    again = ib.sweep(D["X"], D["y"], **kw)
    assert set(again.data_vars) == set(first.data_vars)
    for k in first.data_vars:
        a, b = first[k].values, again[k].values
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b)
        else:
            assert (a == b).all(), k
    assert again["passed"].dtype == bool and again["passed"].values.all()


def test_different_sweep_in_same_dir_is_refused(data, tmp_path, capsys):
    p, _ = data
    out = tmp_path / "x"
    assert main(_sweep_cmd(p, out, ["--certify"])[3:]) == 0
    capsys.readouterr()
    assert main(_sweep_cmd(p, out)[3:]) == 2
    assert "different sweep" in capsys.readouterr().err


@pytest.mark.parametrize("bad, needle", [(["--alpha", "1:2"], "LO:HI:COUNT"), (["--shape", "0,1.5"], "|s| < 1"),
                                         (["--alpha", "0:1:3"], "0 < LO"), (["--alpha", "0.1,-1"], "> 0"),
                                         (["--alpha", "0.1,nan"], "> 0"), (["--alpha", "a,b"], "A1,A2")])
def test_sweep_bad_input(data, tmp_path, capsys, bad, needle):
    p, _ = data
    args = _sweep_cmd(p, tmp_path / "b")[3:]
    i = args.index(bad[0])
    args[i + 1] = bad[1]
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_sweep_alpha_forms():
    from ibflow._cli import _parse_alpha

    np.testing.assert_allclose(_parse_alpha("1e-3:1e-1:3"), [1e-3, 1e-2, 1e-1], rtol=1e-14)
    np.testing.assert_array_equal(_parse_alpha("0.3"), [0.3])
    np.testing.assert_array_equal(_parse_alpha("0.5,0.01, 2,0.5"), [0.01, 0.5, 2.0])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(alphas=[]), "alphas is empty"), (dict(shapes=[]), "shapes is empty"), (dict(seeds=[]), "seeds is empty"),
    (dict(alphas=[0.1, 0.0]), "> 0"), (dict(alphas=[np.nan]), "> 0"), (dict(shapes=[0.0, -1.0]), "|s| < 1"),
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=2.5), "chunk_size"),
])
def test_sweep_api_refuses_bad_grids(kwargs, needle):
    """Checked on the host before anything is compiled: a clear ValueError, never an empty or
    silently adjusted grid."""
    X, y = problem()
    grid = dict(alphas=[0.1], shapes=[0.0]) | kwargs
    with pytest.raises(ValueError, match=re.escape(needle)):
        ib.sweep(X, y, progress=False, **grid)


def test_sharded_over_four_host_devices(data, tmp_path):
    """Chunks are sharded over all devices; four forced CPU devices give the same answers."""
    p, D = data
    code = (
        "import numpy as np, jax, ibflow as ib, json, sys;"
        "D = dict(np.load(sys.argv[1]));"
        "ds = ib.sweep(D['X'], D['y'], alphas=[1e-2, 1.0], shapes=[0.0, 0.5], progress=False);"
        "print(json.dumps(dict(n=len(jax.devices()), w=ds['predictor'].values.tolist())))"
    )
    # JAX_PLATFORMS=cpu: on a GPU machine the default devices are the GPU's (one device there).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, str(p / "d.npz")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == 4
    single = ib.sweep(D["X"], D["y"], alphas=[1e-2, 1.0], shapes=[0.0, 0.5], progress=False)
    # Different chunk sizes sum in different orders: both runs sit within the solver's accuracy
    # (~1e-10 relative in norm) of the limit, so they agree to that, not bit for bit.
    w4, w1 = np.array(res["w"]), single["predictor"].values
    assert np.max(np.linalg.norm(w4 - w1, axis=-1) / np.linalg.norm(w1, axis=-1)) < 1e-9


def test_reduced_and_pure_sweeps_agree(data):
    """The default (reduced coordinates, rtol 1e-4 for limits) and the pure parameter ODE give
    the same limits, both certified, and the reduced sweep's limits match dual Newton."""
    p, D = data
    alphas, shapes = [1e-4, 0.02, 0.7], [0.0, 0.9]
    fast = ib.sweep(D["X"], D["y"], alphas=alphas, shapes=shapes, certify=True, progress=False)
    pure = ib.sweep(D["X"], D["y"], alphas=alphas, shapes=shapes, certify=True, progress=False,
                    flow_kwargs=dict(mode="pure"))
    assert fast["passed"].values.all() and pure["passed"].values.all()
    assert json.loads(fast.attrs["config"])["flow_kwargs"]["rtol"] == repr(ib._sweep.REDUCED_RTOL)
    assert "rtol" not in json.loads(pure.attrs["config"])["flow_kwargs"]
    solver = repr(ib.LinearlyImplicitExtrapolation(order_k=ib._sweep.REDUCED_ORDER))
    assert json.loads(fast.attrs["config"])["flow_kwargs"]["solver"] == solver
    assert "solver" not in json.loads(pure.attrs["config"])["flow_kwargs"]
    for i, a in enumerate(alphas):
        for j, s in enumerate(shapes):
            wf, wp = fast["predictor"].values[i, j, 0], pure["predictor"].values[i, j, 0]
            assert np.linalg.norm(wf - wp) <= 1e-8 * np.linalg.norm(wp)
            ref = ib.dual_newton(ib.implicit_potential(ib.diagonal_init(a, s, D["X"].shape[1])), D["X"], D["y"]).w
            assert np.linalg.norm(wf - ref) <= 1e-10 * np.linalg.norm(ref)


@pytest.mark.parametrize("alpha,shape", [(1e-5, 0.0), (0.01, 0.5), (0.3, -0.9), (2.0, 0.99)])
def test_chunk_order_key_is_half_the_initial_kernel(alpha, shape):
    """The sweep orders points by `_kernel_scale`, documented as half the initial tangent kernel
    `u² + v²` of a two-layer diagonal net: check it against the initialisation's magnitudes."""
    from ibflow._sweep import _kernel_scale

    net = ib.diagonal_init(alpha, shape, 3)
    u, v = np.asarray(net.plus)
    np.testing.assert_allclose(_kernel_scale(alpha, shape), (u**2 + v**2) / 2, rtol=1e-12)


def test_second_sweep_reuses_the_compiled_chunk(data):
    """A second sweep with the same network and options (new α values, new data values of the
    same shapes) neither traces nor compiles its chunk program again."""
    from ibflow._sweep import _cached_chunk_solver

    p, D = data

    def solver_with(**options):  # the chunk solver of a default sweep of these data's shapes
        return _cached_chunk_solver("diagonal", D["X"].shape[1], 2, 1, 0.2,
                                    dict(rtol=ib._sweep.REDUCED_RTOL, atol=ib._sweep.REDUCED_ATOL, **options,
                                         solver=ib.LinearlyImplicitExtrapolation(order_k=ib._sweep.REDUCED_ORDER)),
                                    None, None)

    kw = dict(alphas=[0.01, 0.2], shapes=[0.0, 0.5], progress=False, chunk_size=4)
    a = ib.sweep(D["X"], D["y"], **kw)
    solve = solver_with()
    compiled = solve.cache_size()  # other tests' sweeps may have compiled other chunk sizes
    assert compiled >= 1
    kw["alphas"] = [0.02, 0.3]
    b = ib.sweep(D["X"] * 1.1, D["y"], **kw)
    assert (a["status"].values == "converged").all() and (b["status"].values == "converged").all()
    assert solve.cache_size() == compiled
    # The command line spells out gradient_flow's documented defaults (`ibflow demo` and library
    # calls do not): the same flow, so the same chunk program, not a second trace and compile.
    assert solver_with(loss_rtol=1e-24, mode="auto", max_steps=20_000) is solve
    assert solver_with(loss_rtol=1e-20) is not solve  # a non-default option is another flow
    for i, alpha in enumerate(kw["alphas"]):
        net = ib.diagonal_init(alpha, 0.5, D["X"].shape[1])
        ref = ib.dual_newton(ib.implicit_potential(net), D["X"] * 1.1, D["y"]).w
        np.testing.assert_allclose(b["predictor"].values[i, 1, 0], ref, rtol=1e-9, atol=1e-12)
