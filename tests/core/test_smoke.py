"""A first check that the package imports and one step matches the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np

import jadam
from tests.helpers import reference


def test_adam_one_run_matches_reference_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(20, 3))
    params0 = rng.uniform(1, 2, size=3)
    tx = jadam.adam(1e-2)
    params = jnp.asarray(params0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g, want in zip(grads, reference.adam(grads, params0, lr=1e-2), strict=True):
      u, state = update(jnp.asarray(g), state, params)
      params = params + u
      np.testing.assert_allclose(np.asarray(params), want, rtol=1e-13)
