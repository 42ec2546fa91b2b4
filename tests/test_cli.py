import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ibflow as ib
from ibflow._cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli")
    D = ib.sparse_regression(num_samples=6, dim=10, num_test=8, seed=2)
    np.savez(p / "d.npz", **D)
    rng = np.random.default_rng(0)
    d = 10
    inits = {
        "diagonal": dict(plus=rng.uniform(-1, 1, (3, d)), minus=rng.uniform(-1, 1, (3, d))),
        "diagonal-tied": dict(plus=rng.uniform(0.2, 1, d), minus=rng.uniform(0.2, 1, d)),
        "fc": dict(W=rng.standard_normal((d, 1)) * 0.5, a=np.array([0.9])),
        "fc3": dict(W1=rng.standard_normal((d, 2)) * 0.5, W2=rng.standard_normal((2, 2)), a=np.ones(2)),
        "leaky-relu": dict(w=np.random.default_rng(5).standard_normal(d) * 0.3, a=np.array(0.8)),  # no kink sliding
        "conv": dict(kernels=rng.standard_normal((2, d)) * 0.5),
        "linear": dict(w=rng.standard_normal(d)),
    }
    for k, v in inits.items():
        np.savez(p / f"{k}.npz", **v)
    X = D["X"].copy()
    X[1, 1] = np.inf
    np.savez(p / "inf.npz", X=X, y=D["y"])
    np.savez(p / "noy.npz", X=D["X"])
    return p, D


def _run(args, tmp):
    out = tmp / "r.json"
    try:
        rc = main(args + ["--out", str(out)])
    except SystemExit as e:  # argparse's own errors (one line, status 2)
        rc = e.code
    return rc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("net, extra", [
    ("diagonal", ["--alpha", "0.1", "--shape", "0.5"]),
    ("diagonal", ["--alpha", "0.1", "--shape", "0.5", "--depth", "3"]),
    ("diagonal-tied", ["--alpha", "0.1", "--shape", "0"]),
    ("fc", ["--alpha", "0.5", "--shape", "0.2", "--width", "3"]),
    ("conv", ["--alpha", "0.5", "--shape", "0.2"]),
    ("leaky-relu", ["--alpha", "0.5", "--shape", "0.2", "--slope", "0.3"]),
    ("linear", ["--alpha", "0.5"]),
])
def test_run_scale_shape(files, net, extra, tmp_path):
    p, D = files
    rc, r = _run(["run", "--data", str(p / "d.npz"), "--net", net] + extra, tmp_path)
    assert rc == 0
    assert r["status"] == "converged"
    for key in ("predictor", "loss", "t_end", "num_steps", "wall_seconds", "test_error", "population_error"):
        assert key in r
    assert len(r["predictor"]) == D["X"].shape[1]
    assert r["loss"] <= 1e-20


def test_negative_values_are_values_not_options():
    # argparse reads "-0.5" after an option as its value but "-0.5,0,0.5" as an unknown option:
    # a sweep over negative shapes was refused ("expected one argument").
    from ibflow._cli import _attach_negative_values, build_parser

    parse = lambda argv: build_parser().parse_args(_attach_negative_values(argv))
    sweep = ["sweep", "--data", "d.npz", "--net", "diagonal", "--alpha", "0.1:1:3", "--out", "o"]
    assert parse(sweep + ["--shape", "-0.5,0,0.5"]).shape == "-0.5,0,0.5"
    assert parse(sweep + ["--shape=-0.9,-.2"]).shape == "-0.9,-.2"
    assert parse(sweep + ["--shape", "-.5,.5", "--certify"]).certify
    run = ["run", "--data", "d.npz", "--net", "diagonal", "--alpha", "0.1", "--out", "r.json"]
    assert parse(run + ["--shape", "-0.3"]).shape == -0.3
    assert parse(run + ["--shape", "-1e-3"]).shape == -1e-3
    with pytest.raises(SystemExit):  # an option name is still an option name
        parse(run + ["--shape", "--depth", "3"])


@pytest.mark.parametrize("net, file", [("diagonal", "diagonal"), ("diagonal-tied", "diagonal-tied"), ("fc", "fc"),
                                       ("fc", "fc3"), ("leaky-relu", "leaky-relu"), ("conv", "conv"), ("linear", "linear")])
def test_run_init_file(files, net, file, tmp_path):
    p, D = files
    rc, r = _run(["run", "--data", str(p / "d.npz"), "--net", net, "--init", str(p / f"{file}.npz")], tmp_path)
    assert rc == 0 and r["status"] == "converged"
    if net == "linear":  # closed form: argmin ‖w − w0‖ s.t. Xw = y
        w0 = np.load(p / "linear.npz")["w"]
        np.testing.assert_allclose(r["predictor"], ib.min_l2(D["X"], D["y"], w0), rtol=1e-8)


def test_run_certify(files, tmp_path):
    p, _ = files
    rc, r = _run(["run", "--data", str(p / "d.npz"), "--net", "diagonal", "--alpha", "0.05", "--shape", "0.3",
                  "--certify"], tmp_path)
    c = r["certificate"]
    assert rc == 0 and c["passed"] and c["applicable"]
    for k in ("potential", "kkt_residual", "primal_residual", "reference_distance"):
        assert k in c
    rc, r = _run(["run", "--data", str(p / "d.npz"), "--net", "diagonal", "--alpha", "0.05", "--shape", "0.3",
                  "--certify", "--potential", "l2"], tmp_path)
    assert rc == 0 and not r["certificate"]["passed"]


def test_run_mode_pure_and_reduced_agree(files, tmp_path):
    """`--mode`: the JSON names the coordinates used, and both reach the same certified limit."""
    p, _ = files
    base = ["run", "--data", str(p / "d.npz"), "--net", "diagonal", "--alpha", "0.05", "--shape", "0.3", "--certify"]
    out = {}
    for mode in ("auto", "pure"):
        rc, r = _run(base + ["--mode", mode], tmp_path)
        assert rc == 0 and r["certificate"]["passed"]
        out[mode] = r
    out["reduced"] = out["auto"]  # the default is the reduced mode here
    assert out["auto"]["mode"] == "reduced" and out["pure"]["mode"] == "pure"
    assert out["pure"]["end_jump"] < 1e-9 and out["reduced"]["end_jump"] < 1e-9
    a, b = np.asarray(out["pure"]["predictor"]), np.asarray(out["reduced"]["predictor"])
    assert np.linalg.norm(a - b) <= 1e-8 * np.linalg.norm(a)
    (tmp_path / "bad").mkdir()
    rc, r = _run(["run", "--data", str(p / "d.npz"), "--net", "fc", "--alpha", "0.5", "--shape", "0.2",
                  "--mode", "reduced"], tmp_path / "bad")
    assert rc == 2 and r is None


def test_run_certify_not_applicable(files, tmp_path, capsys):
    p, _ = files
    rc, r = _run(["run", "--data", str(p / "d.npz"), "--net", "fc", "--alpha", "0.5", "--shape", "-0.5",
                  "--certify"], tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and r["certificate"]["applicable"] is False and r["certificate"]["passed"] is False
    assert len(err) == 1 and "delta" in err[0]


@pytest.mark.parametrize("args, needle", [
    (["--data", "MISSING.npz", "--net", "diagonal", "--alpha", "1"], "not found"),
    (["--data", "{p}/inf.npz", "--net", "diagonal", "--alpha", "1"], "NaN or inf"),
    (["--data", "{p}/noy.npz", "--net", "diagonal", "--alpha", "1"], "'y'"),
    (["--data", "{p}/d.npz", "--net", "diagonal", "--alpha", "0"], "--alpha"),
    (["--data", "{p}/d.npz", "--net", "diagonal", "--alpha", "nan"], "--alpha"),
    (["--data", "{p}/d.npz", "--net", "diagonal", "--alpha", "1", "--shape", "-1"], "--shape"),
    (["--data", "{p}/d.npz", "--net", "nonet", "--alpha", "1"], "invalid choice"),
    (["--data", "{p}/d.npz", "--net", "diagonal"], "--alpha"),
    (["--data", "{p}/d.npz", "--net", "fc", "--init", "{p}/diagonal.npz"], "'W'"),
    (["--data", "{p}/d.npz", "--net", "diagonal", "--init", "{p}/linear.npz"], "'plus'"),
    (["--data", "{p}/d.npz", "--net", "linear", "--init", "{p}/fc.npz"], "'w'"),
    (["--data", "{p}/d.npz", "--net", "diagonal", "--init", "{p}/diagonal.npz", "--depth", "2"], "depth"),
    (["--data", "{p}/d.npz", "--net", "diagonal", "--alpha", "1", "--depth", "1"], "depth"),
    # Classification-only stopping options with the square loss would be silently ignored.
    (["--data", "{p}/d.npz", "--net", "diagonal", "--alpha", "1", "--until-loss", "1e-50"], "--until-loss"),
    (["--data", "{p}/d.npz", "--net", "diagonal", "--alpha", "1", "--until-time", "10"], "--until-time"),
])
def test_bad_input_one_line(files, tmp_path, capsys, args, needle):
    p, _ = files
    args = [a.replace("{p}", str(p)) for a in args]
    rc, _ = _run(["run"] + args, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0], err


def test_unconverged_exit_status(files, tmp_path):
    p, _ = files
    rc, r = _run(["run", "--data", str(p / "d.npz"), "--net", "diagonal", "--alpha", "0.1", "--max-steps", "3"], tmp_path)
    assert rc == 1 and r["status"] == "max_steps"


def test_console_script_installed(files, tmp_path):
    p, _ = files
    proc = subprocess.run([sys.executable, "-m", "ibflow", "run", "--data", str(p / "d.npz"), "--net", "linear",
                           "--alpha", "1", "--out", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o.json").read_text())["status"] == "converged"


def test_run_in_float32_takes_the_float32_tolerances(files, tmp_path):
    """With `IBFLOW_NO_X64=1`, `ibflow run` leaves its tolerances to `default_solver_tolerances`
    (rtol 1e-5 in float32). It once passed float64's rtol 1e-10 itself, out of the float32 order-5
    solver's reach: the same run with `--rtol 1e-10 --atol 1e-12` does not converge (checked here
    in 2000 steps; measured `stalled` at 20000), the default converges to the float64 flow's
    limit within float32 accuracy."""
    import os

    p, _ = files
    base = [sys.executable, "-m", "ibflow", "run", "--data", str(p / "d.npz"), "--net", "fc", "--init",
            str(p / "fc.npz")]
    env = dict(os.environ, IBFLOW_NO_X64="1", IBFLOW_CACHE_DIR="off")
    out = {}
    for name, extra in (("default", []), ("float64 tolerances", ["--rtol", "1e-10", "--atol", "1e-12",
                                                                  "--max-steps", "2000"])):
        proc = subprocess.run(base + ["--out", str(tmp_path / f"{name}.json")] + extra, env=env,
                              capture_output=True, text=True)
        assert (tmp_path / f"{name}.json").exists(), proc.stderr
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert out["default"]["status"] == "converged"
    assert out["float64 tolerances"]["status"] != "converged"
    rc, r64 = _run(["run", "--data", str(p / "d.npz"), "--net", "fc", "--init", str(p / "fc.npz")], tmp_path)
    assert rc == 0 and r64["status"] == "converged"
    a, b = np.asarray(out["default"]["predictor"]), np.asarray(r64["predictor"])
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def test_demo_main_job_certifies_every_point(tmp_path, capsys):
    """The README's main job (`ibflow demo`) at a small size: exit 0, the dataset and the
    figure written, every point converged and certified, and each limit equal to the
    independent dual-Newton minimiser of its Azulay Thm 4.1 potential."""
    import xarray as xr

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--dim", "30", "--samples", "12"]) == 0
    assert "points certified" in capsys.readouterr().out
    assert (out / "demo.png").stat().st_size > 0
    with xr.open_dataset(out / "sweep.nc", engine="h5netcdf") as ds:
        ds = ds.load()
    assert (ds["status"].values == "converged").all() and ds["passed"].values.all()
    D = ib.sparse_regression(num_samples=12, dim=30, num_test=500, seed=0)
    for a in ds["alpha"].values:
        for s in ds["shape"].values:
            w = ds["predictor"].sel(alpha=a, shape=s).isel(seed=0).values
            ref = ib.dual_newton(ib.implicit_potential(ib.diagonal_init(float(a), float(s), 30)), D["X"], D["y"]).w
            assert np.linalg.norm(w - ref) / np.linalg.norm(ref) < 1e-8


def test_compilation_cache_dir_resolution(monkeypatch, tmp_path):
    from ibflow._program_cache import default_cache_dir

    monkeypatch.delenv("IBFLOW_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / "ibflow" / "jax")
    monkeypatch.setenv("IBFLOW_CACHE_DIR", "off")
    assert default_cache_dir() is None
    monkeypatch.setenv("IBFLOW_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == str(tmp_path / "c")


def test_sweep_compilation_cache_is_reused_across_data_values(tmp_path):
    """Two command-line sweeps on different data of the same shapes share one persistent cache:
    the first stores the solve's program (compiled, and traced in `programs/`), the second finds
    it and adds none (the data are arguments, not constants, so the key does not depend on their
    values), and the second's limits are still the exact ones (dual Newton of the Thm 4.1
    potential)."""
    import xarray as xr

    cache = tmp_path / "cache"
    env = dict(os.environ, IBFLOW_CACHE_DIR=str(cache))
    entries = []
    for seed in (0, 1):
        D = ib.sparse_regression(num_samples=8, dim=20, seed=seed)
        np.savez(tmp_path / f"d{seed}.npz", X=D["X"], y=D["y"])
        out = tmp_path / f"out{seed}"
        proc = subprocess.run([sys.executable, "-m", "ibflow", "sweep", "--data", str(tmp_path / f"d{seed}.npz"),
                               "--net", "diagonal", "--alpha", "1e-3:0.5:3", "--shape", "0,0.8", "--certify",
                               "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        # The sweep's solve (compiled in ~2 s); smaller programs near the cache's 0.2 s
        # compile-time threshold may or may not be stored, depending on the machine's speed.
        entries.append(sorted(name for name in os.listdir(cache) if name.startswith("jit_chunk")))
        with xr.open_dataset(out / "sweep.nc", engine="h5netcdf") as ds:
            ds = ds.load()
        assert ds["passed"].values.all()
        for a in ds["alpha"].values:
            for s in ds["shape"].values:
                w = ds["predictor"].sel(alpha=a, shape=s).isel(seed=0).values
                ref = ib.dual_newton(ib.implicit_potential(ib.diagonal_init(float(a), float(s), 20)), D["X"], D["y"]).w
                assert np.linalg.norm(w - ref) <= 1e-10 * np.linalg.norm(ref)
    assert len(entries[0]) == 1 and entries[1] == entries[0], entries
    # The traced chunk program too (`_program_cache`): kept by the first sweep, found by the second.
    assert len(os.listdir(cache / "programs")) == 1


def test_run_flow_programs_are_kept_and_reused(tmp_path):
    """`ibflow run` checks its data on the host and traces its flows without `eqx.error_if`
    (`_checks.host_validated`): a program holding such a host callback is never stored in JAX's
    persistent compilation cache, so every command compiled its flow anew (~5 s at d = 1000).
    The regression flow is also kept traced (`programs/`, `_cli._run_flow`): a second command on
    other data of the same shapes adds no compiled program and no traced one, and its limit is
    still the exact one (dual Newton on the Thm 4.1 potential). The margin flow is kept the
    same way, and certified."""
    cache = tmp_path / "cache"
    env = dict(os.environ, IBFLOW_CACHE_DIR=str(cache))
    rng = np.random.default_rng(7)
    Xc = rng.standard_normal((8, 5))
    np.savez(tmp_path / "cls.npz", X=Xc, y=np.sign(Xc @ rng.standard_normal(5)))
    entries = []
    for seed in (0, 1):
        D = ib.sparse_regression(num_samples=6, dim=10, seed=seed)
        np.savez(tmp_path / f"d{seed}.npz", X=D["X"], y=D["y"])
        proc = subprocess.run([sys.executable, "-m", "ibflow", "run", "--data", str(tmp_path / f"d{seed}.npz"),
                               "--net", "diagonal", "--alpha", "0.1", "--shape", "0.5", "--out",
                               str(tmp_path / "r.json")], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        r = json.loads((tmp_path / "r.json").read_text())
        ref = ib.dual_newton(ib.implicit_potential(ib.diagonal_init(0.1, 0.5, 10)), D["X"], D["y"]).w
        assert r["status"] == "converged"
        assert np.linalg.norm(np.asarray(r["predictor"]) - ref) <= 1e-10 * np.linalg.norm(ref)
        entries.append((sorted(n for n in os.listdir(cache) if n.startswith("jit_run_flow")),
                        sorted(os.listdir(cache / "programs"))))
    assert len(entries[0][0]) == 1 and len(entries[0][1]) == 1 and entries[1] == entries[0], entries
    proc = subprocess.run([sys.executable, "-m", "ibflow", "run", "--data", str(tmp_path / "cls.npz"), "--net", "fc",
                           "--alpha", "0.5", "--shape", "0.3", "--loss", "exp", "--until-loss", "1e-10", "--certify",
                           "--out", str(tmp_path / "m.json")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "m.json").read_text())
    assert r["status"] == "converged" and r["certificate"]["passed"]
    assert any(name.startswith("jit_margin_flow") for name in os.listdir(cache)), os.listdir(cache)
    assert len(os.listdir(cache / "programs")) == 2  # the margin flow's traced program beside the regression's


def test_module_entry_flushes_output_and_keeps_exit_status(files, tmp_path):
    """`python -m ibflow` leaves through `os._exit` after `main` (`_cli.entry`): its stdout and
    stderr must still arrive, with the exit status `main` returned."""
    p, _ = files
    bad = subprocess.run([sys.executable, "-m", "ibflow", "run", "--data", str(tmp_path / "missing.npz"), "--net",
                          "linear", "--alpha", "1", "--out", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "data file not found" in bad.stderr
    out = tmp_path / "sweep"
    ok = subprocess.run([sys.executable, "-m", "ibflow", "sweep", "--data", str(p / "d.npz"), "--net", "linear",
                         "--alpha", "0.1:1:2", "--shape", "0", "--out", str(out), "--no-progress"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "2/2 points converged" in ok.stdout and (out / "sweep.nc").stat().st_size > 0


@pytest.mark.parametrize("flags, version, expected", [
    # jaxlib versions whose XLA defines the flag (its name is in their libraries) get it ...
    ("", "0.10.2", "--xla_cpu_use_fusion_emitters=false"),
    ("", "0.7.0", "--xla_cpu_use_fusion_emitters=false"),
    ("--xla_cpu_multi_thread_eigen=false", "0.10.2",
     "--xla_cpu_multi_thread_eigen=false --xla_cpu_use_fusion_emitters=false"),
    # ... others do not: jaxlib 0.11.2's XLA aborts on it as an unknown flag; 0.5.0 lacks it.
    ("", "0.11.2", ""),
    ("", "0.5.0", ""),
    ("", "unknown", ""),
    # the user's own setting of the flag stands
    ("--xla_cpu_use_fusion_emitters=true", "0.10.2", "--xla_cpu_use_fusion_emitters=true"),
])
def test_cpu_xla_flags_version_range(flags, version, expected):
    from ibflow._cli import cpu_xla_flags

    assert cpu_xla_flags(flags, version) == expected


@pytest.mark.parametrize("flags, version, expected", [
    ("", "0.10.2", "--xla_cpu_use_fusion_emitters=false --xla_gpu_autotune_level=0"),
    ("", "0.11.2", "--xla_gpu_autotune_level=0"),
    ("--xla_dump_to=/tmp/d", "0.11.2", "--xla_dump_to=/tmp/d --xla_gpu_autotune_level=0"),
    # the user's own autotuning level stands, next to the CPU emitter choice
    ("--xla_gpu_autotune_level=4", "0.10.2",
     "--xla_gpu_autotune_level=4 --xla_cpu_use_fusion_emitters=false"),
    ("--xla_gpu_autotune_level=2 --xla_cpu_use_fusion_emitters=true", "0.11.2",
     "--xla_gpu_autotune_level=2 --xla_cpu_use_fusion_emitters=true"),
])
def test_cli_xla_flags_add_the_gpu_autotuning_choice(flags, version, expected):
    from ibflow._cli import cli_xla_flags

    assert cli_xla_flags(flags, version) == expected


def test_entry_sets_its_xla_flags_before_the_backend_starts():
    """`entry` (the console script and `python -m ibflow`) puts `cli_xla_flags` into the
    process's XLA_FLAGS before `main`, while JAX's backend has not started, and the installed
    jaxlib's XLA accepts them (an unknown XLA_FLAGS entry aborts the process at the first
    computation)."""
    code = ("import os, ibflow._cli as c, jax.numpy as jnp\n"
            "from jax._src import xla_bridge\n"
            "def main():\n"
            "    print(repr(os.environ.get('XLA_FLAGS')), bool(xla_bridge._backends))\n"
            "    print(float(jnp.arange(4.0).sum()))\n"
            "    return 0\n"
            "c.main = main\n"
            "c.entry()\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    import ast

    from jaxlib.version import __version__

    from ibflow._cli import cli_xla_flags

    flags, started = proc.stdout.split("\n")[0].rsplit(" ", 1)
    expected = cli_xla_flags("", __version__)
    assert ast.literal_eval(flags) == (expected or None) and started == "False"
    assert proc.stdout.split("\n")[1] == "6.0"
