import gc

import jax
import pytest

jax.config.update("jax_enable_x64", True)


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
