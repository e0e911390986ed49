"""jadam._core.host_init: an optimizer's first state, its constants filled on the host, as eager init gives it."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam._core import host_init

_OPTIMIZERS = {
  "adam": lambda: jadam.adam(1e-3),
  "adam amsgrad bf16": lambda: jadam.adam(1e-3, amsgrad=True, mu_dtype=jnp.bfloat16),
  "adam8bit": lambda: jadam.adam8bit(1e-3),
  "adagrad": lambda: jadam.adagrad(1e-2, initial_accumulator_value=0.25),
  "torch AdamW groups": lambda: jadam.torch.AdamW([{"params": "a/.*"}, {"params": "b/.*", "lr": 1e-4}], lr=1e-3),
}


def _params(n=6):
  rng = np.random.default_rng(0)
  out = {"a": [jnp.asarray(rng.standard_normal((i + 2, 3)), jnp.float32) for i in range(n)]}
  out["b"] = {"w": jnp.asarray(rng.standard_normal(5000), jnp.float32), "k": jnp.arange(4)}
  return out


def _moments(state):
  (moments,) = [s for s in state if hasattr(s, "mu")]
  return moments


def _same_leaves(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert (a.dtype, a.shape, a.weak_type) == (b.dtype, b.shape, b.weak_type)
    assert a.committed == b.committed and a.devices() == b.devices()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_the_eager_state(name):
  tx = _OPTIMIZERS[name]()
  params = _params()
  with jax.disable_jit():  # eager init, one operation at a time: the reference
    want = jax.tree.map(jnp.asarray, tx.init(params))
  _same_leaves(tx.init(params), want)


def test_committed_parameters_give_committed_state():
  params = jax.device_put(_params(), jax.devices()[0])
  tx = jadam.adam(1e-3)
  state = tx.init(params)
  with jax.disable_jit():  # eager: moments committed as zeros_like commits them, counts not
    want = jax.tree.map(jnp.asarray, tx.init(params))
  _same_leaves(state, want)
  assert all(x.committed for x in jax.tree.leaves((_moments(state).mu, _moments(state).nu)))


def test_one_program_for_any_number_of_leaf_shapes(caplog):
  params = [jnp.ones((i + 1, 7), jnp.float32) for i in range(24)]  # 24 shapes: eager init compiles one each
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    state = jadam.adam(1e-3).init(params)
  compiles = [r for r in caplog.records if "Compiling" in r.getMessage()]
  assert len(compiles) <= 2, [r.getMessage()[:80] for r in compiles]
  assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(_moments(state)))


def test_under_transformations_init_runs_as_it_is():
  tx = jadam.adam(1e-3)
  params = _params()
  shapes = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(shapes) == jax.tree.structure(tx.init(params))
  _same_leaves(jax.jit(tx.init)(params), tx.init(params))
  closed_over = jax.jit(lambda: tx.init(params))()  # concrete parameters seen inside a jit
  _same_leaves(closed_over, tx.init(params))
  stacked = jax.vmap(tx.init)(jnp.ones((3, 5)))
  assert _moments(stacked).mu.shape == (3, 5)


def test_an_init_that_needs_concrete_values_runs_eagerly():
  def init(params):
    scale = float(jnp.max(params["w"]))  # a concrete value: not traceable
    return {"s": jnp.full_like(params["w"], scale)}

  params = {"w": jnp.arange(4.0)}
  np.testing.assert_array_equal(host_init.init(init, params)["s"], np.full(4, 3.0))


def test_other_operations_are_evaluated_eagerly():
  def init(params):
    return {"copy": jax.tree.map(lambda p: p * 2, params), "ones": jax.tree.map(jnp.ones_like, params)}

  params = _params(2)
  _same_leaves(host_init.init(init, params), init(params))
  tx = optax.chain(optax.ema(0.9, debias=False))
  _same_leaves(host_init.init(tx.init, params), tx.init(params))


def test_a_mesh_sharding_is_kept():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put({"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, sharding)
  state = jadam.adam(1e-3).init(params)
  assert all(m.sharding == sharding for m in jax.tree.leaves((_moments(state).mu, _moments(state).nu)))


@pytest.mark.parametrize("fused", [True, False])
def test_the_first_donated_step_updates_the_new_state_in_place(fused):
  """The moments made on the host live in buffers the device owns (not NumPy's memory wrapped zero-copy, which a
  donated step cannot reuse and would copy): the first donated step writes into them."""
  tx = jadam.adam(1e-3)
  params = {"w": jnp.zeros((1000, 64)), "b": jnp.zeros((64,))}
  state = tx.init(params)
  step = jadam.make_update_step(tx, fused=fused)

  def pointers(p, s):
    return sorted(x.unsafe_buffer_pointer() for x in jax.tree.leaves((p, s)) if x.size > 1)

  before = pointers(params, state)
  params, state = step(params, state, jax.tree.map(jnp.ones_like, params))
  assert pointers(params, state) == before
