"""Low precision, mixed trees, non-float leaves and the saturating step count."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam


def _run_zero_gradient_steps(tx, params, steps):
  """One step with a unit gradient (so nu is nonzero), then `steps` zero-gradient steps in a jitted scan."""
  state = tx.init(params)
  updates, state = tx.update(jnp.ones_like(params), state, params)

  def body(state, _):
    u, state = tx.update(jnp.zeros_like(params), state, params)
    return state, u

  state, us = jax.jit(lambda s: jax.lax.scan(body, s, length=steps))(state)
  return updates, state, us


def test_bf16_second_moment_decays_as_0999_to_the_1000():
  params = jnp.linspace(1.0, 2.0, 8, dtype=jnp.bfloat16)
  first, state, us = _run_zero_gradient_steps(jadam.adam(1e-3), params, 1000)
  assert first.dtype == jnp.bfloat16 and us.dtype == jnp.bfloat16  # updates come back bf16
  moments_state = state[1]  # after add_l2
  assert moments_state.mu.dtype == jnp.bfloat16  # mu keeps the parameter's dtype
  assert moments_state.nu.dtype == jnp.float32  # nu is widened by default, for this reason:
  want = 0.001 * 0.999**1000
  np.testing.assert_allclose(np.asarray(moments_state.nu), want, rtol=2**-8)  # bf16's precision
  np.testing.assert_allclose(np.asarray(moments_state.nu), want, rtol=1e-4)  # and in fact float32's
  assert int(moments_state.count) == 1001
  chex.assert_tree_all_finite(us)


def test_bf16_second_moment_stored_in_bf16_would_not_decay():
  """The contrast that motivates the default: in bf16, 0.999 v rounds back to v."""
  v = jnp.bfloat16(0.001)
  assert (jnp.float32(0.999) * v.astype(jnp.float32)).astype(jnp.bfloat16) == v  # round-to-nearest
  # An explicit nu_dtype=bfloat16 is therefore stored with stochastic rounding
  # (issue 5; tests/storage/test_lowp.py), and decays on average.
  params = jnp.linspace(1.0, 2.0, 8, dtype=jnp.bfloat16)
  _, state, _ = _run_zero_gradient_steps(jadam.adam(1e-3, nu_dtype=jnp.bfloat16), params, 1000)
  nu = state[1].nu
  assert nu.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(nu, np.float32).mean(), 0.001 * 0.999**1000, rtol=0.1)


@pytest.mark.parametrize(
  "make",
  [
    lambda: jadam.adam(1e-3),
    lambda: jadam.adamw(1e-3),
    lambda: jadam.adam(1e-3, amsgrad=True),
    lambda: jadam.rmsprop(1e-3, centered=True),
    lambda: jadam.adagrad(1e-2),
  ],
  ids=["adam", "adamw", "amsgrad", "rmsprop_centered", "adagrad"],
)
def test_fp16_zero_gradient_gives_finite_updates(make):
  params = jnp.linspace(1.0, 2.0, 8, dtype=jnp.float16)
  tx = make()
  updates, state = jax.jit(tx.update)(jnp.zeros_like(params), tx.init(params), params)
  assert updates.dtype == jnp.float16
  chex.assert_tree_all_finite(updates)
  chex.assert_tree_all_finite(state)


def test_fp16_zero_gradient_optax_adam_gives_nan():
  """Documented contrast: optax.adam's eps=1e-8 rounds to 0 in float16, and 0 / 0 is NaN."""
  params = jnp.linspace(1.0, 2.0, 8, dtype=jnp.float16)
  tx = optax.adam(1e-3)
  with jax.numpy_dtype_promotion("standard"):
    updates, _ = tx.update(jnp.zeros_like(params), tx.init(params), params)
  assert np.all(np.isnan(np.asarray(updates, np.float32)))


ALL = {
  "adam": lambda: jadam.adam(1e-3, weight_decay=0.1, amsgrad=True),
  "adamw": lambda: jadam.adamw(1e-3),
  "sgd": lambda: jadam.sgd(1e-3, momentum=0.9, nesterov=True, weight_decay=0.1),
  "rmsprop": lambda: jadam.rmsprop(1e-3, centered=True, momentum=0.9, weight_decay=0.1),
  "adagrad": lambda: jadam.adagrad(1e-2, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.1),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_updates_come_back_in_each_leafs_dtype(name):
  with jax.enable_x64(True):
    params = {
      "f64": jnp.linspace(1.0, 2.0, 3, dtype=jnp.float64),
      "f32": jnp.linspace(1.0, 2.0, 3, dtype=jnp.float32),
      "bf16": jnp.linspace(1.0, 2.0, 3, dtype=jnp.bfloat16),
      "f16": jnp.linspace(1.0, 2.0, 3, dtype=jnp.float16),
    }
    grads = jax.tree.map(lambda p: (p - 1.5).astype(p.dtype), params)
    tx = ALL[name]()
    state0 = tx.init(params)
    updates, state1 = jax.jit(tx.update)(grads, state0, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1)
    chex.assert_tree_all_finite(updates)
    # The four leaves got (nearly) the same step: none was lost to a narrow dtype.
    f = {k: np.asarray(v, np.float64) for k, v in updates.items()}
    for k in ("f32", "bf16", "f16"):
      np.testing.assert_allclose(f[k], f["f64"], rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL))
def test_integer_boolean_and_none_leaves_do_not_move(name):
  params = {
    "w": jnp.linspace(1.0, 2.0, 3, dtype=jnp.float32),
    "i": jnp.arange(3, dtype=jnp.int32),
    "flag": jnp.array([True, False]),
    "frozen": None,
    "unused": jnp.ones(2, jnp.float32),
  }
  grads = {
    "w": jnp.full(3, 0.5, jnp.float32),
    "i": jnp.zeros(3, jnp.int32),
    "flag": np.zeros(2, jax.dtypes.float0),  # what jax.grad(..., allow_int=True) gives
    "frozen": None,
    "unused": None,  # a None gradient for an array parameter: a clear error, not a crash in optax.apply_updates
  }
  tx = ALL[name]()
  with pytest.raises(ValueError, match=r"the gradient at \['unused'\] is None, but the params hold float32\[2\]"):
    tx.update(grads, tx.init(params), params)
  grads["unused"] = jnp.zeros(2, jnp.float32)
  state0 = tx.init(params)
  step = jax.jit(tx.update)
  updates, state1 = step(grads, state0, params)
  updates2, state2 = step(grads, state1, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1, state2)
  assert updates["frozen"] is None
  chex.assert_trees_all_equal(updates["i"], jnp.zeros(3, jnp.int32))  # integer leaves do not move
  assert updates["flag"].dtype == jax.dtypes.float0
  assert updates["w"].dtype == jnp.float32 and np.all(np.asarray(updates["w"]) < 0)


def _set_counts(state, value):
  """Every `count` in a chain's state set to `value`."""

  def fix(path, leaf):
    name = getattr(path[-1], "name", None)
    return jnp.asarray(value, jnp.int32) if name == "count" else leaf

  return jax.tree_util.tree_map_with_path(fix, state)


def test_step_count_saturates_at_int32_max():
  params = jnp.linspace(1.0, 2.0, 4, dtype=jnp.float32)
  g = jnp.asarray([0.5, -1.0, 2.0, -0.25], jnp.float32)
  tx = jadam.adam(1e-2, amsgrad=True)
  state = _set_counts(tx.init(params), 2**31 - 2)
  step = jax.jit(tx.update)
  m = v = np.zeros(4)
  for _ in range(4):
    updates, state = step(g, state, params)
    # At t ~ 2**31 both corrections are 1: the update is m / (sqrt(v) + eps), by hand in float64.
    gg = np.asarray(g, np.float64)
    m, v = 0.9 * m + 0.1 * gg, 0.999 * v + 0.001 * gg * gg
    np.testing.assert_allclose(np.asarray(updates), -1e-2 * m / (np.sqrt(v) + 1e-8), rtol=1e-5)
  counts = [
    leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state) if getattr(path[-1], "name", None) == "count"
  ]
  assert counts and all(int(c) == 2**31 - 1 and c.dtype == jnp.int32 for c in counts)


def test_complex_params_are_their_real_and_imaginary_parts():
  """Complex leaves follow PyTorch's view_as_real rule: Adam on z is optax.adam on (Re z, Im z)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    p0 = jnp.asarray(rng.uniform(1, 2, 3) + 1j * rng.uniform(1, 2, 3))
    grads = [jnp.asarray(rng.normal(size=3) + 1j * rng.normal(size=3)) for _ in range(30)]

    def as_real(z):
      return jnp.stack([jnp.real(z), jnp.imag(z)])

    results = []
    for tx, promotion, view in ((jadam.adam(1e-2), "strict", lambda z: z), (optax.adam(1e-2), "standard", as_real)):
      with jax.numpy_dtype_promotion(promotion):
        p = view(p0)
        state = tx.init(p)
        for g in grads:
          u, state = jax.jit(tx.update)(view(g), state, p)
          p = optax.apply_updates(p, u)
        results.append(p)
    assert results[0].dtype == jnp.complex128
    chex.assert_trees_all_close(as_real(results[0]), results[1], rtol=1e-12, atol=0)
