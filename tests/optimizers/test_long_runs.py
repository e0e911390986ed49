"""Long runs: a step count at the int32 limit, and 100,000 jitted steps in one `lax.scan`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from tests.helpers import reference

INT32_MAX = int(jnp.iinfo(jnp.int32).max)


def _set_counts(state, value):
  """Every step count in a (chained, wrapped) state set to `value`: what a run of that many steps leaves."""

  def fix(path, leaf):
    return jnp.asarray(value, jnp.int32) if getattr(path[-1], "name", None) == "count" else leaf

  return jax.tree_util.tree_map_with_path(fix, state)


def _counts(state):
  return [
    leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state) if getattr(path[-1], "name", None) == "count"
  ]


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adam_at_the_int32_limit_matches_the_reference(x64, amsgrad):
  """From count max - 2, five steps: the count saturates at the maximum, the corrections are 1, the updates right."""
  rng = np.random.default_rng(0)
  grads, p0 = rng.normal(size=(5, 4)), rng.uniform(1.0, 2.0, 4)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    tx = jadam.adam(1e-2, weight_decay=0.1, amsgrad=amsgrad)
    params = jnp.asarray(p0, dtype)
    state = _set_counts(tx.init(params), INT32_MAX - 2)  # each stage's count, via _replace
    step = jax.jit(lambda p, s, g: jadam.update_and_apply(tx, g, s, p))
    path = []
    for g in grads:
      params, state = step(params, state, jnp.asarray(g, dtype))
      chex.assert_tree_all_finite((params, state))
      path.append(np.asarray(params, np.float64))
    assert all(int(c) == INT32_MAX and c.dtype == jnp.int32 for c in _counts(state))
  want = reference.adam(grads, p0, lr=1e-2, weight_decay=0.1, amsgrad="torch" if amsgrad else None, t0=INT32_MAX - 2)
  # ... which is Adam with both corrections 1: the first update is lr (1 - b1) g / sqrt((1 - b2) g^2), not the
  # corrected lr sign(g) of an early step.
  np.testing.assert_allclose(want[0] - p0, -1e-2 * 0.1 / np.sqrt(0.001) * np.sign(grads[0] + 0.1 * p0), rtol=1e-4)
  np.testing.assert_allclose(np.stack(path), want, rtol=1e-12 if x64 else 1e-6, atol=0)


SATURATING = {
  "adamw": lambda: jadam.adamw(1e-2),
  "sgd": lambda: jadam.sgd(1e-2, momentum=0.9, weight_decay=0.1),
  "rmsprop": lambda: jadam.rmsprop(1e-2, centered=True, momentum=0.5),
  "adagrad": lambda: jadam.adagrad(1e-1, lr_decay=0.01),
  "adamax": lambda: jadam.adamax(1e-2),
  "nadam": lambda: jadam.nadam(1e-2),
  "radam": lambda: jadam.radam(1e-2),
  "keras": lambda: jadam.keras.Adam(1e-2, amsgrad=True),
  "torch_onecycle": lambda: jadam.torch.Adam(lr=jadam.torch.OneCycleLR(1e-2, total_steps=100)),
  "inject_hyperparams": lambda: optax.inject_hyperparams(jadam.adam, hyperparam_dtype=jnp.float32)(
    learning_rate=optax.linear_schedule(1e-2, 1e-3, 100)
  ),
  "apply_if_finite": lambda: optax.apply_if_finite(jadam.adam(1e-2), 3),
}


@pytest.mark.parametrize("name", sorted(SATURATING))
def test_every_optimizer_keeps_stepping_at_the_int32_limit(name):
  tx = SATURATING[name]()
  params = {"w": jnp.linspace(1.0, 2.0, 4, dtype=jnp.float32), "h": jnp.ones(2, jnp.bfloat16)}
  grads = {"w": jnp.asarray([0.5, -1.0, 2.0, -0.25], jnp.float32), "h": jnp.asarray([1.0, -1.0], jnp.bfloat16)}
  state = _set_counts(tx.init(params), INT32_MAX - 2)
  step = jax.jit(lambda p, s: jadam.update_and_apply(tx, grads, s, p))
  for _ in range(5):
    params, state = step(params, state)
    chex.assert_tree_all_finite((params, state))
  counts = _counts(state)
  assert counts and all(int(c) == INT32_MAX for c in counts)
  # The updates still move against the gradient: the step did not collapse to zero or blow up.
  u, _ = tx.update(grads, state, params)
  w = np.asarray(u["w"])
  assert np.all(np.sign(w) == -np.sign(np.asarray(grads["w"]))) and np.all(np.abs(w) < 1.0)


@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16], ids=["default", "bf16_moments"])
def test_100000_steps_in_one_scan(mu_dtype):
  """A hundred thousand jitted steps: state dtypes and shapes never change, parameters stay finite and converge."""
  steps = 100_000
  params = {"w": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32), "h": jnp.zeros(3, jnp.bfloat16), "s": jnp.float32(2.0)}
  target = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  # lr 1e-2: a bfloat16 parameter near 0.5 moves only by steps above half its spacing there, 2e-3.
  tx = jadam.adam(1e-2, amsgrad=True, weight_decay=1e-4, mu_dtype=mu_dtype, nu_dtype=mu_dtype)
  state0 = tx.init(params)

  @jax.jit
  def run(params, state):
    def body(carry, t):
      params, state = carry
      noise = 0.01 * jnp.sin(t.astype(jnp.float32))
      grads = jax.tree.map(
        lambda p, c: (p.astype(jnp.float32) - c.astype(jnp.float32) + noise).astype(p.dtype), params, target
      )
      return jadam.update_and_apply(tx, grads, state, params), None

    return jax.lax.scan(body, (params, state), jnp.arange(steps, dtype=jnp.int32))[0]

  final, state = run(params, state0)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
  chex.assert_trees_all_equal_shapes_and_dtypes(final, params)
  chex.assert_tree_all_finite((final, state))
  assert all(int(c) == steps for c in _counts(state))
  for leaf in jax.tree.leaves(final):
    np.testing.assert_allclose(np.asarray(leaf, np.float32), 0.5, atol=0.02)  # converged to the target
