"""Property tests (hypothesis): random hyperparameters and gradients, jadam against the NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import jadam
from tests.helpers import reference

STEPS, N = 20, 3


@jax.jit
def _run(hp, grads, p0):
  """Builds Adam from traced hyperparameters (no Python branching on them) and runs it: one compile for all examples."""
  tx = jadam.adam(hp["lr"], hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["wd"], amsgrad=True)

  def body(carry, g):
    theta, state = carry
    u, state = tx.update(g, state, theta)
    theta = optax.apply_updates(theta, u)
    return (theta, state), theta

  return jax.lax.scan(body, (p0, tx.init(p0)), grads)[1]


@settings(max_examples=25, deadline=None)
@given(
  lr=st.floats(1e-4, 2e-2),
  b1=st.floats(0.0, 0.99),
  b2=st.floats(0.5, 0.999),  # closer to 1, the reference's own 1 - b2**t loses digits at small t
  eps=st.floats(1e-10, 1e-2),
  wd=st.floats(0.0, 0.5),
  scale=st.sampled_from([1e-6, 1.0, 1e3]),
  seed=st.integers(0, 2**16),
)
def test_amsgrad_with_weight_decay_matches_reference_float64(lr, b1, b2, eps, wd, scale, seed):
  rng = np.random.default_rng(seed)
  grads = scale * rng.normal(size=(STEPS, N))
  p0 = rng.uniform(1.0, 2.0, N)
  with jax.enable_x64(True):
    hp = {k: jnp.asarray(v, jnp.float64) for k, v in dict(lr=lr, b1=b1, b2=b2, eps=eps, wd=wd).items()}
    got = np.asarray(_run(hp, jnp.asarray(grads), jnp.asarray(p0)))
  want = reference.adam(grads, p0, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, amsgrad="torch")
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=0)


@settings(max_examples=25, deadline=None)
@given(
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
  zero=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_updates_are_finite_and_keep_dtype(dtype, zero, seed):
  rng = np.random.default_rng(seed)
  params = jnp.asarray(rng.uniform(1.0, 2.0, N), dtype)
  g = jnp.zeros(N, dtype) if zero else jnp.asarray(rng.normal(size=N), dtype)
  tx = jadam.adam(1e-3, amsgrad=True, weight_decay=0.01)
  state = tx.init(params)
  for _ in range(3):
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  assert u.dtype == dtype
  chex.assert_tree_all_finite((u, state))
