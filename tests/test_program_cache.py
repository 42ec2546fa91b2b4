"""Traced programs kept on disk (`ibflow._program_cache`): found again only for the same
configuration, shapes and code, and a sweep or a run from a kept program gives the exact limits."""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ibflow as ib
from ibflow import _program_cache, _sweep


@pytest.fixture
def program_dir(tmp_path):
    _sweep._SOLVERS.clear()  # in-process compiled solvers would hide the disk
    _program_cache.set_directory(str(tmp_path / "programs"))
    yield tmp_path / "programs"
    _program_cache.set_directory(None)
    _sweep._SOLVERS.clear()


def _limits_are_exact(ds, X, y, d):
    assert (ds["status"].values == "converged").all() and ds["passed"].values.all()
    for a in ds["alpha"].values:
        for s in ds["shape"].values:
            w = ds["predictor"].sel(alpha=a, shape=s).isel(seed=0).values
            ref = ib.dual_newton(ib.implicit_potential(ib.diagonal_init(float(a), float(s), d)), X, y).w
            assert np.linalg.norm(w - ref) <= 1e-10 * np.linalg.norm(ref)


def test_program_path_keys():
    args = (jnp.zeros(4), jnp.zeros((3, 5)))
    _program_cache.set_directory(None)
    assert _program_cache.program_path("cfg", args) is None  # off unless the command line turns it on
    _program_cache.set_directory("/somewhere")
    try:
        p = _program_cache.program_path("cfg", args)
        assert p is not None and p.startswith("/somewhere")
        assert _program_cache.program_path("cfg", args) == p  # deterministic
        assert _program_cache.program_path("cfg2", args) != p
        assert _program_cache.program_path("cfg", (jnp.zeros(4), jnp.zeros((3, 6)))) != p
        assert _program_cache.program_path("cfg", (jnp.zeros(4, jnp.float32), jnp.zeros((3, 5)))) != p
        # An object named by its address could be another object in another process: never kept.
        assert _program_cache.program_path(repr((lambda x: x,)), args) is None
    finally:
        _program_cache.set_directory(None)


class _Out(eqx.Module):  # module level: the kept skeleton is pickled
    value: jax.Array
    label: str = eqx.field(static=True)


def test_compile_program_restores_static_fields_and_skips_the_trace(program_dir):
    """`compile_program` on its own: the first call traces and keeps the program, a second call
    with the same configuration and shapes (new values) runs the kept program without calling
    the function, and both return its output with the non-array part (a static field) put back."""
    calls = []

    def fn(a, b):
        calls.append(1)
        return _Out(jnp.sin(a) @ b, "kept"), {"n": a.shape[0]}

    a, b = jnp.linspace(0.0, 1.0, 3), jnp.arange(6.0).reshape(3, 2)
    out, extra = _program_cache.compile_program(fn, (a, b), "test-config", "test_fn")(a, b)
    assert calls and out.label == "kept" and extra == {"n": 3}
    np.testing.assert_allclose(out.value, np.sin(np.asarray(a)) @ np.asarray(b), rtol=1e-15)
    assert len(os.listdir(program_dir)) == 1
    calls.clear()
    a2 = a + 0.5
    out2, extra2 = _program_cache.compile_program(fn, (a2, b), "test-config", "test_fn")(a2, b)
    assert not calls and out2.label == "kept" and extra2 == {"n": 3}
    np.testing.assert_allclose(out2.value, np.sin(np.asarray(a2)) @ np.asarray(b), rtol=1e-15)
    # another configuration is traced anew
    _program_cache.compile_program(fn, (a, b), "other-config", "test_fn")(a, b)
    assert calls and len(os.listdir(program_dir)) == 2


def _count_traces(monkeypatch):
    """A counter of the traces of the sweep's per-point function (`_sweep._solver_fn`)."""
    traces = []
    make = _sweep._solver_fn

    def counted(*a, **k):
        one = make(*a, **k)

        def traced_one(*args):
            traces.append(1)
            return one(*args)

        return traced_one

    monkeypatch.setattr(_sweep, "_solver_fn", counted)
    return traces


def test_kept_program_is_reused_without_tracing(program_dir, monkeypatch):
    """The first sweep traces and exports its chunk program; a second one on other data of the
    same shapes, in a fresh solver, deserialises it without tracing, and its limits are the exact
    ones (dual Newton of the Thm 4.1 potential)."""
    traces = _count_traces(monkeypatch)
    kw = dict(alphas=[1e-3, 0.05, 1.0], shapes=[0.0, 0.7], certify=True, progress=False)
    D0 = ib.sparse_regression(num_samples=8, dim=20, seed=0)
    ds0 = ib.sweep(D0["X"], D0["y"], **kw)
    files = sorted(os.listdir(program_dir))
    assert len(files) == 1 and files[0].endswith(".ibflow-program")
    assert len(traces) >= 1
    _limits_are_exact(ds0, D0["X"], D0["y"], 20)

    _sweep._SOLVERS.clear()
    traces.clear()
    D1 = ib.sparse_regression(num_samples=8, dim=20, seed=1)
    ds1 = ib.sweep(D1["X"], D1["y"], **kw)
    assert traces == [] and sorted(os.listdir(program_dir)) == files
    _limits_are_exact(ds1, D1["X"], D1["y"], 20)

    # The same sweep without the directory traces as before and gives the same numbers.
    _program_cache.set_directory(None)
    _sweep._SOLVERS.clear()
    ref = ib.sweep(D1["X"], D1["y"], **kw)
    assert len(traces) >= 1
    np.testing.assert_allclose(ds1["predictor"].values, ref["predictor"].values, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(ds1["num_steps"].values, ref["num_steps"].values)


def test_unexportable_program_is_traced_as_before(program_dir, monkeypatch):
    """Where `jax.export` fails (e.g. a custom call it cannot serialise), the sweep traces and
    compiles as without the directory, and keeps nothing."""
    def fail(*a, **k):
        raise ValueError("cannot export")

    monkeypatch.setattr(jax.export, "export", fail)
    D = ib.sparse_regression(num_samples=8, dim=20, seed=3)
    ds = ib.sweep(D["X"], D["y"], alphas=[1e-2, 0.5], shapes=[0.0], certify=True, progress=False)
    _limits_are_exact(ds, D["X"], D["y"], 20)
    assert not program_dir.exists() or os.listdir(program_dir) == []


def test_damaged_program_is_traced_again(program_dir):
    kw = dict(alphas=[1e-2, 0.5], shapes=[0.0], progress=False)
    D = ib.sparse_regression(num_samples=8, dim=20, seed=2)
    ib.sweep(D["X"], D["y"], **kw)
    (path,) = [program_dir / f for f in os.listdir(program_dir)]
    path.write_bytes(b"not a program")
    _sweep._SOLVERS.clear()
    ds = ib.sweep(D["X"], D["y"], certify=True, **kw)
    _limits_are_exact(ds, D["X"], D["y"], 20)
    assert _program_cache.load(str(path)) is not None  # written anew


def test_only_configurations_named_by_their_text_are_kept():
    """Options of ibflow's or diffrax's classes and plain values name their trace; a user's own
    function or class could change its code under the same text, so such sweeps keep nothing."""
    import diffrax

    assert _sweep._keepable(dict(rtol=1e-4, mode="auto", max_steps=10, solver=ib.LinearlyImplicitExtrapolation(5)),
                            dict(loss=ib.SquareLoss(), solver=diffrax.Kvaerno5(), dt0=None))
    assert not _sweep._keepable(dict(warp=lambda net: 1.0))

    class MyLoss(ib.SquareLoss):
        pass

    assert not _sweep._keepable(dict(loss=MyLoss()))


def test_least_recently_used_programs_are_pruned(tmp_path, monkeypatch):
    """At most `MAX_PROGRAMS` files stay; a program just used (loaded) outlives older ones."""
    monkeypatch.setattr(_program_cache, "MAX_PROGRAMS", 2)
    exported = jax.export.export(jax.jit(lambda x: [2 * x]))(jnp.zeros(3))
    skel = [jax.ShapeDtypeStruct((3,), jnp.zeros(3).dtype)]
    paths = [str(tmp_path / f"p{i}.ibflow-program") for i in range(3)]
    _program_cache.save(paths[0], exported, skel)
    _program_cache.save(paths[1], exported, skel)
    os.utime(paths[0], (1, 1))
    os.utime(paths[1], (2, 2))
    assert _program_cache.load(paths[0]) is not None  # used now: the newest
    _program_cache.save(paths[2], exported, skel)
    assert sorted(os.listdir(tmp_path)) == ["p0.ibflow-program", "p2.ibflow-program"]
    found = _program_cache.load(paths[2])
    assert found is not None and float(found[0].call(jnp.ones(3))[0][1]) == 2.0


_LIBRARY_SCRIPT = """
import json, os, sys
import ibflow as ib
path = ib.enable_compilation_cache(sys.argv[1])
D = ib.sparse_regression(num_samples=12, dim=30, seed=int(sys.argv[2]))
ds = ib.sweep(D["X"], D["y"], alphas=[0.01, 0.3], shapes=[0.0, 0.5], progress=False)
print("RESULT " + json.dumps(dict(path=path, w=ds["predictor"].values.tolist(), status=ds["status"].values.ravel().tolist())))
"""


def _library_sweep(cache, seed):
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _LIBRARY_SCRIPT, str(cache), str(seed)], capture_output=True, text=True,
                       timeout=600)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, p.stderr[-2000:]
    return json.loads(lines[0][7:])


def test_enable_compilation_cache_from_the_library(tmp_path, monkeypatch):
    """`ibflow.enable_compilation_cache` gives a library user's process the command line's
    caches: a first sweep stores its compiled program and its traced chunk program under the
    directory, a second process on other data of the same shapes adds neither (it found both),
    and its limits are the exact ones (dual Newton of the Thm 4.1 potential). With
    `IBFLOW_CACHE_DIR=off` and no path, it returns None and changes nothing."""
    cache = tmp_path / "cache"
    first = _library_sweep(cache, 0)
    assert first["path"] == str(cache)
    compiled = sorted(f for f in os.listdir(cache) if f.startswith("jit_"))
    kept = sorted(os.listdir(cache / "programs"))
    assert compiled and kept
    second = _library_sweep(cache, 1)
    assert sorted(f for f in os.listdir(cache) if f.startswith("jit_")) == compiled
    assert sorted(os.listdir(cache / "programs")) == kept
    D = ib.sparse_regression(num_samples=12, dim=30, seed=1)
    assert set(second["status"]) == {"converged"}
    for i, a in enumerate([0.01, 0.3]):
        for j, s in enumerate([0.0, 0.5]):
            ref = ib.dual_newton(ib.implicit_potential(ib.diagonal_init(a, s, 30)), D["X"], D["y"]).w
            w = np.asarray(second["w"][i][j][0])
            assert np.linalg.norm(w - ref) <= 1e-10 * np.linalg.norm(ref)
    # Off (in this process: with the directory off nothing global is changed).
    monkeypatch.setenv("IBFLOW_CACHE_DIR", "off")
    before = jax.config.jax_compilation_cache_dir
    assert ib.enable_compilation_cache() is None
    assert _program_cache._directory is None and jax.config.jax_compilation_cache_dir == before
