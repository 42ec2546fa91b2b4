import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def getkey():
    counter = iter(range(10_000))
    return lambda: jax.random.PRNGKey(next(counter))
