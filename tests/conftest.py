import gc
import os

import jax
import pytest

jax.config.update("jax_enable_x64", True)
# The command line keeps compiled programs in a persistent cache (~/.cache/ibflow/jax); the
# suite (which calls it in process and in subprocesses) leaves the user's cache alone and
# compiles everything itself. test_cli.py tests the cache in a temporary directory.
os.environ.setdefault("IBFLOW_CACHE_DIR", "off")


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
