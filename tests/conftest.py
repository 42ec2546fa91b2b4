import gc
import os
import shutil
import tempfile
import time
import uuid

# The suite's XLA:CPU compiler options, set before JAX's backend starts (it reads XLA_FLAGS
# once, at the first computation). Most of a test's time is XLA compiling a program it then
# runs for milliseconds, so the suite compiles with LLVM's optimisation level 0 (and the
# command line's choices, `ibflow._cli.cli_xla_flags`: its XLA:CPU emitters and, on a GPU, no
# kernel autotuning): the default suite then took about half the time (2 cores). Level 0
# changes how fast the code runs, not what it computes (every test's tolerance is its own). It
# also leaves out XLA's while-loop-invariant code motion, which a program with nested while
# loops pays for dearly: the leaky-ReLU flow (its pieces' `diffeqsolve` inside the event loop;
# d = 50, N = 20) compiled in 4.3 s without it against 9.6 s with it (the pass ran 26 times,
# 1.8 s, and made the loop simplifications that follow it cost 1.5 s more), the default suite
# took 517 s against 554 s in the same hour, and the sweep's chunk program (no nested loops)
# compiled as fast either way. A user's own XLA_FLAGS, even empty, stand instead:
# `XLA_FLAGS= pytest` runs the suite as the library runs by default.
if "XLA_FLAGS" not in os.environ:
    from jaxlib.version import __version__ as _jaxlib_version

    from ibflow._cli import cli_xla_flags

    os.environ["XLA_FLAGS"] = cli_xla_flags(
        "--xla_backend_optimization_level=0 --xla_disable_hlo_passes=while-loop-invariant-code-motion",
        _jaxlib_version,
    )

# On a GPU machine every worker process (pytest-xdist) would otherwise take 75 % of the GPU's
# memory at its first computation: with 8 workers on an H200 (fifteenth session) 51 of 69
# tests failed with JaxRuntimeError; with preallocation off, 119 of 121 (three test files)
# passed. Each worker allocates what it uses instead.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
# The command line keeps compiled programs in a persistent cache (~/.cache/ibflow/jax); the
# suite (which calls it in process and in subprocesses) leaves the user's cache alone and
# compiles everything itself. test_cli.py tests the cache in a temporary directory.
os.environ.setdefault("IBFLOW_CACHE_DIR", "off")


_SUITE_CACHE_ROOT = os.path.join(tempfile.gettempdir(), "ibflow-suite-jax")


def pytest_configure(config):
    """A JAX compilation cache for this run only, shared by its worker processes.

    Each module's compiled programs are released when it finishes (`_release_compiled_code`), so
    modules that solve the same flows on data of the same shapes compiled them again, and so did
    each xdist worker. With one persistent cache per run (a fresh directory, removed when the run
    ends) a program is compiled once per run and read back elsewhere: every test still compiles
    what it runs at least once per run, and no run sees another's programs. The controller picks
    the run's id (xdist's `--testrunuid`); a run without workers keeps its own directory. Off when
    `JAX_COMPILATION_CACHE_DIR` is set (the user's choice stands) or `IBFLOW_SUITE_CACHE=off`."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get("IBFLOW_SUITE_CACHE") == "off":
        return
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        path = os.path.join(_SUITE_CACHE_ROOT, workerinput["testrunuid"])
    else:
        _remove_stale_caches()
        if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") != "no":
            config.option.testrunuid = config.option.testrunuid or uuid.uuid4().hex
            path = os.path.join(_SUITE_CACHE_ROOT, config.option.testrunuid)  # the workers' directory
        else:
            path = os.path.join(_SUITE_CACHE_ROOT, uuid.uuid4().hex)
            _use_compilation_cache(path)
        config._ibflow_suite_cache = path  # removed in pytest_unconfigure
        return
    _use_compilation_cache(path)


def _remove_stale_caches(max_age_s=86_400):
    """Remove the directories of runs that ended without `pytest_unconfigure` (killed) a day ago."""
    try:
        entries = list(os.scandir(_SUITE_CACHE_ROOT))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir() and time.time() - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass


def _use_compilation_cache(path):
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def pytest_unconfigure(config):
    path = getattr(config, "_ibflow_suite_cache", None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def getkey():
    counter = iter(range(10_000))
    return lambda: jax.random.PRNGKey(next(counter))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Free each module's compiled executables when it finishes.

    Every XLA:CPU executable keeps memory mappings alive; one pytest process compiling
    the whole suite's programs otherwise exceeds Linux's default `vm.max_map_count`
    (65530) and XLA segfaults while compiling (measured: ~12 500 mappings after
    test_classify.py alone)."""
    yield
    jax.clear_caches()
    gc.collect()
