"""Adamax, NAdam and RAdam (jadam.adamax, nadam, radam and their stages): references and properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jadam
from tests.helpers import reference_extra as reference

CONFIGS = [
  ("adamax", dict(), dict()),
  (
    "adamax",
    dict(weight_decay=0.1, maximize=True, b1=0.8, eps=1e-3),
    dict(weight_decay=0.1, maximize=True, b1=0.8, eps=1e-3),
  ),
  ("nadam", dict(), dict()),
  ("nadam", dict(weight_decay=0.1, momentum_decay=0.01), dict(weight_decay=0.1, momentum_decay=0.01)),
  (
    "nadam",
    dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    dict(weight_decay=0.1, decoupled=True, maximize=True),
  ),
  ("radam", dict(), dict()),
  ("radam", dict(weight_decay=0.1, b2=0.99), dict(weight_decay=0.1, b2=0.99)),
  (
    "radam",
    dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    dict(weight_decay=0.1, decoupled=True, maximize=True),
  ),
]


class ReferenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*range(len(CONFIGS)))
  def test_float64_matches_numpy_reference(self, i):
    name, kw, ref_kw = CONFIGS[i]
    with jax.enable_x64(True):
      grads = jax.random.normal(jax.random.key(i), (60, 5), jnp.float64)
      params = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)
      tx = getattr(jadam, name)(learning_rate=1e-2, **kw)
      state, update = self.variant(tx.init)(params), self.variant(tx.update)
      want = getattr(reference, name)(np.asarray(grads), np.asarray(params), lr=1e-2, **ref_kw)
      for g, w in zip(grads, want, strict=True):
        u, state = update(g, state, params)
        params = params + u
        np.testing.assert_allclose(np.asarray(params), w, rtol=1e-12, atol=1e-12 * np.max(np.abs(w)))


@pytest.mark.parametrize("name", ["adamax", "nadam", "radam"])
def test_inject_hyperparams_and_schedules(name):
  tx = optax.inject_hyperparams(getattr(jadam, name))(learning_rate=optax.linear_schedule(1e-2, 1e-3, 10), b1=0.9)
  params = {"w": jnp.ones(3)}  # optax.inject_hyperparams refuses int leaves under strict promotion
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    u, state = step({"w": jnp.full(3, 0.5)}, state, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
  assert bool(jnp.all(jnp.isfinite(u["w"])))


@pytest.mark.parametrize("name", ["adamax", "nadam", "radam"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_kept_and_zero_gradients_finite(name, dtype):
  tx = getattr(jadam, name)()
  params = jnp.ones(4, dtype)
  state = tx.init(params)
  u, state = tx.update(jnp.zeros(4, dtype), state, params)
  assert u.dtype == dtype and bool(jnp.all(jnp.isfinite(u)))


def test_wrong_inputs_name_the_missing_stage():
  g = jnp.ones(2)
  for stage in (jadam.normalize_inf(), jadam.nesterov_correct(), jadam.rectify()):
    with pytest.raises(TypeError, match="scale_by_moments"):
      stage.update(g, stage.init(g))
  for tx in (
    optax.chain(jadam.scale_by_moments(), jadam.bias_correct(), jadam.nesterov_correct()),
    optax.chain(jadam.scale_by_moments(), jadam.bias_correct(), jadam.rectify()),
  ):
    with pytest.raises(TypeError, match="bias_correct"):
      tx.update(g, tx.init(g))
  with pytest.raises(ValueError, match="needs the parameters"):
    tx = jadam.decoupled_decay(0.1, 1e-3)
    tx.update(g, tx.init(g))
  with pytest.raises(ValueError, match="Invalid eps"):
    jadam.scale_by_inf_moments(eps=-1.0)


def test_radam_is_momentum_sgd_until_rho_exceeds_5():
  """For beta2 = 0.999, rho_t <= 5 for t <= 5: the first steps are -lr * m_hat."""
  with jax.enable_x64(True):
    tx = jadam.radam(learning_rate=1.0)
    params = jnp.zeros(1, jnp.float64)
    state = tx.init(params)
    m = 0.0
    for t in range(1, 6):
      g = jnp.full(1, float(t), jnp.float64)
      u, state = tx.update(g, state, params)
      m = 0.9 * m + 0.1 * t
      np.testing.assert_allclose(np.asarray(u), -m / (1 - 0.9**t), rtol=1e-14)
